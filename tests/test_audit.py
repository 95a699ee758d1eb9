"""kernel_lab.audit: what a candidate program's own code may not do, decided by where the call comes from.

The audit hook is process-wide and cannot be removed, so each test runs it in a sandbox child
(tests/hostile/audit_tasks.py) on a probe program written here.
"""

from pathlib import Path

import pytest

from kernel_lab.sandbox import run_task

ENV = {"PYTHONPATH": str(Path(__file__).resolve().parent / "hostile")}

# name -> statement run inside the program's attempts(); each must be refused with this text.
ATTACKS = {
    "getframe": ("sys._getframe()", "read the call stack"),
    "inspect_stack": ("inspect.stack()", "read the call stack"),
    "currentframe": ("inspect.currentframe()", "read the call stack"),
    "extract_stack": ("traceback.extract_stack()", "read the call stack"),
    "logging_currentframe": ("logging.currentframe()", "read the call stack"),
    "tb_frame": ("_traceback().tb_frame", "read frames (tb_frame"),
    "gi_frame": ("_generator().gi_frame", "read frames (gi_frame"),
    "gc_objects": ("gc.get_objects()", "walked the heap (gc.get_objects)"),
    "gc_referrers": ("gc.get_referrers(sys)", "walked the heap (gc.get_referrers)"),
    "current_frames": ("sys._current_frames()", "read the call stacks"),
    "settrace": ("sys.settrace(None)", "installed a trace function"),
    "setprofile": ("sys.setprofile(None)", "installed a profile function"),
    "thread": ("threading.Thread(target=print).start()", "started a thread"),
    "raw_thread": ("_thread.start_new_thread(print, ())", "started a thread"),
    "popen": ("subprocess.Popen(['true'])", "created a process (subprocess.Popen)"),
    "run": ("subprocess.run(['true'])", "created a process (subprocess.Popen)"),
    "system": ("os.system('true')", "created a process (os.system)"),
    "fork": ("os.fork()", "created a process (os.fork)"),
    "posix_spawn": ("os.posix_spawn('/bin/true', ['true'], {})", "created a process (os.posix_spawn)"),
    "execv": ("os.execv('/bin/true', ['true'])", "created a process (os.exec)"),
    "kill": ("os.kill(os.getpid(), 0)", "sent a signal"),
    "signal": ("signal.signal(signal.SIGALRM, print)", "installed a signal handler or timer"),
    "setitimer": ("signal.setitimer(signal.ITIMER_REAL, 60)", "installed a signal handler or timer"),
    "open_write": ("open(HERE / 'w.txt', 'w')", "for writing"),
    "open_append": ("open(HERE / 'w.txt', 'a')", "for writing"),
    "os_open_write": ("os.open(HERE / 'w.txt', os.O_WRONLY | os.O_CREAT)", "for writing"),
    "pathlib_write": ("(HERE / 'w.txt').write_text('x')", "for writing"),
    "mkdir": ("os.mkdir(HERE / 'd')", "changed the file system (os.mkdir)"),
    "remove": ("os.remove(HERE / 'probe.py')", "changed the file system (os.remove)"),
    "compile_as_harness": ("compile('x = 1', KERNEL_LAB + '/microbench.py', 'exec')",
                           "compiled code under another file's name"),
    "compile_as_stdlib": ("compile('x = 1', collections.__file__, 'exec')", "compiled code under another file's name"),
    "hidden_code": ("exec(compile('import sys; sys._getframe()', '<hidden>', 'exec'))", "read the call stack"),
    "code_replace": ("attempts.__code__.replace(co_filename='/x.py')", "built a code object by hand"),
    "marshal": ("marshal.loads(marshal.dumps(1))", "loaded code with marshal"),
    "ctypes": ("ctypes.string_at(id(HERE), 8)", "called ctypes"),
}
# Standard-library helpers that peek at their caller's frame: allowed when the program calls them.
ALLOWED = {
    "namedtuple": "collections.namedtuple('P', 'a b')",
    "typing": "typing.NamedTuple('R', [('x', int)])",
    "typevar": "typing.TypeVar('T')",
    "enum": "enum.Enum('E', 'A B')",
    "dataclass": "dataclasses.make_dataclass('D', ['x'])",
    "logging": "logging.getLogger('probe').debug('hello')",
    "warnings": "warnings.warn('probe')",
    "read_file": "open(HERE / 'probe.py').read()",
    "exec_string": "exec('y = 1')",
    "functools": "functools.lru_cache()(abs)(-1)",
}

