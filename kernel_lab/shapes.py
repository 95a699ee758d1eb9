"""Shapes of real models, the test and benchmark cases built from them, and inputs.

A case is a plain dict: "name" (model/role/variant), "model", "kernel", the kernel's
dimensions, "tokens" (batch, length), and optional adversarial switches:
  layout="transposed"   the main activation is a non-contiguous (transposed) view
  row_scales=True       rms_norm rows of magnitudes 1e-3 .. 1e3 plus an all-zero row
  logit_scale=S         cross-entropy logits of magnitude up to +-S
  offset=N              RoPE position offset (int, or an mx.array scalar when offset_array)
make_inputs turns a case into fresh random arguments for a kernel.
"""

import math

import mlx.core as mx

# Published configs (Hugging Face config.json of each model).
MODEL_CONFIGS = {
    "smollm2-135m": dict(hidden=576, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                         vocab=49152, rms_eps=1e-5, rope_theta=100000.0, rope_traditional=False,
                         qkv_bias=False, tied_embeddings=True),
    "qwen2.5-0.5b": dict(hidden=896, heads=14, kv_heads=2, head_dim=64, intermediate=4864,
                         vocab=151936, rms_eps=1e-6, rope_theta=1000000.0, rope_traditional=False,
                         qkv_bias=True, tied_embeddings=True),
    "tinyllama-1.1b": dict(hidden=2048, heads=32, kv_heads=4, head_dim=64, intermediate=5632,
                           vocab=32000, rms_eps=1e-5, rope_theta=10000.0, rope_traditional=False,
                           qkv_bias=False, tied_embeddings=False),
    "qwen3-0.6b": dict(hidden=1024, heads=16, kv_heads=8, head_dim=128, intermediate=3072,
                       vocab=151936, rms_eps=1e-6, rope_theta=1000000.0, rope_traditional=False,
                       qkv_bias=False, tied_embeddings=True, qk_norm=True),
    # Phi-3.5 uses "longrope" (SuScaledRoPE, per-dim factors); cases use its base only.
    "phi-3.5-mini": dict(hidden=3072, heads=32, kv_heads=32, head_dim=96, intermediate=8192,
                         vocab=32064, rms_eps=1e-5, rope_theta=10000.0, rope_traditional=False,
                         qkv_bias=False, tied_embeddings=False),
    # Llama-3.2-1B: the llama3 RoPE scaling, passed to rope as `freqs` (mlx-lm Llama3RoPE).
    "llama-3.2-1b": dict(hidden=2048, heads=32, kv_heads=8, head_dim=64, intermediate=8192,
                         vocab=128256, rms_eps=1e-5, rope_theta=500000.0, rope_traditional=False,
                         qkv_bias=False, tied_embeddings=True,
                         rope_scaling=dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
}

LORA_RANK = 8  # mlx-lm's default LoRA rank
LORA_SCALE = 20.0  # mlx-lm's default LoRA scale
GROUP_SIZE = 64  # mlx-lm's default quantization group size
BITS = 4

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def llama3_freqs(dims, base, scaling):
    """Per-pair wavelengths of mlx-lm's Llama3RoPE (its `_freqs`), float32."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    freqs = base ** (mx.arange(0, dims, 2) / dims)
    wavelens = 2 * math.pi * freqs
    freqs = mx.where(wavelens > old_len / low, freqs * factor, freqs)
    medium = (wavelens > old_len / high) & (wavelens < old_len / low)
    smooth = (old_len / wavelens - low) / (high - low)
    return mx.where(medium, freqs / ((1 - smooth) / factor + smooth), freqs).astype(mx.float32)


# ---------------------------------------------------------------------------- cases

def _case(kernel, model, role, tokens, **fields):
    name = f"{model}/{role}"
    return dict(name=name, kernel=kernel, model=model, tokens=tuple(tokens), **fields)


def _rms_norm_cases(tokens):
    s, q, t = MODEL_CONFIGS["smollm2-135m"], MODEL_CONFIGS["qwen3-0.6b"], MODEL_CONFIGS["qwen2.5-0.5b"]
    return [
        _case("rms_norm", "smollm2-135m", "input_layernorm", tokens, dim=s["hidden"], eps=s["rms_eps"]),
        _case("rms_norm", "qwen3-0.6b", "q_norm", tokens, dim=q["head_dim"], eps=q["rms_eps"],
              heads=q["heads"]),
        _case("rms_norm", "qwen2.5-0.5b", "norm/row-scales", tokens, dim=t["hidden"],
              eps=t["rms_eps"], row_scales=True),
        _case("rms_norm", "smollm2-135m", "norm/transposed", tokens, dim=s["hidden"],
              eps=s["rms_eps"], layout="transposed"),
    ]


def _rope_cases(tokens, long_offset=4096 + 17):
    def rope(model, role, **kw):
        c = MODEL_CONFIGS[model]
        fields = dict(heads=c["heads"], head_dim=c["head_dim"], dims=c["head_dim"],
                      traditional=c["rope_traditional"], base=c["rope_theta"], scale=1.0, offset=0)
        fields.update(kw)
        return _case("rope", model, role, tokens, **fields)

    return [
        rope("smollm2-135m", "q"),
        rope("qwen3-0.6b", "k/offset", heads=MODEL_CONFIGS["qwen3-0.6b"]["kv_heads"], offset=37),
        rope("llama-3.2-1b", "q/llama3-freqs/offset-array", freqs="llama3", base=None,
             offset=long_offset, offset_array=True),
        rope("tinyllama-1.1b", "q/traditional/large-offset", traditional=True, offset=long_offset,
             scale=0.5),
        rope("phi-3.5-mini", "q/partial-rotary", dims=48),
    ]


def _swiglu_cases(tokens):
    return [
        _case("swiglu", "smollm2-135m", "mlp", tokens, dim=MODEL_CONFIGS["smollm2-135m"]["intermediate"]),
        _case("swiglu", "qwen2.5-0.5b", "mlp/transposed", tokens,
              dim=MODEL_CONFIGS["qwen2.5-0.5b"]["intermediate"], layout="transposed"),
    ]


def _ce_cases(tokens, small_tokens):
    return [
        _case("cross_entropy", "smollm2-135m", "lm_head", tokens, vocab=MODEL_CONFIGS["smollm2-135m"]["vocab"]),
        _case("cross_entropy", "tinyllama-1.1b", "lm_head/large-logits", small_tokens,
              vocab=MODEL_CONFIGS["tinyllama-1.1b"]["vocab"], logit_scale="max"),
        _case("cross_entropy", "smollm2-135m", "lm_head/transposed", small_tokens, vocab=4096,
              layout="transposed"),
    ]


def _lce_cases(tokens, vocab_cap):
    s, t = MODEL_CONFIGS["smollm2-135m"], MODEL_CONFIGS["tinyllama-1.1b"]
    def vocab_role(role, vocab, cap):  # the name says when the vocabulary is cut
        return (role, vocab) if vocab <= cap else (f"{role}/vocab{cap}", cap)

    role_q, vocab_q = vocab_role("tied-embedding/q4", s["vocab"], vocab_cap)
    role_d, vocab_d = vocab_role("lm_head/dense", t["vocab"], vocab_cap // 4)
    return [
        _case("linear_cross_entropy", "smollm2-135m", role_q, tokens, hidden=s["hidden"],
              vocab=vocab_q, quantized=True, group_size=GROUP_SIZE),
        _case("linear_cross_entropy", "tinyllama-1.1b", role_d, tokens, hidden=t["hidden"],
              vocab=vocab_d, quantized=False),
    ]


def _adapter_cases(kernel, tokens):
    s, q = MODEL_CONFIGS["smollm2-135m"], MODEL_CONFIGS["qwen2.5-0.5b"]
    common = dict(rank=LORA_RANK, scale=LORA_SCALE)
    return [
        _case(kernel, "smollm2-135m", "q_proj/q4", tokens, in_dim=s["hidden"],
              out_dim=s["heads"] * s["head_dim"], quantized=True, group_size=GROUP_SIZE, **common),
        _case(kernel, "qwen2.5-0.5b", "k_proj/q4-g32/bias", tokens, in_dim=q["hidden"],
              out_dim=q["kv_heads"] * q["head_dim"], quantized=True, group_size=32, bias=True, **common),
        _case(kernel, "smollm2-135m", "down_proj/dense/transposed", tokens, in_dim=s["intermediate"],
              out_dim=s["hidden"], quantized=False, layout="transposed", **common),
    ]


def correctness_cases(kernel, shape_set="default"):
    """Cases for the correctness check: "default" (few tokens, seconds on a CPU) or "full"."""
    if shape_set == "default":
        tokens, small, vocab_cap = (1, 8), (1, 4), 4096
    elif shape_set == "full":
        tokens, small, vocab_cap = (2, 64), (1, 16), 1 << 30
    else:
        raise ValueError(f"unknown shape_set {shape_set!r}; use 'default' or 'full'")
    table = {
        "rms_norm": lambda: _rms_norm_cases(tokens),
        "rope": lambda: _rope_cases(tokens),
        "swiglu": lambda: _swiglu_cases(tokens),
        "cross_entropy": lambda: _ce_cases(tokens, small),
        "linear_cross_entropy": lambda: _lce_cases(small, vocab_cap),
        "lora_linear": lambda: _adapter_cases("lora_linear", tokens),
        "dora_linear": lambda: _adapter_cases("dora_linear", tokens),
    }
    if kernel not in table:
        raise ValueError(f"unknown kernel {kernel!r}; expected one of {', '.join(table)}")
    return table[kernel]()


def bench_cases(kernel):
    """The micro-benchmark cases on this device (they live in kernel_lab.bench_cases)."""
    from .bench_cases import bench_cases as cases

    return cases(kernel)


# --------------------------------------------------------------------------- inputs

class _Keys:
    """A deterministic stream of PRNG keys from one seed."""

    def __init__(self, seed):
        self.key = mx.random.key(seed)

    def __call__(self):
        self.key, sub = mx.random.split(self.key)
        return sub


def _activation(keys, shape, dtype, layout=None, scale=1.0):
    """Normal(0, scale) values; a transposed (non-contiguous) view when layout says so."""
    if layout == "transposed":
        flipped = shape[:-2] + (shape[-1], shape[-2])
        return (mx.random.normal(flipped, key=keys()) * scale).astype(dtype).swapaxes(-1, -2)
    if layout is not None:
        raise ValueError(f"unknown layout {layout!r}")
    return (mx.random.normal(shape, key=keys()) * scale).astype(dtype)


def _base_weight(keys, case, dtype):
    """(weight, scales, biases, group_size, bits) of a 4-bit or dense base layer."""
    out_dim, in_dim = case.get("out_dim", case.get("vocab")), case.get("in_dim", case.get("hidden"))
    dense = mx.random.normal((out_dim, in_dim), key=keys()) * in_dim ** -0.5
    if not case.get("quantized"):
        return dense.astype(dtype), None, None, None, None
    weight, scales, biases = mx.quantize(dense, group_size=case["group_size"], bits=BITS)
    return weight, scales.astype(dtype), biases.astype(dtype), case["group_size"], BITS


def make_inputs(kernel, case, dtype, seed):
    """Fresh random inputs for `kernel` on `case`: (args, kwargs, grad_argnums).

    grad_argnums are the positions in `args` of the differentiable inputs. As in mlx-lm
    training, LoRA/DoRA parameters (lora_a, lora_b, magnitude) are float32 whatever the
    activation dtype; quantized scales/biases and norm weights use the activation dtype.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if case["kernel"] != kernel:
        raise ValueError(f"case {case['name']!r} is for {case['kernel']}, not {kernel}")
    keys = _Keys(seed)
    batch, length = case["tokens"]
    layout = case.get("layout")

    if kernel == "rms_norm":
        lead = (batch, length, case["heads"]) if "heads" in case else (batch, length)
        x = _activation(keys, lead + (case["dim"],), dtype, layout)
        if case.get("row_scales"):
            rows = math.prod(lead)
            magnitudes = 10.0 ** mx.linspace(-3, 3, rows)  # 1e-3 .. 1e3 (x^2 overflows float16)
            magnitudes = mx.where(mx.arange(rows) == rows // 2, 0.0, magnitudes)  # one zero row
            x = (x.astype(mx.float32) * magnitudes.reshape(lead + (1,))).astype(dtype)
        weight = (1.0 + 0.1 * mx.random.normal((case["dim"],), key=keys())).astype(dtype)
        return [x, weight, case["eps"]], {}, (0, 1)

    if kernel == "rope":
        # mlx-lm's attention: (B, L, H, D) projections transposed to (B, H, L, D) views.
        x = mx.random.normal((batch, length, case["heads"], case["head_dim"]), key=keys())
        x = x.astype(dtype).transpose(0, 2, 1, 3)
        freqs = None
        if case.get("freqs") == "llama3":
            cfg = MODEL_CONFIGS[case["model"]]
            freqs = llama3_freqs(case["dims"], cfg["rope_theta"], cfg["rope_scaling"])
        offset = mx.array(case["offset"]) if case.get("offset_array") else case["offset"]
        kwargs = dict(traditional=case["traditional"], base=case["base"], scale=case["scale"],
                      offset=offset, freqs=freqs)
        return [x, case["dims"]], kwargs, (0,)

    if kernel == "swiglu":
        shape = (batch, length, case["dim"])
        gate = _activation(keys, shape, dtype, layout, scale=2.0)
        up = _activation(keys, shape, dtype, layout)
        return [gate, up], {}, (0, 1)

    if kernel == "cross_entropy":
        vocab = case["vocab"]
        scale = 3.0
        if case.get("logit_scale") == "max":
            # Near each dtype's safe top: +-1e4 in float32/bfloat16, +-3e4 in float16.
            scale = 3e4 / 4 if dtype == mx.float16 else 1e4 / 4
        logits = _activation(keys, (batch, length, vocab), dtype, layout, scale=scale)
        if case.get("logit_scale") == "max":
            logits = mx.clip(logits.astype(mx.float32), -4 * scale, 4 * scale).astype(dtype)
        targets = mx.random.randint(0, vocab, (batch, length), key=keys())
        return [logits, targets], {}, (0,)

    if kernel == "linear_cross_entropy":
        hidden = _activation(keys, (batch, length, case["hidden"]), dtype, layout, scale=2.0)
        weight, scales, biases, group_size, bits = _base_weight(keys, case, dtype)
        targets = mx.random.randint(0, case["vocab"], (batch, length), key=keys())
        kwargs = dict(scales=scales, biases=biases, group_size=group_size, bits=bits)
        return [hidden, weight, targets], kwargs, (0,)

    if kernel in ("lora_linear", "dora_linear"):
        in_dim, out_dim, rank = case["in_dim"], case["out_dim"], case["rank"]
        x = _activation(keys, (batch, length, in_dim), dtype, layout)
        weight, scales, biases, group_size, bits = _base_weight(keys, case, dtype)
        bound = in_dim ** -0.5  # mlx-lm's lora_a init: uniform(-1/sqrt(in), 1/sqrt(in))
        lora_a = mx.random.uniform(-bound, bound, (in_dim, rank), key=keys())
        # Non-zero lora_b (mlx-lm starts at zero) so that every gradient is non-trivial.
        lora_b = mx.random.normal((rank, out_dim), key=keys()) * (0.5 / (LORA_SCALE * rank ** 0.5))
        bias = (0.1 * mx.random.normal((out_dim,), key=keys())).astype(dtype) if case.get("bias") else None
        kwargs = dict(group_size=group_size, bits=bits, bias=bias)
        args = [x, weight, scales, biases, lora_a, lora_b, case["scale"]]
        if kernel == "lora_linear":
            return args, kwargs, (0, 4, 5)
        # DoRALinear.m is the base weight's float32 row norm; perturb it as training would.
        base = weight if scales is None else mx.dequantize(weight, scales, biases, group_size=group_size,
                                                           bits=bits)
        magnitude = mx.linalg.norm(base.astype(mx.float32), axis=1)
        magnitude = magnitude * (1.0 + 0.1 * mx.random.normal((out_dim,), key=keys()))
        return args + [magnitude], kwargs, (0, 4, 5, 7)

    raise ValueError(f"unknown kernel {kernel!r}")


def vjp_at(fn, args, kwargs, grad_argnums, cotangent):
    """(output, grads): fn(*args, **kwargs) and its vjp w.r.t. args[i] for i in grad_argnums."""

    def differentiable(*primals):
        call_args = list(args)
        for position, value in zip(grad_argnums, primals):
            call_args[position] = value
        return fn(*call_args, **kwargs)

    outputs, grads = mx.vjp(differentiable, [args[i] for i in grad_argnums], [cotangent])
    return outputs[0], grads
