"""Stage 1 of the evaluator: import a program under the guards and check every kernel, in children.

`run(program, ...)` (the evaluator's side, no MLX) runs `check` in sandboxed children with
MLX_ENABLE_TF32=0 set before MLX starts, so float32 is checked in true float32 on CUDA too, and
returns one TaskResult for them all; `check` (a child's side) installs the audit hook, imports the
program, runs kernel_lab.correctness.check_kernels on its kernels and returns the results as
JSON, with the seconds of each of its phases (MLX and the device, the program, the checks).

Attention is checked in a child of its own, beside the other seven kernels' child: on CUDA, cuDNN
plans its fused attention afresh for every shape in every process, 5-7 s of the 10.6 s that one
child took on a warm H200 (benchmarks/h200-2026-11-22c).
"""

import json
import os
import time

from .check_format import format_failure, format_table
from .contract import KERNEL_NAMES
from .sandbox import Session, TaskResult, wait_all

ENV = {"MLX_ENABLE_TF32": "0"}  # float32 checked in true float32 (CUDA runs TF32 otherwise)
OWN_CHILD = ("attention",)  # kernels checked in a child of their own, at the same time as the rest


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def check(program, seed, shape_set, dtypes, names):
    """In a child: the program imported under the audit and guards, its kernels `names` checked."""
    clock, phases = [time.perf_counter()], {}

    def lap(name):
        clock.append(time.perf_counter())
        phases[name] = clock[-1] - clock[-2]

    import mlx.core as mx

    from . import audit, correctness, guards
    from .contract import load_program

    mx.eval(mx.zeros(1) + 1)  # the device starts here, not inside the first kernel's time
    lap("importing MLX, starting the device")
    audit.install(program)  # no threads, processes, frame reads or file writes from its code
    before = guards.snapshot()
    kernels = load_program(program)
    guards.verify(before, "after importing the program")
    lap("importing the program")
    results = correctness.check_kernels(kernels, seed=seed, shape_set=shape_set,
                                        dtypes=tuple(dtypes), names=names)
    guards.verify(before, "after running the kernels")
    lap("checking the kernels")
    tf32 = os.environ.get("MLX_ENABLE_TF32", "(unset)")
    setting = (f"{mx.default_device()}, MLX_ENABLE_TF32={tf32}: float32 is checked in true float32 "
               "(no TF32 matmuls); values and gradients under mx.compile, as timed")
    return _jsonable({"results": results, "setting": setting, "phases": phases})


def groups(names=None):
    """The kernels of each child: OWN_CHILD's alone, then the rest (empty groups dropped)."""
    names = list(KERNEL_NAMES if names is None else names)
    alone = [n for n in names if n in OWN_CHILD]
    return [[n] for n in alone] + ([rest] if (rest := [n for n in names if n not in OWN_CHILD]) else [])


def phases(task):
    """{phase: seconds} of a finished stage 1: its slowest child's, starting the child first (the
    wall time from the spawn less what that child measured itself)."""
    inner = task.value["phases"]
    return {"starting the child": max(task.seconds - sum(inner.values()), 0.0), **inner}


def run(program, *, seed, shape_set="default", dtypes=("float32", "bfloat16", "float16"), names=None,
        timeout=300.0, memory_limit=None):
    """`check` in sandboxed children, one per group, at the same time; one TaskResult: the first
    failed child's, else value {results (in `names` order), setting, phases, table, failures}."""
    names = list(KERNEL_NAMES if names is None else names)
    spawned, sessions = time.monotonic(), []
    try:
        for group in groups(names):
            session = Session(memory_limit=memory_limit, env=ENV)
            sessions.append(session)
            session.submit("kernel_lab.stage1:check", dict(program=str(program), seed=seed,
                                                           shape_set=shape_set, dtypes=list(dtypes),
                                                           names=group))
        tasks = wait_all(sessions, timeout)
    finally:
        for session in sessions:
            session.close()  # also kills grandchildren the code left running
    seconds = time.monotonic() - spawned
    for task, session in zip(tasks, sessions):
        task.seconds = seconds
        if task.returncode is None:
            task.returncode = session.proc.returncode
    failed = [t for t in tasks if not t.ok]
    if failed:
        return failed[0]
    by_name = {r["kernel"]: r for t in tasks for r in t.value["results"]}
    results = [by_name[n] for n in names]
    slowest = max(tasks, key=lambda t: sum(t.value["phases"].values()))
    value = {"results": results, "setting": tasks[0].value["setting"], "phases": slowest.value["phases"],
             "children": len(tasks), "table": format_table(results),
             "failures": [format_failure(r) for r in results if not r["passed"]]}
    return TaskResult(ok=True, value=value, stdout="".join(t.stdout for t in tasks),
                      stderr="".join(t.stderr for t in tasks), seconds=seconds,
                      returncode=max(t.returncode or 0 for t in tasks),
                      peak_rss=sum(t.peak_rss for t in tasks))
