"""The benchmark command's bookkeeping: tables and scores from saved runs (no training here)."""

import json
from pathlib import Path

from kernel_lab import benchmark

RESULTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*/*/benchmark.json"))


def _load():
    macro, micro = [], None
    for path in RESULTS:
        payload = json.loads(path.read_text())
        macro += payload.get("macro") or []
        micro = payload.get("micro") or micro
    return macro, micro


def test_saved_gpu_results_summarize():
    assert RESULTS, "benchmarks/*/*/benchmark.json missing"
    macro, micro = _load()
    table = benchmark.scores(macro, micro)
    # the optimized program beats stock on the GPU; the starting program's Qwen loss drifts > 1%
    assert table["optimized_program"]["combined"] > 1.0
    assert table["initial_program"]["loss_matches"] is False
    assert table["initial_program"]["combined"] == 0.0
    text = benchmark.format_tables(macro, micro) + benchmark.format_scores(table)
    assert "optimized_program" in text and "roof" in text and "LOSS MISMATCH" in text


def test_scores_follow_the_evaluator_formulas():
    row = dict(model="m", fine_tune_type="lora", ok=True, final_loss=2.0, loss_rel_diff=0.0)
    macro = [dict(row, side="stock"),
             dict(row, side="p", speedup=1.21, memory_reduction=0.5, final_loss=2.001)]
    table = benchmark.scores(macro, None)
    assert abs(table["p"]["macro"] - 1.21 ** 0.7 * 2.0 ** 0.3) < 1e-9
    assert table["p"]["loss_matches"] and "combined" not in table["p"]  # no micro measured
    macro[1]["final_loss"] = 2.1  # 5% off stock
    assert benchmark.scores(macro, None)["p"]["loss_matches"] is False


def test_compare_sides_rotates_and_takes_medians(monkeypatch):
    calls = []

    def fake_run(kwargs, timeout, memory_limit, runner):
        side = kwargs["program"] or "stock"
        calls.append(Path(side).stem)
        tps = {"stock": 100.0, "a": 150.0}[Path(side).stem] + len(calls)
        return {"ok": True, "tokens_per_second": tps, "peak_memory": 2e9 if side == "stock" else 1e9,
                "final_loss": 1.0, "losses": [2.0, 1.0], "reports": [{"iteration": 1}, {"iteration": 2}]}

    monkeypatch.setattr(benchmark.macrobench, "_run", fake_run)
    budget = dict(benchmark.BUDGETS["cpu"], trials=2)
    rows = benchmark.compare_sides("m", "lora", ["/x/a.py"], budget)
    assert calls == ["stock", "a", "a", "stock"]  # the order rotates each trial
    stock, a = rows
    assert stock["tokens_per_second"] == (101 + 104) / 2 and a["tokens_per_second"] == (152 + 153) / 2
    assert a["speedup"] == a["tokens_per_second"] / stock["tokens_per_second"]
    assert a["memory_reduction"] == 0.5 and a["loss_rel_diff"] == 0.0
