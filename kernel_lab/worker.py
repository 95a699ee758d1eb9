"""Child-process entry point of the sandbox: `python -m kernel_lab.worker RESULT_FD`.

Reads JSON lines from stdin: first {"nonce", "address_space_limit", "parent_pid"}, then one
request {"id", "target", "kwargs"} per call. For each it imports "package.module:function", calls
it with kwargs and writes one JSON line {"nonce", "id", "ok", "value" | "error", "traceback"} to
the file descriptor RESULT_FD; it exits when stdin closes (or after a sys.exit in a call). Only
`kernel_lab.sandbox` starts it (`run_task`: one call; `Session`: many).
"""

import faulthandler
import importlib
import json
import os
import signal
import sys
import traceback
from pathlib import Path

HARNESS_DIR = str(Path(__file__).resolve().parent)
HARNESS_FILES = {str(Path(__file__).resolve().parent.parent / "evaluator.py")}


def _limit_resources(address_space_limit):
    try:
        import resource
    except ImportError:  # not POSIX
        return
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # a segfaulting candidate leaves no core file
    if address_space_limit:
        resource.setrlimit(resource.RLIMIT_AS, (address_space_limit, address_space_limit))


def _die_with_parent(parent_pid):
    """Linux: get SIGKILL when the parent (the evaluator) dies, so no orphan keeps running."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid and os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(1)


def _is_harness_file(filename):
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return filename.startswith(HARNESS_DIR) or filename in HARNESS_FILES \
        or any(filename.startswith(p) for p in prefixes) or filename.startswith("<frozen")


def culprit_line(exc):
    """Where the error arose in user code: 'file.py:LINE: source' (innermost non-harness frame)."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        text = (exc.text or "").strip()
        return f"{Path(exc.filename).name}:{exc.lineno}: {text}" if text else \
            f"{Path(exc.filename).name}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if not _is_harness_file(frame.filename):
            source = (frame.line or "").strip()
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}: {source}"
    return None


def describe_exception(exc):
    """One line: 'Type: message (at file.py:LINE in func: source)'."""
    if isinstance(exc, SyntaxError) and exc.filename and exc.lineno:
        text = (exc.text or "").strip()
        return (f"{type(exc).__name__}: {exc.msg} at line {exc.lineno} of "
                f"{Path(exc.filename).name}" + (f": {text}" if text else ""))
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    where = culprit_line(exc)
    return f"{text} (at {where})" if where else text


def _call(request):
    """Run one request; the result message (without the nonce) and whether to exit afterwards."""
    message = {"id": request.get("id")}
    try:
        module_name, _, function_name = request["target"].partition(":")
        function = getattr(importlib.import_module(module_name), function_name)
        message.update(ok=True, value=function(**request["kwargs"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        where = culprit_line(exc)
        message.update(ok=False, traceback=traceback.format_exc(),
                       error=f"exited with status {code} (sys.exit in the candidate"
                             + (f" at {where})" if where else ")"))
        return message, True
    except BaseException as exc:  # noqa: BLE001 - everything the candidate raises is reported
        message.update(ok=False, error=describe_exception(exc), traceback=traceback.format_exc())
    return message, False


def main():
    result_fd = int(sys.argv[1])
    # Requests arrive on a private copy of stdin; fd 0 and sys.stdin point at /dev/null.
    requests = os.fdopen(os.dup(0), "r")
    hello = json.loads(requests.readline())
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    sys.stdin = open(os.devnull)
    nonce = hello["nonce"]
    result_pipe = os.fdopen(result_fd, "w")
    faulthandler.enable()  # stack dump on SIGSEGV / SIGABRT ...
    faulthandler.register(signal.SIGTERM, chain=True)  # ... and on the parent's timeout
    _limit_resources(hello.get("address_space_limit"))
    _die_with_parent(hello.get("parent_pid"))

    for line in requests:
        if not line.strip():
            continue
        message, leave = _call(json.loads(line))
        message["nonce"] = nonce
        result_pipe.write(_safe_dumps(message) + "\n")
        result_pipe.flush()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - the candidate may have closed or replaced it
                pass
        if leave:
            break
    os._exit(0)  # skip interpreter teardown: atexit hooks of the candidate do not run


def _safe_dumps(message):
    try:
        return json.dumps(message)
    except (TypeError, ValueError) as exc:
        fallback = {"nonce": message["nonce"], "id": message.get("id"), "ok": False,
                    "error": f"the task's result is not JSON-serializable: {exc}"}
        return json.dumps(fallback)


if __name__ == "__main__":
    main()
