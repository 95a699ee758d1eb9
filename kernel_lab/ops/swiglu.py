"""SwiGLU gating of mlx-lm's MLPs: silu(gate) * up."""

import importlib.util
from pathlib import Path

import mlx.core as mx

from ._float64 import float64_on_cpu


def _mlx_lm_swiglu():
    """mlx-lm's own compiled swiglu (`mlx_lm.models.activations`, used by its Llama/Qwen/Phi MLPs),
    loaded from its file without running `mlx_lm/__init__.py`: that imports transformers (and with
    it torch where torch is installed), seconds in every checking and timing child that needs none
    of it. The file imports only mlx. Older mlx-lm without it spells out nn.silu(gate) * up."""
    spec = importlib.util.find_spec("mlx_lm")  # finds the package without importing it
    path = Path(next(iter(spec.submodule_search_locations or []), "")) / "models" / "activations.py" \
        if spec else None
    if path is None or not path.is_file():
        import mlx.nn as nn

        return lambda gate, up: nn.silu(gate) * up
    module_spec = importlib.util.spec_from_file_location("kernel_lab.ops._mlx_lm_activations", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.swiglu


_swiglu = _mlx_lm_swiglu()


@float64_on_cpu
def oracle(gate, up):
    """The plain math in float64."""
    return gate * mx.sigmoid(gate) * up


def stock(gate, up):
    """What mlx-lm runs: `mlx_lm.models.activations.swiglu`."""
    return _swiglu(gate, up)
