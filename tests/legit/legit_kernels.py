"""Legitimate alternative kernels: other orders of the same arithmetic that stage 1 must accept.

Every function here follows the contract (kernel_lab/contract.py) and computes in float32 or
better; none is a shortcut. VARIANTS maps a variant name to the kernels it replaces.
"""

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

F32 = mx.float32


def _dequantize(weight, scales, biases, group_size, bits, dtype):
    return mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits).astype(dtype)


# ------------------------------------------------ dense dequantize + matmul bases (custom VJP)

def dense_base(x, weight, scales, biases, group_size, bits):
    """x @ W.T through a dense copy of W; the backward dequantizes again instead of keeping it."""
    if scales is None:
        return x @ weight.T

    @mx.custom_function
    def matmul(x):
        return x @ _dequantize(weight, scales, biases, group_size, bits, x.dtype).T

    @matmul.vjp
    def matmul_vjp(primals, cotangent, output):
        return cotangent @ _dequantize(weight, scales, biases, group_size, bits, cotangent.dtype)

    return matmul(x)


def lora_dense_base(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    y = dense_base(x, weight, scales, biases, group_size, bits)
    if bias is not None:
        y = y + bias
    return y + (scale * ((x @ lora_a) @ lora_b)).astype(x.dtype)


def _dora_rescale(out, w, lora_a, lora_b, scale, magnitude, x_dtype):
    adapted = w.astype(F32) + scale * (lora_a @ lora_b).T
    denom = mx.stop_gradient(mx.sqrt(mx.sum(adapted * adapted, axis=1)))
    return (magnitude / denom).astype(x_dtype) * out


def dora_dense_base(x, weight, scales, biases, lora_a, lora_b, scale, magnitude, *, group_size, bits,
                    bias=None):
    y = dense_base(x, weight, scales, biases, group_size, bits)
    out = y + (scale * ((x @ lora_a) @ lora_b)).astype(x.dtype)
    w = weight if scales is None else _dequantize(weight, scales, biases, group_size, bits, F32)
    out = _dora_rescale(out, mx.stop_gradient(w), lora_a, lora_b, scale, magnitude, x.dtype)
    return out if bias is None else out + bias


def dora_quantized_matmul(x, weight, scales, biases, lora_a, lora_b, scale, magnitude, *, group_size,
                          bits, bias=None):
    """DoRA whose base output comes from mx.quantized_matmul, as LoRALinear's does."""
    if scales is None:
        y = x @ weight.T
        w = weight
    else:
        y = mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)
        w = _dequantize(weight, scales, biases, group_size, bits, F32)
    out = y + (scale * ((x @ lora_a) @ lora_b)).astype(x.dtype)
    out = _dora_rescale(out, mx.stop_gradient(w), lora_a, lora_b, scale, magnitude, x.dtype)
    return out if bias is None else out + bias


def ce_f32(logits, targets):
    logits = logits.astype(F32)
    return mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]


def lce_dense_base(hidden, weight, targets, *, scales=None, biases=None, group_size=None, bits=None):
    return ce_f32(dense_base(hidden, weight, scales, biases, group_size, bits), targets)


# ------------------------------------------------ float32 accumulation, one rounding at the end

