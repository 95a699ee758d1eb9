"""The starting program that OpenEvolve evolves: eight MLX fine-tuning kernels.

Everything between EVOLVE-BLOCK-START and EVOLVE-BLOCK-END may be rewritten by the
search; the eight public functions must keep their signatures and semantics (see
kernel_lab/contract.py): every candidate is checked against a float64 oracle
(values and gradients, three dtypes, adversarial inputs) before it is timed against
the kernels MLX and mlx-lm ship (mx.fast.*, nn.losses.cross_entropy, LoRALinear,
DoRALinear). This version is the plain composition of MLX ops a user writes first.

Run `python initial_program.py` for a quick self-check against the oracle.
"""

import math  # noqa: F401  (available to evolved code)

import mlx.core as mx
import mlx.nn as nn  # noqa: F401  (available to evolved code)

# EVOLVE-BLOCK-START


def rms_norm(x, weight, eps):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (like mx.fast.rms_norm)."""
    xf = x.astype(mx.float32)
    y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    y = y.astype(x.dtype)
    return y if weight is None else y * weight


def rope(x, dims, *, traditional, base, scale, offset, freqs=None):
    """Rotary embedding of the first `dims` features of x (B, *, L, D) (like mx.fast.rope)."""
    length = x.shape[-2]
    half = dims // 2
    if freqs is None:
        inv_freq = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims)
    else:
        inv_freq = 1.0 / freqs.astype(mx.float32)
    positions = mx.arange(length, dtype=mx.float32) + offset
    angles = (positions * scale)[:, None] * inv_freq[None, :]
    cos, sin = mx.cos(angles), mx.sin(angles)
    xf = x[..., :dims].astype(mx.float32)
    if traditional:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rotated = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        rotated = rotated.reshape(*rotated.shape[:-2], dims)
    else:
        x1, x2 = xf[..., :half], xf[..., half:]
        rotated = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    rotated = rotated.astype(x.dtype)
    if dims == x.shape[-1]:
        return rotated
    return mx.concatenate([rotated, x[..., dims:]], axis=-1)


def attention(queries, keys, values, *, scale, mask=None):
    """softmax(q k^T * scale + mask) v over grouped-query heads (like mx.fast.scaled_dot_product_attention)."""
    group = queries.shape[1] // keys.shape[1]
    if group > 1:  # each key/value head serves `group` query heads
        keys, values = mx.repeat(keys, group, axis=1), mx.repeat(values, group, axis=1)
    scores = ((queries * scale) @ keys.swapaxes(-1, -2)).astype(mx.float32)
    if isinstance(mask, str):  # "causal": query i sees the keys up to i + Lk - L
        length, key_length = scores.shape[-2:]
        rows = mx.arange(key_length - length, key_length)
        mask = rows[:, None] >= mx.arange(key_length)[None]
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    return mx.softmax(scores, axis=-1).astype(values.dtype) @ values


def swiglu(gate, up):
    """silu(gate) * up, the gated activation of Llama/Qwen/Phi MLPs."""
    return gate * mx.sigmoid(gate) * up


def cross_entropy(logits, targets):
    """Per-token loss logsumexp(logits) - logits[target], computed in float32."""
    logits = logits.astype(mx.float32)
    peak = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))
    lse = mx.log(mx.sum(mx.exp(logits - peak), axis=-1)) + peak[..., 0]
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked


def linear_cross_entropy(hidden, weight, targets, *, scales=None, biases=None, group_size=None, bits=None):
    """cross_entropy(hidden @ weight.T, targets); weight 4-bit quantized when scales is given."""
    if scales is None:
        logits = hidden @ weight.T
    else:
        logits = mx.quantized_matmul(
            hidden, weight, scales=scales, biases=biases, transpose=True,
            group_size=group_size, bits=bits,
        )
    return cross_entropy(logits, targets)


def lora_linear(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    """Frozen (quantized) base layer plus the low-rank update scale * (x @ a) @ b."""
    if scales is None:
        y = x @ weight.T
    else:
        y = mx.quantized_matmul(
            x, weight, scales=scales, biases=biases, transpose=True,
            group_size=group_size, bits=bits,
        )
    if bias is not None:
        y = y + bias
    z = (x @ lora_a) @ lora_b
    return y + (scale * z).astype(x.dtype)


def dora_linear(x, weight, scales, biases, lora_a, lora_b, scale, magnitude, *, group_size, bits, bias=None):
    """LoRA output rescaled row-wise to `magnitude` / ||W + scale * (a @ b).T|| (no grad through the norm)."""
    w = weight
    if scales is not None:
        w = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits)
    y = x @ w.T
    z = (x @ lora_a) @ lora_b
    out = y + (scale * z).astype(x.dtype)
    adapted = w + scale * (lora_a @ lora_b).T
    denom = mx.stop_gradient(mx.sqrt(mx.sum(adapted * adapted, axis=1)))
    out = (magnitude / denom).astype(x.dtype) * out
    return out if bias is None else out + bias


# EVOLVE-BLOCK-END


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from kernel_lab.correctness import check_kernels, format_table

    results = check_kernels(sys.modules[__name__], seed=0, shape_set="smoke")
    print(format_table(results))
    sys.exit(0 if all(r["passed"] for r in results) else 1)
