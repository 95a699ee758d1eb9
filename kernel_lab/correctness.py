"""Stage 1 of the evaluator: are a program's kernels right, values and gradients, as they are run?

For every kernel, case (kernel_lab.cases: real-model shapes, adversarial inputs, contract variants
drawn from the seed, large cases) and dtype, on fresh random inputs from the caller's seed:
  * an eager call must return an mx.array of the shape and dtype stock returns (the two
    cross-entropy kernels may return float32, the contract's loss dtype); on small cases its
    values are checked too;
  * the forward output and the vector-Jacobian product (random cotangent, every differentiable
    input) are computed under mx.compile, as the timed runs and mlx-lm's training step run them,
    and compared with the reference (so a right forward with a zero, missing or stop_gradient'ed
    gradient fails, and so does a kernel that behaves differently when traced);
  * the reference is the float64 ORACLE on the kernel's own (rounded) inputs and cotangent; for
    large cases (10^5-10^8 elements: full vocabularies, thousands of tokens) it is STOCK run in
    float32 on the same values (the float64 oracle takes minutes there on two cores), and the
    tolerance adds the float32 model of the reference itself.
Float32 is checked in true float32: the evaluator's stage-1 child sets MLX_ENABLE_TF32=0 before
MLX loads (MLX on CUDA otherwise runs float32 matmuls in TF32, ~1e-3 relative).

Error: err = max|out - ref| / max|ref| over the tensor (one number for losses, activations and
gradients of any magnitude). A comparison passes when
    err <= max(model, STOCK_MARGIN * stock_err)
`model` = kernel_lab.tolerances.model_tolerance = C * (u(dtype) + u32 * growth(case)): u the
dtype's unit roundoff (float32 2^-24, bfloat16 2^-8, float16 2^-11), u32 the float32 arithmetic
a correct kernel computes in, growth the case's reductions (sqrt of their lengths) and
conditioning (RoPE angles up to (offset + L) * scale, logits up to +-3e4); C a few units, per
kernel and direction (tolerances.COEFFICIENTS; the model and its calibration: tolerances).
In bfloat16 that is 1.6-3.6e-2 (was up to 1e-1), in float16 2-4e-3: a kernel that drops the LoRA
term, leaves it out of DoRA's norm, computes in a coarser dtype or approximates a function fails.
`stock_err` is the error of what MLX ships on the very same inputs, computed only when the model
is exceeded: the stock kernel, and for dora_linear on a quantized base also mx.quantized_matmul
(forward and transposed), which a kernel may use instead of stock's dequantize. It matters where
MLX's own kernels are far off: the CPU's half-precision quantized matmul accumulates in half
precision (stock LoRA ~5e-2 in bfloat16). STOCK_MARGIN = 2 leaves room for another order of the
same arithmetic but not for a shortcut; on a GPU stock accumulates in float32 and the model rules.
Exceptions inside a kernel are caught and reported as that kernel's failure.
"""

import sys
import time
import traceback
import zlib

import mlx.core as mx

from . import shapes
from .check_format import format_failure, format_table  # noqa: F401  (callers import them here)
from .contract import KERNEL_NAMES
from .ops import STOCK
from .references import normalized_error, reference, stock_errors
from .tolerances import model_tolerance, tolerance  # noqa: F401  (tolerance: the shared accessor)

DEFAULT_DTYPES = ("float32", "bfloat16", "float16")
STOCK_MARGIN = 2.0

ARG_NAMES = {
    "rms_norm": ("x", "weight", "eps"),
    "rope": ("x", "dims"),
    "attention": ("queries", "keys", "values"),
    "swiglu": ("gate", "up"),
    "cross_entropy": ("logits", "targets"),
    "linear_cross_entropy": ("hidden", "weight", "targets"),
    "lora_linear": ("x", "weight", "scales", "biases", "lora_a", "lora_b", "scale"),
    "dora_linear": ("x", "weight", "scales", "biases", "lora_a", "lora_b", "scale", "magnitude"),
}

