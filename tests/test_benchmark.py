"""The benchmark command's bookkeeping (tables and scores from saved runs) and the coordination of
the training comparison (kernel_lab.macrobench) with scripted workers: no training here."""

import contextlib
import json
from pathlib import Path

import pytest

from kernel_lab import benchmark, budgets, macrobench, stage3
from kernel_lab.models import registry
from kernel_lab.models.cache import CONVERTER_VERSION, MARKER
from kernel_lab.sandbox import TaskResult

SAVED = Path(__file__).resolve().parents[1] / "benchmarks"
# The first day's set, one run a folder (micro, and each training row); later tables are whole runs.
RESULTS = sorted(SAVED.glob("h200-2026-11-22/*/benchmark.json"))


def _load(paths=RESULTS):
    macro, micro = [], None
    for path in paths:
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


def test_saved_table_without_micro_scores_training_only():
    # `--no-micro` (benchmarks/h100-2026-12-06): macro scores, no combined one without stage 2
    macro, micro = _load([SAVED / "h100-2026-12-06/table/benchmark.json"])
    assert micro is None
    table = benchmark.scores(macro, micro)
    assert table["optimized_program"]["macro"] > 1.0 and table["optimized_program"]["loss_matches"]
    assert "combined" not in table["optimized_program"]
    assert "optimized_program" in benchmark.format_tables(macro, micro)


def test_scores_follow_the_evaluator_formulas():
    row = dict(model="m", fine_tune_type="lora", ok=True, final_loss=2.0, loss_rel_diff=0.0)
    macro = [dict(row, side="stock"),
             dict(row, side="p", speedup=1.21, memory_reduction=0.5, final_loss=2.001)]
    table = benchmark.scores(macro, None)
    assert abs(table["p"]["macro"] - 1.21 ** 0.7 * 2.0 ** 0.3) < 1e-9
    assert table["p"]["loss_matches"] and "combined" not in table["p"]  # no micro measured
    macro[1]["final_loss"] = 2.1  # 5% off stock
    assert benchmark.scores(macro, None)["p"]["loss_matches"] is False


# ---------------------------------------------------------------- the comparison, with fakes


class FakeSandbox:
    """Stands in for kernel_lab.sandbox: every Session is a scripted trainworker.

    `tps[side][w]` / `peak[side][w]`: tokens/s and peak bytes of measured window w; `loss[side]`:
    the loss of every report; `fail[side]`: {function: TaskResult or error record}."""

    def __init__(self, tps, peak=None, loss=None, fail=None, gpu=False):
        self.tps, self.peak, self.loss = tps, peak or {}, loss or {}
        self.fail, self.gpu = fail or {}, gpu
        self.log, self.closed, self.locked, self.sessions, self.batches = [], 0, False, [], []
        outer = self

        class Session(FakeWorker):
            def __init__(self, **options):
                super().__init__(outer, options)

        self.Session = Session

    @contextlib.contextmanager
    def device_lock(self, timeout=None):
        self.locked = True
        yield

    def wait_all(self, sessions, timeout):
        self.batches.append((sessions[0].pending[0], [s.side for s in sessions]))  # one wait: (call, sides)
        return [s.run() for s in sessions]


