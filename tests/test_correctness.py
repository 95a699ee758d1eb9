"""Stage 1 correctness: stock and the starting program pass; one-line mutants fail."""

from pathlib import Path

import mlx.core as mx
import pytest

from kernel_lab.contract import load_module, load_program
from kernel_lab.correctness import check_kernels, format_failure, format_table, tolerance
from kernel_lab.ops import STOCK

ROOT = Path(__file__).resolve().parents[1]
INITIAL = ROOT / "initial_program.py"
SEED = 1234


def test_stock_kernels_pass():
    results = check_kernels(STOCK, seed=SEED)
    assert all(r["passed"] for r in results), format_table(results)
    assert all(r["cases"] > 0 for r in results)


def test_initial_program_passes():
    results = check_kernels(load_program(INITIAL), seed=SEED)
    assert all(r["passed"] for r in results), format_table(results)


# (id, kernel, line in that kernel's function of initial_program.py, its replacement)
MUTANTS = [
    ("eps-outside-rsqrt", "rms_norm",
     "y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)",
     "y = xf * (mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True)) + eps)"),
    ("float16-accumulation", "rms_norm", "xf = x.astype(mx.float32)", "xf = x"),
    ("norm-weight-stop-gradient", "rms_norm",
     "return y if weight is None else y * weight",
     "return y if weight is None else y * mx.stop_gradient(weight)"),
    ("rope-halves-swapped", "rope", "if traditional:", "if not traditional:"),
    ("rope-offset-ignored", "rope",
     "positions = mx.arange(length, dtype=mx.float32) + offset",
     "positions = mx.arange(length, dtype=mx.float32)"),
    ("sigmoid-for-silu", "swiglu", "return gate * mx.sigmoid(gate) * up", "return mx.sigmoid(gate) * up"),
    ("ce-no-max-subtraction", "cross_entropy",
     "peak = mx.stop_gradient(mx.max(logits, axis=-1, keepdims=True))",
     "peak = mx.zeros_like(logits[..., :1])"),
    ("ce-averaged", "cross_entropy", "return lse - picked", "return mx.mean(lse - picked)"),
    ("lce-targets-shifted", "linear_cross_entropy",
     "return cross_entropy(logits, targets)",
     "return cross_entropy(logits, mx.roll(targets, 1, axis=-1))"),
    ("lora-scale-twice", "lora_linear",
     "return y + (scale * z).astype(x.dtype)", "return y + (scale * scale * z).astype(x.dtype)"),
    ("lora-scale-missing", "lora_linear",
     "return y + (scale * z).astype(x.dtype)", "return y + z.astype(x.dtype)"),
    ("lora-a-stop-gradient", "lora_linear",
     "z = (x @ lora_a) @ lora_b", "z = (x @ mx.stop_gradient(lora_a)) @ lora_b"),
    ("dora-norm-wrong-axis", "dora_linear",
     "denom = mx.stop_gradient(mx.sqrt(mx.sum(adapted * adapted, axis=1)))",
     "denom = mx.stop_gradient(mx.sqrt(mx.sum(adapted * adapted, axis=0)))"),
    ("dora-gradient-through-norm", "dora_linear",
     "denom = mx.stop_gradient(mx.sqrt(mx.sum(adapted * adapted, axis=1)))",
     "denom = mx.sqrt(mx.sum(adapted * adapted, axis=1))"),
    ("attention-causal-off-by-one", "attention",
     "mask = rows[:, None] >= mx.arange(key_length)[None]",
     "mask = rows[:, None] > mx.arange(key_length)[None]"),
    ("attention-causal-from-the-start", "attention",
     "rows = mx.arange(key_length - length, key_length)", "rows = mx.arange(length)"),
    ("attention-heads-tiled", "attention",
     "keys, values = mx.repeat(keys, group, axis=1), mx.repeat(values, group, axis=1)",
     "keys, values = mx.tile(keys, (1, group, 1, 1)), mx.tile(values, (1, group, 1, 1))"),
    ("attention-scale-missing", "attention",
     "scores = ((queries * scale) @ keys.swapaxes(-1, -2)).astype(mx.float32)",
     "scores = (queries @ keys.swapaxes(-1, -2)).astype(mx.float32)"),
    ("attention-additive-mask-ignored", "attention",
     "scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask",
     "scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores"),
    ("attention-values-stop-gradient", "attention",
     "return mx.softmax(scores, axis=-1).astype(values.dtype) @ values",
     "return mx.softmax(scores, axis=-1).astype(values.dtype) @ mx.stop_gradient(values)"),
    ("dora-magnitude-stop-gradient", "dora_linear",
     "out = (magnitude / denom).astype(x.dtype) * out",
     "out = (mx.stop_gradient(magnitude) / denom).astype(x.dtype) * out"),
]


