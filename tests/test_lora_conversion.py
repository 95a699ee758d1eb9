"""convert_to_lora on real models: every LoRA/DoRA layer fits its base, whatever the base's bits."""

import mlx.core as mx
import pytest
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from kernel_lab.training import convert_to_lora


@pytest.mark.slow
@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_qwen_5_bit_layers_get_adapters_of_the_right_size(qwen_model, fine_tune_type):
    """Qwen's GGUF holds 5-bit layers; mlx-lm 0.32's DoRALinear sizes lora_a as if 32 // 5 = 6
    values fit a word (840 inputs instead of 896) and its first forward fails."""
    model, _ = qwen_model
    convert_to_lora(model, fine_tune_type=fine_tune_type, num_layers=len(model.layers))
    try:
        bits = set()
        for _, module in model.named_modules():
            if isinstance(module, (LoRALinear, DoRALinear)):
                linear = module.linear
                bits.add(linear.bits)
                assert module.lora_a.shape[0] == linear.weight.shape[1] * 32 // linear.bits
        assert 5 in bits and 4 in bits
        logits = model(mx.array([[1, 2, 3, 4]]))
        assert logits.shape == (1, 4, model.args.vocab_size)
    finally:  # the fixture is shared: take the adapters off again
        for path, module in list(model.named_modules()):
            if isinstance(module, (LoRALinear, DoRALinear)):
                parent = model
                *parents, name = path.split(".")
                for part in parents:
                    parent = parent[int(part)] if part.isdigit() else getattr(parent, part)
                setattr(parent, name, module.linear)