class FakeWorker:
    def __init__(self, box, options):
        self.box, self.options, self.side, self.pending, self.count = box, options, "?", None, 0
        box.sessions.append(self)

    def submit(self, target, kwargs=None):
        assert self.pending is None, "a call is still running"
        self.pending = (target.rpartition(":")[2], kwargs or {})

    def call(self, target, kwargs=None, *, timeout):
        self.submit(target, kwargs)
        return self.run()

    def close(self):
        self.box.closed += 1

    def run(self):
        function, kwargs = self.pending
        self.pending = None
        if function == "load":
            self.side = {None: "stock"}.get(kwargs["program"], Path(str(kwargs["program"])).stem)
            self.steps = kwargs["steps"]
        self.box.log.append((self.side, function, kwargs))
        failure = self.box.fail.get(self.side, {}).get(function)
        if isinstance(failure, TaskResult):
            return failure
        if failure is not None and (function != "window" or failure.get("at") == self.count + 1):
            return TaskResult(ok=True, value={"ok": False, **failure})
        return TaskResult(ok=True, value=getattr(self, function)(**kwargs))

    def report(self, iteration, w=None):
        losses = self.box.loss.get(self.side, [2.0 - 0.1 * i for i in range(12)])
        tps = self.box.tps[self.side][w] if w is not None else 1.0
        peak = self.box.peak.get(self.side, [1e9] * 9)[w] if w is not None else 5e9
        return {"ok": True, "iteration": iteration, "train_loss": losses[iteration // self.w - 1],
                "tokens_per_second": tps, "peak_memory": peak, "wall_seconds": 0.5}

    def hello(self):
        return {"gpu": self.box.gpu, "device": "fake", "backend": "fake", "mlx": "0"}

    def load(self, **kwargs):
        return {"ok": True, "seconds": 1.0, "dtype": "float32", "batch_shape": [1, 33]}

    def prepare(self, window_steps, warmup_windows, grad_check, **kwargs):
        self.w, self.count, self.done = window_steps, 0, warmup_windows * window_steps
        check = {"ok": True, "grad_cosine_min": 0.9999, "grad_rel_err_max": 2e-3} \
            if grad_check and self.side != "stock" else None
        warm = [self.report((i + 1) * window_steps) for i in range(warmup_windows)]
        return {"ok": True, "warmup": warm, "grad_check": check, "seconds": 2.0}

    def window(self):
        self.done += self.w
        self.count += 1
        return self.report(self.done, self.count - 1)

    def finish(self, abort=False):
        return {"ok": not abort, "error_kind": "aborted" if abort else None,
                "patch_report_text": None if self.side == "stock" else "Kernel patch report"}


def test_tf32_is_a_budget_choice():
    """... unless a budget lets CUDA use TF32 (then no side gets MLX_ENABLE_TF32)."""
    box = FakeSandbox(tps={"stock": [100, 100, 100], "a": [100, 100, 100]},
                      peak={"stock": [2e9] * 3, "a": [2e9] * 3})
    benchmark.compare_sides(["/x/a.py"], dict(budgets.BUDGETS["cpu"], tf32=True), models=["m"],
                            fine_tune_types=("lora",), sandbox=box, log=lambda m: None, windows=3)
    assert [s.options["env"] for s in box.sessions] == [{}] * 2


def _calls(box, function):
    return [side for side, f, _ in box.log if f == function]


def test_sides_load_and_prepare_together_and_windows_rotate():
    box = FakeSandbox(tps={"stock": [100, 110, 90], "a": [150, 99, 180], "b": [50, 55, 45]},
                      peak={"stock": [2e9, 2e9, 2e9], "a": [1e9, 1.2e9, 1e9], "b": [2e9, 2e9, 4e9]})
    rows, result = benchmark.compare_sides(["/x/a.py", "/x/b.py"], "cpu", models=["m"],
                                           fine_tune_types=("lora", "dora"), sandbox=box,
                                           log=lambda m: None, windows=3)
    assert box.locked and box.closed == 3 and result["error"] is None
    # true float32 for the gradient check: MLX_ENABLE_TF32=0 for every worker...
    assert [s.options["env"] for s in box.sessions] == [{"MLX_ENABLE_TF32": "0"}] * 3
    functions = [f for _, f, _ in box.log]
    assert functions[:4] == ["hello", "load", "load", "load"]  # every side loads at the same time
    assert _calls(box, "load") == ["stock", "a", "b"]
    prepares = [i for i, f in enumerate(functions) if f == "prepare"]
    assert prepares[:3] == [4, 5, 6]  # all sides prepare (compile) at once, before any window
    # one side at a time, the order rotated every window; LoRA then DoRA in the same workers
    assert _calls(box, "window") == ["stock", "a", "b", "a", "b", "stock", "b", "stock", "a"] * 2
    assert {side for side, f, kw in box.log if f == "prepare" and kw["fine_tune_type"] == "dora"} \
        == {"stock", "a", "b"}
    stock, a, b = rows[:3]
    assert [r["side"] for r in rows] == ["stock", "a", "b"] * 2
    assert stock["tokens_per_second"] == 100 and a["tokens_per_second"] == 150
    # speedup: median of the per-window ratios (1.5, 0.9, 2.0), not a ratio of medians
    assert a["speedup"] == pytest.approx(1.5) and a["speedups"] == pytest.approx([1.5, 0.9, 2.0])
    assert b["speedup"] == pytest.approx(0.5)
    assert a["memory_reduction"] == pytest.approx(0.5) and b["memory_reduction"] == pytest.approx(0.0)
    assert a["loss_rel_diff"] == 0.0 and a["grad_rel_err_max"] == 2e-3
    assert stock["steps"] == [1, 2, 3, 4] and len(stock["losses"]) == 4


def test_prepare_group_caps_the_sides_preparing_at_once():
    """Nine float32 gradient checks at once ran an H200 out of memory: prepare_group of them at a time."""
    box = FakeSandbox(tps={s: [100] * 2 for s in ("stock", "a", "b", "c")})
    rows, result = benchmark.compare_sides(["/x/a.py", "/x/b.py", "/x/c.py"],
                                           dict(budgets.BUDGETS["cpu"], prepare_group=3), models=["m"],
                                           fine_tune_types=("lora",), sandbox=box, log=lambda m: None,
                                           windows=2)
    assert result["error"] is None and len(rows) == 4
    assert [sides for call, sides in box.batches if call == "prepare"] == [["stock", "a", "b"], ["c"]]
    assert [len(sides) for call, sides in box.batches if call == "load"] == [4]  # loading stays together
    # stage 3's two sides together; the table's one at a time (an H100 ran out of memory with Qwen DoRA)
    assert budgets.BUDGETS["gpu"]["prepare_group"] >= 2 and budgets.BUDGETS["table"]["prepare_group"] == 1


def test_a_program_failing_to_prepare_leaves_stock_unmeasured_not_failed():
    """The table's row names who failed: the program, not stock, which had nothing left to race."""
    box = FakeSandbox(tps={"stock": [100] * 2, "a": [100] * 2},
                      fail={"a": {"prepare": {"error": "the kernels fail inside the model: out of memory"}}})
    rows, result = benchmark.compare_sides(["/x/a.py"], "cpu", models=["m"], fine_tune_types=("lora",),
                                           sandbox=box, log=lambda m: None, windows=2)
    stock, a = rows
    assert not stock["ok"] and stock["error"] == "not measured: no program was left to compare with"
    assert not a["ok"] and a["error"] == "while preparing: the kernels fail inside the model: out of memory"


def test_a_failed_gradient_check_stops_stage3_before_any_window():
    error = ("gradient check failed (lora, float32, 1 batch(es) of 1x33 tokens): "
             "model.layers.28.mlp.up_proj.lora_b: cosine 0.5000 ...; kernel swiglu patched in alone")
    box = FakeSandbox(tps={"stock": [1.0] * 3, "candidate": [1.0] * 3},
                      fail={"candidate": {"prepare": {"error": error, "grad_check": {
                          "ok": False, "grad_cosine_min": 0.5, "grad_rel_err_max": 0.7}}}})
    result = stage3.run_macro("/x/candidate.py", models=["m"], budget="cpu", sandbox=box,
                              log=lambda m: None)
    assert not result["ok"] and len(result["runs"]) == 1  # DoRA never started
    assert f"training with the candidate's kernels failed while preparing: {error}" in result["error"]
    assert result["grad_cosine_min"] == 0.5 and result["grad_rel_err_max"] == 0.7
    assert _calls(box, "window") == []
    assert [kw for side, f, kw in box.log if f == "finish"] == [{"abort": True}]  # stock stopped
    assert box.closed == 2


def test_a_loss_mismatch_is_measured_but_scores_zero():
    box = FakeSandbox(tps={"stock": [100, 100], "candidate": [120, 120]},
                      loss={"candidate": [2.0, 1.9, 1.8 * 1.015]})  # final report 1.5% off
    result = stage3.run_macro("/x/candidate.py", models=["m"], fine_tune_types=("lora",),
                              budget="cpu", sandbox=box, log=lambda m: None)
    run = result["runs"][0]
    assert run["training_speedup"] == pytest.approx(1.2) and not run["loss_matches"]
    assert "differs from stock (final 1.50%" in result["error"]
    assert stage3.score_inputs(result) == [(pytest.approx(1.2), 1.0)]


def test_a_crash_in_a_measured_window_names_the_window():
    crash = TaskResult(ok=False, error="timeout after 120 s (stuck at prog.py:3 in swiglu)")
    box = FakeSandbox(tps={"stock": [1.0] * 2, "candidate": [1.0] * 2},
                      fail={"candidate": {"window": crash}})
    result = stage3.run_macro("/x/candidate.py", models=["m"], budget="cpu", sandbox=box,
                              log=lambda m: None)
    assert "failed in measured window 1: timeout after 120 s (stuck at prog.py:3 in swiglu)" \
        in result["error"]
    assert _calls(box, "window") == ["stock", "candidate"]


def test_the_workers_device_chooses_the_budget():
    windows = budgets.BUDGETS["gpu"]["windows"]
    box = FakeSandbox(tps={"stock": [1.0] * windows, "none": [1.0] * windows}, gpu=True)
    result = stage3.run_macro("none", models=["m"], fine_tune_types=("lora",), sandbox=box,
                              log=lambda m: None)
    assert result["ok"] and result["budget"]["name"] == "gpu"
    assert result["training_speedup"] == 1.0 and result["grad_cosine_min"] == 0.9999
    load = next(kw for _, f, kw in box.log if f == "load")
    gpu = budgets.BUDGETS["gpu"]
    assert (load["batch_size"], load["seq_len"]) == (gpu["batch_size"], gpu["seq_len"])
    assert load["steps"] == (gpu["warmup_windows"] + gpu["windows"]) * gpu["window_steps"]
    assert box.log[0][1] == "hello"


def test_budget_options_are_typed_and_checked():
    assert budgets.parse_options("batch_size=8, seq_len=512,tf32=1,learning_rate=1e-4") == {
        "batch_size": 8, "seq_len": 512, "tf32": True, "learning_rate": 1e-4}
    with pytest.raises(ValueError, match="bad stage-3 option 'iters=3'"):
        budgets.parse_options("iters=3")
    with pytest.raises(ValueError, match="warmup_windows must be at least 1"):
        budgets.check_budget(budgets.resolve_budget("cpu", warmup_windows=0))
    with pytest.raises(ValueError, match="unknown budget entries: trials"):
        budgets.resolve_budget("gpu", trials=2)


def test_a_model_converted_in_the_cache_counts_as_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "package_dir", lambda pip_name: None)  # no package installed
    monkeypatch.setenv("KERNEL_LAB_CACHE", str(tmp_path))
    assert registry.available_offline() == []
    name = "qwen2.5-coder-0.5b-q4"
    (tmp_path / name).mkdir()
    (tmp_path / name / MARKER).write_text(json.dumps(
        {"converter_version": CONVERTER_VERSION, "source_sha256": registry.EMBEDDED[name].sha256}))
    assert registry.available_offline() == [name]
    assert budgets.default_models(budgets.BUDGETS["gpu"]["models"]) == [name]
    assert budgets.default_models("default") == [name]  # the default model is not there


