"""The reference kernels: oracle semantics, stock faithfulness to mlx-lm, and both the
stock kernels and initial_program.py against the oracle (forward and backward)."""

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.tuner.dora import DoRALinear
from mlx_lm.tuner.lora import LoRALinear

from kernel_lab import shapes
from kernel_lab.contract import KERNEL_NAMES, load_program
from kernel_lab.correctness import DEFAULT_DTYPES, CheckFailure, check_case
from kernel_lab.ops import ORACLE, STOCK

INITIAL = load_program(Path(__file__).resolve().parents[1] / "initial_program.py")


def f64(a):
    return a.astype(mx.float64, stream=mx.cpu)


def max_diff(a, b):
    with mx.stream(mx.cpu):
        return mx.max(mx.abs(f64(a) - f64(b))).item()


def _small_cases(kernel):
    return [c for c in shapes.correctness_cases(kernel) if not c.get("large")]


# A few shapes per kernel: the first and the last small default case (the last is adversarial).
FEW_CASES = [(k, c) for k in KERNEL_NAMES for c in {id(x): x for x in
             (_small_cases(k)[0], _small_cases(k)[-1])}.values()]


@pytest.mark.parametrize("impl", ["stock", "initial"])
@pytest.mark.parametrize("dtype", DEFAULT_DTYPES)
@pytest.mark.parametrize("kernel,case", FEW_CASES, ids=[f"{k}-{c['name']}" for k, c in FEW_CASES])
def test_forward_and_backward_match_oracle(impl, dtype, kernel, case):
    fn = getattr(STOCK if impl == "stock" else INITIAL, kernel)
    try:
        check_case(fn, kernel, case, dtype, seed=7)
    except CheckFailure as failure:
        pytest.fail(f"{impl} {kernel} {case['name']} {dtype}: {failure.what}: {failure.error}")


def test_rope_oracle_matches_fast_rope_with_offset_vector_and_freqs():
    x = mx.random.normal((2, 3, 5, 32), key=mx.random.key(0))
    freqs = shapes.llama3_freqs(32, 500000.0, shapes.MODEL_CONFIGS["llama-3.2-1b"]["rope_scaling"])
    offsets = mx.array([0, 4100])
    for kwargs in (dict(base=None, freqs=freqs), dict(base=10000.0)):
        for traditional in (False, True):
            got = mx.fast.rope(x, 32, traditional=traditional, scale=1.0, offset=offsets, **kwargs)
            ref = ORACLE.rope(x, 32, traditional=traditional, scale=1.0, offset=offsets, **kwargs)
            assert max_diff(got, ref) < 2e-3


def test_oracles_reject_bad_arguments():
    x = mx.zeros((1, 2, 4, 16))
    with pytest.raises(ValueError, match="even"):
        ORACLE.rope(x, 15, traditional=False, base=10000.0, scale=1.0, offset=0)
    with pytest.raises(ValueError, match="exactly one"):
        ORACLE.rope(x, 16, traditional=False, base=10000.0, scale=1.0, offset=0, freqs=mx.ones((8,)))
    with pytest.raises(ValueError, match="does not match"):
        ORACLE.cross_entropy(mx.zeros((2, 3, 10)), mx.zeros((2, 4), dtype=mx.int32))
    with pytest.raises(ValueError, match="integer"):
        ORACLE.cross_entropy(mx.zeros((2, 10)), mx.zeros((2,)))
    with pytest.raises(ValueError, match="group_size"):
        w, s, b = mx.quantize(mx.zeros((64, 64)), group_size=64, bits=4)
        ORACLE.lora_linear(mx.zeros((1, 64)), w, s, b, mx.zeros((64, 8)), mx.zeros((8, 64)), 1.0,
                           group_size=None, bits=None)


def test_oracle_rms_norm_zero_row_and_large_logits_stay_finite():
    x = mx.zeros((2, 8))
    y = ORACLE.rms_norm(x, mx.ones((8,)), 1e-5)
    assert mx.all(y == 0).item()
    logits = mx.array([[1e4, -1e4, 0.0]])
    loss = ORACLE.cross_entropy(logits, mx.array([1]))
    assert abs(loss.item() - 2e4) < 1e-6


