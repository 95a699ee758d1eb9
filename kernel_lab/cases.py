"""Stage 1's cases: real-model shapes, adversarial inputs, contract variants and large cases.

A case is a plain dict (see kernel_lab.shapes for the fields make_inputs reads). Three kinds:
  * small cases (a few tokens) of every kernel, checked in every dtype against the float64
    oracle, with adversarial inputs (rows of magnitude 1e-3..1e3 and a zero row, logits near
    +-1e4, RoPE offsets past 4096 as an int and an mx.array, llama3 `freqs`, transposed views);
  * contract variants drawn from the seed: LoRA/DoRA base bits 4/5/8, group sizes 32/64, LoRA
    rank 8/16/64 and scale 20/2/0.25, bias present/absent, dense and quantized bases, and a 4- or
    8-bit lm_head for linear_cross_entropy. Each value is a shuffled cycle over the cases
    of a kernel, so EVERY evaluation covers every value of every field (a kernel wrong only for
    8-bit bases, group 64 or a bias always fails) while the combinations change with the seed;
    seed None gives the canonical (unshuffled) assignment. The case name spells the variant;
  * large cases (`large=True`): full real vocabularies (SmolLM2 49152, Qwen2.5 151936, Gemma 3
    262144) and enough tokens that a kernel chunked over tokens or columns runs past its first
    chunk. Their reference is stock in float32 on the same (rounded) inputs, not the float64
    oracle (too slow at these sizes on a 2-core CPU). On an accelerator they are training-sized
    (e.g. 4x512 tokens: 10^8 logits for SmolLM2, past the 2^26-element chunks of
    examples/optimized_program.py) and run in every dtype; on the CPU they are cut to what
    fits in stage 1's time and run in float32 only (the dtype the CPU times).
"""

import random
import zlib

from types import MappingProxyType

import mlx.core as mx

from .shapes import GROUP_SIZE, LORA_RANK, LORA_SCALE, MODEL_CONFIGS, _case

BITS = (4, 5, 8)  # base layers: mlx-community 4-bit, the 5- and 8-bit layers of GGUF mixes
HEAD_BITS = (4, 8)  # lm_head / tied embedding (Q4 and Q6_K-as-8-bit in the embedded models)
GROUP_SIZES = (GROUP_SIZE, 32)  # mlx-lm's default and the GGUF conversion's
RANKS = (LORA_RANK, 16, 64)
SCALES = (LORA_SCALE, 2.0, 0.25)
GEMMA3 = dict(hidden=640, vocab=262144)  # Gemma 3 270M (config.json); its MLP is GeGLU


# Token counts (batch, length) of the large cases. Accelerator: training-sized (4x512; the losses at
# full vocabulary and real width: 10^8 logits). CPU: what fits in stage 1's seconds on two cores
# (~0.5M elements a case; Gemma's 262144-row head 64 wide).
LARGE_ACCELERATOR = MappingProxyType(dict(
    tokens=(4, 512), swiglu=(4, 512), attention=(4, 1023), ce=((2, 512), (1, 512)),
    lce=((4, 512), (1, 512), (1, 512), (8, 1024)), adapter=(4, 512), lce_narrow=False))
LARGE_CPU = MappingProxyType(dict(
    tokens=(1, 512), swiglu=(1, 128), attention=(1, 300), ce=((1, 4), (1, 2)),
    lce=((1, 2), (2, 512)), adapter=(1, 256), lce_narrow=True))


def on_accelerator():
    """True on Metal/CUDA, where large cases are training-sized and run in every dtype."""
    return mx.default_device().type != mx.DeviceType.cpu


class _Draw:
    """Per-kernel variant draws: cycle(values, n) covers every value once n >= len(values)."""

    def __init__(self, seed, kernel):
        self.rng = None if seed is None else random.Random(zlib.crc32(f"{seed}/{kernel}".encode()))

    def cycle(self, values, n):
        values = list(values)
        if self.rng is not None:
            self.rng.shuffle(values)
        return [values[i % len(values)] for i in range(n)]

    def flags(self, n):
        """n booleans with both True and False present (n >= 2)."""
        pattern = [i % 2 == 1 for i in range(n)]
        if self.rng is not None:
            self.rng.shuffle(pattern)
        return pattern