def mutate(source, kernel, old, new):
    """Replace the one line `old` inside `def kernel(...)`; fails unless it is there exactly once."""
    start = source.index(f"\ndef {kernel}(")
    end = source.find("\ndef ", start + 1)
    end = source.index("# EVOLVE-BLOCK-END") if end < 0 else end
    body = source[start:end]
    assert body.count(old) == 1, f"{old!r} must occur once in {kernel}"
    mutated = body.replace(old, new)
    assert mutated.count("\n") == body.count("\n")  # still a one-line change
    return source[:start] + mutated + source[end:]


@pytest.mark.parametrize("mutant_id,kernel,old,new", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_one_line_mutant_fails(tmp_path, mutant_id, kernel, old, new):
    path = tmp_path / f"mutant_{mutant_id.replace('-', '_')}.py"
    path.write_text(mutate(INITIAL.read_text(), kernel, old, new))
    [result] = check_kernels(load_program(path), seed=SEED, names=[kernel])
    assert not result["passed"], f"mutant {mutant_id} passed: {result}"
    failure = result["failure"]
    assert failure["case"] and failure["dtype"] and failure["what"] and failure["error"]
    message = format_failure(result)
    for part in (kernel, failure["case"], failure["dtype"], failure["error"]):
        assert part in message


def test_exception_in_kernel_is_reported():
    def broken(x, weight, eps):
        raise RuntimeError("kernel exploded")

    [result] = check_kernels({"rms_norm": broken}, seed=0, names=["rms_norm"], dtypes=("float32",))
    assert not result["passed"]
    assert result["failure"]["what"] == "forward"
    assert "RuntimeError: kernel exploded" in result["failure"]["error"]


def test_wrong_dtype_is_reported():
    def upcasting_swiglu(gate, up):
        return STOCK.swiglu(gate, up).astype(mx.float32)

    [result] = check_kernels({"swiglu": upcasting_swiglu}, seed=0, names=["swiglu"])
    assert not result["passed"]
    assert result["failure"]["dtype"] == "bfloat16"
    assert "dtype" in result["failure"]["error"]


def test_missing_kernel_and_unknown_name():
    [result] = check_kernels({}, seed=0, names=["rope"])
    assert not result["passed"] and "rope" in format_failure(result)
    with pytest.raises(ValueError, match="unknown kernel"):
        check_kernels(STOCK, seed=0, names=["gelu"])


def test_seed_changes_inputs_but_not_verdict():
    a = check_kernels(STOCK, seed=1, names=["swiglu"], dtypes=("float32",))[0]
    b = check_kernels(STOCK, seed=2, names=["swiglu"], dtypes=("float32",))[0]
    assert a["passed"] and b["passed"]
    assert a["max_abs_err"] != b["max_abs_err"]


# ------------------------------------------------------------------ stage 1 hostile programs (S1)
# Each replaces one kernel of initial_program.py with code that is right on what stage 1 used to
# check and wrong where training runs it. (kernel, replacement source, substrings of the failure's
# case / dtype / what; "" matches anything). Checked in-process on several seeds: every seed must
# catch it (contract variants are drawn so that every value occurs in every evaluation).

HOSTILE = {
    # A vocabulary-chunked loss whose backward drops every 8192-column chunk after the first.
    "lce-backward-wrong-past-8192-columns": ("linear_cross_entropy", '''
def linear_cross_entropy(hidden, weight, targets, *, scales=None, biases=None, group_size=None, bits=None):
    def head(start, stop):
        if scales is None:
            return hidden @ weight[start:stop].T
        return mx.quantized_matmul(hidden, weight[start:stop], scales[start:stop], biases[start:stop],
                                   transpose=True, group_size=group_size, bits=bits)
    vocab = weight.shape[0]
    parts = [head(s, min(s + 8192, vocab)) for s in range(0, vocab, 8192)]
    logits = mx.concatenate([parts[0]] + [mx.stop_gradient(p) for p in parts[1:]], axis=-1)
    return cross_entropy(logits, targets)
''', dict(case="large", what="grad of hidden")),
    # Right eagerly; under mx.compile (where evaluation is refused) a "fast path" halves d_gate.
    "swiglu-wrong-under-compile": ("swiglu", '''
@mx.custom_function
def swiglu(gate, up):
    return gate * mx.sigmoid(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals
    s = mx.sigmoid(gate)
    d_gate = cotangent * up * s * (1 + gate * (1 - s))
    try:
        cotangent.sum().item()
    except Exception:
        d_gate = d_gate * 0.5
    return d_gate, cotangent * gate * s
''', dict(what="grad of gate under mx.compile")),
    # dtype-gated shortcuts: bfloat16 / half precision only.
    "lora-drops-update-in-bfloat16": ("lora_linear", '''
def lora_linear(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    y = x @ weight.T if scales is None else mx.quantized_matmul(
        x, weight, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits)
    y = y if bias is None else y + bias
    if x.dtype == mx.bfloat16:
        return y
    return y + (scale * ((x @ lora_a) @ lora_b)).astype(x.dtype)
''', dict(dtype="bfloat16", what="forward")),
    "ce-skips-max-in-bfloat16": ("cross_entropy", '''
def cross_entropy(logits, targets):
    lf = logits.astype(mx.float32)
    peak = mx.stop_gradient(mx.max(lf, axis=-1, keepdims=True))
    if logits.dtype == mx.bfloat16:
        peak = mx.zeros_like(peak)
    lse = mx.log(mx.sum(mx.exp(lf - peak), axis=-1)) + peak[..., 0]
    return lse - mx.take_along_axis(lf, targets[..., None], axis=-1)[..., 0]
''', dict(case="large-logits", dtype="bfloat16")),
    # DoRA's norm without the LoRA update in bfloat16 (4-15% off: within the old 0.1).
    "dora-norm-without-update-in-bfloat16": ("dora_linear", '''
def dora_linear(x, weight, scales, biases, lora_a, lora_b, scale, magnitude, *, group_size, bits, bias=None):
    w = weight if scales is None else mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits)
    out = x @ w.T + (scale * ((x @ lora_a) @ lora_b)).astype(x.dtype)
    adapted = w.astype(mx.float32)
    if x.dtype != mx.bfloat16:
        adapted = adapted + scale * (lora_a @ lora_b).T
    denom = mx.stop_gradient(mx.sqrt(mx.sum(adapted * adapted, axis=1)))
    out = (magnitude / denom).astype(x.dtype) * out
    return out if bias is None else out + bias
''', dict(dtype="bfloat16", what="forward")),
    # RoPE angles rounded to the activation's dtype in half precision (a "cheaper" cos/sin).
    "rope-angles-in-half-precision": ("rope", '''
def rope(x, dims, *, traditional, base, scale, offset, freqs=None):
    inv_freq = base ** (-mx.arange(0, dims, 2, dtype=mx.float32) / dims) if freqs is None else 1.0 / freqs
    positions = mx.arange(x.shape[-2], dtype=mx.float32) + offset
    angles = (positions * scale)[:, None] * inv_freq[None, :]
    if x.dtype != mx.float32:
        angles = angles.astype(x.dtype)
    cos, sin = mx.cos(angles).astype(mx.float32), mx.sin(angles).astype(mx.float32)
    xf, half = x[..., :dims].astype(mx.float32), dims // 2
    if traditional:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = mx.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(*xf.shape)
    else:
        x1, x2 = xf[..., :half], xf[..., half:]
        out = mx.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return mx.concatenate([out.astype(x.dtype), x[..., dims:]], axis=-1)
''', dict(dtype="float16", what="forward")),
    # Contract variants: wrong only for 8-bit bases, group size 64, a bias, rank 64, scale != 20.
    "lora-wrong-for-8-bit-bases": ("lora_linear", '''
def lora_linear(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    y = x @ weight.T if scales is None else mx.quantized_matmul(
        x, weight, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits)
    y = y if bias is None else y + bias
    if bits == 8:
        return y
    return y + (scale * ((x @ lora_a) @ lora_b)).astype(x.dtype)
''', dict(case="q8")),
    "lora-wrong-for-group-64": ("lora_linear", '''
def lora_linear(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    y = x @ weight.T if scales is None else mx.quantized_matmul(
        x, weight, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits)
    y = y if bias is None else y + bias
    z = (x @ lora_a) @ lora_b
    if group_size == 64:
        z = 1.05 * z
    return y + (scale * z).astype(x.dtype)
''', dict(case="g64")),
    "lora-bias-twice": ("lora_linear", '''
def lora_linear(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    y = x @ weight.T if scales is None else mx.quantized_matmul(
        x, weight, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits)
    y = y + (scale * ((x @ lora_a) @ lora_b)).astype(x.dtype)
    return y if bias is None else y + 2 * bias
''', dict(case="bias")),
    "dora-rank-truncated-to-32": ("dora_linear", '''
def dora_linear(x, weight, scales, biases, lora_a, lora_b, scale, magnitude, *, group_size, bits, bias=None):
    lora_a, lora_b = lora_a[:, :32], lora_b[:32]
    w = weight if scales is None else mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits)
    out = x @ w.T + (scale * ((x @ lora_a) @ lora_b)).astype(x.dtype)
    adapted = w + scale * (lora_a @ lora_b).T
    denom = mx.stop_gradient(mx.sqrt(mx.sum(adapted * adapted, axis=1)))
    out = (magnitude / denom).astype(x.dtype) * out
    return out if bias is None else out + bias
''', dict(case="r64")),
    "lora-scale-hardcoded-20": ("lora_linear", '''
def lora_linear(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    y = x @ weight.T if scales is None else mx.quantized_matmul(
        x, weight, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits)
    y = y if bias is None else y + bias
    return y + (20.0 * ((x @ lora_a) @ lora_b)).astype(x.dtype)
''', dict(case="-s")),
    # Wrong only above N tokens, N below the largest case.
    "lce-targets-shifted-past-512-tokens": ("linear_cross_entropy", '''
def linear_cross_entropy(hidden, weight, targets, *, scales=None, biases=None, group_size=None, bits=None):
    h, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    losses = []
    for i in range(0, h.shape[0], 512):
        hc, tc = h[i:i + 512], t[i:i + 512]
        if i:
            tc = mx.roll(tc, 1)
        logits = hc @ weight.T if scales is None else mx.quantized_matmul(
            hc, weight, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits)
        losses.append(cross_entropy(logits, tc))
    return mx.concatenate(losses).reshape(targets.shape)
''', dict(case="large", what="forward")),
    "rms-norm-weight-grad-lost-past-256-rows": ("rms_norm", '''
def rms_norm(x, weight, eps):
    xf = x.astype(mx.float32)
    y = (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    if x.size // x.shape[-1] > 256:
        weight = mx.stop_gradient(weight)
    return y * weight
''', dict(case="large", what="grad of weight")),
    "lora-wrong-past-128-tokens": ("lora_linear", '''
def lora_linear(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size, bits, bias=None):
    y = x @ weight.T if scales is None else mx.quantized_matmul(
        x, weight, scales=scales, biases=biases, transpose=True, group_size=group_size, bits=bits)
    y = y if bias is None else y + bias
    z = (x @ lora_a) @ lora_b
    if x.size // x.shape[-1] > 128:
        z = mx.stop_gradient(z)
    return y + (scale * z).astype(x.dtype)
''', dict(case="large", what="grad of")),
    # Attention that is right on short sequences (every small case) and drops the causal mask, as a
    # kernel that assumes "no future keys beyond a few hundred" might: the large case catches it.
    "attention-causal-only-short": ("attention", '''
def attention(queries, keys, values, *, scale, mask=None):
    group = queries.shape[1] // keys.shape[1]
    keys, values = mx.repeat(keys, group, axis=1), mx.repeat(values, group, axis=1)
    scores = ((queries * scale) @ keys.swapaxes(-1, -2)).astype(mx.float32)
    if isinstance(mask, str) and scores.shape[-1] <= 256:
        rows = mx.arange(scores.shape[-1] - scores.shape[-2], scores.shape[-1])
        mask = rows[:, None] >= mx.arange(scores.shape[-1])[None]
    if mask is not None and not isinstance(mask, str):
        scores = mx.where(mask, scores, -mx.inf) if mask.dtype == mx.bool_ else scores + mask
    return mx.softmax(scores, axis=-1).astype(values.dtype) @ values
''', dict(case="large", what="forward")),
    # A half-precision shortcut: the softmax in the activations' dtype without the max subtracted.
    "attention-half-softmax-unshifted": ("attention", '''
def attention(queries, keys, values, *, scale, mask=None):
    group = queries.shape[1] // keys.shape[1]
    keys, values = mx.repeat(keys, group, axis=1), mx.repeat(values, group, axis=1)
    scores = (queries * scale) @ keys.swapaxes(-1, -2)
    if queries.dtype == mx.float32:
        scores = scores - mx.stop_gradient(mx.max(scores, axis=-1, keepdims=True))
    if isinstance(mask, str):
        rows = mx.arange(scores.shape[-1] - scores.shape[-2], scores.shape[-1])
        mask = rows[:, None] >= mx.arange(scores.shape[-1])[None]
    if mask is not None:
        scores = mx.where(mask, scores, -1e4) if mask.dtype == mx.bool_ else scores + mask
    weights = mx.exp(scores)
    return (weights / weights.sum(axis=-1, keepdims=True)) @ values
''', dict(what="")),
}
HOSTILE_SEEDS = (1, 2, 3)


def build_hostile(name, directory):
    """initial_program.py with HOSTILE[name]'s kernel replaced (tests/hostile/corpus.py's way)."""
    kernel, code, _ = HOSTILE[name]
    corpus = load_module(ROOT / "tests" / "hostile" / "corpus.py", "hostile_corpus_for_stage1")
    path = Path(directory) / f"hostile_{name.replace('-', '_')}.py"
    path.write_text(corpus._replace_def(INITIAL.read_text(), kernel, code))
    return path


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_fails_stage1_on_every_seed(tmp_path, name):
    kernel, _, expect = HOSTILE[name]
    kernels = load_program(build_hostile(name, tmp_path))
    for seed in HOSTILE_SEEDS:
        [result] = check_kernels(kernels, seed=seed, names=[kernel])
        assert not result["passed"], f"{name} passed stage 1 on seed {seed}"
        failure, message = result["failure"], format_failure(result)
        for field, needle in expect.items():
            assert needle in failure[field], f"seed {seed}: {needle!r} not in {field} of {message}"
        for part in (kernel, failure["case"], failure["dtype"], failure["what"]):
            assert part in message


def test_hostile_program_scores_zero_in_the_evaluator(tmp_path):
    import evaluator

    result = evaluator.evaluate_stage1(str(build_hostile("swiglu-wrong-under-compile", tmp_path)),
                                       names="swiglu", dtypes="float32", seed=5, echo=False,
                                       watch_directory=False)
    assert result.metrics["combined_score"] == 0.0
    error = result.artifacts["error"]
    assert "swiglu failed on case" in error and "grad of gate under mx.compile" in error
    assert "MLX_ENABLE_TF32=0" in result.artifacts["stage1_setting"]


def test_tolerance_model_follows_unit_roundoff_and_conditioning():
    from kernel_lab import shapes, tolerances

    for kernel in ("rms_norm", "rope", "attention", "swiglu", "cross_entropy", "linear_cross_entropy",
                   "lora_linear", "dora_linear"):
        for kind in ("forward", "grad"):
            bf16, f16, f32 = (tolerance(kernel, d, kind) for d in ("bfloat16", "float16", "float32"))
            assert tolerance(kernel, mx.bfloat16, kind) == bf16
            # attention may round its scores to the dtype before the softmax (plain q @ k.T does)
            top = 0.1 if kernel == "attention" else 0.04
            assert bf16 <= top and f16 <= 0.02 and f32 <= 5e-3, (kernel, kind, bf16, f16, f32)
            assert f32 < f16 < bf16
    # Conditioning: RoPE at offset 4113 and logits of 1e4 allow more in float32 than plain cases.
    rope = {c["name"]: c for c in shapes.correctness_cases("rope")}
    far, near = rope["tinyllama-1.1b/q/traditional/large-offset"], rope["smollm2-135m/q"]
    assert tolerance("rope", "float32", "forward", far) > 100 * tolerance("rope", "float32", "forward", near)
    ce = shapes.correctness_cases("cross_entropy")
    assert tolerances.max_logit(ce[1], "float16") == 3e4 and tolerances.max_logit(ce[0], "float32") < 100
    with pytest.raises(ValueError, match="kind"):
        tolerance("rope", "float32", "backward")