def test_oracle_quantized_equals_oracle_on_dequantized_weight():
    case = shapes.correctness_cases("linear_cross_entropy")[0]
    args, kwargs, _ = shapes.make_inputs("linear_cross_entropy", case, "float32", seed=3)
    hidden, weight, targets = args
    dense = mx.dequantize(weight, kwargs["scales"], kwargs["biases"], group_size=kwargs["group_size"],
                          bits=kwargs["bits"])
    assert max_diff(ORACLE.linear_cross_entropy(*args, **kwargs),
                    ORACLE.linear_cross_entropy(hidden, dense, targets)) < 1e-5


def _adapter_inputs(kernel, dtype):
    case = shapes.correctness_cases(kernel)[1]  # canonical: 5-bit, group 32, with bias
    assert case["bias"] and case["quantized"]
    return case, shapes.make_inputs(kernel, case, dtype, seed=11)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stock_lora_is_mlx_lm_lora_linear(dtype):
    case, (args, kwargs, _) = _adapter_inputs("lora_linear", dtype)
    x, weight, scales, biases, lora_a, lora_b, scale = args
    base = nn.QuantizedLinear(lora_a.shape[0], lora_b.shape[1], bias=True, group_size=case["group_size"],
                              bits=case["bits"])
    base.weight, base.scales, base.biases, base.bias = weight, scales, biases, kwargs["bias"]
    layer = LoRALinear.from_base(base, r=lora_a.shape[1], scale=scale)
    layer.lora_a, layer.lora_b = lora_a, lora_b
    expected = layer(x)
    got = STOCK.lora_linear(*args, **kwargs)
    assert got.dtype == expected.dtype and mx.array_equal(got, expected).item()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stock_dora_is_mlx_lm_dora_linear(dtype):
    case, (args, kwargs, _) = _adapter_inputs("dora_linear", dtype)
    x, weight, scales, biases, lora_a, lora_b, scale, magnitude = args
    base = nn.QuantizedLinear(lora_a.shape[0], lora_b.shape[1], bias=True, group_size=case["group_size"],
                              bits=case["bits"])
    base.weight, base.scales, base.biases, base.bias = weight, scales, biases, kwargs["bias"]
    layer = DoRALinear.from_base(base, r=lora_a.shape[1], scale=scale)
    layer.lora_a, layer.lora_b, layer.m = lora_a, lora_b, magnitude
    expected = layer(x)
    got = STOCK.dora_linear(*args, **kwargs)
    assert got.dtype == expected.dtype and mx.array_equal(got, expected).item()

    # Gradients through the module (mlx-lm's training path) equal the kernel's vjp.
    def module_loss(params):
        layer.update(params)
        return layer(x).astype(mx.float32).sum()

    params = dict(lora_a=lora_a, lora_b=lora_b, m=magnitude)
    module_grads = mx.grad(module_loss)(params)
    kernel_grads = mx.grad(lambda a, b, m: STOCK.dora_linear(
        x, weight, scales, biases, a, b, scale, m, **kwargs).astype(mx.float32).sum(),
        argnums=(0, 1, 2))(lora_a, lora_b, magnitude)
    for name, g in zip(("lora_a", "lora_b", "m"), kernel_grads):
        assert max_diff(g, module_grads[name]) <= 1e-6 * max(1.0, mx.abs(g).max().item()), name


