"""Stage 1 of the evaluator: are a program's kernels right, values and gradients?

For every kernel, case (kernel_lab.shapes) and dtype, on fresh random inputs drawn
from the caller's seed:
  * the forward output must have the shape and dtype the STOCK kernel returns (the two
    cross-entropy kernels may also return float32, the contract's loss dtype), be
    finite, and match the float64 ORACLE;
  * the vector-Jacobian product with a random cotangent must match the oracle's for
    every differentiable input (so a right forward with a zero, missing or
    stop_gradient'ed gradient fails);
  * cases include adversarial inputs: rows of magnitude 1e-3..1e3 and a zero row for
    rms_norm, logits near +-1e4 (+-3e4 in float16) for cross-entropy, RoPE offsets
    past 4096 (also as an mx.array) and llama3 `freqs`, transposed (non-contiguous) inputs.
Exceptions inside a kernel are caught and reported as that kernel's failure.

Error measure: err = max|out - oracle| / max|oracle| over the whole tensor (a max error
normalized by the oracle's scale, so one number works for losses, activations and
gradients of any magnitude). A comparison passes when
    err <= max(TOLERANCES[kernel][dtype][forward|grad], STOCK_MARGIN * stock_err)
where stock_err is the stock kernel's own error on the very same inputs: the stock
kernel always passes with margin, also on devices whose float32 matmuls are less
exact than the CPU's (the table was calibrated on the CPU).
TOLERANCES are 8x the worst stock error over 10 seeds of the default set, rounded up
to 1-2-5 steps and capped at TOLERANCE_CAP (0.1): where the CPU's stock kernel is
worse than that (bfloat16 quantized matmuls accumulate in bfloat16 on the CPU: LoRA
7e-2, fused-loss grads 4e-2) only the per-input stock term lets an error that large
pass. Regenerate with `python -m kernel_lab.correctness --calibrate`.
"""

import argparse
import math
import sys
import time
import traceback
import zlib

import mlx.core as mx

from . import shapes
from .contract import KERNEL_NAMES
from .ops import ORACLE, STOCK
from .ops._float64 import upcast

DEFAULT_DTYPES = ("float32", "bfloat16", "float16")
STOCK_MARGIN = 8.0
CALIBRATION_MARGIN = 8.0
TOLERANCE_CAP = 0.1

# Measured on the CPU (mlx 0.32.4): python -m kernel_lab.correctness --calibrate --seeds 10
TOLERANCES = {
    "rms_norm": {"float32": {"forward": 5e-6, "grad": 5e-6},
                 "bfloat16": {"forward": 5e-2, "grad": 1e-1},
                 "float16": {"forward": 1e-2, "grad": 1e-2}},
    "rope": {"float32": {"forward": 2e-3, "grad": 2e-3},
             "bfloat16": {"forward": 1e-1, "grad": 1e-1},
             "float16": {"forward": 1e-2, "grad": 1e-2}},
    "swiglu": {"float32": {"forward": 1e-6, "grad": 1e-6},
               "bfloat16": {"forward": 5e-2, "grad": 1e-1},
               "float16": {"forward": 1e-2, "grad": 2e-2}},
    "cross_entropy": {"float32": {"forward": 5e-5, "grad": 5e-4},
                      "bfloat16": {"forward": 5e-2, "grad": 5e-2},
                      "float16": {"forward": 5e-3, "grad": 5e-3}},
    "linear_cross_entropy": {"float32": {"forward": 1e-5, "grad": 5e-5},
                             "bfloat16": {"forward": 1e-1, "grad": 1e-1},
                             "float16": {"forward": 2e-2, "grad": 1e-1}},
    "lora_linear": {"float32": {"forward": 2e-5, "grad": 1e-5},
                    "bfloat16": {"forward": 1e-1, "grad": 1e-1},
                    "float16": {"forward": 1e-1, "grad": 1e-1}},
    "dora_linear": {"float32": {"forward": 2e-5, "grad": 2e-5},
                    "bfloat16": {"forward": 1e-1, "grad": 1e-1},
                    "float16": {"forward": 1e-2, "grad": 1e-2}},
}