def _quant_tag(bits, group_size):
    return f"q{bits}-g{group_size}"


def _rms_norm_cases(tokens, large):
    s, q, t = MODEL_CONFIGS["smollm2-135m"], MODEL_CONFIGS["qwen3-0.6b"], MODEL_CONFIGS["qwen2.5-0.5b"]
    return [
        _case("rms_norm", "smollm2-135m", "input_layernorm", tokens, dim=s["hidden"], eps=s["rms_eps"]),
        _case("rms_norm", "qwen3-0.6b", "q_norm", tokens, dim=q["head_dim"], eps=q["rms_eps"],
              heads=q["heads"]),
        _case("rms_norm", "qwen2.5-0.5b", "norm/row-scales", tokens, dim=t["hidden"],
              eps=t["rms_eps"], row_scales=True),
        _case("rms_norm", "smollm2-135m", "norm/transposed", tokens, dim=s["hidden"],
              eps=s["rms_eps"], layout="transposed"),
        _case("rms_norm", "qwen2.5-0.5b", f"norm/large-{large[0]}x{large[1]}", large, dim=t["hidden"],
              eps=t["rms_eps"], large=True),
    ]


def _rope_cases(tokens, large, long_offset=4096 + 17):
    def rope(model, role, toks=tokens, **kw):
        c = MODEL_CONFIGS[model]
        fields = dict(heads=c["heads"], head_dim=c["head_dim"], dims=c["head_dim"],
                      traditional=c["rope_traditional"], base=c["rope_theta"], scale=1.0, offset=0)
        fields.update(kw)
        return _case("rope", model, role, toks, **fields)

    return [
        rope("smollm2-135m", "q"),
        rope("qwen3-0.6b", "k/offset", heads=MODEL_CONFIGS["qwen3-0.6b"]["kv_heads"], offset=37),
        rope("llama-3.2-1b", "q/llama3-freqs/offset-array", freqs="llama3", base=None,
             offset=long_offset, offset_array=True),
        rope("tinyllama-1.1b", "q/traditional/large-offset", traditional=True, offset=long_offset,
             scale=0.5),
        rope("phi-3.5-mini", "q/partial-rotary", dims=48),
        rope("qwen2.5-0.5b", f"q/large-{large[0]}x{large[1]}", toks=large, large=True),
    ]


def _attention_cases(tokens, large):
    """Causal GQA self-attention as mlx-lm trains (SmolLM2, Qwen2.5), a 128-wide head without a
    mask (Qwen3), queries shorter than the keys, Gemma 3's sliding window and an additive bias
    with sharp scores; the large case is a real training length that is no multiple of 128
    (1023 on an accelerator) and spans several blocks of 256 queries."""
    s, q, w = MODEL_CONFIGS["smollm2-135m"], MODEL_CONFIGS["qwen2.5-0.5b"], MODEL_CONFIGS["qwen3-0.6b"]

    def attention(model, role, toks, cfg, **kw):
        return _case("attention", model, role, toks, heads=cfg["heads"], kv_heads=cfg["kv_heads"],
                     head_dim=cfg["head_dim"], **{"mask": "causal", **kw})

    gemma = dict(heads=4, kv_heads=1, head_dim=256)  # Gemma 3 270M's local layers
    return [
        attention("smollm2-135m", "self-attn/causal", tokens, s),
        attention("qwen2.5-0.5b", "self-attn/causal/odd-length", (2, 17), q),
        attention("qwen3-0.6b", "self-attn/no-mask", tokens, w, mask=None),
        attention("smollm2-135m", "prefill/causal/5-of-12", (1, 5), s, key_length=12),
        attention("gemma3-270m", "local-attn/window-4", (1, 12), gemma, mask="window", window=4),
        attention("smollm2-135m", "self-attn/additive/sharp", tokens, s, mask="additive", score_scale=4.0),
        attention("smollm2-135m", f"self-attn/causal/large-{large[0]}x{large[1]}", large, s, large=True),
    ]