def test_stock_swiglu_is_mlx_lm_swiglu_without_importing_mlx_lm_in_children():
    from mlx_lm.models import activations

    gate, up = mx.random.normal((3, 70)), mx.random.normal((3, 70))
    assert mx.array_equal(STOCK.swiglu(gate, up), activations.swiglu(gate, up))
    # Checking and timing children import the ops but not mlx_lm (transformers, torch: seconds).
    import subprocess
    import sys

    code = ("import sys, kernel_lab.correctness, kernel_lab.microbench, kernel_lab.stage1; "
            "print(sorted(m for m in ('mlx_lm', 'transformers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"


def test_stock_linear_cross_entropy_is_quantized_lm_head_plus_mlx_loss():
    case = shapes.correctness_cases("linear_cross_entropy")[0]
    args, kwargs, _ = shapes.make_inputs("linear_cross_entropy", case, "float32", seed=5)
    hidden, weight, targets = args
    head = nn.QuantizedLinear(hidden.shape[-1], case["vocab"], bias=False, group_size=kwargs["group_size"],
                              bits=kwargs["bits"])
    head.weight, head.scales, head.biases = weight, kwargs["scales"], kwargs["biases"]
    expected = nn.losses.cross_entropy(head(hidden), targets, reduction="none")
    assert mx.array_equal(STOCK.linear_cross_entropy(*args, **kwargs), expected).item()


def test_make_inputs_is_seeded_and_gradients_are_non_trivial():
    for kernel in KERNEL_NAMES:
        for case in shapes.correctness_cases(kernel):
            args1, kwargs1, argnums = shapes.make_inputs(kernel, case, "float32", seed=1)
            args2, _, _ = shapes.make_inputs(kernel, case, "float32", seed=1)
            args3, _, _ = shapes.make_inputs(kernel, case, "float32", seed=2)
            for i in argnums:
                assert mx.issubdtype(args1[i].dtype, mx.floating), (kernel, i)
                assert mx.array_equal(args1[i], args2[i]).item()
                assert not mx.array_equal(args1[i], args3[i]).item()
            if kernel in ("lora_linear", "dora_linear"):
                assert mx.abs(args1[5]).max().item() > 0  # lora_b non-zero


def test_cases_are_well_formed_and_bench_inputs_build():
    for kernel in KERNEL_NAMES:
        for shape_set in ("default", "full"):
            names = [c["name"] for c in shapes.correctness_cases(kernel, shape_set)]
            assert len(names) == len(set(names)) > 0
        for case in shapes.bench_cases(kernel):
            args, _, argnums = shapes.make_inputs(kernel, case, "float32", seed=0)
            assert argnums and all(isinstance(args[i], mx.array) for i in argnums)
    with pytest.raises(ValueError, match="shape_set"):
        shapes.correctness_cases("rope", "huge")
    with pytest.raises(ValueError, match="unknown kernel"):
        shapes.correctness_cases("gelu")


def test_every_evaluation_covers_every_contract_variant():
    """Each seed's case set holds every bits / group size / rank / scale / bias value at least once."""
    from kernel_lab import cases

    combos = set()
    for seed in range(20):
        for kernel in ("lora_linear", "dora_linear"):
            adapters = shapes.correctness_cases(kernel, seed=seed)
            small_q = [c for c in adapters if c["quantized"] and not c.get("large")]
            assert sorted(c["bits"] for c in small_q) == sorted(cases.BITS)
            assert {c["group_size"] for c in small_q} == set(cases.GROUP_SIZES)
            assert {c["rank"] for c in adapters} >= set(cases.RANKS)
            assert {c["scale"] for c in adapters} >= set(cases.SCALES)
            assert {c["bias"] for c in adapters} == {True, False}
            assert any(not c["quantized"] for c in adapters)
            combos.add(tuple((c["bits"], c["group_size"], c["rank"], c["scale"], c["bias"]) for c in small_q))
        heads = [c for c in shapes.correctness_cases("linear_cross_entropy", seed=seed) if c.get("quantized")]
        assert {c["bits"] for c in heads} == set(cases.HEAD_BITS)
        assert {c["group_size"] for c in heads} == set(cases.GROUP_SIZES)
    assert len(combos) >= 10  # the combinations change with the seed
    canonical = shapes.correctness_cases("lora_linear")
    assert canonical == shapes.correctness_cases("lora_linear", seed=None)


def test_large_cases_cover_full_vocabularies_and_many_tokens():
    lce = [c for c in shapes.correctness_cases("linear_cross_entropy") if c.get("large")]
    ce = [c for c in shapes.correctness_cases("cross_entropy") if c.get("large")]
    assert max(c["vocab"] for c in lce) == 262144  # Gemma 3's (every real vocabulary on a GPU)
    assert {49152, 151936, 262144} <= {c["vocab"] for c in shapes.correctness_cases("cross_entropy")}
    assert {151936, 262144} <= {c["vocab"] for c in ce}
    assert max(math.prod(c["tokens"]) for c in lce) >= 1024  # past any chunk of <= 1023 rows
    for kernel in KERNEL_NAMES:
        assert any(c.get("large") for c in shapes.correctness_cases(kernel)), kernel


def test_quantized_inputs_decode_to_the_intended_scale():
    for bits in (4, 5, 8):
        case = dict(kernel="lora_linear", name="t", tokens=(1, 2), in_dim=256, out_dim=512, rank=8,
                    scale=2.0, quantized=True, bits=bits, group_size=64)
        args, kwargs, _ = shapes.make_inputs("lora_linear", case, "float32", seed=bits)
        w = mx.dequantize(args[1], args[2], args[3], group_size=64, bits=bits)
        std = mx.sqrt(mx.mean(w * w)).item()
        assert 0.8 * 256 ** -0.5 < std < 1.3 * 256 ** -0.5, (bits, std)
        assert abs(mx.mean(w).item()) < 0.1 * std
