"""Child-process tasks for tests/test_audit.py: kernel_lab.audit watching a probe program."""

import importlib.util
import inspect
import os
import threading


def probe(program):
    """Install the audit for `program`, import it, run its `attempts()`; what was refused and allowed."""
    from kernel_lab import audit

    audit.install(program)
    spec = importlib.util.spec_from_file_location("audit_probe", program)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    outcomes = module.attempts()
    try:
        audit.check()
        check = None
    except audit.AuditViolation as exc:
        check = str(exc)
    # The harness itself stays free: frames, threads, files.
    thread = threading.Thread(target=lambda: None)
    thread.start()
    thread.join()
    with open(os.path.join(os.path.dirname(program), "harness.txt"), "w") as handle:
        handle.write(str(len(inspect.stack())))
    return {"outcomes": outcomes, "violations": audit.violations(), "check": check}


def quiet(program):
    """Install, import a program that only uses allowed helpers, run it; check() must pass."""
    from kernel_lab import audit

    audit.install(program)
    spec = importlib.util.spec_from_file_location("audit_quiet", program)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.attempts()
    audit.check()
    return audit.violations()


def harness_thread_keeps_running(program):
    """A thread the harness starts after install (mlx-lm's progress display does) and leaves
    running is not the program's: check() passes while it lives."""
    import time

    from kernel_lab import audit

    audit.install(program)
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="harness-ui", daemon=True)
    thread.start()
    time.sleep(0.05)
    try:
        audit.check()
        return None
    except audit.AuditViolation as exc:
        return str(exc)
    finally:
        stop.set()


def through_guards(program):
    """A swallowed attempt fails guards.verify too (one `audit.install` line wires a stage)."""
    from kernel_lab import audit, guards

    audit.install(program)
    before = guards.snapshot()
    spec = importlib.util.spec_from_file_location("audit_guarded", program)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.attempts()
    try:
        guards.verify(before, "after running")
    except audit.AuditViolation as exc:
        return str(exc)
    return None