@pytest.mark.parametrize("fail", [False, True], ids=["measured", "gradient-check-fails"])
def test_the_evaluators_stage3_folds_the_scores(fail, monkeypatch):
    import evaluator
    from kernel_lab import macrobench, score

    failure = {"candidate": {"prepare": {"error": "gradient check failed (lora ...): x.lora_a: ...",
                                         "grad_check": {"grad_cosine_min": 0.0,
                                                        "grad_rel_err_max": 1.0}}}}
    box = FakeSandbox(tps={"stock": [100, 100], "candidate": [110, 121]},
                      peak={"stock": [2e9, 2e9], "candidate": [1e9, 1e9]},
                      fail=failure if fail else None)
    real = macrobench.run_sides
    monkeypatch.setattr(macrobench, "run_sides", lambda *a, **k: real(*a, **{**k, "sandbox": box}))
    monkeypatch.setattr(evaluator, "cached_stage2", lambda path: {"metrics": {"micro_score": 1.2}})
    metrics, artifacts = evaluator._split(evaluator.evaluate_stage3(
        "/x/candidate.py", seed=3, echo=False, watch_directory=False, stage3_models="m"))
    assert metrics["micro_score"] == 1.2 and metrics["stage3_seconds"] >= 0
    if fail:
        assert metrics["combined_score"] == 0.0 and metrics["grad_cosine_min"] == 0.0
        assert artifacts["error"].startswith("stage 3: m lora: training with the candidate's "
                                             "kernels failed while preparing: gradient check failed")
        return
    macro = score.macro_score([(1.155, 2.0), (1.155, 2.0)])  # per run: median of 1.1 and 1.21
    assert metrics["training_speedup"] == pytest.approx(1.155)
    assert metrics["memory_ratio"] == pytest.approx(2.0) and metrics["memory_reduction"] == 0.5
    assert metrics["macro_score"] == pytest.approx(macro)
    assert metrics["combined_score"] == pytest.approx(score.combined_score(1.2, macro))
    assert metrics["grad_rel_err_max"] == 2e-3 and "per window: 1.100 1.210" in artifacts["fine_tuning"]



