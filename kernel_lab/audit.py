"""An audit hook for a candidate's child: what the program's own code may not do.

    audit.install(program_path)   # in the child, before guards.snapshot() and the program's import
    ...                           # import and run the program
    audit.check()                 # raises AuditViolation naming the first attempt and where (file:line);
                                  # kernel_lab.guards.verify() calls it first, so one line wires a stage

Forbidden to the program's code: starting threads; creating processes (fork, posix_spawn, exec*,
system, subprocess); sending signals or installing signal handlers and timers (they would run its
code while something else is timed); reading frames (sys._getframe, inspect/traceback stacks,
tb_frame / gi_frame / cr_frame, sys._current_frames) or the heap (gc.get_objects / get_referrers /
get_referents); trace, profile and audit hooks; opening files for writing and other file-system
changes; ctypes; building or loading code objects by hand (code.replace, marshal), compiling code
under another file's name (to pass for the harness or the standard library).

"The program's code" = frames whose co_filename is the program file (or a '<...>' name the program
compiled itself). Frame and heap reads are judged by the direct caller, skipping inspect, traceback,
asyncio and logging.currentframe, so standard-library helpers that peek at their caller's frame
(namedtuple, typing, enum, warnings, logging) keep working when the program calls them; the rest is
forbidden while any program frame is on the stack (a helper cannot start a thread on its behalf).
An attempt raises AuditViolation at once AND is recorded, so catching the exception does not help:
`check()` raises again. Python 3.11 audits no thread start: `_thread.start_new_thread` (and
threading's reference to it) are wrapped, `kernel_lab.guards` sees if they are swapped back, and
`check()` looks for live threads that neither ran before `install` nor were started by the harness
through the wrapper (mlx-lm's progress display starts one).

What it cannot stop: code in the same process run by a determined attacker. C extensions (and
cffi) raise no audit events; a function's `__closure__` or a module's globals reach the original
functions behind these wrappers; a stdlib helper not listed above that hands a frame to its caller
(e.g. a traceback object's frames reached some other way) gets past the direct-caller rule; stack
*information* (file names and lines) still leaks through warnings' stacklevel and faulthandler.
Isolation against that needs a separate process (which timing has: stock is never in this process
during stage 2) or a container.
"""

import _signal
import _thread
import os
import sys
import threading
from pathlib import Path

HARNESS_DIR = str(Path(__file__).resolve().parent)
HARNESS_FILES = (str(Path(HARNESS_DIR).parent / "evaluator.py"),)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
PROCESS_EVENTS = {"os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec", "os.system",
                  "subprocess.Popen", "pty.spawn", "os.startfile"}
FILE_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link", "os.truncate",
               "os.chmod", "os.chown", "os.utime", "os.chflags", "os.lchflags", "shutil.rmtree",
               "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree", "shutil.move",
               "shutil.chown", "shutil.make_archive", "shutil.unpack_archive"}
ANY_FRAME_EVENTS = {  # forbidden while any program frame is on the stack: event -> what
    **{e: f"created a process ({e})" for e in PROCESS_EVENTS},
    **{e: f"changed the file system ({e})" for e in FILE_EVENTS},
    "os.kill": "sent a signal (os.kill)", "os.killpg": "sent a signal (os.killpg)",
    "signal.pthread_kill": "sent a signal (signal.pthread_kill)",
    "sys.settrace": "installed a trace function (sys.settrace)",
    "sys.setprofile": "installed a profile function (sys.setprofile)",
    "sys.addaudithook": "added an audit hook (sys.addaudithook)",
}
CALLER_EVENTS = {  # forbidden when the (effective) direct caller is the program: event -> what
    "sys._getframe": "read the call stack (sys._getframe / inspect / traceback)",
    "sys._current_frames": "read the call stacks (sys._current_frames)",
    "gc.get_objects": "walked the heap (gc.get_objects)",
    "gc.get_referrers": "walked the heap (gc.get_referrers)",
    "gc.get_referents": "walked the heap (gc.get_referents)",
    "code.__new__": "built a code object by hand (code.replace / types.CodeType)",
    "marshal.loads": "loaded code with marshal", "marshal.load": "loaded code with marshal",
}
FRAME_ATTRIBUTES = {"tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back"}
WATCHED = set(ANY_FRAME_EVENTS) | set(CALLER_EVENTS) | {"open", "compile", "exec", "object.__getattr__"}


