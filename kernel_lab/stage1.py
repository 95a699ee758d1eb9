"""Stage 1 of the evaluator: import a program under the guards and check every kernel, in a child.

`run(program, ...)` (the evaluator's side, no MLX) runs `check` in a sandboxed child with
MLX_ENABLE_TF32=0 set before MLX starts, so float32 is checked in true float32 on CUDA too, and
returns the child's TaskResult; `check` (the child's side) installs the audit hook, imports the
program, runs kernel_lab.correctness.check_kernels and returns the results as JSON, with the
seconds of each of its phases (MLX and the device, the program, the checks; `phases` adds the
child's start-up, what the parent measured beyond them).
"""

import json
import os
import time

from .sandbox import run_task

ENV = {"MLX_ENABLE_TF32": "0"}  # float32 checked in true float32 (CUDA runs TF32 otherwise)


def _jsonable(value):
    return json.loads(json.dumps(value, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def check(program, seed, shape_set, dtypes, names):
    """In the child: the program imported under the audit and guards, every kernel checked."""
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
    return _jsonable({"results": results, "setting": setting, "phases": phases,
                      "table": correctness.format_table(results),
                      "failures": [correctness.format_failure(r) for r in results if not r["passed"]]})


def phases(task):
    """{phase: seconds} of a finished check, starting the child first (the TaskResult's seconds,
    counted from the spawn, less what the child measured itself)."""
    inner = task.value["phases"]
    return {"starting the child": max(task.seconds - sum(inner.values()), 0.0), **inner}


def run(program, *, seed, shape_set="default", dtypes=("float32", "bfloat16", "float16"), names=None,
        timeout=300.0, memory_limit=None):
    """`check` in a sandboxed child: its TaskResult (value: results, setting, table, failures)."""
    return run_task("kernel_lab.stage1:check", dict(program=str(program), seed=seed, shape_set=shape_set,
                                                   dtypes=list(dtypes), names=names),
                    timeout=timeout, memory_limit=memory_limit, env=ENV)
