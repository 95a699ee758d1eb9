"""Run untrusted code (a candidate program) in an isolated child process.

`run_task("package.module:function", kwargs, timeout=...)` imports and calls the function in a fresh
`python -m kernel_lab.worker` child and returns a `TaskResult`; whatever the code does (loops forever,
calls os._exit, segfaults, allocates without bound, floods stdout) the parent gets a result with a
one-line `error` naming the cause.

Isolation, and its limits:
- the child runs in its own session / process group; a hard wall-clock timeout sends SIGTERM to the
  whole group (the worker dumps its Python stack on SIGTERM, so the error names where it was stuck),
  then SIGKILL after a grace period; leftover descendants are killed when the task ends;
- memory: a parent-side psutil watchdog sums the RSS of the process tree (works on Linux, macOS, with
  Metal and CUDA, unlike RLIMIT_AS); `address_space_limit` additionally sets RLIMIT_AS in the child,
  which is only safe where no GPU driver reserves huge virtual ranges (the CPU backend on Linux);
- stdout/stderr go to files in a private temp dir (kept as head + tail), capped in size;
- on Linux the child is SIGKILLed if the parent dies (PR_SET_PDEATHSIG): no orphaned candidates;
- the working directory is a fresh temp dir, so files the code writes do not land next to the caller;
- the result comes back through a dedicated pipe (not stdout) tagged with a per-run random nonce
  that the worker reads from stdin, so printing a fake result does not forge one. Code running inside
  the worker could still find the nonce in memory; this guards against accidents and cheap tricks,
  not against a determined attacker (use a container or VM for that).

`device_lock()` is a cross-process lock (fcntl.flock) that timing phases take so that two candidates
are never timed on one device at the same time.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_KEEP_BYTES = 4096  # head and tail of stdout/stderr kept in a TaskResult (each)
OUTPUT_LIMIT_BYTES = 64 * 2**20  # a child writing more than this to stdout or stderr is killed
POLL_SECONDS = 0.05


@dataclass
class TaskResult:
    """What a child task returned: ok and value, or a one-line error (+ traceback)."""

    ok: bool
    value: object = None
    error: str = None
    traceback: str = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    returncode: int = None
    peak_rss: int = 0  # bytes, the largest RSS the watchdog saw over the process tree

    def to_dict(self):
        return asdict(self)


def cache_dir():
    """The user cache dir of kernel_lab ($KERNEL_LAB_CACHE, else $XDG_CACHE_HOME/kernel_lab)."""
    root = os.environ.get("KERNEL_LAB_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kernel_lab"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_memory_limit():
    """Half the machine's RAM, at most 16 GB: a candidate must never take the machine down."""
    return min(psutil.virtual_memory().total // 2, 16 * 2**30)


@contextlib.contextmanager
def device_lock(name="device", timeout=None):
    """Hold a cross-process exclusive lock while timing on the device.

    Uses fcntl.flock on `<cache_dir>/locks/<name>.lock` (released by the OS if the holder dies).
    Threads of one process exclude each other too, as each opens its own file description.
    Raises TimeoutError if `timeout` seconds pass without getting the lock.
    """
    import fcntl

    lock_path = cache_dir() / "locks" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    with open(lock_path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"could not take the device lock {lock_path} in {timeout} s")
                time.sleep(0.05)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield lock_path
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


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


def run_task(target, kwargs=None, *, timeout, memory_limit=None, cwd=None, env=None,
             address_space_limit=None, grace=3.0, echo_stderr=False, python=None):
    """Call `target` ("package.module:function") with `kwargs` in a fresh child process.

    kwargs and the return value must be JSON-serializable. `timeout` is a hard wall-clock limit in
    seconds; `memory_limit` caps the RSS of the child's process tree in bytes (None: half the RAM,
    at most 16 GB; 0: no cap); `cwd` defaults to a fresh temp dir removed afterwards; `env` entries
    are added to the inherited environment; `echo_stderr` copies the child's stderr live to ours
    (progress lines) while still capturing it. Never raises for anything the child does.
    """
    if not isinstance(target, str) or ":" not in target:
        raise ValueError(f"target must be 'package.module:function', got {target!r}")
    if timeout is None or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    memory_limit = default_memory_limit() if memory_limit is None else memory_limit
    nonce = secrets.token_hex(16)
    request = json.dumps({
        "target": target,
        "kwargs": kwargs or {},
        "nonce": nonce,
        "address_space_limit": address_space_limit,
        "parent_pid": os.getpid(),
    })

    scratch = Path(tempfile.mkdtemp(prefix="kernel_lab_task_"))
    work_dir = Path(cwd) if cwd else scratch / "cwd"
    work_dir.mkdir(parents=True, exist_ok=True)
    child_env = dict(os.environ)
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    child_env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ next to the candidate program
    child_env["PYTHONFAULTHANDLER"] = "1"

    read_fd, write_fd = os.pipe()
    result_chunks = []
    start = time.monotonic()
    try:
        with open(scratch / "stdout", "wb") as out_file, open(scratch / "stderr", "wb") as err_file:
            proc = subprocess.Popen(
                [python or sys.executable, "-m", "kernel_lab.worker", str(write_fd)],
                stdin=subprocess.PIPE, stdout=out_file, stderr=err_file, cwd=work_dir,
                env=child_env, pass_fds=(write_fd,), start_new_session=True,
            )
        os.close(write_fd)
        write_fd = None
        reader = threading.Thread(target=_drain, args=(read_fd, result_chunks), daemon=True)
        reader.start()
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(request.encode())
            proc.stdin.close()

        killed_for, peak_rss, descendants = _watch(
            proc, scratch, timeout, memory_limit, echo_stderr)
        if killed_for:
            _kill_group(proc, descendants, grace)
        else:
            _kill_leftovers(proc, descendants)  # grandchildren the code may have left running
        reader.join(timeout=5)
        seconds = time.monotonic() - start
        stdout = (scratch / "stdout").read_bytes()
        stderr = (scratch / "stderr").read_bytes()
        return _build_result(proc.returncode, killed_for, b"".join(result_chunks), nonce,
                             _clip_text(stdout), _clip_text(stderr), stderr, seconds, peak_rss,
                             timeout, memory_limit)
    finally:
        if write_fd is not None:
            os.close(write_fd)
        shutil.rmtree(scratch, ignore_errors=True)


def _drain(fd, chunks):
    with os.fdopen(fd, "rb") as pipe:
        while True:
            data = pipe.read(65536)
            if not data:
                return
            chunks.append(data)


def _watch(proc, scratch, timeout, memory_limit, echo_stderr):
    """Poll the child until it exits or must be killed; returns (reason or None, peak RSS, tree)."""
    deadline = time.monotonic() + timeout
    peak_rss = 0
    descendants = []
    echoed = 0
    while True:
        if proc.poll() is not None:
            return None, peak_rss, descendants
        tree = _process_tree(proc.pid)
        if tree:
            descendants = tree[1:] or descendants
        rss = _tree_rss(tree)
        peak_rss = max(peak_rss, rss)
        if memory_limit and rss > memory_limit:
            return (f"out of memory (RSS {_format_bytes(rss)} > limit "
                    f"{_format_bytes(memory_limit)})"), peak_rss, descendants
        for stream in ("stdout", "stderr"):
            size = (scratch / stream).stat().st_size
            if size > OUTPUT_LIMIT_BYTES:
                return (f"output limit exceeded ({_format_bytes(size)} on {stream} > "
                        f"{_format_bytes(OUTPUT_LIMIT_BYTES)})"), peak_rss, descendants
        if echo_stderr:
            echoed = _echo_new(scratch / "stderr", echoed)
        if time.monotonic() > deadline:
            return f"timeout after {timeout:g} s", peak_rss, descendants
        time.sleep(POLL_SECONDS)


def _echo_new(path, offset):
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(1 << 20)
    if data:
        sys.stderr.write(data.decode("utf-8", errors="replace"))
        sys.stderr.flush()
    return offset + len(data)


def _parse_result(raw, nonce):
    """The worker's message: the last JSON line carrying our nonce (anything else is ignored)."""
    for line in reversed(raw.decode("utf-8", errors="replace").splitlines()):
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict) and message.get("nonce") == nonce:
            return message
    return None


