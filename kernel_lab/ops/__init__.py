"""Reference kernels for the contract (`kernel_lab.contract.KERNEL_NAMES`).

ORACLE: the plain math in float64 on the CPU stream; inputs are upcast (quantized
weights dequantized) first. The reference for correctness; differentiate it with
mx.vjp inside `with mx.stream(mx.cpu)`. Returns float64.

STOCK: exactly what MLX and mlx-lm run in production (mx.fast.rms_norm,
mx.fast.rope, mx.fast.scaled_dot_product_attention, mlx-lm's swiglu, nn.losses.cross_entropy on full logits, the
LoRALinear / DoRALinear forward). The reference for speed and memory.
"""

from types import SimpleNamespace

from . import attention, cross_entropy, dora_linear, lora_linear, rms_norm, rope, swiglu

ORACLE = SimpleNamespace(
    rms_norm=rms_norm.oracle,
    rope=rope.oracle,
    attention=attention.oracle,
    swiglu=swiglu.oracle,
    cross_entropy=cross_entropy.oracle,
    linear_cross_entropy=cross_entropy.oracle_linear,
    lora_linear=lora_linear.oracle,
    dora_linear=dora_linear.oracle,
)

STOCK = SimpleNamespace(
    rms_norm=rms_norm.stock,
    rope=rope.stock,
    attention=attention.stock,
    swiglu=swiglu.stock,
    cross_entropy=cross_entropy.stock,
    linear_cross_entropy=cross_entropy.stock_linear,
    lora_linear=lora_linear.stock,
    dora_linear=dora_linear.stock,
)

__all__ = ["ORACLE", "STOCK"]
