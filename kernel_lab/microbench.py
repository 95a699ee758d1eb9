"""Micro-benchmarks, the worker side: functions that `kernel_lab.microrun` calls in sandbox Sessions.

Two kinds of worker, each its own process (`start(role=...)`):
- "candidate": ONE program, imported under kernel_lab.audit and the tamper guards. Every round it
  times the program's kernel and runs stock (kernel_lab.ops.STOCK) on the same inputs, compiled the
  same way but untimed, and compares the output and every gradient with stock's
  (`microcheck.compare`: 2x `correctness.tolerance`, shapes, dtypes, NaN/inf). Stock runs first or
  second, alternately. It also calls the kernel several times inside one compiled graph, as a
  training step does once per layer (`microcheck.in_one_graph`): twice at each case's size, and
  `graph_calls` times (the coordinator's number) at 1x8 tokens on a kernel's first case.
- "reference": stock (and the starting program), timed; never in a process that imported a candidate.
  With stock alone it runs stock once more, untimed: every worker runs two forward+backwards a
  round, in alternating order, so that each timed one follows the making of the inputs half the time.
State lives in `_S` between calls. A round (one per seed the coordinator sends): inputs
`shapes.make_inputs(kernel, case, dtype, seed)` and a random cotangent; per implementation,
forward+backward as training runs it (`mx.vjp` w.r.t. the case's differentiable inputs inside
`mx.compile`, as mlx-lm compiles its step), outputs and gradients evaluated inside the timed region;
peak memory = mx.get_peak_memory() after mx.reset_peak_memory(), minus what was active before (the
inputs). Each round also returns digests of every result (sampled values), the inputs' shapes and
the ids of the compiled steps it ran: the coordinator checks them against the reference process,
since a program's code (run here at import and while traced) can reach this module's state; for the
same reason the comparison limits arrive with every call. Every call ends by synchronizing the
device, every stream included (also those a program created), so no work leaks into another
process's timing; a candidate that left more than PENDING_LIMIT of work queued fails, as do audit
violations and patches (kernel_lab.guards).
"""

import gc
import time

import mlx.core as mx

from kernel_lab import shapes
from kernel_lab.contract import KERNEL_NAMES
from kernel_lab.microcheck import TOLERANCE_FACTOR, compare, digest, in_one_graph
from kernel_lab.microsteps import gather, make_step, sync_all, timed, track_streams

_clock = time.perf_counter  # bound before any candidate is imported
PENDING_LIMIT = 0.1  # seconds of device work still queued when a candidate's call ends
MEMORY_BOUND = ("rms_norm", "rope", "swiglu", "cross_entropy")
UNTIMED = "stock-untimed"  # the label of the stock step a worker runs beside a lone timed one
_ROLE, _DTYPE = None, None  # set by start() before the guard snapshot
_S = {}  # guard snapshot, implementations, the prepared case


class KernelFailure(Exception):
    """An implementation raised, or its result is wrong, in a benchmark round."""


class PendingWork(Exception):
    """A candidate left work running on the device when its call ended."""


def default_dtype():
    """float32 on the CPU (MLX's half-precision CPU kernels are slow), bfloat16 on a GPU."""
    return "float32" if mx.default_device().type == mx.DeviceType.cpu else "bfloat16"


def _finish(value, when):
    """End of every call: device idle, no audit violation, nothing patched."""
    from kernel_lab import guards

    waited = sync_all()
    if _ROLE == "candidate":
        from kernel_lab import audit

        audit.check()
        if waited > PENDING_LIMIT:
            raise PendingWork(f"the program left work running on the device ({waited:.2f} s still queued "
                              f"{when}): kernels must not launch asynchronous work (mx.async_eval, "
                              "streams of their own) that outlives their call")
    guards.verify(_S["guard"], when)
    return value


# ------------------------------------------------------------------ calls (from kernel_lab.microrun)

def start(role, programs, dtype=None):
    """Load this worker's implementations {label: program path, or None for stock}.

    role "candidate": exactly one program, audited and checked against stock every round."""
    global _ROLE, _DTYPE
    from kernel_lab import guards
    from kernel_lab.contract import load_program
    from kernel_lab.ops import STOCK

    if role == "candidate":
        if len(programs) != 1 or None in programs.values():
            raise ValueError("a candidate worker loads exactly one program")
        from kernel_lab import audit

        audit.install(next(iter(programs.values())))
    elif role != "reference":
        raise ValueError(f"unknown role {role!r}")
    _ROLE, _DTYPE = role, dtype or default_dtype()  # module attributes: the guards watch them
    track_streams()
    _S.clear()
    _S["guard"] = guards.snapshot()
    _S["impls"] = {label: STOCK if path is None else load_program(path) for label, path in programs.items()}
    return _finish({"device": str(mx.default_device()), "dtype": _DTYPE, "mlx": mx.__version__},
                   "after importing the program")


