"""Micro-benchmarks (cascade stage 2): each kernel's speed and peak memory against MLX's own.

For every kernel and every case of `shapes.bench_cases(kernel)`, the implementations (candidate,
stock = what MLX / mlx-lm ship, and the starting program) are timed side by side in ONE process,
round-robin per repeat with the order rotated, so that machine noise hits all of them alike:
- forward+backward as training runs it: `mx.vjp` with respect to the case's differentiable inputs
  with a random cotangent, inside `mx.compile` (mlx-lm compiles its training step), outputs AND
  gradients evaluated inside the timed region;
- forward alone, likewise compiled and evaluated;
- peak memory of forward+backward: `mx.get_peak_memory()` after `mx.reset_peak_memory()`, minus
  the memory already active before the call (the inputs' own bytes).
Every repeat draws fresh inputs (a new seed), so outputs cannot be memoized; after each round the
timed forward outputs are compared with stock's on the same inputs (outside the timed region).
Reported per kernel: medians over repeats, geometric means over cases, `speedup_vs_stock`
(stock time / candidate time of forward+backward), `memory_ratio_vs_stock` (stock peak /
candidate peak, > 1 = leaner) and `speedup_vs_initial`.
"""

import math
import statistics
import sys
import time

import mlx.core as mx

from kernel_lab import shapes
from kernel_lab.contract import KERNEL_NAMES

_clock = time.perf_counter  # bound before any candidate is imported
_MIN_PEAK_BYTES = 1024  # floor for memory ratios (a peak can be ~0 for an in-place-ish kernel)


class KernelFailure(Exception):
    """An implementation failed (raised, mis-shaped, NaN, stale output) during benchmarking."""

    def __init__(self, impl, kernel, case, message):
        super().__init__(f"{impl} kernel {kernel} failed in benchmark case {case}: {message}")
        self.impl, self.kernel, self.case = impl, kernel, case


def default_dtype():
    """float32 on the CPU (MLX's half-precision CPU kernels are slow), bfloat16 on a GPU."""
    return "float32" if mx.default_device().type == mx.DeviceType.cpu else "bfloat16"


def _split_arrays(args, kwargs):
    """Separate array inputs (passed to the compiled step) from Python constants (closed over)."""
    array_slots = [("arg", i) for i, a in enumerate(args) if isinstance(a, mx.array)]
    array_slots += [("kw", k) for k, v in kwargs.items() if isinstance(v, mx.array)]

    def gather(args, kwargs):
        return [args[i] if kind == "arg" else kwargs[i] for kind, i in array_slots]

    def scatter(arrays):
        full_args, full_kwargs = list(args), dict(kwargs)
        for (kind, i), value in zip(array_slots, arrays):
            if kind == "arg":
                full_args[i] = value
            else:
                full_kwargs[i] = value
        return full_args, full_kwargs

    return gather, scatter


def make_steps(kernel_fn, args, kwargs, grad_argnums, compile=True):
    """(forward(arrays), forward_backward(arrays, cotangent), gather) for one kernel and case."""
    gather, scatter = _split_arrays(args, kwargs)

    def forward(*arrays):
        full_args, full_kwargs = scatter(arrays)
        return kernel_fn(*full_args, **full_kwargs)

    def forward_backward(cotangent, *arrays):
        full_args, full_kwargs = scatter(arrays)
        return shapes.vjp_at(kernel_fn, full_args, full_kwargs, grad_argnums, cotangent)

    if compile:
        return mx.compile(forward), mx.compile(forward_backward), gather
    return forward, forward_backward, gather


def _timed(fn, *inputs):
    """Run fn and evaluate everything it returns; (result, seconds, peak bytes above the start)."""
    mx.synchronize()
    mx.reset_peak_memory()
    active_before = mx.get_active_memory()
    start = _clock()
    result = fn(*inputs)
    mx.eval(result)
    mx.synchronize()
    seconds = _clock() - start
    peak = max(mx.get_peak_memory() - active_before, 0)
    return result, seconds, peak


