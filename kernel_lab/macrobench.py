"""Stage 3: a program's kernels inside real mlx-lm LoRA / DoRA fine-tuning, against stock.

For each model and fine-tune type, the same training (model, seed, data, steps) runs
stock (plain mlx-lm: its own layers and `default_loss`) and patched with the
candidate's kernels, each in a child process (`sandbox.run_task`) under the device
lock, alternated over trials as stock, cand, cand, stock, ... so drift (thermal,
other load) hits both sides alike. Per run pair:

- training_speedup = candidate tokens/s / stock tokens/s (steady rate: the first
  report window, which holds the compile, is left out), median over trials;
- memory_ratio = stock peak / candidate peak, memory_reduction = 1 - cand/stock
  (peak memory of the training, reset after loading);
- loss_rel_diff = max over reports of |cand - stock| / |stock|; the run FAILS when
  the final loss differs by more than 1% or any report by more than 2%.

A candidate whose training breaks (an exception in a kernel, NaN at step N, out of
memory) fails the stage with the error from `kernel_lab.training` (kernel, layer,
step). `run_macro` returns metrics + per-run records; scoring is kernel_lab.score's.
"""

import math
import statistics
from pathlib import Path

FINAL_LOSS_TOLERANCE = 0.01
REPORT_LOSS_TOLERANCE = 0.02

# Budgets. "cpu": a 2-core CI machine (one LoRA step of the 135M model at 1x32 tokens
# takes a few seconds there). "gpu": a real run for Metal / CUDA.
BUDGETS = {
    # 3 steps of 1 x 32 tokens on LoRA'd last 2 layers of the default model: step 1 holds
    # the compile and is left out of tokens/s; ~30 s a run on 2 cores, 4 runs.
    "cpu": dict(iters=3, batch_size=1, max_seq_length=32, num_layers=2, rank=8,
                steps_per_report=1, trials=1, learning_rate=1e-5, timeout=300,
                models="default"),
    "gpu": dict(iters=40, batch_size=4, max_seq_length=512, num_layers=16, rank=8,
                steps_per_report=5, trials=2, learning_rate=1e-5, timeout=600,
                models="all"),
}
_TRAIN_KEYS = ("iters", "batch_size", "max_seq_length", "num_layers", "rank",
               "steps_per_report", "learning_rate")


def default_budget():
    """'gpu' when MLX's default device is a GPU (Metal or CUDA), else 'cpu'."""
    import mlx.core as mx  # imported here: the evaluator's process must not load MLX

    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def resolve_budget(budget=None, **overrides):
    """A budget dict from a name (None: by device) or a dict, with overrides applied."""
    if budget is None:
        budget = default_budget()
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
        base = dict(BUDGETS[budget], name=budget)
    else:
        base = dict(budget)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return base


def default_models(which="all"):
    """Every real model available offline ("all"), or just the embedded default ("default")."""
    from .models import DEFAULT_MODEL, available_offline

    offline = list(available_offline())
    if which == "default":
        return [m for m in offline if m == DEFAULT_MODEL] or offline[:1]
    return offline


def loss_rel_diff(stock_losses, cand_losses):
    """(max relative difference over reports, relative difference of the final loss)."""
    if len(stock_losses) != len(cand_losses) or not stock_losses:
        return math.inf, math.inf
    diffs = [abs(c - s) / max(abs(s), 1e-12) for s, c in zip(stock_losses, cand_losses)]
    diffs = [d if math.isfinite(d) else math.inf for d in diffs]
    return max(diffs), diffs[-1]


def _run(kwargs, timeout, memory_limit, runner):
    """One training in a child under the device lock; a record dict either way."""
    from .sandbox import device_lock

    with device_lock():
        result = runner("kernel_lab.training:train_once", kwargs, timeout=timeout,
                        memory_limit=memory_limit)
    if result.ok and isinstance(result.value, dict):
        record = result.value
    else:
        error = result.error or "no result"
        oom = "memory" in error.lower()
        record = {"ok": False, "error_kind": "oom" if oom else "crash", "error": error,
                  "traceback": result.traceback}
    record["child_seconds"] = result.seconds
    return record


