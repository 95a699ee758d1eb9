"""evaluator.py, the score, the tamper guards and the micro-benchmarks.

The hostile corpus (tests/hostile/corpus.py) runs each program through the real stage with a
reduced check (its one kernel, float32) and short timeouts: each must score 0 with a clear error,
within its timeout plus a few seconds, leaving the evaluator's files untouched.
"""

import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

import evaluator
from kernel_lab import guards, microbench, score
from kernel_lab.ops import STOCK

sys.path.insert(0, str(Path(__file__).resolve().parent / "hostile"))
import corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OWN_FILES = ["evaluator.py", "kernel_lab/sandbox.py", "kernel_lab/worker.py", "kernel_lab/guards.py",
             "kernel_lab/microbench.py", "kernel_lab/score.py", "tests/hostile/corpus.py"]
STAGE1_TIMEOUT = 8.0


def _hashes():
    return {p: hashlib.sha256((ROOT / p).read_bytes()).hexdigest() for p in OWN_FILES}


def _metrics_and_artifacts(result):
    return result.metrics, result.artifacts


# ------------------------------------------------------------------ score (pure functions)

def test_stage1_score():
    assert score.stage1_score([True] * 7) == (score.STAGE1_PASS_SCORE, 1.0)
    combined, fraction = score.stage1_score([True, False, True, True])
    assert combined == 0.0 and fraction == 0.75
    with pytest.raises(ValueError):
        score.stage1_score([])


def test_kernel_and_micro_score():
    assert score.kernel_score(1.0, 1.0) == 1.0
    assert math.isclose(score.kernel_score(2.0, 1.0), 2 ** 0.75)
    assert math.isclose(score.kernel_score(1.0, 16.0), 2.0)
    assert score.kernel_score(1e9, 1.0) == 100 ** 0.75  # clipped
    assert math.isclose(score.micro_score({"a": (4.0, 1.0), "b": (0.25, 1.0)}), 1.0)
    with pytest.raises(ValueError):
        score.kernel_score(float("nan"), 1.0)
    with pytest.raises(ValueError):
        score.kernel_score(0.0, 1.0)


def test_macro_and_combined_score():
    assert math.isclose(score.run_score(2.0, 1.0), 2 ** 0.7)
    assert math.isclose(score.macro_score([(2.0, 1.0), (0.5, 1.0)]), 1.0)
    assert math.isclose(score.combined_score(16.0, 1.0), 2.0)
    assert math.isclose(score.combined_score(1.0, 2.0), 2 ** 0.75)
    assert score.combined_score(1.0, 1.0) == 1.0  # as good as stock reads 1.0
    assert score.combined_score(1.5, 1.5, loss_matches=False) == 0.0
    assert score.combined_score(0.0, 2.0) == 0.0


def test_stage2_score_meets_the_cascade_gate_exactly_at_the_micro_gate():
    assert math.isclose(score.combined_score(score.MICRO_GATE), score.STAGE3_FLOOR)
    assert score.combined_score(0.89) < score.STAGE3_FLOOR < score.combined_score(0.91)
    assert score.STAGE1_PASS_SCORE < score.combined_score(0.01)


def test_no_program_that_stopped_earlier_outranks_a_fine_tuned_one():
    """Issue 10: micro 0.89 (stopped at stage 2) ranked above micro 0.95 with a measured macro 0.8."""
    stopped = [score.combined_score(m) for m in (0.3, 0.6, 0.89, 0.8999)]
    for micro in (score.MICRO_GATE, 0.95, 1.2, 3.0):
        for macro in (0.01, 0.2, 0.5, 0.8, 1.0, 1.5):
            fine_tuned = score.combined_score(micro, macro)
            assert fine_tuned > max(stopped) > score.STAGE1_PASS_SCORE
    # and within stage 3 the order of the measured results is kept
    measured = [score.fine_tuning_score(1.0, m) for m in (0.05, 0.3, 0.7, 0.76, 0.9, 1.4)]
    banded = [score.band(v) for v in measured]
    assert banded == sorted(banded) and len(set(banded)) == len(banded)
    assert score.combined_score(0.95, 0.8) > score.combined_score(0.89)


