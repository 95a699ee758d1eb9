"""Stage 3: a program's kernels inside real mlx-lm LoRA / DoRA fine-tuning, against stock.

    python -m kernel_lab.stage3 PROGRAM [--budget cpu|gpu|table] [--model M] [--repeat 3]
    python -m kernel_lab.stage3 none      # stock mlx-lm against itself: the noise floor
    python -m kernel_lab.stage3 stock     # kernel_lab.ops.STOCK patched in against stock mlx-lm

One side "stock" (plain mlx-lm: its layers and `default_loss`) and one side "candidate" (the
program's kernels patched in), measured by `kernel_lab.macrobench`. Per model and fine-tune type:
- grad_cosine_min / grad_rel_err_max: the gradient check before training (`kernel_lab.gradcheck`);
  a program that fails it scores 0, with the tensor, both numbers and the kernel named;
- training_speedup: median over window pairs of candidate tokens/s / stock tokens/s (mlx-lm's own
  rate of each window: `macrobench.window_rates`);
- memory_ratio = stock peak / candidate peak, memory_reduction = 1 - candidate / stock (median
  of the per-window peaks);
- loss_rel_diff: max over reports of |cand - stock| / |stock|; the run fails (combined score 0)
  when the final report differs by more than 1% or any report by more than 2%.
A candidate whose training breaks (an exception in a kernel, NaN at step N, out of memory, a
crash or a timeout of its worker) fails the stage with the error naming kernel, layer and step.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from . import macrobench
from .budgets import BUDGETS, parse_options
from .score import geometric_mean

CANDIDATE = "candidate"
METRICS = ("training_speedup", "memory_ratio", "memory_reduction", "loss_rel_diff",
           "grad_cosine_min", "grad_rel_err_max")


def run_entry(run):
    """One model x fine-tune type of a comparison, as stage 3 reports it (records per side for
    kernel_lab.report's loss curves, the pair metrics, the first error)."""
    sides, errors = run["sides"], run["errors"]
    entry = {"model": run["model"], "fine_tune_type": run["fine_tune_type"], "ok": False,
             "records": {name: [_record(s)] for name, s in sides.items()}}
    cand = sides.get(CANDIDATE) or {}
    if cand.get("grad_check"):
        entry["grad_check"] = {k: v for k, v in cand["grad_check"].items() if k != "traceback"}
        for key in ("grad_cosine_min", "grad_rel_err_max"):
            if key in cand["grad_check"]:
                entry[key] = cand["grad_check"][key]
    entry["patch_report"] = cand.get("patch_report")
    if errors:
        side = CANDIDATE if CANDIDATE in errors else next(iter(errors))
        who = "stock mlx-lm" if side == macrobench.STOCK_SIDE else "the candidate's kernels"
        entry.update(failed_side=side, error=f"{run['model']} {run['fine_tune_type']}: "
                                             f"training with {who} failed {errors[side]}")
        return entry
    entry.update(macrobench.pair_metrics(sides[macrobench.STOCK_SIDE], cand))
    entry["ok"] = entry["loss_matches"]
    if not entry["ok"]:
        entry["error"] = (
            f"{run['model']} {run['fine_tune_type']}: the candidate's training loss differs from "
            f"stock (final {entry['final_loss_rel_diff']:.2%}, worst report "
            f"{entry['loss_rel_diff']:.2%}; limits {macrobench.FINAL_LOSS_TOLERANCE:.0%} / "
            f"{macrobench.REPORT_LOSS_TOLERANCE:.0%})")
    return entry


def _record(side):
    reports = side.get("reports") or []
    return {"ok": side.get("ok", False), "reports": reports,
            "losses": [r["train_loss"] for r in reports],
            "final_loss": reports[-1]["train_loss"] if reports else None,
            "tokens_per_second_windows": side.get("tokens_per_second", []),
            "peak_memory_windows": side.get("peak_memory", []),
            "wall_seconds_windows": side.get("wall_seconds", []),
            "patch_report_text": side.get("patch_report"),
            "prepare_seconds": side.get("prepare_seconds")}


def run_macro(program, *, models=None, fine_tune_types=("lora", "dora"), budget=None, seed=0,
              data=None, memory_limit=None, timeout=3600.0, lock_timeout=None, sandbox=None,
              log=macrobench._log, **overrides):
    """Stage 3 for `program` (a path, "stock" or "none"). Returns {"ok", "error", "runs",
    "budget", "device", "loss_matches", and the METRICS folded over runs}."""
    if program not in ("stock", "none"):
        program = str(Path(program).resolve())
    compared = macrobench.run_sides({CANDIDATE: program}, models=models,
                                    fine_tune_types=fine_tune_types, budget=budget, seed=seed,
                                    data=data, memory_limit=memory_limit, timeout=timeout,
                                    lock_timeout=lock_timeout, sandbox=sandbox, log=log, **overrides)
    runs = [run_entry(r) for r in compared["runs"]]
    errors = [r["error"] for r in runs if r.get("error")]
    if compared["error"]:
        errors.append(compared["error"])
    result = {"ok": not errors, "error": "; ".join(errors) or None, "runs": runs,
              "budget": compared.get("budget"), "device": compared.get("device"),
              "lock_wait_seconds": compared.get("lock_wait_seconds", 0.0),
              "loss_matches": bool(runs) and all(r.get("loss_matches", False) for r in runs)}
    measured = [r for r in runs if "training_speedup" in r]
    if measured:
        result.update(training_speedup=geometric_mean(r["training_speedup"] for r in measured),
                      memory_ratio=geometric_mean(r["memory_ratio"] for r in measured),
                      loss_rel_diff=max(r["loss_rel_diff"] for r in measured))
        result["memory_reduction"] = 1.0 - 1.0 / result["memory_ratio"]
    checked = [r for r in runs if "grad_cosine_min" in r]
    if checked:
        result["grad_cosine_min"] = min(r["grad_cosine_min"] for r in checked)
        result["grad_rel_err_max"] = max(r["grad_rel_err_max"] for r in checked)
    return result


def score_inputs(result):
    """[(training_speedup, memory_ratio)] per run, for kernel_lab.score.macro_score."""
    return [(r["training_speedup"], r["memory_ratio"]) for r in result["runs"]
            if "training_speedup" in r]


def format_runs(result):
    """A readable table of run_macro's result: one line a model and fine-tune type, and each
    run's per-window speedups (the noise is visible there)."""
    lines = [f"{'model':24s} {'type':5s} {'speedup':>8s} {'memory':>7s} {'loss diff':>9s} "
             f"{'grad cos':>9s} {'grad err':>9s}  status"]
    for run in result["runs"]:
        grads = (f"{run['grad_cosine_min']:9.6f} {run['grad_rel_err_max']:9.2e}"
                 if "grad_cosine_min" in run else f"{'-':>9s} {'-':>9s}")
        head = f"{run['model']:24s} {run['fine_tune_type']:5s}"
        if "training_speedup" in run:
            lines.append(f"{head} {run['training_speedup']:8.3f} {run['memory_ratio']:7.3f} "
                         f"{run['loss_rel_diff']:9.2e} {grads}  "
                         f"{'ok' if run['ok'] else 'LOSS MISMATCH'}")
            lines.append(f"{'':30s} per window: " + " ".join(f"{s:.3f}" for s in run["speedups"]))
        else:
            lines.append(f"{head} {'':26s} {grads}  FAILED: {run.get('error')}")
    b = result.get("budget") or {}
    lines.append(f"speedup: tokens/s candidate / stock mlx-lm (median of window pairs); memory: "
                 f"stock peak / candidate peak; budget {b.get('name', '?')}: "
                 f"{b.get('batch_size')}x{b.get('seq_len')} tokens, {b.get('windows')} windows of "
                 f"{b.get('window_steps')} steps a side after {b.get('warmup_windows')} warm-up")
    return "\n".join(lines)


def evaluate(program, *, seed, budget="", models="", options="", timeout=1400.0, lock_timeout=None,
             memory_limit=None, echo=True):
    """The evaluator's stage 3 (settings as strings, as KERNEL_LAB_STAGE3_* give them).

    Returns {"runs", "loss_matches", "metrics", "artifacts", "raw"}, or {"error", "metrics",
    "raw"} when a side failed (the candidate then scores 0)."""
    tic = time.monotonic()
    try:
        overrides = parse_options(options)
    except ValueError as exc:
        return {"error": f"stage 3: {exc}", "metrics": {}, "raw": None}
    model_list = [m.strip() for m in models.split(",") if m.strip()] or None
    quiet = (lambda message: None) if not echo else macrobench._log
    result = run_macro(program, models=model_list, budget=budget or None, seed=seed,
                       timeout=timeout, lock_timeout=lock_timeout, memory_limit=memory_limit,
                       log=quiet, **overrides)
    metrics = {k: result[k] for k in METRICS if result.get(k) is not None}
    metrics["stage3_seconds"] = time.monotonic() - tic
    metrics["stage3_lock_wait_seconds"] = result["lock_wait_seconds"]
    runs = score_inputs(result)
    artifacts = {"fine_tuning": format_runs(result)}
    if result["error"] and not (runs and not result["loss_matches"] and
                                all("training_speedup" in r for r in result["runs"])):
        return {"error": f"stage 3: {result['error']}", "metrics": metrics, "raw": result,
                "artifacts": artifacts}
    if result["error"]:
        artifacts["error"] = f"stage 3: {result['error']}"
    return {"runs": runs, "loss_matches": result["loss_matches"], "metrics": metrics,
            "artifacts": artifacts, "raw": result}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", help="a program file, 'stock' (ops.STOCK) or 'none' (mlx-lm)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), help="default: by device")
    parser.add_argument("--model", action="append", dest="models",
                        help="model spec or path (repeatable); default per budget")
    parser.add_argument("--fine-tune-type", action="append", dest="ftts", choices=["lora", "dora"])
    parser.add_argument("--option", default="", help="budget overrides, e.g. windows=5,seq_len=512")
    parser.add_argument("--repeat", type=int, default=1,
                        help="evaluate this many times (seeds SEED, SEED+1, ...); prints the spread")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write every result here")
    args = parser.parse_args(argv)
    results = []
    for i in range(args.repeat):
        tic = time.monotonic()
        result = run_macro(args.program, models=args.models,
                           fine_tune_types=args.ftts or ("lora", "dora"), budget=args.budget,
                           seed=args.seed + i, **parse_options(args.option))
        result["seconds"] = time.monotonic() - tic
        results.append(result)
        print(f"--- evaluation {i + 1}/{args.repeat}: {result['seconds']:.1f} s\n{format_runs(result)}")
        if result["error"]:
            print("error:", result["error"])
    speedups = [r["training_speedup"] for r in results if r.get("training_speedup")]
    if len(speedups) > 1:
        mean = statistics.mean(speedups)
        print(f"training_speedup over {len(speedups)} evaluations: "
              + " ".join(f"{s:.3f}" for s in speedups)
              + f"; mean {mean:.3f}, CV {statistics.stdev(speedups) / mean:.2%}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