def compare_pair(model, fine_tune_type, program, budget, *, seed=0, data=None,
                 memory_limit=None, runner=None):
    """Alternated stock / candidate trainings of one model; the per-run metrics dict."""
    from .sandbox import run_task

    runner = runner or run_task
    common = {k: budget[k] for k in _TRAIN_KEYS}
    common.update(model=model, fine_tune_type=fine_tune_type, seed=seed, data=data)
    sides = {"stock": dict(common, program=None), "candidate": dict(common, program=program)}
    records = {"stock": [], "candidate": []}
    entry = {"model": model, "fine_tune_type": fine_tune_type, "ok": False, "records": records}
    # A few seconds on a tiny model of the same family first: a candidate that breaks
    # inside the model fails here, before minutes of real training.
    from .training import model_family

    family = model_family(model) or "llama"
    check = runner("kernel_lab.training:preflight",
                   {"program": program, "family": family, "fine_tune_type": fine_tune_type},
                   timeout=budget.get("preflight_timeout", 120), memory_limit=memory_limit)
    pre = check.value if check.ok and isinstance(check.value, dict) else {
        "ok": False, "error": check.error or "no result", "error_kind": "crash"}
    entry["preflight"] = {k: pre.get(k) for k in ("ok", "error", "error_kind", "losses")}
    if not pre["ok"]:
        entry["error"] = (f"{model} {fine_tune_type}: the candidate's kernels fail in a tiny "
                          f"{family} model: {pre['error']}")
        entry["error_kind"] = pre.get("error_kind")
        entry["failed_side"] = "candidate"
        return entry
    for trial in range(budget["trials"]):
        order = ("stock", "candidate") if trial % 2 == 0 else ("candidate", "stock")
        for side in order:
            rec = _run(sides[side], budget["timeout"], memory_limit, runner)
            records[side].append(rec)
            if not rec["ok"]:
                who = "stock mlx-lm" if side == "stock" else "the candidate's kernels"
                entry["error"] = f"{model} {fine_tune_type}: training with {who} failed: {rec['error']}"
                entry["error_kind"] = rec.get("error_kind")
                entry["failed_side"] = side
                return entry
    speedups = [c["tokens_per_second"] / s["tokens_per_second"]
                for s, c in zip(records["stock"], records["candidate"])]
    peak_stock = statistics.median(r["peak_memory"] for r in records["stock"])
    peak_cand = statistics.median(r["peak_memory"] for r in records["candidate"])
    worst = max((loss_rel_diff(s["losses"], c["losses"])
                 for s, c in zip(records["stock"], records["candidate"])), key=lambda d: d[0])
    loss_ok = worst[1] <= FINAL_LOSS_TOLERANCE and worst[0] <= REPORT_LOSS_TOLERANCE
    entry.update(
        ok=loss_ok,
        training_speedup=statistics.median(speedups),
        speedups=speedups,
        stock_tokens_per_second=statistics.median(r["tokens_per_second"] for r in records["stock"]),
        candidate_tokens_per_second=statistics.median(
            r["tokens_per_second"] for r in records["candidate"]),
        stock_peak_memory=peak_stock,
        candidate_peak_memory=peak_cand,
        memory_ratio=peak_stock / peak_cand,
        memory_reduction=1.0 - peak_cand / peak_stock,
        loss_rel_diff=worst[0],
        final_loss_rel_diff=worst[1],
        loss_matches=loss_ok,
        stock_losses=records["stock"][0]["losses"],
        candidate_losses=records["candidate"][0]["losses"],
        patch_report=records["candidate"][0].get("patch_report_text"),
    )
    if not loss_ok:
        entry["error"] = (
            f"{model} {fine_tune_type}: the candidate's training loss differs from stock "
            f"(final {worst[1]:.2%}, worst report {worst[0]:.2%}; limits "
            f"{FINAL_LOSS_TOLERANCE:.0%} / {REPORT_LOSS_TOLERANCE:.0%})"
        )
    return entry