def _build_result(returncode, killed_for, raw, nonce, stdout, stderr, full_stderr, seconds,
                  peak_rss, timeout, memory_limit):
    common = dict(stdout=stdout, stderr=stderr, seconds=seconds, returncode=returncode,
                  peak_rss=peak_rss)
    if killed_for:
        where = stuck_location(full_stderr.decode("utf-8", errors="replace"))
        if killed_for.startswith("timeout") and where:
            killed_for += f" (stuck at {where})"
        return TaskResult(ok=False, error=killed_for, **common)
    message = _parse_result(raw, nonce)
    if message is not None and returncode == 0:
        if message.get("ok"):
            return TaskResult(ok=True, value=message.get("value"), **common)
        return TaskResult(ok=False, error=message.get("error"), traceback=message.get("traceback"),
                          **common)
    if returncode is not None and returncode < 0:
        error = f"killed by signal {_signal_name(-returncode)}"
        where = stuck_location(full_stderr.decode("utf-8", errors="replace"))
        if where:
            error += f" (at {where})"
        return TaskResult(ok=False, error=error, **common)
    if message is not None:  # a result was sent, then the process died with a non-zero status
        return TaskResult(ok=False, error=(message.get("error") or
                                           f"exited with status {returncode} after returning"),
                          traceback=message.get("traceback"), **common)
    if returncode == 0 and raw:
        error = "exited without a valid result (the result channel was tampered with)"
    else:
        error = (f"exited with status {returncode} without a result "
                 "(sys.exit / os._exit in the candidate)")
    return TaskResult(ok=False, error=error, **common)