class AuditViolation(PermissionError):
    """The program did something a candidate may not do (see the module docstring)."""


_STATE = {"program": None, "own": set(), "violations": [], "busy": False, "threads": set(),
          "transparent": set(), "transparent_dirs": ()}


def _is_program(code):
    return code.co_filename in _STATE["own"]


def _program_frame(frame):
    """The innermost program frame on the stack from `frame` up, or None."""
    while frame is not None:
        if _is_program(frame.f_code):
            return frame
        frame = frame.f_back
    return None


def _effective_caller(frame):
    """The first frame from `frame` up that is not a frame-handing helper (inspect, traceback ...)."""
    while frame is not None:
        name = frame.f_code.co_filename
        if (frame.f_code.co_filename, frame.f_code.co_name) not in _STATE["transparent"] \
                and name not in _STATE["transparent"] and not name.startswith(_STATE["transparent_dirs"]):
            return frame
        frame = frame.f_back
    return None


def _where(frame):
    """'file.py:LINE in function', and the program's own line when the code was compiled by it."""
    where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} in {frame.f_code.co_name}"
    outer = frame
    while outer is not None and outer.f_code.co_filename != _STATE["program"]:
        outer = outer.f_back
    if outer is not None and outer is not frame:
        where += f" (code compiled by the program, run from {_where(outer)})"
    return where


def _deny(what, frame):
    message = f"audit: the program {what} at {_where(frame)} (not allowed in a candidate program)"
    _STATE["violations"].append(message)
    raise AuditViolation(message)


def _pseudo(filename):
    return filename.startswith("<") and filename.endswith(">")


def _same_source(filename, source):
    """Is `source` (bytes or str) what `filename` holds on disk?"""
    try:
        data = Path(filename).read_bytes()
    except OSError:
        return False
    if isinstance(source, str):
        return data.decode("utf-8", errors="replace") == source
    return isinstance(source, (bytes, bytearray)) and bytes(source) == data


def _check_code(event, args, caller, program_frame):
    """compile / exec: no code under a file name that is neither the program's nor a '<...>' one."""
    if event == "compile":
        source, filename = args
        filename = os.fsdecode(filename) if isinstance(filename, (str, bytes, os.PathLike)) else str(filename)
        if caller is not None and _is_program(caller.f_code):
            if _pseudo(filename):
                _STATE["own"].add(filename)  # code the program compiles stays the program's
            elif filename != _STATE["program"]:
                _deny(f"compiled code under another file's name ({filename})", caller)
        elif not _pseudo(filename) and filename != _STATE["program"] and not _same_source(filename, source):
            _deny(f"compiled code under the name of {filename}, which holds other code", program_frame)
    elif caller is not None and _is_program(caller.f_code):  # exec of a code object
        filename = getattr(args[0], "co_filename", "")
        if not _pseudo(filename) and filename not in _STATE["own"]:
            _deny(f"executed code compiled under another file's name ({filename})", caller)


def _hook(event, args):
    if _STATE["busy"] or (event not in WATCHED and not event.startswith("ctypes.")):
        return
    if event == "object.__getattr__" and args[1] not in FRAME_ATTRIBUTES:
        return
    if event == "open" and not (args[2] & WRITE_FLAGS or (args[1] and set(args[1]) & set("wax+"))):
        return
    _STATE["busy"] = True  # sys._getframe below raises an event of its own
    try:
        frame = sys._getframe(1)
        program_frame = _program_frame(frame)
        if program_frame is None:
            return
        if event in ANY_FRAME_EVENTS or event.startswith("ctypes."):
            _deny(ANY_FRAME_EVENTS.get(event, f"called ctypes ({event})"), program_frame)
        if event == "open":
            _deny(f"opened {args[0]!s} for writing", program_frame)
        caller = _effective_caller(frame)
        if event in ("compile", "exec"):
            _check_code(event, args, caller, program_frame)
        elif caller is not None and _is_program(caller.f_code):
            what = CALLER_EVENTS.get(event) or f"read frames ({args[1]} of {type(args[0]).__name__})"
            _deny(what, caller)
    finally:
        _STATE["busy"] = False