def _geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def run_macro(program, *, models=None, fine_tune_types=("lora", "dora"), budget=None,
              seed=0, data=None, memory_limit=None, stop_on_failure=True, runner=None,
              **overrides):
    """Stage 3 for `program` (a path): stock vs candidate training on each model.

    models: None = every real model available offline; extra hub ids or paths may be
    listed (the "cpu" budget takes only the embedded default model, as the others
    are too slow for CI there). budget: "cpu", "gpu", a dict, or None (by device); keyword overrides
    (iters=..., trials=...) replace budget entries. Returns
    {"ok", "error", "runs": [per-run metrics + records], "training_speedup",
    "memory_ratio", "memory_reduction", "loss_rel_diff", "loss_matches", "budget"}.
    """
    budget = resolve_budget(budget, **overrides)
    program = str(Path(program).resolve())
    models = list(models) if models else default_models(budget.get("models", "all"))
    if not models:
        return {"ok": False, "error": "no real model is available offline for stage 3",
                "runs": [], "budget": budget}
    runs, errors = [], []
    for model in models:
        for ftt in fine_tune_types:
            entry = compare_pair(model, ftt, program, budget, seed=seed, data=data,
                                 memory_limit=memory_limit, runner=runner)
            runs.append(entry)
            if not entry["ok"]:
                errors.append(entry["error"])
                if stop_on_failure:
                    break
        if errors and stop_on_failure:
            break
    measured = [r for r in runs if "training_speedup" in r]
    result = {
        "ok": not errors,
        "error": "; ".join(errors) or None,
        "runs": runs,
        "budget": budget,
        "loss_matches": all(r.get("loss_matches", False) for r in runs),
    }
    if measured:
        result.update(
            training_speedup=_geomean(r["training_speedup"] for r in measured),
            memory_ratio=_geomean(r["memory_ratio"] for r in measured),
            memory_reduction=1.0 - 1.0 / _geomean(r["memory_ratio"] for r in measured),
            loss_rel_diff=max(r["loss_rel_diff"] for r in measured),
        )
    return result


def score_inputs(result):
    """[(training_speedup, memory_ratio)] per run, for kernel_lab.score.macro_score."""
    return [(r["training_speedup"], r["memory_ratio"]) for r in result["runs"]
            if "training_speedup" in r]


def format_runs(result):
    """A readable table of run_macro's result: one line a model and fine-tune type."""
    lines = [f"{'model':26s} {'type':5s} {'speedup':>8s} {'memory':>7s} {'loss diff':>9s}  status"]
    for run in result["runs"]:
        if "training_speedup" in run:
            lines.append(f"{run['model']:26s} {run['fine_tune_type']:5s} {run['training_speedup']:8.3f} "
                         f"{run['memory_ratio']:7.3f} {run['loss_rel_diff']:9.2e}  "
                         f"{'ok' if run['ok'] else 'LOSS MISMATCH'}")
        else:
            lines.append(f"{run['model']:26s} {run['fine_tune_type']:5s} FAILED: {run.get('error')}")
    budget = result.get("budget", {})
    lines.append(f"speedup: tokens/s candidate / stock mlx-lm; memory: stock peak / candidate peak; "
                 f"budget {budget.get('name', '?')}: {budget.get('iters')} iters of "
                 f"{budget.get('batch_size')}x{budget.get('max_seq_length')} tokens, "
                 f"{budget.get('trials')} trial(s)")
    return "\n".join(lines)


def main(argv=None):
    """python -m kernel_lab.macrobench PROGRAM [--budget cpu|gpu] [--model M ...] [--json out.json]"""
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Stage 3: stock vs a program's kernels in "
                                     "real mlx-lm LoRA/DoRA fine-tuning.")
    parser.add_argument("program", help="a program file (e.g. initial_program.py)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default=None,
                        help="cpu (CI-sized) or gpu (real); default by MLX's device")
    parser.add_argument("--model", action="append", dest="models",
                        help="model spec or path (repeatable); default every offline model")
    parser.add_argument("--fine-tune-type", action="append", dest="ftts",
                        choices=["lora", "dora"], help="default both")
    parser.add_argument("--iters", type=int)
    parser.add_argument("--trials", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the full result here")
    args = parser.parse_args(argv)
    result = run_macro(args.program, models=args.models, fine_tune_types=args.ftts or ("lora", "dora"),
                       budget=args.budget, seed=args.seed, iters=args.iters, trials=args.trials)
    print(format_runs(result))
    if result["error"]:
        print("error:", result["error"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
