"""Repack llama.cpp's quantized GGUF blocks into MLX affine quantization (group size 32).

MLX stores a quantized matrix as packed unsigned integers `q` plus one `scale` and
one `bias` per group of 32 weights: `w = scale * q + bias`. Most llama.cpp block
formats are exactly that shape, so their integers are carried over bit for bit:

    Q4_0  w = d * (q - 8)          -> 4 bits, scale d,      bias -8 d
    Q4_1  w = d * q + m            -> 4 bits, scale d,      bias m
    Q5_0  w = d * (q - 16)         -> 5 bits, scale d,      bias -16 d
    Q5_1  w = d * q + m            -> 5 bits, scale d,      bias m
    Q8_0  w = d * q  (q signed)    -> 8 bits, scale d,      bias -128 d   (q + 128 unsigned)
    Q4_K  w = d*sc * q - dmin*m    -> 4 bits, scale d*sc,   bias -dmin*m  (sc, m per 32)

Q6_K is the exception: its 6-bit scales cover 16 weights, and MLX's smallest group
is 32. Each group of 32 spans two sub-blocks `d*sc1*q1` and `d*sc2*q2`; all its values
are multiples of `d*gcd(sc1, sc2)`, so when they span at most 256 such steps it is
stored exactly as 8 bits; otherwise it is rounded to 8 bits over its min..max (error
at most 1/510 of the group's range, well below Q6_K's own step). `q6k_exact_fraction`
reports how many groups were exact.

Everything works on the raw bytes (numpy views of the memory-mapped file), so the
integers never pass through floating point.
"""

import numpy as np

GROUP_SIZE = 32

# Bytes per block and weights per block of each format (llama.cpp's ggml-common.h).
BLOCK_LAYOUT = {
    "Q4_0": (18, 32),
    "Q4_1": (20, 32),
    "Q5_0": (22, 32),
    "Q5_1": (24, 32),
    "Q8_0": (34, 32),
    "Q4_K": (144, 256),
    "Q6_K": (210, 256),
}
BITS = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q6_K": 8}