def _describe(exc, compiled):
    """'Type: message (at file:line ...)', with a hint when it failed under mx.compile."""
    from kernel_lab.worker import describe_exception

    text = describe_exception(exc)
    if compiled:
        text += (" [kernels run inside mx.compile, as in mlx-lm's training step: no .item(), "
                 "no Python branches on array values, no mx.eval inside]")
    return text


def _stale_output_error(output, reference, dtype):
    """Why a timed forward output does not belong to its inputs (None when it does)."""
    if output.shape != reference.shape:
        return f"output shape {tuple(output.shape)} != stock's {tuple(reference.shape)}"
    out32, ref32 = output.astype(mx.float32), reference.astype(mx.float32)
    if not mx.all(mx.isfinite(out32)).item():
        return "NaN or inf in the output"
    scale = max(mx.max(mx.abs(ref32)).item(), 1e-6)
    error = mx.max(mx.abs(out32 - ref32)).item() / scale
    limit = 2e-3 if dtype == "float32" else 6e-2
    if error > limit:
        return (f"output differs from stock's on the same inputs by {error:.3g} of its scale "
                f"(> {limit:g}): stale, memoized or wrong")
    return None


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def bench_kernel(kernel, impls, *, dtype, seed, repeats=5, warmup=2, compile=True, log=None,
                 min_seconds=2.0, max_repeats=40):
    """Time every implementation of one kernel on each bench case; see the module docstring.

    At least `repeats` timed rounds per case, more (up to `max_repeats`) until the timed rounds
    took `min_seconds`: fast kernels get many samples, so that the median shrugs off hiccups.
    Two warm-up rounds: the first compiles, the second still pays for first-touch allocations
    (measured on a 2-core CPU: with one, identical kernels differed by up to 20% on rope).

    impls: {"candidate": fn, "stock": fn, "initial": fn, ...} (must include "stock").
    Returns {"kernel", "cases": [per-case rows], per-impl geometric-mean summaries}.
    """
    if "stock" not in impls:
        raise ValueError("impls must include 'stock' (the reference for ratios)")
    names = list(impls)
    case_rows = []
    for case_index, case in enumerate(shapes.bench_cases(kernel)):
        timings = {n: {"fwd_bwd": [], "fwd": [], "peak": []} for n in names}
        steps = {}
        round_index, measured_seconds = 0, 0.0
        while round_index < warmup + repeats or (
                measured_seconds < min_seconds and round_index < warmup + max_repeats):
            round_start = _clock()
            round_seed = seed * 1_000_003 + case_index * 1009 + round_index
            args, kwargs, grad_argnums = shapes.make_inputs(kernel, case, dtype, round_seed)
            if not steps:
                steps = {n: make_steps(impls[n], args, kwargs, grad_argnums, compile) for n in names}
                reference = impls["stock"](*args, **kwargs)  # fixes the cotangent's shape
                out_shape, out_dtype = reference.shape, reference.dtype
                del reference
            arrays = steps["stock"][2](args, kwargs)
            mx.eval(arrays)
            cotangent = mx.random.normal(out_shape, key=mx.random.key(round_seed)).astype(out_dtype)
            mx.eval(cotangent)
            outputs = {}
            shift = round_index % len(names)
            for n in names[shift:] + names[:shift]:
                forward, forward_backward, _ = steps[n]
                try:
                    out, fwd_seconds, _ = _timed(forward, *arrays)
                    _, fb_seconds, peak = _timed(forward_backward, cotangent, *arrays)
                except Exception as exc:  # noqa: BLE001 - reported with kernel and case
                    raise KernelFailure(n, kernel, case["name"], _describe(exc, compile)) from exc
                outputs[n] = out
                if round_index >= warmup:
                    timings[n]["fwd"].append(fwd_seconds)
                    timings[n]["fwd_bwd"].append(fb_seconds)
                    timings[n]["peak"].append(peak)
            for n in names:
                problem = _stale_output_error(outputs[n], outputs["stock"], dtype)
                if problem:
                    raise KernelFailure(n, kernel, case["name"], problem)
            del outputs, arrays, cotangent
            if round_index >= warmup:
                measured_seconds += _clock() - round_start
            round_index += 1
        row = {"case": case["name"], "tokens": list(case["tokens"]), "repeats": round_index - warmup}
        for n in names:
            row[n] = {
                "fwd_bwd_ms": 1e3 * statistics.median(timings[n]["fwd_bwd"]),
                "fwd_ms": 1e3 * statistics.median(timings[n]["fwd"]),
                "peak_mb": max(timings[n]["peak"]) / 2**20,
                "fwd_bwd_spread": _spread(timings[n]["fwd_bwd"]),
            }
        case_rows.append(row)
        if log:
            log(f"  {kernel:22s} {case['name']:40s} x{row['repeats']:<3d}" + "  ".join(
                f"{n} {row[n]['fwd_bwd_ms']:.2f} ms / {row[n]['peak_mb']:.1f} MB" for n in names))
    return summarize(kernel, case_rows, names)


