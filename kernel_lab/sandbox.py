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

`device_lock()` (kernel_lab/machine.py) is a cross-process lock (fcntl.flock) that timing phases take
so that two candidates are never timed on one device at the same time. The process plumbing (trees,
kills, pipes, why a child ended) is in kernel_lab/childproc.py.
"""

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from .machine import cache_dir, device_lock, ptx_cache_dir  # noqa: F401  (part of this module's API)
from .childproc import (  # noqa: F401  (stuck_location is part of this module's API)
    _clip_text, _drain, _echo_new, _exit_error, _format_bytes, _kill_group,
    _kill_leftovers, _parse_messages, _process_tree, _tree_rss, stuck_location,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
OUTPUT_LIMIT_BYTES = 64 * 2**20  # a child writing more than this to stdout or stderr is killed
POLL_SECONDS = 0.05  # the watchdog's round (memory, output, deadlines); results wake it at once
_ARRIVED = threading.Event()  # set by any session's pipe reader: a result (or an exit) came in


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


def default_memory_limit():
    """Half the machine's RAM, at most 16 GB: a candidate must never take the machine down."""
    return min(psutil.virtual_memory().total // 2, 16 * 2**30)


def _child_env(env):
    child_env = dict(os.environ)
    child_env.setdefault("MLX_PTX_CACHE_DIR", str(ptx_cache_dir()))
    child_env.update(env or {})
    child_env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + [p for p in child_env.get("PYTHONPATH", "").split(os.pathsep) if p])
    child_env["PYTHONDONTWRITEBYTECODE"] = "1"  # no __pycache__ next to the candidate program
    child_env["PYTHONFAULTHANDLER"] = "1"
    return child_env