def test_grad_rows_is_an_option_and_the_table_checks_four_rows():
    assert budgets.parse_options("grad_rows=2") == {"grad_rows": 2}
    assert budgets.BUDGETS["table"]["grad_rows"] == 4 and budgets.BUDGETS["gpu"]["grad_rows"] is None


def test_a_slow_step_in_every_window_is_paid_in_full():
    """A candidate fast on three steps of four and stalled on the fourth, in every window, is
    slower than stock: no per-window median may hide a cost that comes back; a one-off hiccup
    in one window is left out by the median over window pairs."""
    def window(steps):
        return {"tokens_per_second": len(steps) * 4092 / sum(steps), "step_seconds": steps,
                "train_loss": 1.0}

    def side(windows, peak):
        return {"tokens_per_second": [w["tokens_per_second"] for w in windows],
                "peak_memory": [peak] * len(windows), "reports": windows}

    stock = [window([0.1] * 4) for _ in range(6)]
    stalling = [window([0.08, 0.08, 0.08, 0.32]) for _ in range(6)]
    metrics = macrobench.pair_metrics(side(stock, 2e9), side(stalling, 1e9))
    assert metrics["training_speedup"] == pytest.approx(0.4 / 0.56)  # the median step says 1.25
    hiccup = [window([0.08] * 4) for _ in range(5)] + [window([0.08, 0.08, 0.08, 0.9])]
    assert macrobench.pair_metrics(side(stock, 2e9), side(hiccup, 1e9))["training_speedup"] == \
        pytest.approx(1.25)
