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
from kernel_lab import guards, microcheck, microrun, score, shapes, stage2
from kernel_lab.bench_cases import bench_cases
from kernel_lab.contract import KERNEL_NAMES
from kernel_lab.ops import STOCK

sys.path.insert(0, str(Path(__file__).resolve().parent / "hostile"))
import corpus  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OWN_FILES = ["evaluator.py", "kernel_lab/sandbox.py", "kernel_lab/worker.py", "kernel_lab/guards.py",
             "kernel_lab/microbench.py", "kernel_lab/microrun.py", "kernel_lab/audit.py", "kernel_lab/score.py",
             "tests/hostile/corpus.py"]
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


# ------------------------------------------------------------------ stage 2: every timed round is checked

def _stock_results(case, seed, dtype="float32"):
    args, kwargs, argnums = shapes.make_inputs("rms_norm", case, dtype, seed)
    out = STOCK.rms_norm(*args, **kwargs)
    cotangent = mx.random.normal(out.shape, key=mx.random.key(seed))
    result = shapes.vjp_at(STOCK.rms_norm, args, kwargs, argnums, cotangent)
    mx.eval(result)
    return result


def test_compare_rejects_stale_wrong_and_malformed_results():
    case = bench_cases("rms_norm")[0]
    names, limits = ["output", "gradient of x", "gradient of weight"], [1e-5] * 3
    fresh, stale = _stock_results(case, 1), _stock_results(case, 2)  # stale: other inputs (memoized)
    assert microcheck.compare("rms_norm", fresh, fresh, names, limits, "float32") is None
    problem = microcheck.compare("rms_norm", stale, fresh, names, limits, "float32")
    assert problem.startswith("output differs from stock's on the same inputs by ")
    out, (dx, dw) = fresh
    assert microcheck.compare("rms_norm", (out, [dx, dw * 1.001]), fresh, names, limits, "float32") \
        .startswith("gradient of weight differs")
    nan = mx.where(mx.arange(dx.size).reshape(dx.shape) == 7, float("nan"), dx)
    assert "gradient of x has NaN or inf" in microcheck.compare("rms_norm", (out, [nan, dw]), fresh, names,
                                                                limits, "float32")
    assert "output shape" in microcheck.compare("rms_norm", (out[..., :-1], [dx, dw]), fresh, names,
                                                limits, "float32")
    assert "output dtype" in microcheck.compare("rms_norm", (out.astype(mx.float16), [dx, dw]), fresh, names,
                                                limits, "float32")
    assert "gradients where stock has" in microcheck.compare("rms_norm", (out, [dx]), fresh, names, limits,
                                                             "float32")


def test_gpu_bench_cases_are_training_sized_and_build():
    """The GPU cases (chosen at run time on a GPU) at 8x1024 tokens; inputs built here at 1x4 tokens."""
    from kernel_lab import bench_cases as cases_module

    s, q = shapes.MODEL_CONFIGS["smollm2-135m"], shapes.MODEL_CONFIGS["qwen2.5-0.5b"]
    for kernel in KERNEL_NAMES:
        cases = cases_module._gpu_bench_cases(kernel, s, q)
        assert len({c["name"] for c in cases}) == len(cases) and cases[0]["model"] == "smollm2-135m"
        assert any(c["model"] == "qwen2.5-0.5b" for c in cases)
        for case in cases:
            tokens = case["tokens"][0] * case["tokens"][1]
            assert tokens == 8 * 1024 or (case.get("vocab", 0) > 100_000 and tokens == 2 * 1024) \
                or (kernel == "attention" and case["tokens"] == (8, 1023)), case["name"]
            args, _, argnums = shapes.make_inputs(kernel, dict(case, tokens=(1, 4)), "bfloat16", seed=0)
            assert all(isinstance(args[i], mx.array) for i in argnums)