def _live_threads():
    """Idents of every live thread (sys._current_frames, looked at without an audit event)."""
    busy, _STATE["busy"] = _STATE["busy"], True
    try:
        return set(sys._current_frames())
    finally:
        _STATE["busy"] = busy


def _guarded(original, what, thread=False):
    """A wrapper of a thread or signal function that refuses calls from the program's code (a
    thread the harness starts, with no program frame on the stack, is remembered as allowed)."""

    def wrapper(*args, **kwargs):
        if not _STATE["busy"]:
            _STATE["busy"] = True  # no audit event for our own look at the stack
            try:
                frame = _program_frame(sys._getframe(1))
            finally:
                _STATE["busy"] = False
            if frame is not None:
                _deny(what, frame)
        result = original(*args, **kwargs)
        if thread:  # start_new_thread returns the new thread's ident, start_joinable_thread a handle
            _STATE["threads"].add(getattr(result, "ident", result))
        return result

    wrapper.__name__ = getattr(original, "__name__", "wrapper")
    wrapper.__doc__ = getattr(original, "__doc__", None)
    return wrapper


def _wrap_threads_and_signals():
    start = _guarded(_thread.start_new_thread, "started a thread", thread=True)
    _thread.start_new_thread = start
    if getattr(threading, "_start_new_thread", None) is not None:
        threading._start_new_thread = start
    if hasattr(_thread, "start_joinable_thread"):  # Python 3.13+: threading starts threads here
        joinable = _guarded(_thread.start_joinable_thread, "started a thread", thread=True)
        _thread.start_joinable_thread = threading._start_joinable_thread = joinable
    if hasattr(_thread, "start_new"):
        _thread.start_new = start
    import signal

    for name in ("signal", "setitimer", "alarm", "set_wakeup_fd", "siginterrupt"):
        original = getattr(_signal, name, None)
        if original is None:
            continue
        wrapped = _guarded(original, f"installed a signal handler or timer (signal.{name})")
        if getattr(signal, name, None) is original:
            setattr(signal, name, wrapped)
        setattr(_signal, name, wrapped)


def install(program_path):
    """Watch the program at `program_path` from now on (once per process; later calls add files)."""
    program = str(Path(program_path).resolve())
    _STATE["own"].add(program)
    if _STATE["program"] is not None:
        return
    import asyncio
    import inspect
    import logging
    import traceback

    _STATE["program"] = program
    _STATE["transparent"] = {inspect.__file__, traceback.__file__,
                             (logging.currentframe.__code__.co_filename, logging.currentframe.__code__.co_name)}
    _STATE["transparent_dirs"] = (str(Path(asyncio.__file__).parent) + os.sep,)
    _STATE["threads"] = _live_threads()
    _wrap_threads_and_signals()
    sys.addaudithook(_hook)


def violations():
    """Every attempt recorded so far (messages)."""
    return list(_STATE["violations"])


def check():
    """Raise AuditViolation for the first recorded attempt, or for a thread the harness did not start."""
    if _STATE["violations"]:
        extra = len(_STATE["violations"]) - 1
        raise AuditViolation(_STATE["violations"][0] + (f" (and {extra} more)" if extra else ""))
    unexplained = _live_threads() - _STATE["threads"] if _STATE["program"] is not None else set()
    if unexplained:
        names = [t.name for t in threading.enumerate() if t.ident in unexplained] or \
            [f"ident {i}" for i in sorted(unexplained)]
        raise AuditViolation(f"audit: a thread the harness did not start is running ({', '.join(names)}): "
                             "candidate programs may not start threads")