ARG_NAMES = {
    "rms_norm": ("x", "weight", "eps"),
    "rope": ("x", "dims"),
    "swiglu": ("gate", "up"),
    "cross_entropy": ("logits", "targets"),
    "linear_cross_entropy": ("hidden", "weight", "targets"),
    "lora_linear": ("x", "weight", "scales", "biases", "lora_a", "lora_b", "scale"),
    "dora_linear": ("x", "weight", "scales", "biases", "lora_a", "lora_b", "scale", "magnitude"),
}

FLOAT32_LOSS = ("cross_entropy", "linear_cross_entropy")  # may return float32 whatever stock does


def tolerance(kernel, dtype, kind):
    """Allowed normalized error (max|out - oracle| / max|oracle|) of `kernel` in `dtype` for
    `kind` "forward" or "grad"; the one place stages 1 and 2 read tolerances from."""
    name = dtype if isinstance(dtype, str) else str(dtype).split(".")[-1]
    return TOLERANCES[kernel][name][kind]


class CheckFailure(Exception):
    """One comparison failed; carries the failure record."""

    def __init__(self, what, error):
        super().__init__(error)
        self.what, self.error = what, error


def case_seed(seed, kernel, case_name, dtype):
    """A per-(kernel, case, dtype) seed derived from the caller's seed."""
    return zlib.crc32(f"{seed}/{kernel}/{case_name}/{dtype}".encode())


def cases_for(kernel, shape_set):
    """The cases of a shape set; "smoke" is the first default case of each kernel."""
    if shape_set == "smoke":
        return shapes.correctness_cases(kernel, "default")[:1]
    return shapes.correctness_cases(kernel, shape_set)


def _normalized_error(out, ref):
    """(max |out - ref|, that divided by max |ref|), computed in float64 on the CPU."""
    with mx.stream(mx.cpu):
        diff = mx.abs(upcast(out) - ref)
        abs_err = mx.max(diff).item()
        scale = mx.max(mx.abs(ref)).item()
    return abs_err, abs_err / scale if scale > 0 else abs_err


def _all_finite(a):
    with mx.stream(mx.cpu):
        return bool(mx.all(mx.isfinite(upcast(a))).item())


