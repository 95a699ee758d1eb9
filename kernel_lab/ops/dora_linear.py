"""DoRA on a (4-bit quantized or dense) linear layer, as mlx_lm.tuner.dora.DoRALinear.

out = m / ||W + scale * (lora_a @ lora_b).T||_row * (x @ W.T + scale * (x @ lora_a) @ lora_b)
(+ bias after the rescale). As in mlx-lm the row norm is under stop_gradient: no
gradient flows through the denominator; `magnitude` is DoRALinear.m, shape (out,).
"""

import mlx.core as mx

from ._float64 import dense_weight, float64_on_cpu


@float64_on_cpu
def oracle(x, weight, scales, biases, lora_a, lora_b, scale, magnitude, *, group_size, bits, bias=None):
    """The plain math in float64 (same stop_gradient placement as mlx-lm)."""
    w = dense_weight(weight, scales, biases, group_size, bits)
    out = x @ w.T + scale * ((x @ lora_a) @ lora_b)
    adapted = w + scale * (lora_a @ lora_b).T
    denom = mx.stop_gradient(mx.sqrt(mx.sum(adapted * adapted, axis=1)))
    out = (magnitude / denom) * out
    return out if bias is None else out + bias


def stock(x, weight, scales, biases, lora_a, lora_b, scale, magnitude, *, group_size, bits, bias=None):
    """What mlx-lm runs: DoRALinear.__call__ (dropout 0), line for line."""
    w = weight
    if scales is not None:  # DoRALinear._dequantized_weight
        w = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits)
    y = x @ w.T

    z = (x @ lora_a) @ lora_b
    out = y + (scale * z).astype(x.dtype)

    adapted = w + (scale * lora_b.T) @ lora_a.T
    denom = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))

    out = (magnitude / denom).astype(x.dtype) * out

    if bias is not None:
        out = out + bias
    return out