def test_cross_check_catches_other_inputs_steps_or_stock_and_wrong_samples():
    spec = {"names": ["output"], "limits": [1e-3]}
    side = microrun._Side.__new__(microrun._Side)
    side.name, side.role, side.labels = "candidate", "candidate", ["candidate"]
    inputs, ids = [[[2, 3], "mlx.core.float32"]], {"stock-untimed": 1, "candidate": 2}
    good = [[[1.0, -2.0], 4.0]]
    reference = [{"inputs": inputs, "digests": {"stock": good}}]

    def check(inputs=inputs, step_ids=ids, stock=good, candidate=good):
        rows = [{"inputs": inputs, "step_ids": step_ids,
                 "digests": {"stock-untimed": stock, "candidate": candidate}}]
        microrun._cross_check(side, reference, rows, spec, ids, "rms_norm", "case-a")

    check(candidate=[[[1.0, -2.0001], 4.0]])
    with pytest.raises(microrun.MicroError, match="changed the benchmark inputs"):
        check(inputs=[[[2, 3], "mlx.core.float16"]])
    with pytest.raises(microrun.MicroError, match="replaced the compiled steps"):
        check(step_ids={"stock-untimed": 1, "candidate": 3})
    with pytest.raises(microrun.MicroError, match="changed what it is compared with"):
        check(stock=[[[1.0, -2.1], 4.0]])
    with pytest.raises(microrun.MicroError, match="candidate kernel rms_norm is wrong in benchmark case case-a"):
        check(candidate=[[[1.0, -2.0], 4.1]])


def test_summary_uses_medians_per_case_and_geometric_means_over_cases():
    rows = [{"case": "a", "bytes": 4e6, "stock": {"fwd_bwd_ms": 2.0, "peak_mb": 8.0},
             "candidate": {"fwd_bwd_ms": 1.0, "peak_mb": 4.0}, "initial": {"fwd_bwd_ms": 4.0, "peak_mb": 8.0}},
            {"case": "b", "bytes": 8e6, "stock": {"fwd_bwd_ms": 2.0, "peak_mb": 8.0},
             "candidate": {"fwd_bwd_ms": 4.0, "peak_mb": 8.0}, "initial": {"fwd_bwd_ms": 2.0, "peak_mb": 8.0}}]
    result = microrun.summarize("rms_norm", rows, ["stock", "initial", "candidate"], bandwidth=4e9)
    c = result["candidate"]
    assert math.isclose(c["speedup_vs_stock"], 1.0) and math.isclose(c["memory_ratio_vs_stock"], 2 ** 0.5)
    assert math.isclose(c["speedup_vs_initial"], 2 ** 0.5)
    assert math.isclose(rows[0]["candidate"]["roofline"], 1.0)  # 4 MB in 1 ms at 4 GB/s
    assert math.isclose(c["roofline"], (1.0 + 0.5) / 2)
    metrics = stage2.metrics({"kernels": [result], "copy_bandwidth_gb_s": 4.0})
    assert metrics["rms_norm_roofline"] == c["roofline"] and "rms_norm_stock_roofline" in metrics


# ------------------------------------------------------------------ hostile corpus

@pytest.mark.parametrize("name", sorted(corpus.CORPUS))
def test_hostile_program_scores_zero_with_a_clear_error(name, tmp_path):
    entry = corpus.CORPUS[name]
    program = corpus.build(name, tmp_path)
    before = _hashes()
    stage = entry.get("stage", 1)
    options = dict(names=entry["kernel"] or "rms_norm", dtypes="float32", seed=1, echo=False,
                   stage1_timeout=STAGE1_TIMEOUT, stage2_timeout=60, repeats=2, min_seconds=0.2,
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

rms_norm, rope, attention, swiglu = STOCK.rms_norm, STOCK.rope, STOCK.attention, STOCK.swiglu
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


def test_guards_watch_the_training_modules_once_loaded():
    import mlx_lm.tuner.trainer as trainer

    assert "mlx_lm.tuner.trainer" in guards.WATCHED_WHEN_LOADED
    before = guards.snapshot()
    original = trainer.default_loss
    try:
        trainer.default_loss = lambda *a, **k: original(*a, **k)
        found = guards.changes(before, guards.snapshot())
    finally:
        trainer.default_loss = original
    assert "mlx_lm.tuner.trainer.default_loss replaced" in found