def _swiglu_cases(tokens, large):
    s, q = MODEL_CONFIGS["smollm2-135m"], MODEL_CONFIGS["qwen2.5-0.5b"]
    return [
        _case("swiglu", "smollm2-135m", "mlp", tokens, dim=s["intermediate"]),
        _case("swiglu", "qwen2.5-0.5b", "mlp/transposed", tokens, dim=q["intermediate"], layout="transposed"),
        _case("swiglu", "qwen2.5-0.5b", f"mlp/large-{large[0]}x{large[1]}", large, dim=q["intermediate"],
              large=True),
    ]


def _ce_cases(tokens, small, big):
    s, t, q = MODEL_CONFIGS["smollm2-135m"], MODEL_CONFIGS["tinyllama-1.1b"], MODEL_CONFIGS["qwen2.5-0.5b"]
    qwen_tokens, gemma_tokens = big
    return [
        _case("cross_entropy", "smollm2-135m", "lm_head", tokens, vocab=s["vocab"]),
        _case("cross_entropy", "tinyllama-1.1b", "lm_head/large-logits", small, vocab=t["vocab"],
              logit_scale="max"),
        _case("cross_entropy", "smollm2-135m", "lm_head/transposed", small, vocab=4096, layout="transposed"),
        _case("cross_entropy", "qwen2.5-0.5b", f"lm_head/large-{qwen_tokens[0]}x{qwen_tokens[1]}",
              qwen_tokens, vocab=q["vocab"], large=True),
        _case("cross_entropy", "gemma3-270m", f"lm_head/large-{gemma_tokens[0]}x{gemma_tokens[1]}",
              gemma_tokens, vocab=GEMMA3["vocab"], large=True),
    ]


def _lce_cases(small, small_vocab, big, draw, narrow):
    """One small quantized and one small dense head (oracle); large full-vocabulary heads (on
    the CPU Gemma's 262144 rows are 64 wide: the vocabulary is the point there); many tokens."""
    s, t, q = MODEL_CONFIGS["smollm2-135m"], MODEL_CONFIGS["tinyllama-1.1b"], MODEL_CONFIGS["qwen2.5-0.5b"]
    heads = [("smollm2-135m", s["hidden"], s["vocab"]), ("gemma3-270m", GEMMA3["hidden"], GEMMA3["vocab"]),
             ("qwen2.5-0.5b", q["hidden"], q["vocab"])]
    if narrow:  # the CPU: only the largest vocabulary, 64 wide (a real width costs seconds there)
        heads = [("gemma3-270m/width64", 64, GEMMA3["vocab"])]
    n_quantized = 1 + len(heads)
    bits, groups = draw.cycle(HEAD_BITS, n_quantized), draw.cycle(GROUP_SIZES, n_quantized)
    cases = [
        _case("linear_cross_entropy", "smollm2-135m",
              f"tied-embedding/{_quant_tag(bits[0], groups[0])}/vocab{small_vocab}", small,
              hidden=s["hidden"], vocab=small_vocab, quantized=True, bits=bits[0], group_size=groups[0]),
        _case("linear_cross_entropy", "tinyllama-1.1b", "lm_head/dense/vocab256", small, hidden=t["hidden"],
              vocab=256, quantized=False),
    ]
    for (model, hidden, vocab), toks, b, g in zip(heads, big, bits[1:], groups[1:]):
        cases.append(_case("linear_cross_entropy", model,
                           f"tied-embedding/{_quant_tag(b, g)}/large-{toks[0]}x{toks[1]}", toks,
                           hidden=hidden, vocab=vocab, quantized=True, bits=b, group_size=g, large=True))
    # Many tokens, small head: past any chunk of <= 2048 rows (synthetic hidden 64 keeps it cheap).
    many = big[-1]
    cases.append(_case("linear_cross_entropy", "synthetic", f"lm_head/dense/large-{many[0]}x{many[1]}",
                       many, hidden=64, vocab=1024, quantized=False, large=True))
    return cases