def _where(exc):
    """' (at file:line)' of the innermost frame of an exception, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _run(fn, args, kwargs, grad_argnums, cotangent):
    """Forward output and vjp grads of fn w.r.t. args[grad_argnums], evaluated."""

    out, grads = shapes.vjp_at(fn, args, kwargs, grad_argnums, cotangent)
    mx.eval(out, grads)
    return out, grads


def _oracle(kernel, args, kwargs, grad_argnums, cotangent):
    with mx.stream(mx.cpu):
        args64 = [upcast(a) for a in args]
        return _run(getattr(ORACLE, kernel), args64, kwargs, grad_argnums, upcast(cotangent))


def check_case(fn, kernel, case, dtype, seed):
    """Check one kernel on one case and dtype; returns (max_abs_err, max_rel_err).

    Raises CheckFailure naming what failed (forward, grad of <arg>, ...).
    """
    args, kwargs, grad_argnums = shapes.make_inputs(kernel, case, dtype, seed)
    names = ARG_NAMES[kernel]

    stock_fn = getattr(STOCK, kernel)
    expected = stock_fn(*args, **kwargs)  # shape/dtype need no evaluation
    allowed = {expected.dtype} | ({mx.float32} if kernel in FLOAT32_LOSS else set())

    try:
        out = fn(*args, **kwargs)
        mx.eval(out)
    except Exception as exc:  # a kernel bug is a result, not a crash of the checker
        raise CheckFailure("forward", f"{type(exc).__name__}: {exc}{_where(exc)}")
    if not isinstance(out, mx.array):
        raise CheckFailure("forward", f"returned {type(out).__name__}, expected an mx.array")
    if tuple(out.shape) != tuple(expected.shape):
        raise CheckFailure("forward", f"output shape {tuple(out.shape)} != expected {tuple(expected.shape)}")
    if out.dtype not in allowed:
        raise CheckFailure("forward", f"output dtype {out.dtype} != expected {expected.dtype}")

    cot_key = mx.random.key(seed ^ 0x5EED)
    cotangent32 = mx.random.normal(expected.shape, key=cot_key)
    try:
        out, grads = _run(fn, args, kwargs, grad_argnums, cotangent32.astype(out.dtype))
    except Exception as exc:
        raise CheckFailure("backward", f"{type(exc).__name__}: {exc}{_where(exc)}")
    stock_out, stock_grads = _run(stock_fn, args, kwargs, grad_argnums, cotangent32.astype(expected.dtype))
    ref_out, ref_grads = _oracle(kernel, args, kwargs, grad_argnums, cotangent32)

    worst = (0.0, 0.0)
    comparisons = [("forward", out, stock_out, ref_out, "forward")]
    for i, g, sg, rg in zip(grad_argnums, grads, stock_grads, ref_grads):
        comparisons.append((f"grad of {names[i]}", g, sg, rg, "grad"))
    for what, value, stock_value, ref, kind in comparisons:
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckFailure(what, f"shape {tuple(value.shape)} != expected {tuple(ref.shape)}")
        if not _all_finite(value) and _all_finite(ref):
            raise CheckFailure(what, "non-finite values (NaN or inf) where the oracle is finite")
        abs_err, rel_err = _normalized_error(value, ref)
        _, stock_rel = _normalized_error(stock_value, ref)
        tol = max(tolerance(kernel, dtype, kind), STOCK_MARGIN * stock_rel)
        if not rel_err <= tol:  # also catches NaN
            raise CheckFailure(
                what,
                f"max error {abs_err:.3g} = {rel_err:.3g} x max|oracle| > tolerance {tol:.3g} "
                f"(stock kernel: {stock_rel:.3g})",
            )
        worst = (max(worst[0], abs_err), max(worst[1], rel_err))
    return worst


def _shape_text(kernel, case, dtype, seed):
    """Shapes of the array arguments, for failure messages."""
    try:
        args, kwargs, _ = shapes.make_inputs(kernel, case, dtype, seed)
    except Exception:
        return ""
    names = ARG_NAMES[kernel]
    parts = [f"{n}{tuple(a.shape)}" for n, a in zip(names, args) if isinstance(a, mx.array)]
    return ", ".join(parts)


def check_kernels(kernels, *, seed, shape_set="default", dtypes=DEFAULT_DTYPES, names=None):
    """Check each kernel (attributes of `kernels`) against the oracle; one dict per kernel.

    Each dict: kernel, passed, max_abs_err, max_rel_err, cases (comparisons run: case x
    dtype), seconds, failure (None or {case, shape, dtype, what, error}). A kernel stops
    at its first failure.
    """
    names = list(KERNEL_NAMES if names is None else names)
    results = []
    for kernel in names:
        if kernel not in KERNEL_NAMES:
            raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(KERNEL_NAMES)}")
        start = time.perf_counter()
        result = dict(kernel=kernel, passed=True, max_abs_err=0.0, max_rel_err=0.0, cases=0,
                      seconds=0.0, failure=None)
        fn = kernels.get(kernel) if isinstance(kernels, dict) else getattr(kernels, kernel, None)
        if not callable(fn):
            result.update(passed=False, failure=dict(case=None, shape=None, dtype=None, what="definition",
                                                     error=f"the program defines no callable {kernel}"))
        else:
            for case in cases_for(kernel, shape_set):
                for dtype in dtypes:
                    sub_seed = case_seed(seed, kernel, case["name"], dtype)
                    try:
                        abs_err, rel_err = check_case(fn, kernel, case, dtype, sub_seed)
                    except CheckFailure as failure:
                        result.update(passed=False, failure=dict(
                            case=case["name"], shape=_shape_text(kernel, case, dtype, sub_seed),
                            dtype=str(dtype), what=failure.what, error=failure.error))
                        break
                    result["cases"] += 1
                    result["max_abs_err"] = max(result["max_abs_err"], abs_err)
                    result["max_rel_err"] = max(result["max_rel_err"], rel_err)
                if not result["passed"]:
                    break
        result["seconds"] = time.perf_counter() - start
        results.append(result)
    return results


def format_failure(result):
    """One line naming kernel, case, shape, dtype, what failed and the error."""
    f = result.get("failure")
    if not f:
        return f"{result['kernel']}: passed"
    if f["case"] is None:
        return f"{result['kernel']}: {f['error']}"
    return (f"{result['kernel']} failed on case {f['case']} [{f['shape']}], dtype {f['dtype']}, "
            f"{f['what']}: {f['error']}")


def format_table(results):
    """A short text table: kernel, ok, comparisons, max normalized error, seconds."""
    lines = [f"{'kernel':22s} {'ok':4s} {'cases':>5s} {'max err':>9s} {'time':>7s}"]
    for r in results:
        lines.append(f"{r['kernel']:22s} {'yes' if r['passed'] else 'NO':4s} {r['cases']:5d} "
                     f"{r['max_rel_err']:9.2e} {r['seconds']:6.2f}s")
    lines += [format_failure(r) for r in results if not r["passed"]]
    return "\n".join(lines)


# ------------------------------------------------------------------------ calibration

def stock_errors(seeds, shape_set="default", dtypes=DEFAULT_DTYPES):
    """Worst normalized error of the STOCK kernels vs the oracle: {kernel: {dtype: {kind: err}}}."""
    worst = {}
    for kernel in KERNEL_NAMES:
        for case in shapes.correctness_cases(kernel, shape_set):
            for dtype in dtypes:
                for seed in seeds:
                    s = case_seed(seed, kernel, case["name"], dtype)
                    args, kwargs, argnums = shapes.make_inputs(kernel, case, dtype, s)
                    expected = getattr(STOCK, kernel)(*args, **kwargs)
                    cot = mx.random.normal(expected.shape, key=mx.random.key(s ^ 0x5EED))
                    out, grads = _run(getattr(STOCK, kernel), args, kwargs, argnums, cot.astype(expected.dtype))
                    ref, ref_grads = _oracle(kernel, args, kwargs, argnums, cot)
                    slot = worst.setdefault(kernel, {}).setdefault(dtype, {"forward": 0.0, "grad": 0.0})
                    slot["forward"] = max(slot["forward"], _normalized_error(out, ref)[1])
                    for g, rg in zip(grads, ref_grads):
                        slot["grad"] = max(slot["grad"], _normalized_error(g, rg)[1])
    return worst


def round_up_125(value):
    """Smallest 1, 2 or 5 x 10^k not below value."""
    if value <= 0:
        return 0.0
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * 10 ** exponent >= value * (1 - 1e-12):
            return float(f"{step * 10 ** exponent:.0e}")
    return float(f"{10 ** (exponent + 1):.0e}")


def _main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("program", nargs="?", help="program file to check (default: stock kernels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape-set", default="default", choices=("smoke", "default", "full"))
    parser.add_argument("--calibrate", action="store_true", help="measure the stock kernels' errors")
    parser.add_argument("--seeds", type=int, default=10, help="seeds for --calibrate")
    opts = parser.parse_args(argv)
    if opts.calibrate:
        worst = stock_errors(range(opts.seeds), "default" if opts.shape_set == "smoke" else opts.shape_set)
        print(f"# stock worst normalized error over {opts.seeds} seeds -> tolerance "
              f"(x{CALIBRATION_MARGIN:g}, rounded up 1-2-5, capped at {TOLERANCE_CAP:g})")
        for kernel, by_dtype in worst.items():
            for dtype, kinds in by_dtype.items():
                print(f"{kernel:22s} {dtype:9s} " + "  ".join(
                    f"{k} {v:.2e} -> {min(TOLERANCE_CAP, round_up_125(CALIBRATION_MARGIN * v)):.0e}" for k, v in kinds.items()))
        return 0
    if opts.program:
        from .contract import load_program
        kernels = load_program(opts.program)
    else:
        kernels = STOCK
    results = check_kernels(kernels, seed=opts.seed, shape_set=opts.shape_set)
    print(format_table(results))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(_main())