def _spread(samples):
    """Interquartile range / median of the repeats: how noisy this measurement was."""
    if len(samples) < 2:
        return 0.0
    low, _, high = statistics.quantiles(samples, n=4)
    median = statistics.median(samples)
    return (high - low) / median if median > 0 else 0.0


def summarize(kernel, case_rows, names):
    """Per-kernel ratios against stock (and initial), geometric means over cases."""
    result = {"kernel": kernel, "cases": case_rows}
    floor_mb = _MIN_PEAK_BYTES / 2**20
    for n in names:
        result[n] = {
            "fwd_bwd_ms": _geomean([r[n]["fwd_bwd_ms"] for r in case_rows]),
            "fwd_ms": _geomean([r[n]["fwd_ms"] for r in case_rows]),
            "peak_mb": _geomean([max(r[n]["peak_mb"], floor_mb) for r in case_rows]),
        }
        if n == "stock":
            continue
        result[n]["speedup_vs_stock"] = _geomean(
            [r["stock"]["fwd_bwd_ms"] / r[n]["fwd_bwd_ms"] for r in case_rows])
        result[n]["fwd_speedup_vs_stock"] = _geomean(
            [r["stock"]["fwd_ms"] / r[n]["fwd_ms"] for r in case_rows])
        result[n]["memory_ratio_vs_stock"] = _geomean(
            [max(r["stock"]["peak_mb"], floor_mb) / max(r[n]["peak_mb"], floor_mb)
             for r in case_rows])
        if "initial" in names and n != "initial":
            result[n]["speedup_vs_initial"] = _geomean(
                [r["initial"]["fwd_bwd_ms"] / r[n]["fwd_bwd_ms"] for r in case_rows])
    return result


def run(impls, *, names=None, dtype=None, seed=0, repeats=5, warmup=2, compile=True, log=None,
        min_seconds=2.0):
    """Benchmark every kernel (or `names`) for each namespace in impls {"candidate": ns, ...}."""
    dtype = dtype or default_dtype()
    names = list(names or KERNEL_NAMES)
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    log(f"micro-benchmarks on {mx.default_device()} in {dtype}, {repeats} repeats "
        f"(+{warmup} warm-up), {'compiled' if compile else 'eager'}")
    results = []
    for kernel in names:
        start = _clock()
        functions = {label: getattr(ns, kernel) for label, ns in impls.items()}
        results.append(bench_kernel(kernel, functions, dtype=dtype, seed=seed, repeats=repeats,
                                    warmup=warmup, compile=compile, log=log,
                                    min_seconds=min_seconds))
        log(f"  {kernel}: {_clock() - start:.1f} s")
    return {"dtype": dtype, "device": str(mx.default_device()), "repeats": repeats,
            "compiled": compile, "kernels": results}