# ------------------------------------------------------------------ guards

def test_guards_name_what_was_patched():
    before = guards.snapshot()
    original = mx.fast.rms_norm
    try:
        mx.fast.rms_norm = lambda *a, **k: None
        mx.fast.extra_helper = lambda: None
        found = guards.changes(before, guards.snapshot())
        assert "mlx.core.fast.rms_norm replaced" in found
        assert "mlx.core.fast.extra_helper added" in found
        with pytest.raises(guards.TamperError, match="rms_norm replaced"):
            guards.verify(before, "in a test")
    finally:
        mx.fast.rms_norm = original
        del mx.fast.extra_helper
    mx.random.seed(5)  # changes random state, not behaviour
    guards.verify(before, "after restoring")


def test_guards_watch_reference_kernels_and_their_code():
    before = guards.snapshot()
    original = STOCK.rope
    try:
        STOCK.rope = lambda *a, **k: None
        assert "kernel_lab.ops.STOCK.rope replaced" in guards.changes(before, guards.snapshot())
    finally:
        STOCK.rope = original
    code = STOCK.swiglu.__code__
    try:
        STOCK.swiglu.__code__ = (lambda gate, up: gate).__code__
        assert "kernel_lab.ops.STOCK.swiglu.__code__ replaced" in guards.changes(before, guards.snapshot())
    finally:
        STOCK.swiglu.__code__ = code
    assert guards.changes(before, guards.snapshot()) == []


# ------------------------------------------------------------------ stale outputs (anti-memo)

def test_microbench_rejects_outputs_that_do_not_belong_to_their_inputs():
    memo = {}

    def memoized(x, weight, eps):
        key = (tuple(x.shape), str(x.dtype))
        if key not in memo:
            memo[key] = STOCK.rms_norm(x, weight, eps)
        return memo[key]

    with pytest.raises(microbench.KernelFailure, match="stale, memoized or wrong"):
        microbench.bench_kernel("rms_norm", {"candidate": memoized, "stock": STOCK.rms_norm},
                                dtype="float32", seed=0, repeats=2, warmup=1, compile=False,
                                min_seconds=0)


# ------------------------------------------------------------------ hostile corpus

@pytest.mark.parametrize("name", sorted(corpus.CORPUS))
def test_hostile_program_scores_zero_with_a_clear_error(name, tmp_path):
    entry = corpus.CORPUS[name]
    program = corpus.build(name, tmp_path)
    before = _hashes()
    stage = entry.get("stage", 1)
    options = dict(names=entry["kernel"] or "rms_norm", dtypes="float32", seed=1, echo=False,
                   stage1_timeout=STAGE1_TIMEOUT, stage2_timeout=60, repeats=2,
                   memory_limit_gb=1.5, watch_directory=name == "write_next_to_evaluator")
    start = time.monotonic()
    try:
        function = evaluator.evaluate_stage2 if stage == 2 else evaluator.evaluate_stage1
        metrics, artifacts = _metrics_and_artifacts(function(str(program), **options))
    finally:
        if entry.get("cleanup"):
            (ROOT / entry["cleanup"]).unlink(missing_ok=True)
    elapsed = time.monotonic() - start
    assert metrics["combined_score"] == 0.0
    error = artifacts["error"]
    assert error.startswith(f"stage {stage}: ")
    for needle in entry["expect"]:
        assert needle in error, f"{needle!r} not in {error!r}"
    if entry.get("any_of"):
        assert any(needle in error for needle in entry["any_of"]), error
    limit = STAGE1_TIMEOUT if stage == 1 else 60
    assert elapsed < limit + 15, f"took {elapsed:.1f} s"
    assert _hashes() == before, "the evaluator's files changed"


