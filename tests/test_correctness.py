"""Stage 1 correctness: stock and the starting program pass; one-line mutants fail."""

from pathlib import Path

import mlx.core as mx
import pytest

from kernel_lab.contract import load_program
from kernel_lab.correctness import check_kernels, format_failure, format_table
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
