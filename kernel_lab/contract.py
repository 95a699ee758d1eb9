"""The kernel contract: the public names an evolved program must define.

Semantics are MLX's / mlx-lm's; `kernel_lab.ops` holds, for each name, the float64
oracle and the stock implementation MLX ships.
"""

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

KERNEL_NAMES = (
    "rms_norm",  # rms_norm(x, weight, eps) -> like mx.fast.rms_norm
    "rope",  # rope(x, dims, *, traditional, base, scale, offset, freqs=None) -> like mx.fast.rope
    "attention",  # attention(queries, keys, values, *, scale, mask=None) -> like mx.fast.scaled_dot_product_attention
    "swiglu",  # swiglu(gate, up) -> silu(gate) * up
    "cross_entropy",  # cross_entropy(logits, targets) -> per-token float32 loss
    "linear_cross_entropy",  # (hidden, weight, targets, *, scales=None, biases=None, group_size=None, bits=None)
    "lora_linear",  # (x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None)
    "dora_linear",  # (x, weight, scales, biases, lora_a, lora_b, scale, magnitude, *, group_size, bits, bias=None)
)


class ProgramError(Exception):
    """A program could not be loaded or does not follow the contract."""


def load_module(path, name=None):
    """Import a Python file as a fresh module (not cached under its own name)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ProgramError(f"program not found: {path}")
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    name = name or f"kernel_program_{digest}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def kernels_from_module(module):
    """Collect the contract's callables from a module; every name is required."""
    missing = [n for n in KERNEL_NAMES if not callable(getattr(module, n, None))]
    if missing:
        raise ProgramError(
            "program does not define the kernel(s) " + ", ".join(missing)
            + f"; the contract needs all of: {', '.join(KERNEL_NAMES)}"
        )
    return SimpleNamespace(**{n: getattr(module, n) for n in KERNEL_NAMES})


def load_program(path):
    """Load a program file and return its kernels as a namespace."""
    return kernels_from_module(load_module(path))
