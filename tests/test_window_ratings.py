"""benchmarks/window_ratings.py: stage 3's speedup recomputed from a recorded run, both ratings."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("window_ratings", ROOT / "benchmarks/window_ratings.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reports(windows):
    warm = {"tokens_per_second": 1.0, "step_seconds": [9.0]}  # the warm-up window: never counted
    return [warm] + [{"tokens_per_second": len(s) * 100 / sum(s), "step_seconds": s} for s in windows]


def test_both_ratings_from_an_evaluators_json(tmp_path, capsys):
    script = _script()
    stock = _reports([[0.1] * 4] * 3)
    stalling = _reports([[0.08, 0.08, 0.08, 0.32]] * 3)
    run = {"records": {"stock": [{"reports": stock}], "candidate": [{"reports": stalling}]}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"macro": {"runs": [run, run]}, "metrics": {}}))
    (evaluation,) = script.evaluations(path)
    assert script.speedup(evaluation, script.mean_rate) == pytest.approx(0.4 / 0.56)
    assert script.speedup(evaluation, script.median_step_rate) == pytest.approx(1.25)
    script.main([str(path)])
    assert "largest difference between the ratings: 42.9%" in capsys.readouterr().out
