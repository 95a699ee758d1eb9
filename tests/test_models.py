"""kernel_lab.models: real GGUF models converted for mlx-lm, their cache, and clear errors."""

import ast
import json
import math
import os
import re
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from kernel_lab.models import (
    DEFAULT_MODEL,
    EMBEDDED,
    ModelError,
    available_offline,
    compute_dtype,
    load_model,
    model_path,
)
from kernel_lab.models import cache, gguf_blocks, loader, registry

PPL_TEXT_TOPIC = "for"  # pydoc_data.topics: Python's own docs, shipped with CPython


def perplexity(model, tokenizer, n_tokens):
    from pydoc_data.topics import topics

    body = topics[PPL_TEXT_TOPIC].split("\n\n", 1)[1]  # without the underlined heading
    ids = tokenizer.encode(body)[: n_tokens + 1]
    assert len(ids) == n_tokens + 1
    x = mx.array(ids)[None]
    logits = model(x[:, :-1]).astype(mx.float32)
    return math.exp(nn.losses.cross_entropy(logits, x[:, 1:]).mean().item())


def chat(model, tokenizer, question, max_tokens):
    from mlx_lm import generate

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


# --- the embedded default model -------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_perplexity_on_python_docs(embedded_model):
    # A wrong Q/K un-permutation or a mis-packed block gives hundreds or more.
    ppl = perplexity(*embedded_model, n_tokens=128)
    print(f"smollm2-135m-q4 perplexity: {ppl:.2f}")
    assert ppl < 30


@pytest.mark.slow
def test_embedded_model_answers_a_chat_question(embedded_model):
    answer = chat(*embedded_model, "What is the capital of France?", max_tokens=12)
    print(f"answer: {answer!r}")
    assert "Paris" in answer


def test_embedded_model_runs_in_the_compute_dtype(embedded_model):
    model, _ = embedded_model
    params = dict(tree_flatten(model.parameters()))
    floats = {p.dtype for p in params.values() if mx.issubdtype(p.dtype, mx.floating)}
    assert floats == {compute_dtype(mx.float16)}
    # Quantized weights stay packed: q/k/v/o, the MLP and the tied embedding.
    assert params["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert params["model.embed_tokens.weight"].dtype == mx.uint32


def test_compute_dtype_policy():
    if mx.default_device() == mx.cpu:
        assert compute_dtype(mx.bfloat16) == mx.float32
        assert compute_dtype("float16") == mx.float32
    else:
        assert compute_dtype(mx.bfloat16) == mx.bfloat16
    with pytest.raises(ModelError, match="float32"):
        load_model(DEFAULT_MODEL, dtype="int8")


def test_dtype_override():
    model, _ = load_model(DEFAULT_MODEL, dtype="bfloat16")
    floats = {p.dtype for _, p in tree_flatten(model.parameters()) if mx.issubdtype(p.dtype, mx.floating)}
    assert floats == {mx.bfloat16}


def test_tokenizer_round_trips_special_tokens(embedded_model):
    _, tokenizer = embedded_model
    text = "<|im_start|>user\nRound 12345 trips: déjà vu, 東京 😀<|im_end|>\n"
    ids = tokenizer.encode(text)
    for special in ("<|im_start|>", "<|im_end|>"):
        token_id = tokenizer.convert_tokens_to_ids(special)
        assert ids.count(token_id) == 1  # kept whole, not cut into pieces
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")


def test_converted_directory_loads_with_plain_mlx_lm():
    path = model_path(DEFAULT_MODEL)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8}  # Q8_0 in the GGUF
    assert config["tie_word_embeddings"] is True
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "model.safetensors"):
        assert (path / name).is_file()
    assert "chat_template" in json.loads((path / "tokenizer_config.json").read_text())


# --- the cache ------------------------------------------------------------------------------


def test_second_load_uses_the_cache(monkeypatch):
    first = model_path(DEFAULT_MODEL)
    marker = first / cache.MARKER
    mtime = marker.stat().st_mtime_ns

    def must_not_convert(*args, **kwargs):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(loader, "convert_embedded", must_not_convert)
    assert model_path(DEFAULT_MODEL) == first
    assert marker.stat().st_mtime_ns == mtime


def _smollm_gguf():
    return registry.gguf_parts(DEFAULT_MODEL)[0]


@pytest.mark.parametrize("damage", ["truncated", "bad_magic"])
def test_damaged_gguf_is_a_clear_error_and_leaves_no_cache(tmp_path, monkeypatch, damage):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("KERNEL_LAB_CACHE", str(cache_dir))
    data = _smollm_gguf().read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"XXXX" + data[4:])
    with pytest.raises(ModelError, match="damaged or truncated.*fetch --force"):
        loader.convert_embedded("broken", [broken], cache.cache_root() / "broken")
    assert not cache_dir.exists() or list(cache_dir.iterdir()) == []


