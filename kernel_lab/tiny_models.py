"""Tiny random-weight models built from mlx-lm's own model classes.

Each family gets a few-layer config small enough for a CPU test, but keeps what
the patcher must cope with: grouped-query attention, tied and untied heads, q/k
norms (qwen3, gemma3), the fused gate_up projection (phi3), the RoPE variants
that pass `freqs` (llama3 scaling, phi3's longrope), Gemma's 1+weight RMSNorm
and its GeGLU MLP. Models are quantized to 4 bits like the real ones.
"""

import importlib

import mlx.core as mx
import mlx.nn as nn

VOCAB = 256
HIDDEN = 64

_COMMON = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=2,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-5,
    vocab_size=VOCAB,
)

CONFIGS = {
    "llama": dict(
        _COMMON,
        model_type="llama",
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 1024,
        },
    ),
    "qwen2": dict(_COMMON, model_type="qwen2", tie_word_embeddings=False),
    "qwen3": dict(
        _COMMON,
        model_type="qwen3",
        head_dim=16,
        tie_word_embeddings=True,
        rope_theta=1_000_000.0,
        max_position_embeddings=2048,
    ),
    "phi3": dict(
        _COMMON,
        model_type="phi3",
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        original_max_position_embeddings=1024,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0] * 8,
            "long_factor": [1.0 + 0.1 * i for i in range(8)],
        },
    ),
    "gemma3_text": dict(
        _COMMON,
        model_type="gemma3_text",
        head_dim=16,
        sliding_window=16,
        sliding_window_pattern=2,
        query_pre_attn_scalar=16,
    ),
}

FAMILIES = tuple(CONFIGS)


def tiny_model(family, *, quantize=True, group_size=32, bits=4, seed=0, dtype=mx.float32):
    """A random-weight mlx-lm `Model` of `family`, 4-bit quantized unless told not to."""
    if family not in CONFIGS:
        raise ValueError(f"no tiny config for {family!r}; known: {', '.join(FAMILIES)}")
    module = importlib.import_module(f"mlx_lm.models.{family}")
    mx.random.seed(seed)
    model = module.Model(module.ModelArgs.from_dict(CONFIGS[family]))
    if dtype is not None:
        model.set_dtype(dtype)
    if quantize:
        nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model


def random_token_dataset(n=8, length=40, vocab=VOCAB, seed=0):
    """A list of (tokens, offset) items shaped like mlx-lm's CacheDataset entries."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [(rng.integers(1, vocab, size=length - i % 5).tolist(), 0) for i in range(n)]
