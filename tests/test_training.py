"""Training runs (mlx-lm's trainer) with patched kernels, failure diagnosis, and stage 3."""

import math
from types import SimpleNamespace

import mlx.core as mx
import pytest

from kernel_lab.contract import KERNEL_NAMES
from kernel_lab.macrobench import compare_pair, loss_rel_diff, resolve_budget, run_macro
from kernel_lab.ops import STOCK
from kernel_lab.sandbox import TaskResult
from kernel_lab.tiny_models import random_token_dataset, tiny_model
from kernel_lab.training import convert_to_lora, run_training, steady_tokens_per_second, train_once

TINY = dict(iters=4, batch_size=2, max_seq_length=64, learning_rate=1e-3, steps_per_report=2)


def variant(**overrides):
    kernels = {n: getattr(STOCK, n) for n in KERNEL_NAMES}
    kernels.update(overrides)
    return SimpleNamespace(**kernels)


def tiny_run(kernels, family="llama", fine_tune_type="lora"):
    model = tiny_model(family)
    convert_to_lora(model, fine_tune_type=fine_tune_type, num_layers=2, rank=4)
    return run_training(model, random_token_dataset(16, 40), kernels, **TINY)


def test_tiny_patched_training_matches_stock_and_records_metrics():
    stock = tiny_run(None)
    patched = tiny_run(STOCK)
    assert stock["ok"] and patched["ok"]
    assert [r["iteration"] for r in patched["reports"]] == [2, 4]
    assert patched["losses"] == pytest.approx(stock["losses"], rel=1e-5)
    assert patched["patch_report"]["patched"]["lora_linear"] == 14
    for rec in (stock, patched):
        assert rec["tokens_per_second"] > 0 and rec["tokens_per_second_first_excluded"]
        assert rec["peak_memory"] > 0 and rec["wall_seconds"] > 0
        assert rec["trained_tokens"] > 0


def test_steady_rate_leaves_out_the_first_window():
    reports = [
        {"trained_tokens": 100, "tokens_per_second": 10.0},  # 10 s: the compile
        {"trained_tokens": 300, "tokens_per_second": 100.0},  # 2 s
        {"trained_tokens": 400, "tokens_per_second": 50.0},  # 2 s
    ]
    rate, excluded = steady_tokens_per_second(reports)
    assert excluded and rate == pytest.approx(300 / 4)
    assert steady_tokens_per_second(reports[:1]) == (pytest.approx(10.0), False)


def _nan_backward_swiglu():
    @mx.custom_function
    def swiglu(gate, up):
        return STOCK.swiglu(gate, up)

    @swiglu.vjp
    def swiglu_vjp(primals, cotangent, output):
        return cotangent * math.nan, cotangent

    return swiglu


@pytest.mark.parametrize(
    "kernels, expected",
    [
        (variant(rope=lambda x, dims, **kw: STOCK.rope(x, dims, **kw) * math.nan),
         "step 1: first non-finite output from kernel rope at model.layers.0.self_attn.rope"),
        (variant(swiglu=_nan_backward_swiglu()),
         "step 1: non-finite gradients from the backward of kernel swiglu"),
    ],
    ids=["forward-rope", "backward-swiglu"],
)
def test_nan_is_reported_with_kernel_layer_and_step(kernels, expected):
    record = tiny_run(kernels)
    assert not record["ok"] and record["error_kind"] == "nan"
    assert expected in record["error"]


def test_shape_error_names_the_kernel_that_caused_it():
    record = tiny_run(variant(swiglu=lambda g, u: STOCK.swiglu(g, u)[..., :-1]), family="qwen2")
    assert not record["ok"] and record["error_kind"] == "error"
    assert record["kernel"] == "swiglu" and record["module"] == "model.layers.0.mlp"
    assert "training failed at step 1" in record["error"]


def test_out_of_memory_is_reported_not_raised():
    def oom(*args, **kwargs):
        raise RuntimeError("[malloc] Unable to allocate 1099511627776 bytes")

    record = tiny_run(variant(lora_linear=oom))
    assert not record["ok"] and record["error_kind"] == "oom"
    assert "out of memory" in record["error"]


# ---------------------------------------------------------------- stage 3 metrics


def _fake_record(tps, peak, losses):
    return {"ok": True, "tokens_per_second": tps, "peak_memory": peak, "losses": losses,
            "patch_report_text": "report"}