def _adapter_cases(kernel, tokens, large, draw):
    """Three quantized bases (bits 4/5/8 each once), one dense base, one large quantized base."""
    s, q = MODEL_CONFIGS["smollm2-135m"], MODEL_CONFIGS["qwen2.5-0.5b"]
    kv = lambda c: c["kv_heads"] * c["head_dim"]  # noqa: E731
    bases = [("smollm2-135m", "k_proj", s["hidden"], kv(s), True, "contiguous"),
             ("qwen2.5-0.5b", "k_proj", q["hidden"], kv(q), True, "contiguous"),
             ("qwen2.5-0.5b", "v_proj", q["hidden"], kv(q), True, "contiguous"),
             ("smollm2-135m", "o_proj", s["hidden"], s["hidden"], False, "transposed")]
    n = len(bases)
    bits, groups = draw.cycle(BITS, 3), draw.cycle(GROUP_SIZES, 3)
    ranks, scales, bias = draw.cycle(RANKS, n), draw.cycle(SCALES, n), draw.flags(n)
    cases = []
    for i, (model, role, in_dim, out_dim, quantized, layout) in enumerate(bases):
        base = _quant_tag(bits[i], groups[i]) if quantized else "dense"
        name = f"{role}/{base}/r{ranks[i]}-s{scales[i]:g}" + ("/bias" if bias[i] else "")
        if layout == "transposed":
            name += "/transposed"
        fields = dict(in_dim=in_dim, out_dim=out_dim, rank=ranks[i], scale=scales[i], bias=bias[i],
                      quantized=quantized)
        if quantized:
            fields.update(bits=bits[i], group_size=groups[i])
        if layout != "contiguous":
            fields["layout"] = layout
        cases.append(_case(kernel, model, name, tokens, **fields))
    [b], [g] = draw.cycle(BITS, 1), draw.cycle(GROUP_SIZES, 1)
    role, out_dim = ("up_proj", s["intermediate"]) if on_accelerator() else ("k_proj", kv(s))
    cases.append(_case(kernel, "smollm2-135m", f"{role}/{_quant_tag(b, g)}/large-{large[0]}x{large[1]}",
                       large, in_dim=s["hidden"], out_dim=out_dim, rank=LORA_RANK,
                       scale=LORA_SCALE, bias=False, quantized=True, bits=b, group_size=g, large=True))
    return cases


def correctness_cases(kernel, shape_set="default", seed=None):
    """Cases for stage 1: "default" (seconds on a CPU) or "full" (more tokens, uncut vocabularies).

    `seed` draws the contract variants (see the module docstring); None is the canonical set.
    """
    if shape_set == "default":
        tokens, small, small_vocab = (1, 8), (1, 4), 512
    elif shape_set == "full":
        tokens, small, small_vocab = (2, 64), (1, 16), 4096
    else:
        raise ValueError(f"unknown shape_set {shape_set!r}; use 'default' or 'full'")
    size = LARGE_ACCELERATOR if on_accelerator() else LARGE_CPU
    large, ce_big, lce_big, adapter_large = size["tokens"], size["ce"], size["lce"], size["adapter"]
    draw = _Draw(seed, kernel)
    table = {
        "rms_norm": lambda: _rms_norm_cases(tokens, large),
        "rope": lambda: _rope_cases(tokens, large),
        "attention": lambda: _attention_cases(tokens, size["attention"]),
        "swiglu": lambda: _swiglu_cases(tokens, size["swiglu"]),
        "cross_entropy": lambda: _ce_cases(tokens, small, ce_big),
        "linear_cross_entropy": lambda: _lce_cases(small, small_vocab, lce_big, draw, size["lce_narrow"]),
        "lora_linear": lambda: _adapter_cases("lora_linear", tokens, adapter_large, draw),
        "dora_linear": lambda: _adapter_cases("dora_linear", tokens, adapter_large, draw),
    }
    if kernel not in table:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(table)}")
    return table[kernel]()
