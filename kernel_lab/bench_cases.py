"""Training-like cases for the micro-benchmarks (stage 2 and the benchmark table).

Cases are `kernel_lab.shapes` case dicts (its `make_inputs` turns them into arrays), marked large
like stage 1's training-sized cases; which ones depends on the device, decided at run time in the
worker that times them.
"""

import mlx.core as mx

from .shapes import GROUP_SIZE, LORA_RANK, LORA_SCALE, MODEL_CONFIGS
from .shapes import _case as _shape_case


def _case(kernel, model, role, tokens, **fields):
    """A shapes case marked large: make_inputs draws uniform values of std 1, 4x cheaper on a CPU."""
    return _shape_case(kernel, model, role, tokens, large=True, **fields)


def _on_cpu():
    return mx.default_device().type == mx.DeviceType.cpu


def bench_cases(kernel):
    """Training-like cases for the micro-benchmarks (stage 2), chosen at run time by device.

    On a GPU: real training sizes, mlx-lm's batch of 8 x 1024 tokens at SmolLM2-135M's widths
    (hidden 576, intermediate 1536, 9 x 64 heads, vocab 49152) for every kernel, plus
    Qwen2.5-0.5B's (hidden 896, intermediate 4864, 14 x 64 heads; its 152k-vocabulary losses at
    2 x 1024 tokens), so that memory-bound kernels are bandwidth-bound, not launch-bound.
    On the CPU: token counts (and the fused-loss vocabulary) shrink so that one float32
    forward+backward stays under about half a second on two cores, and two cases a kernel at most
    keep stage 2 about as long as it was with everything in one process (about a minute).
    """
    s, q = MODEL_CONFIGS["smollm2-135m"], MODEL_CONFIGS["qwen2.5-0.5b"]
    if not _on_cpu():
        return _gpu_bench_cases(kernel, s, q)
    if kernel == "rms_norm":
        return [_case(kernel, "smollm2-135m", "norm/1x512", (1, 512), dim=s["hidden"], eps=s["rms_eps"]),
                _case(kernel, "qwen2.5-0.5b", "norm/4x512", (4, 512), dim=q["hidden"], eps=q["rms_eps"])]
    if kernel == "rope":
        return [_rope_bench("smollm2-135m", (2, 512)), _rope_bench("qwen3-0.6b", (2, 512))]
    if kernel == "attention":
        return [_attention_bench("smollm2-135m", (1, 128)), _attention_bench("qwen2.5-0.5b", (1, 128))]
    if kernel == "swiglu":
        return [_case(kernel, m, "mlp/1x256", (1, 256), dim=c["intermediate"])
                for m, c in (("smollm2-135m", s), ("qwen2.5-0.5b", q))]
    if kernel == "cross_entropy":
        return [_case(kernel, "smollm2-135m", "lm_head/1x128", (1, 128), vocab=s["vocab"])]
    if kernel == "linear_cross_entropy":  # full-vocab projections cost ~0.1 GFLOP per token: far past 0.5 s
        return [_case(kernel, "smollm2-135m", "tied-embedding/q4/1x64/vocab4096", (1, 64),
                      hidden=s["hidden"], vocab=4096, quantized=True, group_size=GROUP_SIZE)]
    if kernel in ("lora_linear", "dora_linear"):
        return [_adapter_bench(kernel, "smollm2-135m", "q_proj", s["hidden"], s["hidden"], (1, 128)),
                _adapter_bench(kernel, "smollm2-135m", "up_proj", s["hidden"], s["intermediate"], (1, 128))]
    raise ValueError(f"unknown kernel {kernel!r}")


def _rope_bench(model, tokens):
    c = MODEL_CONFIGS[model]
    return _case("rope", model, f"q/{tokens[0]}x{tokens[1]}", tokens, heads=c["heads"], head_dim=c["head_dim"],
                 dims=c["head_dim"], traditional=False, base=c["rope_theta"], scale=1.0, offset=0)


def _attention_bench(model, tokens):
    """Causal GQA self-attention as mlx-lm trains it."""
    c = MODEL_CONFIGS[model]
    return _case("attention", model, f"self-attn/causal/{tokens[0]}x{tokens[1]}", tokens, heads=c["heads"],
                 kv_heads=c["kv_heads"], head_dim=c["head_dim"], mask="causal")


def _adapter_bench(kernel, model, role, in_dim, out_dim, tokens):
    return _case(kernel, model, f"{role}/q4/{tokens[0]}x{tokens[1]}", tokens, in_dim=in_dim, out_dim=out_dim,
                 rank=LORA_RANK, scale=LORA_SCALE, quantized=True, group_size=GROUP_SIZE)


def _gpu_bench_cases(kernel, s, q):
    big, long_vocab = (8, 1024), (2, 1024)
    if kernel == "rms_norm":
        return [_case(kernel, m, "norm/8x1024", big, dim=c["hidden"], eps=c["rms_eps"])
                for m, c in (("smollm2-135m", s), ("qwen2.5-0.5b", q))]
    if kernel == "rope":
        return [_rope_bench("smollm2-135m", big), _rope_bench("qwen2.5-0.5b", big)]
    if kernel == "attention":  # mlx-lm trains on max_seq_length - 1 = 1023 tokens (inputs, targets)
        return [_attention_bench("smollm2-135m", (8, 1023)), _attention_bench("qwen2.5-0.5b", (8, 1023))]
    if kernel == "swiglu":
        return [_case(kernel, m, "mlp/8x1024", big, dim=c["intermediate"])
                for m, c in (("smollm2-135m", s), ("qwen2.5-0.5b", q))]
    if kernel == "cross_entropy":
        return [_case(kernel, "smollm2-135m", "lm_head/8x1024", big, vocab=s["vocab"]),
                _case(kernel, "qwen2.5-0.5b", "lm_head/2x1024", long_vocab, vocab=q["vocab"])]
    if kernel == "linear_cross_entropy":
        return [_case(kernel, m, f"tied-embedding/q4/{t[0]}x{t[1]}", t, hidden=c["hidden"], vocab=c["vocab"],
                      quantized=True, group_size=GROUP_SIZE)
                for m, c, t in (("smollm2-135m", s, big), ("qwen2.5-0.5b", q, long_vocab))]
    if kernel in ("lora_linear", "dora_linear"):
        return [_adapter_bench(kernel, "smollm2-135m", "q_proj", s["hidden"], s["hidden"], big),
                _adapter_bench(kernel, "smollm2-135m", "up_proj", s["hidden"], s["intermediate"], big),
                _adapter_bench(kernel, "qwen2.5-0.5b", "up_proj", q["hidden"], q["intermediate"], big)]
    raise ValueError(f"unknown kernel {kernel!r}")