def lora_f32(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    w = weight.astype(F32) if scales is None else _dequantize(weight, scales, biases, group_size, bits, F32)
    xf = x.astype(F32)
    y = xf @ w.T + scale * ((xf @ lora_a) @ lora_b)
    y = y if bias is None else y + bias.astype(F32)
    return y.astype(x.dtype)


def dora_f32(x, weight, scales, biases, lora_a, lora_b, scale, magnitude, *, group_size, bits, bias=None):
    w = weight.astype(F32) if scales is None else _dequantize(weight, scales, biases, group_size, bits, F32)
    xf = x.astype(F32)
    out = xf @ w.T + scale * ((xf @ lora_a) @ lora_b)
    adapted = mx.stop_gradient(w) + scale * (lora_a @ lora_b).T
    out = (magnitude / mx.stop_gradient(mx.linalg.norm(adapted, axis=1))) * out
    out = out if bias is None else out + bias.astype(F32)
    return out.astype(x.dtype)


def lce_f32(hidden, weight, targets, *, scales=None, biases=None, group_size=None, bits=None):
    w = weight.astype(F32) if scales is None else _dequantize(weight, scales, biases, group_size, bits, F32)
    return ce_f32(hidden.astype(F32) @ w.T, targets)


def swiglu_f32(gate, up):
    g = gate.astype(F32)
    return (g * mx.sigmoid(g) * up.astype(F32)).astype(gate.dtype)


# ------------------------------------------------ chunked and reordered reductions

def lce_token_chunks(hidden, weight, targets, *, scales=None, biases=None, group_size=None, bits=None,
                     chunks=3):
    """Tokens in `chunks` slices through the head (plain autodiff per slice)."""
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    rows = max(1, math.ceil(h.shape[0] / chunks))
    head = partial(_head, weight=weight, scales=scales, biases=biases, group_size=group_size, bits=bits)
    losses = [ce_f32(head(h[i:i + rows]), t[i:i + rows]) for i in range(0, h.shape[0], rows)]
    return mx.concatenate(losses).reshape(targets.shape)


def _head(h, *, weight, scales, biases, group_size, bits):
    if scales is None:
        return h @ weight.T
    return mx.quantized_matmul(h, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)


def _online_logsumexp(logit_chunks, targets):
    """(logsumexp, logit of the target) over vocabulary chunks [(start, logits)], merged online."""
    peak = total = picked = None
    for start, logits in logit_chunks:
        logits = logits.astype(F32)
        chunk_peak = mx.stop_gradient(mx.max(logits, axis=-1))
        new_peak = chunk_peak if peak is None else mx.maximum(peak, chunk_peak)
        chunk_sum = mx.sum(mx.exp(logits - new_peak[..., None]), axis=-1)
        total = chunk_sum if total is None else total * mx.exp(peak - new_peak) + chunk_sum
        local = targets - start
        inside = (local >= 0) & (local < logits.shape[-1])
        value = mx.take_along_axis(logits, mx.clip(local, 0, logits.shape[-1] - 1)[..., None], axis=-1)[..., 0]
        value = mx.where(inside, value, 0.0)
        picked = value if picked is None else picked + value
        peak = new_peak
    return peak + mx.log(total), picked


def _vocab_bounds(vocab):
    size = max(200, math.ceil(vocab / 8))  # several chunks, the last one partial
    return [(s, min(s + size, vocab)) for s in range(0, vocab, size)]


def ce_vocab_chunks(logits, targets):
    chunks = [(s, logits[..., s:e]) for s, e in _vocab_bounds(logits.shape[-1])]
    lse, picked = _online_logsumexp(chunks, targets)
    return lse - picked


def lce_vocab_chunks(hidden, weight, targets, *, scales=None, biases=None, group_size=None, bits=None):
    """Vocabulary in chunks of rows of W (and of its scales/biases), with an online logsumexp."""
    chunks = []
    for s, e in _vocab_bounds(weight.shape[0]):
        sc = None if scales is None else scales[s:e]
        bi = None if biases is None else biases[s:e]
        chunks.append((s, _head(hidden, weight=weight[s:e], scales=sc, biases=bi, group_size=group_size,
                                bits=bits)))
    lse, picked = _online_logsumexp(chunks, targets)
    return lse - picked


def rms_norm_matmul_reduction(x, weight, eps):
    """mean(x^2) as a matmul with a ones vector (another summation order), in float32."""
    xf = x.astype(F32)
    mean_sq = (xf * xf) @ mx.full((x.shape[-1], 1), 1.0 / x.shape[-1], dtype=F32)
    return (xf * mx.rsqrt(mean_sq + eps)).astype(x.dtype) * weight


# ------------------------------------------------ custom VJPs that recompute

@mx.custom_function
def swiglu_recompute(gate, up):
    return nn.silu(gate) * up


@swiglu_recompute.vjp
def _swiglu_recompute_vjp(primals, cotangent, output):
    gate, up = primals
    g, c = gate.astype(F32), cotangent.astype(F32)
    s = mx.sigmoid(g)
    return (c * up.astype(F32) * s * (1 + g * (1 - s))).astype(gate.dtype), (c * g * s).astype(up.dtype)


def rms_norm_recompute(x, weight, eps):
    @mx.custom_function
    def norm(x, weight):
        xf = x.astype(F32)
        return (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype) * weight

    @norm.vjp
    def norm_vjp(primals, cotangent, output):
        x, weight = primals
        xf, c = x.astype(F32), cotangent.astype(F32)
        r = mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
        xhat, wc = xf * r, c * weight.astype(F32)
        dx = r * (wc - xhat * mx.mean(xhat * wc, axis=-1, keepdims=True))
        dw = mx.sum((c * xhat).reshape(-1, x.shape[-1]), axis=0)
        return dx.astype(x.dtype), dw.astype(weight.dtype)

    return norm(x, weight)


def rope_inverse_vjp(x, dims, *, traditional, base, scale, offset, freqs=None):
    """mx.fast.rope forward; the backward is the rotation by minus the angle (scale -> -scale)."""
    rope = partial(mx.fast.rope, dims=dims, traditional=traditional, base=base, offset=offset, freqs=freqs)

    @mx.custom_function
    def rotate(x):
        return rope(x, scale=scale)

    @rotate.vjp
    def rotate_vjp(primals, cotangent, output):
        return rope(cotangent, scale=-scale)

    return rotate(x)


def fast_cross_entropy(logits, targets):
    return mx.fast.cross_entropy(logits, targets)


VARIANTS = {
    "dense-base": dict(lora_linear=lora_dense_base, dora_linear=dora_dense_base,
                       linear_cross_entropy=lce_dense_base),
    "float32-accumulation": dict(lora_linear=lora_f32, dora_linear=dora_f32, linear_cross_entropy=lce_f32,
                                 swiglu=swiglu_f32),
    "dora-quantized-matmul": dict(dora_linear=dora_quantized_matmul),
    "lce-token-chunks": dict(linear_cross_entropy=lce_token_chunks),
    "vocab-chunks-online-logsumexp": dict(linear_cross_entropy=lce_vocab_chunks, cross_entropy=ce_vocab_chunks),
    "rms-norm-matmul-reduction": dict(rms_norm=rms_norm_matmul_reduction),
    "recompute-vjp": dict(swiglu=swiglu_recompute, rms_norm=rms_norm_recompute, rope=rope_inverse_vjp),
    "mx-fast-cross-entropy": dict(cross_entropy=fast_cross_entropy),
}