def cases(names=None):
    """{kernel: {"cases": [bench case, ...], "names": [compared results], "limits": [[per result] per
    case]}} on this device (kernel_lab.bench_cases); limits are 2x correctness.tolerance of the case."""
    from kernel_lab import correctness
    from kernel_lab.bench_cases import bench_cases

    found = {}
    for kernel in names or KERNEL_NAMES:
        kernel_cases = bench_cases(kernel)
        _, _, grad_argnums = shapes.make_inputs(kernel, dict(kernel_cases[0], tokens=(1, 2)), _DTYPE, 0)
        found[kernel] = {
            "cases": kernel_cases,
            "names": ["output"] + [f"gradient of {correctness.ARG_NAMES[kernel][i]}" for i in grad_argnums],
            "limits": [[TOLERANCE_FACTOR * correctness.tolerance(kernel, _DTYPE, "forward", case)]
                       + [TOLERANCE_FACTOR * correctness.tolerance(kernel, _DTYPE, "grad", case)] * len(grad_argnums)
                       for case in kernel_cases]}
    return found


def bandwidth():
    """Bytes/s of a large elementwise op (read + write) in the bench dtype: the roof of rooflines."""
    size = 1 << 24 if mx.default_device().type == mx.DeviceType.cpu else 1 << 28
    x = mx.arange(size, dtype=mx.float32).astype(shapes.DTYPES[_DTYPE])  # cheap, materialized
    mx.eval(x)
    best = float("inf")
    for _ in range(5):
        _, seconds, _ = timed(lambda a: a * 1.0001, x)
        best = min(best, seconds)
    return _finish(2 * x.nbytes / best, "after measuring the bandwidth")


def prepare(kernel, case, seeds, names, limits, graph_calls=0):
    """Compile every implementation for one case and run one untimed warm-up round per seed (in a
    candidate worker the second is `_in_one_graph`: the kernel called twice in one compiled graph,
    and `graph_calls` times at 1x8 tokens when that is not 0).

    `names` and `limits` (of the compared results) come from the coordinator with every call, not
    from this process's state. Returns the seconds of a round (None if no round ran after the
    compiling one), the bytes a forward+backward must move (memory-bound kernels) and the ids of the
    compiled steps (the coordinator checks that the rounds run those very objects)."""
    from kernel_lab.ops import STOCK

    _S.pop("case", None)
    gc.collect()
    # Give the previous case's cached buffers back: the benchmark command runs one worker per program
    # on one GPU, and each keeping its largest case's buffers (the 152k-vocabulary logits) ran an H200
    # out of memory with nine of them.
    mx.clear_cache()
    args, kwargs, grad_argnums = shapes.make_inputs(kernel, case, _DTYPE, seeds[0])
    expected = getattr(STOCK, kernel)(*args, **kwargs)  # lazy: fixes the cotangent's shape and dtype
    steps = {label: make_step(getattr(ns, kernel), args, kwargs, grad_argnums)
             for label, ns in _S["impls"].items()}
    # Every worker runs two forward+backwards a round, so that each timed one comes first (right after
    # the inputs are made) half of the time: a candidate worker times its program and runs stock to
    # compare; a reference worker with stock alone runs stock once more, untimed.
    if len(steps) == 1 and (_ROLE == "candidate" or "stock" in steps):
        steps[UNTIMED] = make_step(getattr(STOCK, kernel), args, kwargs, grad_argnums)
    step_ids = {label: id(step) for label, step in steps.items()}  # before any program code runs here
    nbytes = _case_bytes(args, kwargs, grad_argnums, expected) if kernel in MEMORY_BOUND else None
    _S["case"] = dict(kernel=kernel, name=case["name"], case=case, steps=steps, gather=gather(args, kwargs),
                      shape=expected.shape, out_dtype=expected.dtype)
    del args, kwargs, expected
    seconds = None
    for index, seed in enumerate(seeds):
        start = _clock()
        if _ROLE == "candidate" and index == 1:  # a candidate's second warm-up: twice in one graph
            _in_one_graph(seed, names, limits, graph_calls)
        else:
            _round(seed, index, names, limits)
            seconds = _clock() - start if index else None  # the first round compiles
    if _ROLE == "candidate" and len(seeds) < 2:
        _in_one_graph(seeds[0] ^ 0x5151, names, limits, graph_calls)
    return _finish({"round_seconds": seconds, "bytes": nbytes, "step_ids": step_ids}, f"after compiling {kernel}")


