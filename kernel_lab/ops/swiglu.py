"""SwiGLU gating of mlx-lm's MLPs: silu(gate) * up."""

import mlx.core as mx

from ._float64 import float64_on_cpu

try:  # mlx-lm's own compiled swiglu, used by its Llama/Qwen/Phi MLPs
    from mlx_lm.models.activations import swiglu as _mlx_lm_swiglu
except ImportError:  # older mlx-lm: the MLPs spell it out as nn.silu(gate) * up
    import mlx.nn as nn

    def _mlx_lm_swiglu(gate, up):
        return nn.silu(gate) * up


@float64_on_cpu
def oracle(gate, up):
    """The plain math in float64."""
    return gate * mx.sigmoid(gate) * up


def stock(gate, up):
    """What mlx-lm runs: `mlx_lm.models.activations.swiglu`."""
    return _mlx_lm_swiglu(gate, up)