FLOAT32_LOSS = ("cross_entropy", "linear_cross_entropy")  # may return float32 whatever stock does


class CheckFailure(Exception):
    """One comparison failed; carries the failure record."""

    def __init__(self, what, error):
        super().__init__(error)
        self.what, self.error = what, error


def case_seed(seed, kernel, case_name, dtype):
    """A per-(kernel, case, dtype) seed derived from the caller's seed."""
    return zlib.crc32(f"{seed}/{kernel}/{case_name}/{dtype}".encode())


def cases_for(kernel, shape_set, seed=None):
    """The cases of a shape set for this seed; "smoke" is the first default case of each kernel."""
    if shape_set == "smoke":
        return shapes.correctness_cases(kernel, "default", seed)[:1]
    return shapes.correctness_cases(kernel, shape_set, seed)


def case_dtypes(case, dtypes):
    """Large cases run in float32 only on the CPU (its half-precision matmuls are ~50x slower)."""
    from .cases import on_accelerator

    if case.get("large") and not on_accelerator():
        return tuple(d for d in dtypes if d == "float32")
    return tuple(dtypes)


def _all_finite(a):
    return bool(mx.all(mx.isfinite(a)).item())


def _where(exc):
    """' (at file:line)' of the innermost frame of an exception, if any."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def compiled_vjp(fn, args, kwargs, grad_argnums):
    """(step, arrays): step(cotangent, *arrays) = (output, grads) under mx.compile, the array
    arguments passed as inputs and the Python constants closed over (as microbench times it)."""
    slots = [("arg", i) for i, a in enumerate(args) if isinstance(a, mx.array)]
    slots += [("kw", k) for k, v in kwargs.items() if isinstance(v, mx.array)]

    def step(cotangent, *arrays):
        full_args, full_kwargs = list(args), dict(kwargs)
        for (kind, key), value in zip(slots, arrays):
            (full_args if kind == "arg" else full_kwargs)[key] = value
        return shapes.vjp_at(fn, full_args, full_kwargs, grad_argnums, cotangent)

    return mx.compile(step), [args[k] if kind == "arg" else kwargs[k] for kind, k in slots]


def _check_output(out, expected, allowed, what):
    if not isinstance(out, mx.array):
        raise CheckFailure(what, f"returned {type(out).__name__}, expected an mx.array")
    if tuple(out.shape) != tuple(expected.shape):
        raise CheckFailure(what, f"output shape {tuple(out.shape)} != expected {tuple(expected.shape)}")
    if out.dtype not in allowed:
        raise CheckFailure(what, f"output dtype {out.dtype} != expected {expected.dtype}")


def _memo(cache, key, make):
    """make(), or the value cached under key (cache None: no caching)."""
    if cache is None:
        return make()
    if key not in cache:
        cache[key] = make()
    return cache[key]


def check_case(fn, kernel, case, dtype, seed, cache=None):
    """Check one kernel on one case and dtype; returns (max_abs_err, max_rel_err).

    Raises CheckFailure naming what failed (forward, grad of <arg>, under mx.compile or eager).
    `cache`: a dict shared by calls that check several implementations on the same seed (tests,
    calibration): inputs, references and stock's errors are then computed once.
    """
    key = (kernel, case["name"], str(dtype), seed)
    args, kwargs, grad_argnums = _memo(cache, key, lambda: shapes.make_inputs(kernel, case, dtype, seed))
    names, large = ARG_NAMES[kernel], bool(case.get("large"))
    expected = getattr(STOCK, kernel)(*args, **kwargs)  # shape/dtype need no evaluation
    allowed = {expected.dtype} | ({mx.float32} if kernel in FLOAT32_LOSS else set())

    try:  # eagerly: exceptions, shape and dtype with plain messages
        eager = fn(*args, **kwargs)
        _check_output(eager, expected, allowed, "forward")
        if not large:  # small cases: eager values are checked too (large: the compiled ones only)
            mx.eval(eager)
    except CheckFailure:
        raise
    except Exception as exc:  # a kernel bug is a result, not a crash of the checker
        raise CheckFailure("forward", f"{type(exc).__name__}: {exc}{_where(exc)}")

    cotangent = mx.random.normal(expected.shape, key=mx.random.key(seed ^ 0x5EED)).astype(eager.dtype)
    try:
        step, arrays = compiled_vjp(fn, args, kwargs, grad_argnums)
        out, grads = step(cotangent, *arrays)
        mx.eval(out, grads)
    except Exception as exc:
        raise CheckFailure("forward+backward under mx.compile",
                           f"{type(exc).__name__}: {exc}{_where(exc)} [kernels run inside mx.compile, "
                           "as in mlx-lm's training step: no .item(), no Python branches on array values]")
    _check_output(out, expected, allowed, "forward under mx.compile")
    key += (str(cotangent.dtype),)
    ref_out, ref_grads = _memo(cache, key + ("reference",),
                               lambda: reference(kernel, case, args, kwargs, grad_argnums, cotangent))

    comparisons = [("forward under mx.compile", out, ref_out, "forward", 0)]
    if not large:
        comparisons.insert(0, ("forward", eager, ref_out, "forward", 0))
    for slot, (i, g, rg) in enumerate(zip(grad_argnums, grads, ref_grads), start=1):
        comparisons.append((f"grad of {names[i]} under mx.compile", g, rg, "grad", slot))
    stock = None
    worst = (0.0, 0.0)
    for what, value, ref, kind, slot in comparisons:
        if tuple(value.shape) != tuple(ref.shape):
            raise CheckFailure(what, f"shape {tuple(value.shape)} != expected {tuple(ref.shape)}")
        if not _all_finite(value) and _all_finite(ref):
            raise CheckFailure(what, "non-finite values (NaN or inf) where the reference is finite")
        abs_err, rel_err = normalized_error(value, ref, large)
        model = model_tolerance(kernel, case, dtype, kind)
        if large:  # the float32 reference's own error
            model += model_tolerance(kernel, case, "float32", kind)
        tol = model
        if not rel_err <= model and not (large and dtype == "float32"):  # stock: only when needed
            if stock is None:
                stock = _memo(cache, key + ("stock",), lambda: stock_errors(
                    kernel, case, args, kwargs, grad_argnums, cotangent.astype(expected.dtype), ref_out,
                    ref_grads))
            tol = max(model, STOCK_MARGIN * stock[slot])
        if not rel_err <= tol:  # also catches NaN
            stock_text = f"; stock kernel: {stock[slot]:.3g}" if stock else ""
            raise CheckFailure(what, f"max error {abs_err:.3g} = {rel_err:.3g} x max|reference| > "
                                     f"tolerance {tol:.3g} (model {model:.3g}{stock_text})")
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


def check_kernels(kernels, *, seed, shape_set="default", dtypes=DEFAULT_DTYPES, names=None, cache=None):
    """Check each kernel (attributes of `kernels`) against the reference; one dict per kernel.

    Each dict: kernel, passed, max_abs_err, max_rel_err, cases (comparisons run: case x
    dtype), seconds, failure (None or {case, shape, dtype, what, error}). A kernel stops
    at its first failure. `cache`: see check_case (never for a candidate under evaluation).
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
            for case in cases_for(kernel, shape_set, seed):
                for dtype in case_dtypes(case, dtypes):
                    sub_seed = case_seed(seed, kernel, case["name"], dtype)
                    try:
                        abs_err, rel_err = check_case(fn, kernel, case, dtype, sub_seed, cache)
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


if __name__ == "__main__":
    from .calibration import main

    sys.exit(main())