def _fake_runner(stock, cand):
    calls = []

    def runner(target, kwargs, **_):
        if target.endswith(":preflight"):
            return TaskResult(ok=True, value={"ok": True, "losses": [1.0]})
        side = "stock" if kwargs["program"] is None else "candidate"
        calls.append(side)
        return TaskResult(ok=True, value=dict((stock if side == "stock" else cand).pop(0)))

    return runner, calls


def test_compare_pair_alternates_and_computes_ratios():
    stock = [_fake_record(100, 1000, [2.0, 1.5]), _fake_record(110, 1000, [2.0, 1.5]),
             _fake_record(90, 1000, [2.0, 1.5])]
    cand = [_fake_record(150, 800, [2.0, 1.505]), _fake_record(99, 800, [2.0, 1.505]),
            _fake_record(180, 800, [2.0, 1.505])]
    runner, calls = _fake_runner(stock, cand)
    budget = resolve_budget("cpu", trials=3)
    entry = compare_pair("m", "lora", "/p.py", budget, runner=runner)
    assert calls == ["stock", "candidate", "candidate", "stock", "stock", "candidate"]
    assert entry["ok"] and entry["loss_matches"]
    assert entry["training_speedup"] == pytest.approx(1.5)  # median of 1.5, 0.9, 2.0
    assert entry["memory_ratio"] == pytest.approx(1.25)
    assert entry["memory_reduction"] == pytest.approx(0.2)
    assert entry["loss_rel_diff"] == pytest.approx(0.005 / 1.5)


def test_compare_pair_fails_on_a_loss_mismatch():
    runner, _ = _fake_runner([_fake_record(100, 1000, [2.0, 1.5])],
                             [_fake_record(200, 500, [2.0, 1.53])])  # final 2% off
    entry = compare_pair("m", "lora", "/p.py", resolve_budget("cpu"), runner=runner)
    assert not entry["ok"] and not entry["loss_matches"]
    assert "differs from stock" in entry["error"]
    assert loss_rel_diff([1.0, 1.0], [1.0, 1.015]) == (pytest.approx(0.015), pytest.approx(0.015))


BROKEN_PROGRAM = '''
from kernel_lab.ops import STOCK
rms_norm, rope, cross_entropy = STOCK.rms_norm, STOCK.rope, STOCK.cross_entropy
linear_cross_entropy, lora_linear, dora_linear = (
    STOCK.linear_cross_entropy, STOCK.lora_linear, STOCK.dora_linear)

def swiglu(gate, up):
    return STOCK.swiglu(gate, up)[..., :-1]  # drops a column: breaks the down projection
'''


def test_stage3_broken_program_fails_fast_naming_kernel_layer_and_step(tmp_path):
    program = tmp_path / "broken.py"
    program.write_text(BROKEN_PROGRAM)
    result = run_macro(program, models=["smollm2-135m-q4"], fine_tune_types=("lora",),
                       budget="cpu")
    assert not result["ok"]
    run = result["runs"][0]
    assert run["records"]["stock"] == []  # failed in the preflight, before real training
    assert "kernel swiglu at model.layers" in result["error"]
    assert "step 1" in result["error"]


# ---------------------------------------------------------------- the real embedded model


@pytest.mark.slow
@pytest.mark.parametrize("fine_tune_type", ["lora", "dora"])
def test_real_model_with_stock_kernels_trains_like_mlx_lm(fine_tune_type):
    args = dict(fine_tune_type=fine_tune_type, iters=2, batch_size=1, max_seq_length=32,
                num_layers=2, steps_per_report=1)
    plain = train_once("smollm2-135m-q4", None, **args)
    patched = train_once("smollm2-135m-q4", "stock", **args)
    assert plain["ok"] and patched["ok"], (plain.get("error"), patched.get("error"))
    assert len(patched["losses"]) == 2
    assert patched["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    report = patched["patch_report"]
    kind = "dora_linear" if fine_tune_type == "dora" else "lora_linear"
    assert report["patched"] == {"rms_norm": 61, "rope": 30, "swiglu": 30, kind: 14}
    assert report["stock"] == [] and report["loss"] == "linear_cross_entropy"
    assert patched["peak_memory"] > 0 and patched["tokens_per_second"] > 0
