"""Micro-benchmarks, the worker side: functions that `kernel_lab.microrun` calls in sandbox Sessions.

Two kinds of worker, each its own process (`start(role=...)`):
- "candidate": ONE program, imported under kernel_lab.audit and the tamper guards. Every round it
  times the program's kernel and runs stock (kernel_lab.ops.STOCK) on the same inputs, compiled the
  same way but untimed, and compares the output and every gradient with stock's
  (`microcheck.compare`: 2x `correctness.tolerance`, shapes, dtypes, NaN/inf). Stock runs first or
  second, alternately. Once per case it also calls the kernel twice inside one compiled graph, as a
  training step does (`microcheck.twice_in_one_graph`).
- "reference": stock (and the starting program), timed; never in a process that imported a candidate.
  With stock alone it runs stock once more, untimed: every worker runs two forward+backwards a
  round, in alternating order, so that each timed one follows the making of the inputs half the time.
State lives in `_S` between calls. A round (one per seed the coordinator sends): inputs
`shapes.make_inputs(kernel, case, dtype, seed)` and a random cotangent; per implementation,
forward+backward as training runs it (`mx.vjp` w.r.t. the case's differentiable inputs inside
`mx.compile`, as mlx-lm compiles its step), outputs and gradients evaluated inside the timed region;
peak memory = mx.get_peak_memory() after mx.reset_peak_memory(), minus what was active before (the
inputs). Each round also returns a digest of stock's results (sampled values), which the coordinator
compares across processes. Every call ends by synchronizing the device, every stream included (also
those a program created), so no work leaks into another process's timing; a candidate that left
more than PENDING_LIMIT of work queued fails, as do audit violations and patches (kernel_lab.guards).
"""

import gc
import time

import mlx.core as mx

from kernel_lab import shapes
from kernel_lab.contract import KERNEL_NAMES
from kernel_lab.microcheck import TOLERANCE_FACTOR, compare, digest, twice_in_one_graph

_clock = time.perf_counter  # bound before any candidate is imported
PENDING_LIMIT = 0.1  # seconds of device work still queued when a candidate's call ends
MEMORY_BOUND = ("rms_norm", "rope", "swiglu", "cross_entropy")
_S = {}  # role, dtype, guard snapshot, implementations, the prepared case
_STREAMS = []  # streams created in this process (mx.new_stream & co. are wrapped)


class KernelFailure(Exception):
    """An implementation raised, or its result is wrong, in a benchmark round."""


class PendingWork(Exception):
    """A candidate left work running on the device when its call ended."""


def default_dtype():
    """float32 on the CPU (MLX's half-precision CPU kernels are slow), bfloat16 on a GPU."""
    return "float32" if mx.default_device().type == mx.DeviceType.cpu else "bfloat16"


def _track_streams():
    """Wrap mx.new_stream & co. so that `_sync_all` also waits for streams a program creates."""
    for name in ("new_stream", "new_thread_local_stream", "new_thread_unsafe_stream"):
        original = getattr(mx, name, None)
        if original is None or getattr(original, "_kernel_lab_tracked", False):
            continue

        def tracked(*args, _original=original, **kwargs):
            stream = _original(*args, **kwargs)
            _STREAMS.append(stream)
            return stream

        tracked._kernel_lab_tracked = True
        setattr(mx, name, tracked)


def _sync_all():
    """Wait for all work this process launched; returns the seconds waited."""
    start = _clock()
    for device in (mx.default_device(), mx.cpu):
        mx.synchronize(device)
    for stream in _STREAMS:
        mx.synchronize(stream)
    return _clock() - start


def _finish(value, when):
    """End of every call: device idle, no audit violation, nothing patched."""
    from kernel_lab import guards

    waited = _sync_all()
    if _S.get("role") == "candidate":
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
    _track_streams()
    _S.clear()
    _S.update(role=role, dtype=dtype or default_dtype(), guard=guards.snapshot())
    _S["impls"] = {label: STOCK if path is None else load_program(path) for label, path in programs.items()}
    return _finish({"device": str(mx.default_device()), "dtype": _S["dtype"], "mlx": mx.__version__},
                   "after importing the program")


def cases(names=None):
    """{kernel: [bench case, ...]} on this device (kernel_lab.bench_cases)."""
    from kernel_lab.bench_cases import bench_cases

    return {kernel: bench_cases(kernel) for kernel in (names or KERNEL_NAMES)}


