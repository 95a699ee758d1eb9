"""Stage 1's tolerances, from each kernel's arithmetic (the model is in correctness's docstring).

    tolerance = C[kernel][kind] * (u(dtype) + u32 * growth(kernel, case, kind))

u(dtype) is the unit roundoff of the kernel's dtype (float32 2^-24, bfloat16 2^-8, float16 2^-11):
a correct kernel rounds its output, and a few intermediates, to that dtype. u32 = 2^-24 is the
float32 arithmetic every correct kernel computes in (inputs and cotangents are exact: the
reference works on the kernel's own rounded values), and growth() is how much a float32 kernel's
error can grow with the case's reductions (sqrt of their lengths: random rounding errors) and
conditioning (RoPE angles up to (offset + L) * scale rad lose u32 * angle; the softmax of
logits up to L loses u32 * L through exp(l - lse)). C, a few units, is calibrated: see
CALIBRATION below. A kernel that computes, accumulates or stores an intermediate in a coarser
dtype than it was given, drops a term, or approximates a function falls outside.
"""

import math
from types import MappingProxyType

UNIT_ROUNDOFF = MappingProxyType({"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11})
U32 = UNIT_ROUNDOFF["float32"]

# C: roundoffs a correct kernel may be off, forward / each gradient. Calibrated on the CPU
# (mlx 0.32.4), `python -m kernel_lab.correctness --calibrate --seeds 20` (numbers in CALIBRATION).
COEFFICIENTS = MappingProxyType({
    "rms_norm": MappingProxyType({"forward": 4.0, "grad": 6.0}),
    "rope": MappingProxyType({"forward": 4.0, "grad": 4.0}),
    "swiglu": MappingProxyType({"forward": 4.0, "grad": 6.0}),
    "cross_entropy": MappingProxyType({"forward": 4.0, "grad": 8.0}),
    "linear_cross_entropy": MappingProxyType({"forward": 4.0, "grad": 8.0}),
    "lora_linear": MappingProxyType({"forward": 4.0, "grad": 4.0}),
    "dora_linear": MappingProxyType({"forward": 6.0, "grad": 6.0}),
})

CALIBRATION = """(filled in by the calibration run)"""


def dtype_name(dtype):
    return dtype if isinstance(dtype, str) else str(dtype).split(".")[-1]


def max_logit(case, dtype):
    """Largest |logit| a case's inputs hold (kernel_lab.shapes.make_inputs: clipped at 4x scale
    for "max" cases; else normal logits, or hidden ~ N(0, 4) times rows of norm ~1)."""
    if case.get("logit_scale") == "max":
        return 3e4 if dtype_name(dtype) == "float16" else 1e4
    return 18.0 if case["kernel"] == "cross_entropy" else 12.0


def growth(kernel, case, kind, dtype="float32"):
    """How many u32 a correct float32 computation of this case may lose (see module docstring)."""
    rows = math.prod(case["tokens"]) * case.get("heads", 1)
    root = math.sqrt
    if kernel == "rms_norm":
        return root(case["dim"]) + (root(rows) if kind == "grad" else 0.0)
    if kernel == "rope":
        offset = case.get("offset", 0)
        return 1.0 + (abs(offset) + case["tokens"][1]) * abs(case.get("scale", 1.0))
    if kernel == "swiglu":
        return 1.0
    if kernel in ("cross_entropy", "linear_cross_entropy"):
        vocab = case["vocab"]
        g = root(vocab) + math.log(vocab) + max_logit(case, dtype)  # the lse sum; exp(l - lse)
        if kernel == "linear_cross_entropy":  # logits over hidden; d_hidden sums over the vocabulary
            g += root(case["hidden"]) + (root(vocab) if kind == "grad" else 0.0)
        return g
    if kernel in ("lora_linear", "dora_linear"):
        k, n, r = case["in_dim"], case["out_dim"], case["rank"]
        g = root(k) + root(r) + (root(n) + root(rows) if kind == "grad" else 0.0)
        return g + (root(k) if kernel == "dora_linear" else 0.0)  # DoRA's row norms
    raise ValueError(f"unknown kernel {kernel!r}")


def model_tolerance(kernel, case, dtype, kind):
    """C * (u(dtype) + u32 * growth): the allowed max|out - ref| / max|ref| on this case."""
    c = COEFFICIENTS[kernel][kind]
    return c * (UNIT_ROUNDOFF[dtype_name(dtype)] + U32 * growth(kernel, case, kind, dtype))


def tolerance(kernel, dtype, kind, case=None):
    """Allowed normalized error of `kernel` in `dtype` for `kind` ("forward" | "grad") on `case`;
    without a case, the largest over the kernel's canonical cases on this device (stage 2 allows
    2x this between candidate and stock on its own cases)."""
    if kind not in ("forward", "grad"):
        raise ValueError(f"kind must be 'forward' or 'grad', not {kind!r}")
    if case is not None:
        return model_tolerance(kernel, case, dtype, kind)
    from .cases import correctness_cases

    return max(model_tolerance(kernel, c, dtype, kind) for c in correctness_cases(kernel))
