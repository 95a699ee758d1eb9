"""Kernel variants measured by benchmarks/probe_kernels.py (drafts for examples/optimized_program.py).

Attention: (queries (B, Hq, L, D), keys/values (B, Hkv, L, D), scale, mask) as mlx-lm calls
mx.fast.scaled_dot_product_attention. LoRA: the lora_linear contract (kernel_lab/contract.py).
"""
import mlx.core as mx

from kernel_lab.ops import STOCK

F32 = mx.float32
BLOCK = 256


# ------------------------------------------------------------------ attention

def _pad128(queries, keys, values, *, scale, mask):
    """Stock SDPA on lengths padded up to a multiple of 128 (padded keys come last, so with a
    causal mask no real query sees them; the padded query rows are cut off)."""
    L = queries.shape[2]
    pad = -L % 128
    if pad == 0 or mask != "causal" or keys.shape[2] != L:
        return STOCK_ATTENTION(queries, keys, values, scale=scale, mask=mask)
    widths = [(0, 0), (0, 0), (0, pad), (0, 0)]
    out = STOCK_ATTENTION(mx.pad(queries, widths), mx.pad(keys, widths), mx.pad(values, widths),
                          scale=scale, mask=mask)
    return out[:, :, :L]


def STOCK_ATTENTION(queries, keys, values, *, scale, mask):
    return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)


def _grouped(x, B, Hkv, rep, L, D):
    return x.reshape(B, Hkv, rep, L, D)


def _block_probs(qb, k5, scale, q0, q1, offset, mask, compute):
    """Softmax probabilities of one query block over the keys it can see (causal: up to its end)."""
    kend = k5.shape[3] if mask != "causal" else q1 + offset
    s = (qb.astype(compute) @ k5[:, :, :, :kend].astype(compute).swapaxes(-1, -2)).astype(F32)
    s = s * scale
    if mask == "causal":
        keep = (mx.arange(q0, q1) + offset)[:, None] >= mx.arange(kend)[None]
        s = mx.where(keep, s, -mx.inf)
    return mx.softmax(s, axis=-1), kend


def _chunked_backward(q, k, v, cot, out, scale, mask, compute):
    """dq, dk, dv by query blocks, recomputing each block's probabilities (no L x L matrix kept);
    matmuls in `compute` (None: the inputs' dtype), softmax and sums in float32."""
    compute = compute or q.dtype
    B, Hq, L, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    rep, offset = Hq // Hkv, Lk - L
    q5, do, o = (_grouped(t, B, Hkv, rep, L, D) for t in (q, cot, out))
    k5, v5 = k[:, :, None], v[:, :, None]
    dq, dk, dv = [], mx.zeros((B, Hkv, 1, Lk, D), F32), mx.zeros((B, Hkv, 1, Lk, D), F32)
    for q0 in range(0, L, BLOCK):
        q1 = min(q0 + BLOCK, L)
        p, kend = _block_probs(q5[:, :, :, q0:q1], k5, scale, q0, q1, offset, mask, compute)
        dob = do[:, :, :, q0:q1]
        pv = (p.swapaxes(-1, -2).astype(compute) @ dob.astype(compute)).astype(F32)
        dv = dv + mx.pad(pv.sum(axis=2, keepdims=True), [(0, 0)] * 3 + [(0, Lk - kend), (0, 0)])
        dp = (dob.astype(compute) @ v5[:, :, :, :kend].astype(compute).swapaxes(-1, -2)).astype(F32)
        delta = mx.sum(dob.astype(F32) * o[:, :, :, q0:q1].astype(F32), axis=-1, keepdims=True)
        ds = p * (dp - delta) * scale
        dq.append((ds.astype(compute) @ k5[:, :, :, :kend].astype(compute)).astype(F32))
        dkb = (ds.swapaxes(-1, -2).astype(compute) @ q5[:, :, :, q0:q1].astype(compute)).astype(F32)
        dk = dk + mx.pad(dkb.sum(axis=2, keepdims=True), [(0, 0)] * 3 + [(0, Lk - kend), (0, 0)])
    dq = mx.concatenate(dq, axis=3) if len(dq) > 1 else dq[0]
    return (dq.reshape(q.shape).astype(q.dtype), dk[:, :, 0].astype(k.dtype),
            dv[:, :, 0].astype(v.dtype))


def _fast_forward_chunked_backward(compute):
    def attention(queries, keys, values, *, scale, mask):
        @mx.custom_function
        def attn(q, k, v):
            return STOCK_ATTENTION(q, k, v, scale=scale, mask=mask)

        @attn.vjp
        def attn_vjp(primals, cot, out):
            return _chunked_backward(*primals, cot, out, scale, mask, compute)

        return attn(queries, keys, values)

    return attention


ATTENTION = {
    "stock": STOCK_ATTENTION,
    "stock_pad128": _pad128,
    "fastfwd_chunkbwd_f32": _fast_forward_chunked_backward(F32),
    "fastfwd_chunkbwd_half": _fast_forward_chunked_backward(None),
}


# ------------------------------------------------------------------ LoRA

def _base(weight, scales, biases, group_size, bits, dense):
    if scales is None:
        return (lambda x: x @ weight.T), (lambda g: g @ weight)
    if dense:
        def w(dt):
            return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits).astype(dt)
        return (lambda x: x @ w(x.dtype).T), (lambda g: g @ w(g.dtype))
    q = dict(group_size=group_size, bits=bits)
    return (lambda x: mx.quantized_matmul(x, weight, scales, biases, transpose=True, **q),
            lambda g: mx.quantized_matmul(g, weight, scales, biases, transpose=False, **q))


def _lean_lora(dense, half):
    """LoRA with a custom VJP that keeps only x (its own dtype) for the backward."""
    def lora_linear(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
        fwd, bwd = _base(weight, scales, biases, group_size, bits, dense)

        @mx.custom_function
        def f(x, a, b):
            if half:
                z = (x @ a.astype(x.dtype)) @ b.astype(x.dtype)
            else:
                z = (x.astype(F32) @ a) @ b
            return fwd(x) + (scale * z).astype(x.dtype)

        @f.vjp
        def f_vjp(primals, cot, out):
            x, a, b = primals
            x2, g2 = x.reshape(-1, x.shape[-1]), cot.reshape(-1, cot.shape[-1])
            if half:
                ah, bh = a.astype(x.dtype), b.astype(x.dtype)
                gb = g2 @ bh.T
                dx = bwd(cot) + ((scale * gb) @ ah.T).reshape(x.shape)
                da = scale * (x2.T.astype(F32) @ gb.astype(F32))
                db = scale * ((x2 @ ah).T.astype(F32) @ g2.astype(F32))
            else:
                x32, g32 = x2.astype(F32), g2.astype(F32)
                gb = g32 @ b.T
                dx = bwd(cot) + ((scale * gb) @ a.T).astype(x.dtype).reshape(x.shape)
                da = scale * (x32.T @ gb)
                db = scale * ((x32 @ a).T @ g32)
            return dx, da, db

        y = f(x, lora_a, lora_b)
        return y if bias is None else y + bias

    return lora_linear


def _dense_lora(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    w = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits).astype(x.dtype)
    y = x @ w.T
    z = (x @ lora_a) @ lora_b
    y = y + (scale * z).astype(x.dtype)
    return y if bias is None else y + bias


LORA = {
    "stock": STOCK.lora_linear,
    "dense_base": _dense_lora,
    "lean_qmm": _lean_lora(dense=False, half=False),
    "lean_dense": _lean_lora(dense=True, half=False),
    "lean_dense_half": _lean_lora(dense=True, half=True),
}