def test_size_and_checksum_are_verified_before_converting(tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("KERNEL_LAB_CACHE", str(cache_dir))
    half = tmp_path / "half.gguf"
    half.write_bytes(_smollm_gguf().read_bytes()[:1000])
    model = EMBEDDED[DEFAULT_MODEL]
    with pytest.raises(ModelError, match="truncated"):
        loader.convert_embedded("x", [half], cache_dir / "x", size=model.size, sha256=model.sha256)
    with pytest.raises(ModelError, match="sha256"):
        loader.convert_embedded("x", [half, half], cache_dir / "x", size=2000, sha256=model.sha256)
    assert list(cache_dir.iterdir()) == []


def test_directory_without_marker_is_never_used(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNEL_LAB_CACHE", str(tmp_path))
    half_written = tmp_path / DEFAULT_MODEL
    half_written.mkdir()
    (half_written / "config.json").write_text("{}")
    assert not cache.is_complete(half_written)
    calls = []
    monkeypatch.setattr(loader, "convert_embedded", lambda *a, **k: calls.append(a) or a[2])
    model_path(DEFAULT_MODEL)
    assert calls, "a directory without its completion marker was used as a finished conversion"


# --- bad specs ------------------------------------------------------------------------------


def test_unknown_spec_lists_the_known_models():
    with pytest.raises(ModelError) as info:
        model_path("no-such-model")
    for name in EMBEDDED:
        assert name in str(info.value)


def test_not_installed_model_names_the_fetch_command(monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "package_dir", lambda pip_name: None)
    monkeypatch.setenv("KERNEL_LAB_CACHE", str(tmp_path))  # nothing converted there either
    with pytest.raises(ModelError, match=r"python -m kernel_lab.models fetch qwen2.5-coder-0.5b-q4"):
        registry.gguf_parts("qwen2.5-coder-0.5b-q4")
    assert available_offline() == []


def test_unsupported_architecture_is_named(tmp_path, monkeypatch):
    import gguf

    monkeypatch.setenv("KERNEL_LAB_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="'mamba'.*supported: llama, qwen2, gemma3"):
        loader.convert_embedded("mamba", [path], cache.cache_root() / "mamba")
    assert list((tmp_path / "cache").iterdir()) == []


def test_hub_id_without_network_is_one_clear_error():
    # A fresh interpreter with the hub offline: deterministic whether or not CI has a network.
    code = (
        "from kernel_lab.models import load_model, ModelError\n"
        "try:\n    load_model('mlx-community/kernel-lab-no-such-repo-4bit')\n"
        "except ModelError as e:\n    print('MODELERROR', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "MODELERROR cannot get Hugging Face model 'mlx-community/kernel-lab-no-such-repo-4bit'" in out.stdout
    assert "Traceback" not in out.stderr


def test_local_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        model_path(str(tmp_path))


# --- exact repacking of GGUF blocks ----------------------------------------------------------


@pytest.mark.parametrize("bits", [4, 5, 6, 8])
def test_bit_packing_matches_mlx(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2**bits, size=(3, 64), dtype=np.uint8)
    packed = gguf_blocks.pack_bits(q, bits)
    ones, zeros = mx.ones((3, 2)), mx.zeros((3, 2))
    out = mx.dequantize(mx.array(packed), ones, zeros, group_size=32, bits=bits)
    np.testing.assert_array_equal(np.array(out), q)


def test_gguf_blocks_repack_exactly():
    """Every block type in the embedded file, dequantized by MLX, equals gguf's own dequantization."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(_smollm_gguf()))
    checked = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        if kind in gguf_blocks.BLOCK_LAYOUT and kind not in checked:
            raw = np.asarray(tensor.data)[:16]
            packed, scales, biases, bits = gguf_blocks.repack(kind, raw, int(tensor.shape[0]))
            ours = mx.dequantize(mx.array(packed), mx.array(scales), mx.array(biases), group_size=32, bits=bits)
            np.testing.assert_array_equal(np.array(ours), dequantize(raw, tensor.tensor_type).astype(np.float32))
            checked.add(kind)
    assert checked == {"Q4_1", "Q8_0"}


# --- Qwen2.5-Coder (491 MB split over six PyPI packages) --------------------------------------


@pytest.mark.slow
def test_qwen_perplexity_on_python_docs(qwen_model):
    ppl = perplexity(*qwen_model, n_tokens=64)
    print(f"qwen2.5-coder-0.5b-q4 perplexity: {ppl:.2f}")
    assert ppl < 20


@pytest.mark.slow
def test_qwen_writes_python_that_parses(qwen_model):
    answer = chat(*qwen_model, "Write a Python function add(a, b) that returns a + b. Only code, no comments.", 40)
    print(f"answer: {answer!r}")
    block = re.search(r"```(?:python)?\n(.*?)(?:```|$)", answer, re.S)
    code = block.group(1) if block else answer
    tree = ast.parse(code)
    assert any(isinstance(node, ast.FunctionDef) for node in ast.walk(tree))


# --- Gemma 3 270M (norms stored +1 by llama.cpp, q/k norms, GeGLU) ----------------------------


@pytest.mark.slow
def test_gemma_perplexity_on_python_docs(gemma_model):
    # Norms left at llama.cpp's 1 + w, or a mis-packed Q4_K/Q6_K block, gives thousands.
    ppl = perplexity(*gemma_model, n_tokens=64)
    print(f"gemma3-270m-q4 perplexity: {ppl:.2f}")
    assert ppl < 40
