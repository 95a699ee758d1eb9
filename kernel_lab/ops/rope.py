"""Rotary position embedding, with the semantics of mx.fast.rope.

x is (B, *, L, D); the first `dims` features of each position are rotated, the rest
pass through. Non-traditional (the default in mlx-lm) rotates the two halves
x[:dims/2] and x[dims/2:dims]; traditional rotates interleaved pairs (x[0], x[1]), ...
The angle of pair i at position p is (offset + p) * scale * theta_i with
theta_i = base ** (-2i / dims), or theta_i = 1 / freqs[i] when `freqs` is given
(mlx-lm's Llama3/Yarn/SuScaled RoPEs pass per-pair wavelengths as `freqs`, base=None).
"""

import mlx.core as mx

from ._float64 import float64_on_cpu


def check_arguments(x, dims, base, freqs):
    """Raise ValueError for arguments mx.fast.rope would reject."""
    if x.ndim < 3:
        raise ValueError(f"rope expects x of at least 3 dims (B, *, L, D), got shape {x.shape}")
    if dims % 2 or dims > x.shape[-1] or dims <= 0:
        raise ValueError(f"rope dims must be even and in (0, {x.shape[-1]}], got {dims}")
    if (base is None) == (freqs is None):
        raise ValueError("rope needs exactly one of base and freqs")
    if freqs is not None and freqs.shape != (dims // 2,):
        raise ValueError(f"rope freqs must have shape ({dims // 2},), got {freqs.shape}")


@float64_on_cpu
def oracle(x, dims, *, traditional, base, scale, offset, freqs=None):
    """The plain math in float64 (offset: int, scalar array or one per batch row)."""
    check_arguments(x, dims, base, freqs)
    length = x.shape[-2]
    half = dims // 2
    if freqs is None:
        theta = base ** (-mx.arange(0, dims, 2, dtype=mx.float64) / dims)
    else:
        theta = 1.0 / freqs
    offset = mx.array(offset).astype(mx.float64)
    if offset.ndim == 1:  # one offset per batch row
        offset = offset.reshape((-1,) + (1,) * (x.ndim - 2))
    positions = offset + mx.arange(length, dtype=mx.float64)  # (..., L)
    angles = (positions * scale)[..., None] * theta  # (..., L, dims/2)
    cos, sin = mx.cos(angles), mx.sin(angles)
    rotated, rest = x[..., :dims], x[..., dims:]
    if traditional:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
        pairs = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
        out = pairs.reshape(*pairs.shape[:-2], dims)
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
        out = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return mx.concatenate([out, rest], axis=-1) if dims < x.shape[-1] else out


def stock(x, dims, *, traditional, base, scale, offset, freqs=None):
    """What MLX and mlx-lm run: the fused mx.fast.rope."""
    return mx.fast.rope(
        x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs
    )