class Session:
    """A long-lived isolated child (`python -m kernel_lab.worker`) that serves several calls.

    State kept by the called functions (a loaded program, a model, compiled steps) survives from
    one call to the next, so a coordinator can interleave short timed calls of several sessions.
    Each call has its own wall-clock limit; a call that runs past it, or a child that exceeds the
    memory or output limits, gets the whole process group killed, and every later call fails with
    that reason. Results come back through the nonce-tagged pipe, as for `run_task`.
    """

    def __init__(self, *, memory_limit=None, cwd=None, env=None, address_space_limit=None,
                 grace=3.0, echo_stderr=False, python=None):
        self.memory_limit = default_memory_limit() if memory_limit is None else memory_limit
        self.grace, self.echo_stderr = grace, echo_stderr
        self.nonce = secrets.token_hex(16)
        self.scratch = Path(tempfile.mkdtemp(prefix="kernel_lab_task_"))
        work_dir = Path(cwd) if cwd else self.scratch / "cwd"
        work_dir.mkdir(parents=True, exist_ok=True)
        self._messages, self._next_id, self._pending = {}, 0, None
        self._buffer, self._raw_seen = b"", False
        self.dead = None  # why the child is gone (None while it serves calls)
        self.peak_rss, self._descendants, self._echoed = 0, [], 0
        self._offsets = (0, 0)
        read_fd, write_fd = os.pipe()
        try:
            with open(self.scratch / "stdout", "wb") as out, open(self.scratch / "stderr", "wb") as err:
                self.proc = subprocess.Popen(
                    [python or sys.executable, "-m", "kernel_lab.worker", str(write_fd)],
                    stdin=subprocess.PIPE, stdout=out, stderr=err, cwd=work_dir,
                    env=_child_env(env), pass_fds=(write_fd,), start_new_session=True,
                )
        finally:
            os.close(write_fd)
        self._chunks = []
        self._reader = threading.Thread(target=_drain, args=(read_fd, self._chunks, _ARRIVED),
                                        daemon=True)
        self._reader.start()
        self._send({"nonce": self.nonce, "address_space_limit": address_space_limit,
                    "parent_pid": os.getpid()})

    # -------------------------------------------------------------- calls

    def _send(self, message):
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # the child is gone; the next poll says why

    def submit(self, target, kwargs=None):
        """Start `target` ("package.module:function") with `kwargs` in the child; returns at once."""
        if not isinstance(target, str) or ":" not in target:
            raise ValueError(f"target must be 'package.module:function', got {target!r}")
        if self._pending is not None:
            raise RuntimeError("a call is still running in this session")
        self._next_id += 1
        self._pending = self._next_id
        self._call_start = time.monotonic()
        self._offsets = tuple(self._size(s) for s in ("stdout", "stderr"))
        if self.dead is None:
            self._send({"id": self._pending, "target": target, "kwargs": kwargs or {}})

    def wait(self, timeout):
        """The running call's TaskResult, waiting at most `timeout` seconds (then the child dies)."""
        return wait_all([self], timeout)[0]

    def call(self, target, kwargs=None, *, timeout):
        """submit + wait: one call's TaskResult."""
        if timeout is None or timeout <= 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.submit(target, kwargs)
        return self.wait(timeout)

    def close(self):
        """End the child (stdin closed, then the group killed) and remove its scratch folder."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, ValueError):
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                pass
        _kill_leftovers(self.proc, self._descendants)
        self.proc.wait()
        self._reader.join(timeout=5)
        shutil.rmtree(self.scratch, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- watching

    def _size(self, stream):
        try:
            return (self.scratch / stream).stat().st_size
        except OSError:
            return 0

    def _message(self):
        """The result message of the pending call, if it has arrived."""
        while self._chunks:
            self._buffer += self._chunks.pop(0)
        if b"\n" in self._buffer:
            complete, _, self._buffer = self._buffer.rpartition(b"\n")
            self._raw_seen = True
            for message in _parse_messages(complete, self.nonce):
                self._messages[message.get("id")] = message
        return self._messages.pop(self._pending, None)

    def _poll(self, deadline):
        """One watchdog round; the pending call's TaskResult once it is known, else None."""
        message = self._message()
        if message is not None:
            return self._finish(message=message)
        if self.dead is not None or self.proc.poll() is not None:
            self._reader.join(timeout=5)  # the pipe closes with the child: read what it sent
            message = self._message()
            return self._finish(message=message, exited=message is None)
        tree = _process_tree(self.proc.pid)
        if tree:
            self._descendants = tree[1:] or self._descendants
        rss = _tree_rss(tree)
        self.peak_rss = max(self.peak_rss, rss)
        reason = None
        if self.memory_limit and rss > self.memory_limit:
            reason = (f"out of memory (RSS {_format_bytes(rss)} > limit "
                      f"{_format_bytes(self.memory_limit)})")
        for stream in ("stdout", "stderr"):
            size = self._size(stream)
            if size > OUTPUT_LIMIT_BYTES:
                reason = (f"output limit exceeded ({_format_bytes(size)} on {stream} > "
                          f"{_format_bytes(OUTPUT_LIMIT_BYTES)})")
        if self.echo_stderr:
            self._echoed = _echo_new(self.scratch / "stderr", self._echoed)
        if reason is None and time.monotonic() > deadline:
            reason = f"timeout after {deadline - self._call_start:g} s"
        if reason is None:
            return None
        _kill_group(self.proc, self._descendants, self.grace)
        self.dead = reason
        return self._finish(killed_for=reason)

    def _finish(self, message=None, killed_for=None, exited=False):
        if self.echo_stderr:
            self._echoed = _echo_new(self.scratch / "stderr", self._echoed)
        stdout = (self.scratch / "stdout").read_bytes()[self._offsets[0]:]
        full_stderr = (self.scratch / "stderr").read_bytes()
        stderr = full_stderr[self._offsets[1]:]
        common = dict(stdout=_clip_text(stdout), stderr=_clip_text(stderr),
                      seconds=time.monotonic() - self._call_start, returncode=self.proc.returncode,
                      peak_rss=self.peak_rss)
        self._pending = None
        if killed_for:
            where = stuck_location(stderr.decode("utf-8", errors="replace"))
            if killed_for.startswith("timeout") and where:
                killed_for += f" (stuck at {where})"
            return TaskResult(ok=False, error=killed_for, **common)
        if self.dead is not None and message is None:
            return TaskResult(ok=False, error=f"the child had already ended: {self.dead}", **common)
        if message is not None and message.get("ok"):
            return TaskResult(ok=True, value=message.get("value"), **common)
        if message is not None:
            if exited or self.proc.poll() is not None:
                self.dead = message.get("error") or "exited"
            return TaskResult(ok=False, error=message.get("error"),
                              traceback=message.get("traceback"), **common)
        self.dead = error = _exit_error(self.proc.returncode, self._raw_seen or self._buffer, full_stderr)
        return TaskResult(ok=False, error=error, **common)


def wait_all(sessions, timeout):
    """Wait for the running call of every session (at most `timeout` s each); their TaskResults.

    Children that run at the same time are watched together, e.g. two programs compiling while
    nothing is being timed."""
    deadlines = {id(s): s._call_start + timeout for s in sessions}
    results = {}
    while len(results) < len(sessions):
        _ARRIVED.clear()  # cleared before polling: a result that comes in after the poll wakes the wait
        for session in sessions:
            if id(session) not in results:
                result = session._poll(deadlines[id(session)])
                if result is not None:
                    results[id(session)] = result
        if len(results) < len(sessions):
            _ARRIVED.wait(POLL_SECONDS)
    return [results[id(s)] for s in sessions]


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
    spawned = time.monotonic()
    session = Session(memory_limit=memory_limit, cwd=cwd, env=env,
                      address_space_limit=address_space_limit, grace=grace,
                      echo_stderr=echo_stderr, python=python)
    try:
        result = session.call(target, kwargs, timeout=timeout)
        result.seconds = time.monotonic() - spawned  # the child's start-up included
    finally:
        session.close()  # also kills grandchildren the code left running
    if result.returncode is None:
        result.returncode = session.proc.returncode
    return result
