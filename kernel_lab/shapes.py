"""Shapes of real models, the test and benchmark cases built from them, and inputs.

A case is a plain dict: "name" (model/role/variant), "model", "kernel", the kernel's
dimensions, "tokens" (batch, length), and optional adversarial switches:
  layout="transposed"   the main activation is a non-contiguous (transposed) view
  row_scales=True       rms_norm rows of magnitudes 1e-3 .. 1e3 plus an all-zero row
  logit_scale=S         cross-entropy logits of magnitude up to +-S
  offset=N              RoPE position offset (int, or an mx.array scalar when offset_array)
  mask=M                attention mask: "causal", None, "window" (a boolean sliding window of
                        `window` keys, as Gemma 3's local layers) or "additive" (a float bias
                        with the causal part at -1e4); key_length=Lk for queries shorter than
                        the keys (a prefill after a cache); score_scale=S sharpens the scores
and the contract's arguments: quantized / bits (default 4) / group_size of a base or lm_head,
rank / scale / bias of LoRA and DoRA; large=True marks a case checked against stock in float32
(kernel_lab.cases). make_inputs turns a case into fresh random arguments for a kernel.
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


def correctness_cases(kernel, shape_set="default", seed=None):
    """Cases for the correctness check (stage 1); see kernel_lab.cases."""
    from .cases import correctness_cases as cases  # imports this module: import it lazily

    return cases(kernel, shape_set, seed)


def bench_cases(kernel):
    """The micro-benchmark cases on this device (they live in kernel_lab.bench_cases)."""
    from .bench_cases import bench_cases as cases

    return cases(kernel)


# --------------------------------------------------------------------------- inputs

class _Keys:
    """A deterministic stream of PRNG keys from one seed, and draws of mean 0 and std 1:
    normal, or uniform on +-sqrt(3) when `fast` (4x cheaper on a CPU: large cases)."""

    def __init__(self, seed, fast=False):
        self.key, self.fast = mx.random.key(seed), fast

    def __call__(self):
        self.key, sub = mx.random.split(self.key)
        return sub

    def normal(self, shape):
        if self.fast:
            return mx.random.uniform(-3 ** 0.5, 3 ** 0.5, shape, key=self())
        return mx.random.normal(shape, key=self())


def _activation(keys, shape, dtype, layout=None, scale=1.0):
    """Normal(0, scale) values; a transposed (non-contiguous) view when layout says so."""
    if layout == "transposed":
        flipped = shape[:-2] + (shape[-1], shape[-2])
        return (keys.normal(flipped) * scale).astype(dtype).swapaxes(-1, -2)
    if layout is not None:
        raise ValueError(f"unknown layout {layout!r}")
    return (keys.normal(shape) * scale).astype(dtype)


def _base_weight(keys, case, dtype):
    """(weight, scales, biases, group_size, bits) of a quantized (case bits, default 4) or dense
    base of std ~1/sqrt(in). Quantized: random codes (every packed bit pattern is valid) and
    per-group scales of 0.5-1.5x, biases centring each group; cheaper than quantizing floats."""
    out_dim, in_dim = case.get("out_dim", case.get("vocab")), case.get("in_dim", case.get("hidden"))
    if not case.get("quantized"):
        return (keys.normal((out_dim, in_dim)) * in_dim ** -0.5).astype(dtype), None, None, None, None
    bits, group_size = case.get("bits", BITS), case["group_size"]
    halves = mx.random.randint(0, 1 << 16, (out_dim, in_dim * bits // 32, 2), dtype=mx.uint32, key=keys())
    weight = mx.left_shift(halves[..., 0], 16) | halves[..., 1]
    levels = (1 << bits) - 1
    spread = mx.random.uniform(0.5, 1.5, (out_dim, in_dim // group_size), key=keys())
    scales = spread * (2 * 3 ** 0.5 / levels) * in_dim ** -0.5  # uniform codes: std in^-1/2
    biases = -scales * (levels / 2)
    return weight, scales.astype(dtype), biases.astype(dtype), group_size, bits


def make_inputs(kernel, case, dtype, seed):
    """Fresh random inputs for `kernel` on `case`: (args, kwargs, grad_argnums).

    grad_argnums are the positions in `args` of the differentiable inputs. As in mlx-lm
    training, LoRA/DoRA parameters (lora_a, lora_b, magnitude) are float32 whatever the
    activation dtype; quantized scales/biases and norm weights use the activation dtype.
    """
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if case["kernel"] != kernel:
        raise ValueError(f"case {case['name']!r} is for {case['kernel']}, not {kernel}")
    keys = _Keys(seed, fast=bool(case.get("large")))
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
        weight = (1.0 + 0.1 * keys.normal((case["dim"],))).astype(dtype)
        return [x, weight, case["eps"]], {}, (0, 1)

    if kernel == "rope":
        # mlx-lm's attention: (B, L, H, D) projections transposed to (B, H, L, D) views.
        x = keys.normal((batch, length, case["heads"], case["head_dim"]))
        x = x.astype(dtype).transpose(0, 2, 1, 3)
        freqs = None
        if case.get("freqs") == "llama3":
            cfg = MODEL_CONFIGS[case["model"]]
            freqs = llama3_freqs(case["dims"], cfg["rope_theta"], cfg["rope_scaling"])
        offset = mx.array(case["offset"]) if case.get("offset_array") else case["offset"]
        kwargs = dict(traditional=case["traditional"], base=case["base"], scale=case["scale"],
                      offset=offset, freqs=freqs)
        return [x, case["dims"]], kwargs, (0,)

    if kernel == "attention":
        return _attention_inputs(keys, case, dtype, batch, length)

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
        # Non-zero lora_b (mlx-lm starts at zero) so that every gradient is non-trivial, sized so
        # that scale * (x @ a) @ b is ~0.6x the base output whatever the scale and rank (a kernel
        # that drops or mis-scales the update, or leaves it out of DoRA's norm, is far off).
        lora_b = keys.normal((rank, out_dim)) * (1.0 / (case["scale"] * rank ** 0.5))
        bias = (0.1 * keys.normal((out_dim,))).astype(dtype) if case.get("bias") else None
        kwargs = dict(group_size=group_size, bits=bits, bias=bias)
        args = [x, weight, scales, biases, lora_a, lora_b, case["scale"]]
        if kernel == "lora_linear":
            return args, kwargs, (0, 4, 5)
        # DoRALinear.m is the base weight's float32 row norm; perturb it as training would.
        base = weight if scales is None else mx.dequantize(weight, scales, biases, group_size=group_size,
                                                           bits=bits)
        magnitude = mx.linalg.norm(base.astype(mx.float32), axis=1)
        magnitude = magnitude * (1.0 + 0.1 * keys.normal((out_dim,)))
        return args + [magnitude], kwargs, (0, 4, 5, 7)

    raise ValueError(f"unknown kernel {kernel!r}")


def _attention_inputs(keys, case, dtype, batch, length):
    """mlx-lm's attention inputs: (B, L, heads, D) projections seen as (B, heads, L, D) views."""
    heads, kv_heads, dim = case["heads"], case["kv_heads"], case["head_dim"]
    key_length = case.get("key_length", length)

    def heads_view(n, rows, scale=1.0):
        return (keys.normal((batch, rows, n, dim)) * scale).astype(dtype).transpose(0, 2, 1, 3)

    queries = heads_view(heads, length, case.get("score_scale", 1.0))
    k, v = heads_view(kv_heads, key_length), heads_view(kv_heads, key_length)
    mask = case.get("mask")
    if mask in ("window", "additive"):
        rows = mx.arange(key_length - length, key_length)[:, None]
        cols = mx.arange(key_length)[None]
        visible = rows >= cols
        if mask == "window":
            mask = visible & (rows < cols + case["window"])
        else:  # a position bias on top of the causal mask, in the activations' dtype
            bias = 0.5 * keys.normal((1, heads, length, key_length))
            mask = mx.where(visible, bias, -1e4).astype(dtype)
    return [queries, k, v], dict(scale=dim ** -0.5, mask=mask), (0, 1, 2)


def vjp_at(fn, args, kwargs, grad_argnums, cotangent):
    """(output, grads): fn(*args, **kwargs) and its vjp w.r.t. args[i] for i in grad_argnums."""

    def differentiable(*primals):
        call_args = list(args)
        for position, value in zip(grad_argnums, primals):
            call_args[position] = value
        return fn(*call_args, **kwargs)

    outputs, grads = mx.vjp(differentiable, [args[i] for i in grad_argnums], [cotangent])
    return outputs[0], grads
