"""Scaled dot-product attention, as mlx-lm's attention layers call it in training.

attention(queries, keys, values, *, scale, mask=None) with queries (B, Hq, Lq, D) and
keys / values (B, Hkv, Lk, D), Hq a multiple of Hkv (grouped-query attention: query head h
reads key/value head h // (Hq / Hkv)). `mask` is what `mlx_lm.models.base.create_attention_mask`
hands the layer: None, "causal" (query i sees keys j <= i + Lk - Lq), a boolean array (True =
attend) or an additive array, broadcastable to (B, Hq, Lq, Lk). Returns (B, Hq, Lq, D) in the
queries' dtype, like mx.fast.scaled_dot_product_attention.
"""

import mlx.core as mx

from ._float64 import float64_on_cpu


def check_arguments(queries, keys, values, mask):
    """Raise ValueError for arguments mx.fast.scaled_dot_product_attention would reject."""
    if queries.ndim != 4 or keys.ndim != 4 or values.ndim != 4:
        raise ValueError("attention expects (B, heads, L, D) queries, keys and values")
    if keys.shape != values.shape[:3] + (keys.shape[3],) or keys.shape[:3] != values.shape[:3]:
        raise ValueError(f"keys {keys.shape} and values {values.shape} disagree")
    if queries.shape[1] % keys.shape[1]:
        raise ValueError(f"{queries.shape[1]} query heads are not a multiple of {keys.shape[1]} kv heads")
    if isinstance(mask, str) and mask != "causal":
        raise ValueError(f"mask must be None, 'causal' or an array, got {mask!r}")


def causal_mask(query_length, key_length):
    """(Lq, Lk) booleans: query i (aligned to the end of the keys) sees keys j <= i + Lk - Lq."""
    rows = mx.arange(key_length - query_length, key_length)
    return rows[:, None] >= mx.arange(key_length)[None]


@float64_on_cpu
def oracle(queries, keys, values, *, scale, mask=None):
    """The plain math in float64: repeated kv heads, masked scores, softmax, weighted values."""
    check_arguments(queries, keys, values, mask)
    repeats = queries.shape[1] // keys.shape[1]
    keys, values = mx.repeat(keys, repeats, axis=1), mx.repeat(values, repeats, axis=1)
    scores = (queries * scale) @ keys.swapaxes(-1, -2)
    if isinstance(mask, str):
        mask = causal_mask(queries.shape[2], keys.shape[2])
    if mask is not None:
        if mask.dtype == mx.bool_:
            scores = mx.where(mask, scores, -mx.inf)
        else:
            scores = scores + mask.astype(mx.float64, stream=mx.cpu)
    return mx.softmax(scores, axis=-1) @ values


def stock(queries, keys, values, *, scale, mask=None):
    """What mlx-lm runs in training: mx.fast.scaled_dot_product_attention."""
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