def bandwidth():
    """Bytes/s of a large elementwise op (read + write) in the bench dtype: the roof of rooflines."""
    size = 1 << 24 if mx.default_device().type == mx.DeviceType.cpu else 1 << 28
    x = mx.arange(size, dtype=mx.float32).astype(shapes.DTYPES[_S["dtype"]])  # cheap, materialized
    mx.eval(x)
    best = float("inf")
    for _ in range(5):
        _, seconds, _ = _timed(lambda a: a * 1.0001, x)
        best = min(best, seconds)
    return _finish(2 * x.nbytes / best, "after measuring the bandwidth")


def prepare(kernel, case, seeds):
    """Compile every implementation for one case and run one untimed warm-up round per seed (in a
    candidate worker the second is `_twice`: the kernel called twice in one compiled graph).

    Returns the seconds of a round (None if no round ran after the compiling one), the bytes a
    forward+backward must move (memory-bound kernels), the names of the compared results and their
    limits (2x the tolerance of each)."""
    from kernel_lab import correctness
    from kernel_lab.ops import STOCK

    _S.pop("case", None)
    gc.collect()
    args, kwargs, grad_argnums = shapes.make_inputs(kernel, case, _S["dtype"], seeds[0])
    expected = getattr(STOCK, kernel)(*args, **kwargs)  # lazy: fixes the cotangent's shape and dtype
    steps = {label: make_step(getattr(ns, kernel), args, kwargs, grad_argnums)
             for label, ns in _S["impls"].items()}
    # Every worker runs two forward+backwards a round, so that each timed one comes first (right after
    # the inputs are made) half of the time: a candidate worker times its program and runs stock to
    # compare; a reference worker with stock alone runs stock once more, untimed.
    partner = len(steps) == 1 and (_S["role"] == "candidate" or "stock" in steps)
    check = make_step(getattr(STOCK, kernel), args, kwargs, grad_argnums) if partner else None
    names = ["output"] + [f"gradient of {correctness.ARG_NAMES[kernel][i]}" for i in grad_argnums]
    limits = [TOLERANCE_FACTOR * correctness.tolerance(kernel, _S["dtype"], "forward")] + \
        [TOLERANCE_FACTOR * correctness.tolerance(kernel, _S["dtype"], "grad")] * len(grad_argnums)
    nbytes = _case_bytes(args, kwargs, grad_argnums, expected) if kernel in MEMORY_BOUND else None
    _S["case"] = dict(kernel=kernel, name=case["name"], case=case, labels=list(steps), steps=steps,
                      check=check, gather=_gather(args, kwargs), shape=expected.shape,
                      out_dtype=expected.dtype, names=names, limits=limits)
    del args, kwargs, expected
    seconds = None
    for index, seed in enumerate(seeds):
        start = _clock()
        if _S["role"] == "candidate" and index == 1:  # a candidate's second warm-up: twice in one graph
            _twice(seed)
        else:
            _round(seed, index)
            seconds = _clock() - start if index else None  # the first round compiles
    if _S["role"] == "candidate" and len(seeds) < 2:
        _twice(seeds[0] ^ 0x5151)
    return _finish({"round_seconds": seconds, "bytes": nbytes, "names": names, "limits": limits},
                   f"after compiling {kernel}")


def _twice(seed):
    """Each candidate kernel called twice inside one compiled graph must match stock both times."""
    c = _S["case"]
    for label in c["labels"]:
        kernel_fn = getattr(_S["impls"][label], c["kernel"])
        try:
            problem = twice_in_one_graph(c["kernel"], kernel_fn, c["check"], c["case"], _S["dtype"],
                                         [seed, seed ^ 0x7777], _cotangent, c["names"], c["limits"])
        except Exception as exc:  # noqa: BLE001 - reported with kernel and case
            raise KernelFailure(f"{label} kernel {c['kernel']} failed when called twice in one compiled graph "
                                f"(as a training step calls it per layer) in benchmark case {c['name']} "
                                f"({_S['dtype']}): {_describe(exc)}") from exc
        if problem:
            raise KernelFailure(f"{label} kernel {c['kernel']} is wrong in benchmark case {c['name']} "
                                f"({_S['dtype']}): {problem}")


