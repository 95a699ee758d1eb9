"""Per-token cross-entropy, plain and fused with the lm_head projection.

cross_entropy(logits, targets) = logsumexp(logits) - logits[target], one value per
token, with nn.losses.cross_entropy(reduction="none") semantics (integer targets).
linear_cross_entropy(hidden, weight, targets, ...) is the same loss of the logits
hidden @ weight.T, where weight is the (vocab, hidden) lm_head / tied embedding,
4-bit quantized when `scales` is given (mx.quantize layout, as nn.QuantizedLinear).
"""

import mlx.core as mx
import mlx.nn as nn

from ._float64 import dense_weight, float64_on_cpu


def check_targets(logits_shape, targets):
    """Raise ValueError unless targets are integer class indices matching logits."""
    if not mx.issubdtype(targets.dtype, mx.integer):
        raise ValueError(f"targets must be integer class indices, got {targets.dtype}")
    if tuple(targets.shape) != tuple(logits_shape[:-1]):
        raise ValueError(
            f"targets shape {targets.shape} does not match logits shape {logits_shape}"
        )


@float64_on_cpu
def oracle(logits, targets):
    """The plain math in float64."""
    check_targets(logits.shape, targets)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return mx.logsumexp(logits, axis=-1) - picked


def stock(logits, targets):
    """What mlx-lm's loss runs: nn.losses.cross_entropy on the full logits.

    It returns the logits' dtype (on the GPU a fused kernel accumulates in float32;
    on the CPU it reduces in the logits' dtype).
    """
    return nn.losses.cross_entropy(logits, targets, reduction="none")


@float64_on_cpu
def oracle_linear(hidden, weight, targets, *, scales=None, biases=None, group_size=None, bits=None):
    """Dequantize to float64, project, then the float64 cross-entropy."""
    w = dense_weight(weight, scales, biases, group_size, bits)
    return oracle(hidden @ w.T, targets)


def stock_linear(hidden, weight, targets, *, scales=None, biases=None, group_size=None, bits=None):
    """What mlx-lm runs: the full logits from the lm_head (nn.QuantizedLinear's
    quantized_matmul, or nn.Linear's matmul), then nn.losses.cross_entropy."""
    if scales is None:
        logits = hidden @ weight.T
    else:
        logits = mx.quantized_matmul(
            hidden, weight, scales=scales, biases=biases, transpose=True,
            group_size=group_size, bits=bits,
        )
    return stock(logits, targets)