PROBE = '''
import collections, ctypes, dataclasses, enum, functools, gc, inspect, logging, marshal, os, signal
import subprocess, sys, threading, _thread, traceback, typing, warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
KERNEL_LAB = {kernel_lab!r}
P = collections.namedtuple("P", "a b")  # at import too
warnings.simplefilter("ignore")


def _traceback():
    try:
        raise ValueError
    except ValueError as exc:
        return exc.__traceback__


def _generator():
    yield 1


def attempts():
    outcomes = {{}}
{lines}
    return outcomes
'''


def _write_probe(tmp_path, statements):
    lines = []
    for name, statement in statements.items():
        lines += [f"    try:", f"        {statement}", f"        outcomes[{name!r}] = 'allowed'",
                  f"    except BaseException as exc:",
                  f"        outcomes[{name!r}] = type(exc).__name__ + ': ' + str(exc)"]
    kernel_lab = str(Path(__file__).resolve().parent.parent / "kernel_lab")
    path = tmp_path / "probe.py"
    path.write_text(PROBE.format(kernel_lab=kernel_lab, lines="\n".join(lines)))
    return path


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("audit")
    silent = {"addaudithook": "sys.addaudithook(lambda *a: None)"}  # Python swallows the refusal
    program = _write_probe(tmp_path, {**{k: v[0] for k, v in ATTACKS.items()}, **ALLOWED, **silent})
    result = run_task("audit_tasks:probe", {"program": str(program)}, timeout=60, env=ENV)
    assert result.ok, result.error + (result.traceback or "")
    return result.value, tmp_path


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_refused_and_named(probed, name):
    outcome = probed[0]["outcomes"][name]
    assert outcome.startswith("AuditViolation: audit: the program "), outcome
    assert ATTACKS[name][1] in outcome, outcome
    assert "probe.py:" in outcome and "in attempts" in outcome, outcome


@pytest.mark.parametrize("name", sorted(ALLOWED))
def test_standard_helpers_keep_working(probed, name):
    assert probed[0]["outcomes"][name] == "allowed"


def test_swallowed_attempts_are_recorded_and_the_harness_stays_free(probed):
    value, tmp_path = probed
    assert value["check"].startswith("audit: the program ") and "more)" in value["check"]
    assert len(value["violations"]) >= len(ATTACKS)
    assert any("added an audit hook" in v for v in value["violations"])  # refused silently by Python
    assert not (tmp_path / "w.txt").exists() and not (tmp_path / "d").exists()
    assert (tmp_path / "probe.py").exists() and (tmp_path / "harness.txt").exists()


def test_a_quiet_program_passes(tmp_path):
    program = _write_probe(tmp_path, ALLOWED)
    result = run_task("audit_tasks:quiet", {"program": str(program)}, timeout=60, env=ENV)
    assert result.ok and result.value == [], result.error


def test_threads_the_harness_starts_are_allowed(tmp_path):
    program = _write_probe(tmp_path, ALLOWED)
    result = run_task("audit_tasks:harness_thread_keeps_running", {"program": str(program)},
                      timeout=60, env=ENV)
    assert result.ok and result.value is None, (result.error, result.value)


def test_guards_verify_reports_a_swallowed_attempt(tmp_path):
    program = _write_probe(tmp_path, {"thread": ATTACKS["thread"][0]})
    result = run_task("audit_tasks:through_guards", {"program": str(program)}, timeout=60, env=ENV)
    assert result.ok, result.error
    assert result.value.startswith("audit: the program started a thread at probe.py:")