def _f16(raw, start):
    """The float16 at byte `start` of every block, as float32 (blocks, 1)."""
    return raw[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _low_high_nibbles(qs):
    """llama.cpp puts weight j in the low nibble of byte j and weight j+16 in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(raw):
    d = _f16(raw, 0)
    return _low_high_nibbles(raw[:, 2:18]), d, -8.0 * d


def _q4_1(raw):
    d, m = _f16(raw, 0), _f16(raw, 2)
    return _low_high_nibbles(raw[:, 4:20]), d, m


def _fifth_bits(qh_bytes):
    """Bit j of the little-endian uint32 qh is the 5th bit of weight j."""
    qh = qh_bytes.copy().view("<u4")  # (blocks, 1)
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _q5_0(raw):
    d = _f16(raw, 0)
    q = _low_high_nibbles(raw[:, 6:22]) | (_fifth_bits(raw[:, 2:6]) << 4)
    return q, d, -16.0 * d


def _q5_1(raw):
    d, m = _f16(raw, 0), _f16(raw, 2)
    q = _low_high_nibbles(raw[:, 8:24]) | (_fifth_bits(raw[:, 4:8]) << 4)
    return q, d, m


def _q8_0(raw):
    d = _f16(raw, 0)
    q = raw[:, 2:34].view(np.int8).astype(np.int16) + 128
    return q.astype(np.uint8), d, -128.0 * d


def _k4_scales_mins(packed):
    """The eight 6-bit (scale, min) pairs of a Q4_K super-block (llama.cpp get_scale_min_k4)."""
    p = packed.astype(np.uint8)
    sc = np.empty((p.shape[0], 8), np.uint8)
    mn = np.empty((p.shape[0], 8), np.uint8)
    sc[:, :4] = p[:, 0:4] & 63
    mn[:, :4] = p[:, 4:8] & 63
    sc[:, 4:] = (p[:, 8:12] & 0x0F) | ((p[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (p[:, 8:12] >> 4) | ((p[:, 4:8] >> 6) << 4)
    return sc, mn


def _q4_k(raw):
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, mn = _k4_scales_mins(raw[:, 4:16])
    qs = raw[:, 16:144].reshape(-1, 4, 32)  # four chunks of 64 weights
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(-1, 8, 32)
    scale = d * sc.astype(np.float32)  # (blocks, 8) -> one per group of 32
    bias = -(dmin * mn.astype(np.float32))
    return q.reshape(-1, 256), scale, bias


def _q6_k_integers(raw):
    """Q6_K as (d (blocks,1), signed ints sc*q (blocks, 256)) so that w = d * ints."""
    ql = raw[:, 0:128].reshape(-1, 2, 64)
    qh = raw[:, 128:192].reshape(-1, 2, 32)
    sc = raw[:, 192:208].view(np.int8).astype(np.int32)  # 16 scales, one per 16 weights
    d = _f16(raw, 208)
    low = np.concatenate([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=-1)
    high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)
    q = (low | (high << 4)).astype(np.int32).reshape(-1, 256) - 32
    return d, q * np.repeat(sc, 16, axis=1)


def _q6_k(raw):
    d, ints = _q6_k_integers(raw)
    groups = ints.reshape(-1, 8, 32)  # (blocks, groups, 32)
    step = np.gcd.reduce(np.abs(groups), axis=-1)
    step[step == 0] = 1
    lo, hi = (groups // step[..., None]).min(-1), (groups // step[..., None]).max(-1)
    exact = (hi - lo) <= 255
    d3 = d[:, :, None]
    # Exact groups: integer grid of step d*gcd starting at the group minimum.
    q_exact = groups // step[..., None] - lo[..., None]
    scale = np.where(exact, d * step, 0.0).astype(np.float32)
    bias = np.where(exact, d * step * lo, 0.0).astype(np.float32)
    # The rest: 8-bit rounding over the group's min..max (as mx.quantize does).
    w = d3 * groups.astype(np.float32)
    wmin, wmax = w.min(-1), w.max(-1)
    round_scale = np.maximum((wmax - wmin) / 255.0, np.finfo(np.float32).tiny)
    q_round = np.clip(np.rint((w - wmin[..., None]) / round_scale[..., None]), 0, 255)
    q = np.where(exact[..., None], q_exact, q_round).astype(np.uint8)
    scale = np.where(exact, scale, round_scale)
    bias = np.where(exact, bias, wmin)
    return q.reshape(-1, 256), scale.reshape(-1, 8), bias.reshape(-1, 8)


_DECODERS = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0, "Q4_K": _q4_k, "Q6_K": _q6_k}


def q6k_exact_fraction(raw_rows):
    """Fraction of the 32-weight groups of a Q6_K tensor that repack exactly into 8 bits."""
    d, ints = _q6_k_integers(raw_rows.reshape(-1, BLOCK_LAYOUT["Q6_K"][0]))
    groups = ints.reshape(-1, 32)
    step = np.gcd.reduce(np.abs(groups), axis=-1)
    step[step == 0] = 1
    spans = (groups // step[:, None]).max(-1) - (groups // step[:, None]).min(-1)
    return float(np.mean(spans <= 255))


def pack_bits(q, bits):
    """Pack unsigned ints (rows, n) of `bits` bits into MLX's uint32 layout (a little-endian bit stream)."""
    rows, n = q.shape
    if (n * bits) % 32:
        raise ValueError(f"a row of {n} {bits}-bit values does not fill whole uint32 words")
    if bits in (2, 4, 8):
        per_word = 32 // bits
        shifts = np.arange(per_word, dtype=np.uint32) * bits
        return (q.reshape(rows, -1, per_word).astype(np.uint32) << shifts).sum(-1, dtype=np.uint32)
    # 3, 5, 6 bits: values straddle words; spread each value's bits over the stream.
    bit_values = ((q[..., None].astype(np.uint8) >> np.arange(bits, dtype=np.uint8)) & 1).reshape(rows, -1)
    return np.packbits(bit_values, axis=-1, bitorder="little").view("<u4").astype(np.uint32)


def repack(type_name, raw_rows, n_cols):
    """Quantized GGUF rows -> (packed uint32 (rows, n_cols*bits/32), scales, biases float32 (rows, n_cols/32), bits).

    `raw_rows` is the (rows, bytes_per_row) uint8 view the gguf reader gives.
    """
    if type_name not in _DECODERS:
        raise ValueError(f"GGUF tensor type {type_name} has no MLX repacking (known: {sorted(_DECODERS)})")
    block_bytes, block_weights = BLOCK_LAYOUT[type_name]
    rows = raw_rows.shape[0]
    if n_cols % block_weights or raw_rows.shape[1] != n_cols // block_weights * block_bytes:
        raise ValueError(f"{type_name} rows of {raw_rows.shape[1]} bytes do not hold {n_cols} weights")
    q, scale, bias = _DECODERS[type_name](np.ascontiguousarray(raw_rows).reshape(-1, block_bytes))
    bits = BITS[type_name]
    packed = pack_bits(q.reshape(rows, n_cols), bits)
    return packed, scale.reshape(rows, n_cols // GROUP_SIZE), bias.reshape(rows, n_cols // GROUP_SIZE), bits
