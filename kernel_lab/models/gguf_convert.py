"""Convert a llama.cpp GGUF file into an mlx-lm model directory (quantized weights kept).

Supported architectures: llama (SmolLM2), qwen2 (Qwen2.5) and gemma3 (Gemma 3 text).
What llama.cpp changed on the way in is undone here:
  * llama: Q and K rows were permuted for its interleaved RoPE -> permuted back
    (the packed rows and their scales/biases alike, K with the KV head count);
  * gemma3: RMSNorm weights were stored as 1 + w -> 1 is subtracted.
Quantized tensors are repacked bit for bit where the block format maps onto MLX
(see `gguf_blocks`); `config.json` names the bits of every module that is not 4-bit.
"""

import json

import numpy as np

from . import gguf_blocks
from .tokenizer import save_tokenizer

FLOAT_TYPES = {"F32", "F16", "BF16"}

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA3_LAYER_TENSORS = {
    **_LAYER_TENSORS,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _llama_config(f, arch):
    heads = int(f[f"{arch}.attention.head_count"])
    hidden = int(f[f"{arch}.embedding_length"])
    return {
        "hidden_size": hidden,
        "num_hidden_layers": int(f[f"{arch}.block_count"]),
        "intermediate_size": int(f[f"{arch}.feed_forward_length"]),
        "num_attention_heads": heads,
        "num_key_value_heads": int(f.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(f.get(f"{arch}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(f[f"{arch}.attention.layer_norm_rms_epsilon"]),
        "rope_theta": float(f.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(f.get(f"{arch}.context_length", 4096)),
        "vocab_size": len(f["tokenizer.ggml.tokens"]),
        "rope_traditional": False,
    }


def _gemma3_config(f, arch):
    config = _llama_config(f, arch)
    config.pop("rope_traditional")
    config.update(
        sliding_window=int(f.get("gemma3.attention.sliding_window", 512)),
        # Gemma 3 scales queries by head_dim ** -0.5 (HF's query_pre_attn_scalar = head_dim).
        query_pre_attn_scalar=config["head_dim"],
        rope_local_base_freq=10000.0,
        sliding_window_pattern=6,
    )
    return config


# architecture -> (mlx-lm model_type, config builder, layer tensor names, undo Q/K permutation, norms stored +1)
ARCHITECTURES = {
    "llama": ("llama", _llama_config, _LAYER_TENSORS, True, False),
    "qwen2": ("qwen2", _llama_config, _LAYER_TENSORS, False, False),
    "gemma3": ("gemma3_text", _gemma3_config, _GEMMA3_LAYER_TENSORS, False, True),
}


class UnsupportedModel(ValueError):
    """The GGUF describes an architecture, tensor or quantization the converter does not handle."""


def read_fields(reader):
    """GGUF metadata as {key: python value}."""
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def _mlx_name(gguf_name, layer_tensors):
    """'blk.3.attn_q.weight' -> ('model.layers.3.self_attn.q_proj', 'weight')."""
    parts = gguf_name.split(".")
    suffix = parts[-1]
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in layer_tensors:
        return f"model.layers.{parts[1]}.{layer_tensors[parts[2]]}", suffix
    if len(parts) == 2 and parts[0] in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[parts[0]], suffix
    raise UnsupportedModel(f"tensor {gguf_name!r} has no mlx-lm counterpart")


def _unpermute_rows(array, n_heads):
    """Undo llama.cpp's Q/K row permutation (works on weights and on their per-row scales/biases)."""
    rows = array.shape[0]
    return array.reshape(n_heads, rows // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(array.shape)


def _narrow_float(array):
    """float16 when that is exact (Q4_K's d*sc products are not), else float32."""
    as_half = array.astype(np.float16)
    return as_half if np.array_equal(as_half.astype(np.float32), array) else array


def convert_tensors(reader, arch, config):
    """Yield (mlx name, numpy array) and fill config['quantization'] with per-module bits."""
    _, _, layer_tensors, unpermute, norms_plus_one = ARCHITECTURES[arch]
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    quantization = config["quantization"]
    for tensor in reader.tensors:
        module, suffix = _mlx_name(tensor.name, layer_tensors)
        kind = tensor.tensor_type.name
        short = tensor.name.split(".")[-2]
        n_heads = heads.get(short) if unpermute else None
        if kind in FLOAT_TYPES:
            array = np.asarray(tensor.data).astype(np.float32).reshape(tuple(int(n) for n in reversed(tensor.shape)))
            if norms_plus_one and module.endswith("norm"):
                array = array - 1.0
            if n_heads:
                array = _unpermute_rows(array, n_heads)
            yield f"{module}.{suffix}", array
            continue
        if suffix != "weight":
            raise UnsupportedModel(f"quantized tensor {tensor.name!r} is not a weight matrix")
        try:
            packed, scales, biases, bits = gguf_blocks.repack(kind, np.asarray(tensor.data), int(tensor.shape[0]))
        except ValueError as e:
            raise UnsupportedModel(f"tensor {tensor.name!r}: {e}") from e
        if n_heads:
            packed, scales, biases = (_unpermute_rows(a, n_heads) for a in (packed, scales, biases))
        if bits != quantization["bits"]:
            quantization[module] = {"group_size": gguf_blocks.GROUP_SIZE, "bits": bits}
        yield f"{module}.weight", packed
        yield f"{module}.scales", _narrow_float(scales)
        yield f"{module}.biases", _narrow_float(biases)


def convert_gguf(gguf_path, out_dir):
    """Write config.json, model.safetensors and the tokenizer files for `gguf_path` into `out_dir`.

    Returns a summary dict (architecture, tensor type counts). Raises UnsupportedModel
    for what it cannot convert and ValueError/OSError for a damaged file.
    """
    import gguf
    import mlx.core as mx

    reader = gguf.GGUFReader(str(gguf_path))
    fields = read_fields(reader)
    arch = fields.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedModel(
            f"GGUF architecture {arch!r} is not supported by the converter (supported: {', '.join(ARCHITECTURES)})"
        )
    model_type, make_config, _, _, _ = ARCHITECTURES[arch]
    config = {"model_type": model_type, **make_config(fields, arch)}
    config["quantization"] = {"group_size": gguf_blocks.GROUP_SIZE, "bits": 4}
    names = {t.name for t in reader.tensors}
    config["tie_word_embeddings"] = "output.weight" not in names

    weights = {name: mx.array(array) for name, array in convert_tensors(reader, arch, config)}
    mx.save_safetensors(str(out_dir / "model.safetensors"), weights, metadata={"format": "mlx"})
    config["quantization_config"] = config["quantization"]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    save_tokenizer(arch, fields, out_dir)
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"architecture": arch, "name": fields.get("general.name"), "tensor_types": types}
