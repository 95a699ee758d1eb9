"""Stage 1's tolerances, from each kernel's arithmetic (the check itself: kernel_lab.correctness).

    tolerance = C[kernel][kind] * (u(dtype) + u32 * growth(kernel, case, kind))

u(dtype) is the unit roundoff of the kernel's dtype (float32 2^-24, bfloat16 2^-8, float16 2^-11):
a correct kernel rounds its output, and a few intermediates, to that dtype. u32 = 2^-24 is the
float32 arithmetic a correct kernel computes in (inputs and cotangent are exact: the reference
works on the kernel's own rounded values). growth() is how far a float32 computation of the case
may drift: sqrt of each reduction's length (random rounding errors: D for rms_norm, the
vocabulary for the losses' logsumexp and, for linear_cross_entropy, its d_hidden and the hidden
width, in_dim / out_dim / tokens / rank for LoRA and DoRA, once more in_dim for DoRA's row
norms) plus the conditioning: RoPE angles up to (offset + L) * scale rad lose u32 * angle in
float32 (4113 rad in the default cases), and exp(l - lse) of logits up to L (1e4, 3e4 in float16)
loses u32 * L. So bfloat16 allows 1.6-3.6e-2 (was up to 0.1), float16 2-4e-3 (1.8e-2 for logits
of 3e4), float32 5e-7..5e-3 (the larger where growth says so: RoPE at offset 4113, logits of
1e4). A kernel that computes an intermediate in a coarser dtype than it was given, drops a
term, or approximates a function falls outside; tests/test_correctness.py holds such programs.

C, per kernel and direction, is 2.4-3.7x the worst error measured in these units over seeds
0-19 on the CPU (mlx 0.32.4, 2 cores), over stock, initial_program.py, examples/optimized_program.py
(also with its CUDA dense-base and chunked-loss paths forced) and the legit corpus of
tests/legit/ (dense dequantize + matmul bases with re-dequantizing VJPs, float32 accumulation,
token- and vocabulary-chunked losses with an online logsumexp, reordered reductions, recomputing
VJPs, DoRA on mx.quantized_matmul, mx.fast.cross_entropy):
    python tests/legit/legit_corpus.py --calibrate --seeds 0-19
    python -m kernel_lab.correctness --calibrate --seeds 20 [PROGRAM ...]
worst units (forward / grad) -> C:  rms_norm 1.53 / 2.29 -> 4 / 6;  rope 1.69 / 1.61 -> 4 / 4;
swiglu 1.57 / 2.48 -> 4 / 6;  cross_entropy 1.32 / 2.77 -> 4 / 8;  linear_cross_entropy 1.58 /
2.19 -> 4 / 8;  lora_linear 1.70 / 1.46 -> 4 / 4;  dora_linear 2.29 / 1.62 -> 6 / 6 (6.5 min);
attention 1.62 / 2.90 -> 4 / 8 (stock, initial_program.py and the optimized program's padded and
blockwise paths, seeds 0-19; its scores may be rounded to the dtype: dtype_growth below).
Not in these numbers: half-precision quantized matmuls on the CPU (6-22 units: MLX's CPU kernel
accumulates in half precision); there the stock term of kernel_lab.correctness carries the check.
"""

import functools
import math
from types import MappingProxyType

UNIT_ROUNDOFF = MappingProxyType({"float32": 2.0 ** -24, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11})
U32 = UNIT_ROUNDOFF["float32"]

# C: roundoffs a correct kernel may be off, forward / each gradient (calibration: module docstring).
COEFFICIENTS = MappingProxyType({
    "rms_norm": MappingProxyType({"forward": 4.0, "grad": 6.0}),
    "rope": MappingProxyType({"forward": 4.0, "grad": 4.0}),
    "attention": MappingProxyType({"forward": 4.0, "grad": 8.0}),
    "swiglu": MappingProxyType({"forward": 4.0, "grad": 6.0}),
    "cross_entropy": MappingProxyType({"forward": 4.0, "grad": 8.0}),
    "linear_cross_entropy": MappingProxyType({"forward": 4.0, "grad": 8.0}),
    "lora_linear": MappingProxyType({"forward": 4.0, "grad": 4.0}),
    "dora_linear": MappingProxyType({"forward": 6.0, "grad": 6.0}),
})


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
    if kernel == "attention":  # q.k over D, softmax and p.v over the keys; dk, dv over queries
        keys = case.get("key_length", case["tokens"][1])
        sharp = 4.0 * case.get("score_scale", 1.0)  # largest |score|: exp(s - lse) conditioning
        g = root(case["head_dim"]) + root(keys) + sharp
        return g + (root(case["tokens"][1] * case["heads"] // case["kv_heads"]) if kind == "grad" else 0.0)
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


def dtype_growth(kernel, case):
    """How many u(dtype) a correct kernel's roundings to its own dtype may cost: 1 (the output),
    except attention, whose scores q.k may be rounded to the dtype before the softmax (as MLX's
    CPU kernel and a plain `q @ k.T` do): exp(s - lse) then loses u * |s|, with the largest |s| a
    few times score_scale (calibrated: 1 + score_scale / 2)."""
    if kernel == "attention":
        return 1.0 + case.get("score_scale", 1.0) / 2
    return 1.0


def model_tolerance(kernel, case, dtype, kind):
    """C * (u(dtype) * dtype_growth + u32 * growth): the allowed max|out - ref| / max|ref|."""
    c = COEFFICIENTS[kernel][kind]
    return c * (UNIT_ROUNDOFF[dtype_name(dtype)] * dtype_growth(kernel, case)
                + U32 * growth(kernel, case, kind, dtype))


def tolerance(kernel, dtype, kind, case=None):
    """Allowed normalized error of `kernel` in `dtype` for `kind` ("forward" | "grad") on `case`;
    without a case, the largest over the kernel's canonical cases on this device (stage 2 allows
    2x this between candidate and stock on its own cases)."""
    if kind not in ("forward", "grad"):
        raise ValueError(f"kind must be 'forward' or 'grad', not {kind!r}")
    if case is not None:
        return model_tolerance(kernel, case, dtype, kind)
    from .cases import on_accelerator

    return _worst_canonical(kernel, dtype_name(dtype), kind, on_accelerator())


@functools.lru_cache(maxsize=None)
def _worst_canonical(kernel, dtype, kind, accelerated):
    from .cases import correctness_cases

    return max(model_tolerance(kernel, c, dtype, kind) for c in correctness_cases(kernel))
