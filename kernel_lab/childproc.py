"""The child-process plumbing under kernel_lab.sandbox: process trees and killing them, reading a
child's pipe and output files, and saying why a child ended (signal, exit, the line it was stuck at)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_KEEP_BYTES = 4096  # head and tail of stdout/stderr kept in a TaskResult (each)


def _format_bytes(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _clip_text(data, keep=OUTPUT_KEEP_BYTES):
    """Head and tail of captured output, decoded leniently."""
    if len(data) > 2 * keep:
        skipped = len(data) - 2 * keep
        data = data[:keep] + f"\n[... {skipped} bytes cut ...]\n".encode() + data[-keep:]
    return data.decode("utf-8", errors="replace")


def _process_tree(pid):
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def _tree_rss(processes):
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def _kill_group(proc, known_descendants, grace):
    """SIGTERM the child's process group, wait `grace` s, then SIGKILL it and any stray descendant."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _kill_leftovers(proc, known_descendants)
    proc.wait()


def _kill_leftovers(proc, known_descendants):
    """SIGKILL the process group and descendants seen earlier (some may have left the group)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for child in known_descendants:
        with contextlib.suppress(psutil.Error):
            child.kill()


_STACK_LINE = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')


def stuck_location(stderr_text):
    """From a faulthandler dump (most recent call first), the first frame outside the harness."""
    frames = _STACK_LINE.findall(stderr_text or "")
    harness = str(REPO_ROOT / "kernel_lab")
    prefixes = {sys.prefix, sys.base_prefix}
    for filename, line, func in frames:
        if filename.startswith(harness) or filename == str(REPO_ROOT / "evaluator.py") \
                or any(filename.startswith(p) for p in prefixes):
            continue
        return f"{Path(filename).name}:{line} in {func}"
    if frames:
        filename, line, func = frames[0]
        return f"{Path(filename).name}:{line} in {func}"
    return None


def _signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _exit_error(returncode, raw, full_stderr):
    """Why a child ended without a result for the running call."""
    if returncode is not None and returncode < 0:
        error = f"killed by signal {_signal_name(-returncode)}"
        where = stuck_location(full_stderr.decode("utf-8", errors="replace"))
        return error + (f" (at {where})" if where else "")
    if returncode == 0 and raw:
        return "exited without a valid result (the result channel was tampered with)"
    return f"exited with status {returncode} without a result (sys.exit / os._exit in the candidate)"


def _drain(fd, chunks, arrived=None):
    """Read a child's result pipe into `chunks` until it closes; set `arrived` at each read."""
    with os.fdopen(fd, "rb") as pipe:
        while True:
            data = pipe.read1(65536) if hasattr(pipe, "read1") else pipe.read(65536)
            if data:
                chunks.append(data)
            if arrived is not None:
                arrived.set()
            if not data:
                return


def _echo_new(path, offset):
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(1 << 20)
    if data:
        sys.stderr.write(data.decode("utf-8", errors="replace"))
        sys.stderr.flush()
    return offset + len(data)


def _parse_messages(raw, nonce):
    """The worker's messages: JSON lines carrying our nonce (anything else is ignored)."""
    found = []
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("nonce") == nonce:
            found.append(message)
    return found