def measure(seeds, first_round=0):
    """One timed round per seed: {"rounds": [{label: {"ms", "peak"}, "digest", "inputs"}], "seconds"}."""
    start = _clock()
    rows = [_round(seed, first_round + i) for i, seed in enumerate(seeds)]
    return _finish({"rounds": rows, "seconds": _clock() - start}, f"after timing {_S['case']['kernel']}")


# ------------------------------------------------------------------ rounds

def _slots(args, kwargs):
    """Where the array inputs are: [("arg", i) | ("kw", name)] (the rest are Python constants)."""
    return [("arg", i) for i, a in enumerate(args) if isinstance(a, mx.array)] + \
        [("kw", k) for k, v in kwargs.items() if isinstance(v, mx.array)]


def _gather(args, kwargs):
    """A function picking the array inputs (passed to the compiled step) from (args, kwargs)."""
    slots = _slots(args, kwargs)
    return lambda a, k: [a[i] if kind == "arg" else k[i] for kind, i in slots]


def forward_backward(kernel_fn, args, kwargs, grad_argnums):
    """(cotangent, *arrays) -> (output, grads): the vjp w.r.t. the case's differentiable inputs, the
    arrays passed in, the Python constants (eps, dims, group size ...) closed over."""
    slots = _slots(args, kwargs)
    args = [None if isinstance(a, mx.array) else a for a in args]  # arrays come with each call
    kwargs = {k: None if isinstance(v, mx.array) else v for k, v in kwargs.items()}

    def step(cotangent, *arrays):
        full_args, full_kwargs = list(args), dict(kwargs)
        for (kind, i), value in zip(slots, arrays):
            if kind == "arg":
                full_args[i] = value
            else:
                full_kwargs[i] = value
        return shapes.vjp_at(kernel_fn, full_args, full_kwargs, grad_argnums, cotangent)

    return step


def make_step(kernel_fn, args, kwargs, grad_argnums):
    """The mx.compile'd `forward_backward`, as mlx-lm compiles its training step."""
    return mx.compile(forward_backward(kernel_fn, args, kwargs, grad_argnums))


def _timed(fn, *inputs):
    """Run fn and evaluate what it returns: (result, seconds, peak bytes above what was active)."""
    mx.enable_compile()  # a program may have switched compilation off while it was traced
    mx.synchronize()
    mx.reset_peak_memory()
    active_before = mx.get_active_memory()
    start = _clock()
    result = fn(*inputs)
    mx.eval(result)
    mx.synchronize()
    seconds = _clock() - start
    return result, seconds, max(mx.get_peak_memory() - active_before, 0)


def _cotangent(seed):
    c = _S["case"]
    return mx.random.normal(c["shape"], key=mx.random.key(seed ^ 0x5EED)).astype(c["out_dtype"])


def _round(seed, index):
    """Inputs from `seed`; every implementation timed (rotated); candidates compared with stock."""
    c, dtype = _S["case"], _S["dtype"]
    args, kwargs, _ = shapes.make_inputs(c["kernel"], c["case"], dtype, seed)
    arrays = c["gather"](args, kwargs)
    cotangent = _cotangent(seed)
    mx.eval(arrays, cotangent)
    del args, kwargs
    shift = index % len(c["labels"])
    jobs = [(label, c["steps"][label]) for label in c["labels"][shift:] + c["labels"][:shift]]
    if c["check"] is not None:  # stock first in even rounds (so it is traced before the candidate)
        jobs.insert(0 if index % 2 == 0 else len(jobs), ("stock-untimed", c["check"]))
    results, row = {}, {}
    for label, step in jobs:
        try:
            results[label], seconds, peak = _timed(step, cotangent, *arrays)
        except Exception as exc:  # noqa: BLE001 - reported with kernel, case and round
            raise KernelFailure(f"{label} kernel {c['kernel']} failed in benchmark case {c['name']} "
                                f"({dtype}, round {index}): {_describe(exc)}") from exc
        if label != "stock-untimed":
            row[label] = {"ms": 1e3 * seconds, "peak": peak}
    if _S["role"] == "candidate":
        for label in c["labels"]:
            problem = compare(c["kernel"], results[label], results["stock-untimed"], c["names"], c["limits"],
                              dtype)
            if problem:
                raise KernelFailure(f"{label} kernel {c['kernel']} is wrong in benchmark case {c['name']} "
                                    f"({dtype}, round {index}, input seed {seed}): {problem}")
    row["digest"] = digest(results.get("stock", results.get("stock-untimed")), seed)
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