def _in_one_graph(seed, names, limits, graph_calls):
    """Each candidate kernel called several times inside one compiled graph must match stock every time."""
    from kernel_lab.ops import STOCK

    c = _S["case"]
    checks = [(c["case"], [seed, seed ^ 0x7777], 2)]
    if graph_calls:
        checks.append((dict(c["case"], tokens=(1, 8)), [seed + i for i in range(1, 5)], graph_calls))
    for label in c["steps"]:
        if label == UNTIMED:
            continue
        kernel_fn, stock_fn = getattr(_S["impls"][label], c["kernel"]), getattr(STOCK, c["kernel"])
        for case, seeds, calls in checks:
            try:
                problem = in_one_graph(c["kernel"], kernel_fn, stock_fn, case, _DTYPE, seeds, calls, names, limits)
            except Exception as exc:  # noqa: BLE001 - reported with kernel and case
                raise KernelFailure(f"{label} kernel {c['kernel']} failed when called {calls} times in one compiled "
                                    f"graph (a training step calls a kernel once per layer) in benchmark case "
                                    f"{case['name']} at {case['tokens']} tokens ({_DTYPE}): {_describe(exc)}") from exc
            if problem:
                raise KernelFailure(f"{label} kernel {c['kernel']} is wrong in benchmark case {case['name']} at "
                                    f"{tuple(case['tokens'])} tokens ({_DTYPE}): {problem}")


def measure(seeds, first_round, names, limits):
    """One timed round per seed: {"rounds": [{label: {"ms", "peak"}, "digests", "inputs", "step_ids"}],
    "seconds"}; a candidate's results are compared with stock's (`names`, `limits`) every round."""
    start = _clock()
    rows = [_round(seed, first_round + i, names, limits) for i, seed in enumerate(seeds)]
    return _finish({"rounds": rows, "seconds": _clock() - start}, f"after timing {_S['case']['kernel']}")


# ------------------------------------------------------------------ rounds

def _cotangent(seed):
    c = _S["case"]
    return mx.random.normal(c["shape"], key=mx.random.key(seed ^ 0x5EED)).astype(c["out_dtype"])


def _round(seed, index, names, limits):
    """Inputs from `seed`; every step run, timed ones recorded (order rotated); candidates compared
    with stock; digests of every result, the inputs' shapes and the ids of the steps run."""
    c = _S["case"]
    args, kwargs, _ = shapes.make_inputs(c["kernel"], c["case"], _DTYPE, seed)
    arrays = c["gather"](args, kwargs)
    cotangent = _cotangent(seed)
    mx.eval(arrays, cotangent)
    del args, kwargs
    labels = [label for label in c["steps"] if label != UNTIMED]
    shift = index % len(labels)
    order = labels[shift:] + labels[:shift]
    if UNTIMED in c["steps"]:  # stock first in even rounds (so it is traced before the candidate)
        order.insert(0 if index % 2 == 0 else len(order), UNTIMED)
    results, row = {}, {"step_ids": {}}
    for label in order:
        step = c["steps"][label]
        row["step_ids"][label] = id(step)
        try:
            results[label], seconds, peak = timed(step, cotangent, *arrays)
        except Exception as exc:  # noqa: BLE001 - reported with kernel, case and round
            raise KernelFailure(f"{label} kernel {c['kernel']} failed in benchmark case {c['name']} "
                                f"({_DTYPE}, round {index}): {_describe(exc)}") from exc
        if label != UNTIMED:
            row[label] = {"ms": 1e3 * seconds, "peak": peak}
    if _ROLE == "candidate":
        for label in labels:
            problem = compare(c["kernel"], results[label], results[UNTIMED], names, limits, _DTYPE)
            if problem:
                raise KernelFailure(f"{label} kernel {c['kernel']} is wrong in benchmark case {c['name']} "
                                    f"({_DTYPE}, round {index}, input seed {seed}): {problem}")
    row["digests"] = {label: digest(result, seed) for label, result in results.items()}
    row["inputs"] = [[list(a.shape), str(a.dtype)] for a in arrays]
    return row


def _describe(exc):
    """'Type: message (at file:line ...)', with a hint: kernels run inside mx.compile."""
    from kernel_lab.worker import describe_exception

    return describe_exception(exc) + (" [kernels run inside mx.compile, as in mlx-lm's training step: "
                                      "no .item(), no Python branches on array values, no mx.eval inside]")


def _case_bytes(args, kwargs, grad_argnums, output):
    """Least bytes forward+backward must move: inputs twice, output and cotangent, gradients."""
    arrays = [a for a in list(args) + list(kwargs.values()) if isinstance(a, mx.array)]
    grads = sum(args[i].nbytes for i in grad_argnums)
    return 2 * sum(a.nbytes for a in arrays) + 2 * output.nbytes + grads
