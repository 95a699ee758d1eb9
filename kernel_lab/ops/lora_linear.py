"""LoRA on a (4-bit quantized or dense) linear layer, as mlx_lm.tuner.lora.LoRALinear.

y = base(x) + scale * ((x @ lora_a) @ lora_b), with base(x) = x @ W.T (+ bias),
W the dequantized weight when `scales` is given; lora_a is (in, r), lora_b (r, out).
Dropout is not part of the kernel (mlx-lm's default dropout is 0).
"""

import mlx.core as mx

from ._float64 import dense_weight, float64_on_cpu


@float64_on_cpu
def oracle(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    """The plain math in float64."""
    w = dense_weight(weight, scales, biases, group_size, bits)
    y = x @ w.T + scale * ((x @ lora_a) @ lora_b)
    return y if bias is None else y + bias


def base_linear(x, weight, scales, biases, *, group_size, bits, bias=None):
    """nn.QuantizedLinear.__call__ (scales given) or nn.Linear.__call__, line for line."""
    if scales is None:
        y = x @ weight.T
    else:
        y = mx.quantized_matmul(
            x, weight, scales=scales, biases=biases, transpose=True,
            group_size=group_size, bits=bits,
        )
    return y if bias is None else y + bias


def stock(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    """What mlx-lm runs: LoRALinear.__call__ (dropout 0) over its base layer."""
    y = base_linear(x, weight, scales, biases, group_size=group_size, bits=bits, bias=bias)
    z = (x @ lora_a) @ lora_b
    return y + (scale * z).astype(x.dtype)
