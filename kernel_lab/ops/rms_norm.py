"""RMS normalization over the last axis: x / sqrt(mean(x^2) + eps) * weight."""

import mlx.core as mx

from ._float64 import float64_on_cpu


@float64_on_cpu
def oracle(x, weight, eps):
    """The plain math in float64."""
    y = x * mx.rsqrt(mx.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * weight


def stock(x, weight, eps):
    """What MLX and mlx-lm run: the fused mx.fast.rms_norm."""
    return mx.fast.rms_norm(x, weight, eps)