@pytest.mark.parametrize("name", sorted(corpus.HARMLESS))
def test_harmless_side_effects_do_not_touch_the_directory(name, tmp_path):
    program = corpus.build(name, tmp_path, corpus.HARMLESS)
    top_level = {p.name: p.stat().st_mtime_ns for p in ROOT.iterdir() if p.is_file()}
    result = evaluator.evaluate_stage1(str(program), names="rms_norm", dtypes="float32", seed=2,
                                       echo=False, stage1_timeout=30, watch_directory=False)
    assert result.metrics["combined_score"] == score.STAGE1_PASS_SCORE, result.artifacts.get("error")
    assert "pwned" not in (ROOT / "evaluator.py").read_text()[:100]
    assert "pwned" not in (ROOT / "initial_program.py").read_text()[:100]
    for file_name in ("evaluator.py", "initial_program.py"):
        assert (ROOT / file_name).stat().st_mtime_ns == top_level[file_name]


def test_failed_stage1_stops_the_cascade(tmp_path):
    program = corpus.build("nan_output", tmp_path)
    metrics, artifacts = _metrics_and_artifacts(evaluator.evaluate(
        str(program), names="rms_norm", dtypes="float32", seed=3, echo=False, stage1_timeout=30))
    assert metrics["combined_score"] == 0.0 and "micro_score" not in metrics
    assert artifacts["seed"] == "3"


def test_stage2_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNEL_LAB_CACHE", str(tmp_path))
    program = tmp_path / "p.py"
    program.write_text("# some program\n")
    assert evaluator.cached_stage2(program) is None
    evaluator._write_stage2_cache(program, {"micro_score": 1.2}, {"kernels": []}, seed=9)
    assert evaluator.cached_stage2(program)["metrics"]["micro_score"] == 1.2
    program.write_text("# another program\n")
    assert evaluator.cached_stage2(program) is None


# ------------------------------------------------------------------ real stages (seconds each)

STOCK_PROGRAM = '''"""Every kernel is the stock one MLX / mlx-lm ship (a reference point: micro score ~1)."""
import sys
sys.path.insert(0, {root!r})
from kernel_lab.ops import STOCK

rms_norm, rope, swiglu = STOCK.rms_norm, STOCK.rope, STOCK.swiglu
cross_entropy, linear_cross_entropy = STOCK.cross_entropy, STOCK.linear_cross_entropy
lora_linear, dora_linear = STOCK.lora_linear, STOCK.dora_linear
'''


@pytest.mark.slow
def test_stock_program_scores_about_one_and_passes_stage1(tmp_path):
    program = tmp_path / "stock_program.py"
    program.write_text(STOCK_PROGRAM.format(root=str(ROOT)))
    options = dict(names="rms_norm,rope", dtypes="float32", seed=4, echo=False, repeats=3,
                   min_seconds=1.0)
    stage1 = evaluator.evaluate_stage1(str(program), **options)
    assert stage1.metrics["combined_score"] == score.STAGE1_PASS_SCORE
    stage2 = evaluator.evaluate_stage2(str(program), **options)
    micro = stage2.metrics["micro_score"]
    print(f"stock program micro score {micro:.3f}")
    assert stage2.metrics["combined_score"] == score.stage2_score(micro)
    assert 0.5 < micro < 2.0  # very loose: same code on both sides, noise only
    assert "rms_norm" in stage2.artifacts["benchmarks"]


@pytest.mark.slow
def test_cli_prints_json_metrics_last(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "evaluator.py"), "--stage", "1", "--names", "swiglu",
         "--seed", "5", "--json", "--quiet"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**__import__("os").environ, "KERNEL_LAB_DTYPES": "float32"},
    )
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout.strip().splitlines()[-1])
    assert metrics["combined_score"] == score.STAGE1_PASS_SCORE and metrics["correct_fraction"] == 1.0
