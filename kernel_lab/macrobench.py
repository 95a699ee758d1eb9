"""Real mlx-lm LoRA / DoRA fine-tuning, stock against any number of programs: the one code path
that measures training, for stage 3 (`kernel_lab.stage3`) and `python -m kernel_lab.benchmark`.

Per model, one long-lived sandbox Session per side (stock mlx-lm, then each program;
`kernel_lab.trainworker`) loads the model once. Per fine-tune type (LoRA, then DoRA in the same
workers) the sides prepare at the same time (`prepare_group` of them at once), never timed: a
program's side first checks its gradients against stock's (`kernel_lab.gradcheck`), then each side
compiles and trains its warm-up windows. Then the measured windows of W steps alternate between the
sides, one side training at a time, the order rotated every window so drift cancels. Every batch
has the same shape B x (L + 1) tokens (packed), so nothing compiles in a measured window. Per
window: mlx-lm's tokens/s, its loss, and the peak memory since the window start. This module
imports no MLX: it can run in the evaluator's own process.
"""

import math
import statistics
import sys
import time

from . import budgets

WORKER = "kernel_lab.trainworker"
STOCK_SIDE = "stock"


def _log(message):
    print(message, file=sys.stderr, flush=True)


class Comparison:
    """The sides' Sessions and a deadline; each call's limit is cut to what is left."""

    def __init__(self, budget, sandbox, memory_limit, deadline, log):
        self.budget, self.sandbox, self.memory_limit = budget, sandbox, memory_limit
        self.deadline, self.log = deadline, log
        self.sessions = {}

    def session(self, key):
        if key not in self.sessions:
            env = {} if self.budget.get("tf32") else {"MLX_ENABLE_TF32": "0"}
            self.sessions[key] = self.sandbox.Session(memory_limit=self.memory_limit, env=env)
        return self.sessions[key]

    def limit(self, seconds):
        left = self.deadline - time.monotonic()
        if left <= 1:
            raise TimeoutError("the training comparison ran past its overall time limit")
        return min(seconds, left)

    def together(self, calls, timeout):
        """Submit {key: (function, kwargs)} at once, wait for all; {key: (ok, value or error)}."""
        keys = list(calls)
        for key in keys:
            function, kwargs = calls[key]
            self.session(key).submit(f"{WORKER}:{function}", kwargs)
        results = self.sandbox.wait_all([self.session(k) for k in keys], self.limit(timeout))
        return {k: _unpack(r) for k, r in zip(keys, results)}

    def call(self, key, function, kwargs=None, timeout=60):
        return _unpack(self.session(key).call(f"{WORKER}:{function}", kwargs or {},
                                              timeout=self.limit(timeout)))

    def close(self, model=None):
        for key in [k for k in self.sessions if model is None or k[0] == model]:
            self.sessions.pop(key).close()


def _unpack(task):
    """(ok, value) from a TaskResult: a worker's error record, or the child's own failure."""
    if not task.ok:
        return False, {"ok": False, "error": task.error, "error_kind": "crash",
                       "traceback": task.traceback}
    value = task.value if isinstance(task.value, dict) else {"ok": True, "value": task.value}
    return bool(value.get("ok", True)), value


def compare_model(comp, model, programs, fine_tune_types, *, seed=0, data=None, loaded=None,
                  stop_on_failure=True):
    """Stock and every program on one model, each fine-tune type in turn; [run dict]. A side
    that failed sits out the model's later fine-tune types (stop_on_failure: they are skipped)."""
    budget, names = comp.budget, [STOCK_SIDE] + list(programs)
    sides = {STOCK_SIDE: None, **programs}
    if loaded is None:
        loaded = load_sides(comp, [model], sides, seed=seed, data=data)[model]
    runs, alive = [], [n for n in names if loaded[n][0]]
    for ftt in fine_tune_types:
        run = {"model": model, "fine_tune_type": ftt, "sides": {}, "errors": {}}
        runs.append(run)
        for name in names:
            if not loaded[name][0]:
                run["errors"][name] = f"could not start: {loaded[name][1]['error']}"
            elif name not in alive:
                run["errors"][name] = "skipped: it failed with an earlier fine-tune type"
        if STOCK_SIDE not in alive or len(alive) < 2:
            break
        prepare = {k: budget[k] for k in ("num_layers", "rank", "scale", "learning_rate",
                                          "window_steps", "warmup_windows", "windows",
                                          "grad_check", "grad_batches", "grad_rows", "grad_check_compute")}
        call = ("prepare", dict(prepare, fine_tune_type=ftt, seed=seed))
        prepared, group = {}, int(budget.get("prepare_group") or len(alive))
        for i in range(0, len(alive), group):  # a group at a time: each side's gradient check needs GBs
            prepared.update(comp.together({(model, n): call for n in alive[i:i + group]},
                                          budget["prepare_timeout"]))
        for name in list(alive):
            ok, value = prepared[(model, name)]
            run["sides"][name] = _new_side(value)
            if not ok:
                run["errors"][name] = f"while preparing: {value.get('error')}"
                alive.remove(name)
        comp.log(f"[stage 3] {model} {ftt}: prepared " + ", ".join(
            f"{n} {run['sides'][n]['prepare_seconds'] or 0:.1f} s"
            + (f" (gradient check {run['sides'][n]['grad_check_seconds']:.1f} s)"
               if run["sides"][n].get("grad_check_seconds") else "")
            + ("" if n not in run["errors"] else " (FAILED)") for n in run["sides"]))
        if STOCK_SIDE in alive and len(alive) > 1 and not (run["errors"] and stop_on_failure):
            _measure(comp, model, ftt, run, alive, stop_on_failure)
        finished = comp.together({(model, n): ("finish", {"abort": bool(run["errors"])})
                                  for n in alive}, 120)
        for name in list(alive):
            ok, value = finished[(model, name)]
            run["sides"][name]["patch_report"] = value.get("patch_report_text")
            if not ok and value.get("error_kind") != "aborted" and name not in run["errors"]:
                run["errors"][name] = f"at the end of training: {value.get('error')}"
        alive = [n for n in alive if n not in run["errors"]]
        if run["errors"] and stop_on_failure:
            break
    return runs


def _new_side(prepared):
    check = prepared.get("grad_check") or {}
    warm = prepared.get("warmup") or []
    return {"ok": bool(prepared.get("ok")), "grad_check": check or None,
            "prepare_seconds": prepared.get("seconds"),
            "grad_check_seconds": prepared.get("grad_check_seconds"),
            "reports": list(warm), "tokens_per_second": [], "peak_memory": [],
            "wall_seconds": []}


def _measure(comp, model, ftt, run, alive, stop_on_failure):
    """The measured windows: one side at a time, the order rotated every window; ends early when
    stock or (stop_on_failure) any side fails, or no program is left."""
    windows = comp.budget["windows"]
    for w in range(windows):
        if STOCK_SIDE not in alive or len(alive) < 2 or (run["errors"] and stop_on_failure):
            return
        order = alive[w % len(alive):] + alive[:w % len(alive)]
        for name in order:
            if name not in alive:
                continue
            ok, value = comp.call((model, name), "window", timeout=comp.budget["window_timeout"])
            if not ok:
                run["errors"][name] = f"in measured window {w + 1}: {value.get('error')}"
                alive.remove(name)
                continue
            side = run["sides"][name]
            side["reports"].append(value)
            side["tokens_per_second"].append(value["tokens_per_second"])
            side["peak_memory"].append(value["peak_memory"])
            side["wall_seconds"].append(value["wall_seconds"])
            comp.log(f"  {model} {ftt} window {w + 1}/{windows} {name:<20} "
                     f"{value['tokens_per_second']:9.1f} tok/s {value['peak_memory'] / 1e9:7.3f} GB "
                     f"loss {value['train_loss']:.4f} ({value['wall_seconds']:.2f} s, "
                     f"cpu {value.get('cpu_seconds', 0):.2f} s)")


def load_sides(comp, models, sides, *, seed=0, data=None):
    """Start one worker per (model, side) and load them all at once; {model: {side: (ok, info)}}."""
    budget = comp.budget
    steps = (budget["warmup_windows"] + budget["windows"]) * budget["window_steps"]
    common = {k: budget[k] for k in ("batch_size", "seq_len", "dtype", "max_chars")}
    common.update(steps=max(steps, budget["grad_batches"]), seed=seed, data=data)
    calls = {(m, n): ("load", dict(common, model=m, program=p)) for m in models
             for n, p in sides.items()}
    results = comp.together(calls, budget["load_timeout"])
    loaded = {m: {n: results[(m, n)] for n in sides} for m in models}
    for m in models:
        info = loaded[m][STOCK_SIDE][1]
        if loaded[m][STOCK_SIDE][0]:
            comp.log(f"[stage 3] loaded {m} ({info.get('dtype')}, batches "
                     f"{'x'.join(map(str, info.get('batch_shape', [])))}) in "
                     f"{info.get('seconds', 0):.1f} s")
    return loaded


def run_sides(programs, *, models=None, fine_tune_types=("lora", "dora"), budget=None, seed=0,
              data=None, memory_limit=None, timeout=3600.0, lock_timeout=None, stop_on_failure=True,
              sandbox=None, log=_log, **overrides):
    """Stock mlx-lm against `programs` ({side name: program path, "stock" or "none"}).

    budget: a name from kernel_lab.budgets.BUDGETS, a dict, or None (by the workers' device);
    overrides replace its entries. Returns {"budget", "device", "models", "runs": [run], "error"}.
    """
    if sandbox is None:
        from . import sandbox
    # `timeout` counts from here, the wait for the device lock included, so that stage 3 as a
    # whole ends before OpenEvolve's own evaluation timeout (config.yaml).
    comp = Comparison({}, sandbox, memory_limit, time.monotonic() + timeout, log)
    result = {"runs": [], "error": None, "models": [], "lock_wait_seconds": 0.0}
    asked = time.monotonic()
    try:
        with sandbox.device_lock(timeout=lock_timeout):
            result["lock_wait_seconds"] = time.monotonic() - asked
            comp.budget = budgets.resolve_budget(budget, gpu=None, **overrides)
            first = comp.session(("?", STOCK_SIDE))
            ok, device = _unpack(first.call(f"{WORKER}:hello", {}, timeout=comp.limit(
                comp.budget.get("load_timeout", 300))))
            if not ok:
                raise RuntimeError(f"the training worker does not start: {device.get('error')}")
            comp.budget = budgets.check_budget(
                budgets.resolve_budget(budget, gpu=device["gpu"], **overrides))
            result.update(device=device, budget=comp.budget)
            models = list(models or budgets.default_models(comp.budget["models"]))
            result["models"] = models
            if not models:
                raise RuntimeError("no real model is available offline for the fine-tuning runs")
            comp.sessions[(models[0], STOCK_SIDE)] = comp.sessions.pop(("?", STOCK_SIDE))
            sides = {STOCK_SIDE: None, **programs}
            preloaded = load_sides(comp, models, sides, seed=seed, data=data) \
                if comp.budget["preload"] else {}
            for model in models:
                runs = compare_model(comp, model, programs, fine_tune_types, seed=seed, data=data,
                                     loaded=preloaded.get(model), stop_on_failure=stop_on_failure)
                result["runs"] += runs
                comp.close(model)
                if stop_on_failure and any(r["errors"] for r in runs):
                    break
    except (TimeoutError, RuntimeError, ValueError) as exc:  # ValueError: a budget that cannot work
        result["error"] = str(exc)
    finally:
        comp.close()
    return result


def window_rates(side):
    """A side's measured windows' tokens/s as mlx-lm reports them: every step counts, so a cost
    that comes back every few steps is paid in full (a rating at each window's median step would
    hide one slow step in four; recorded H200 runs were no steadier with it:
    benchmarks/window_ratings.py). One-off hiccups are left to the median over window pairs."""
    return side["tokens_per_second"]


def pair_metrics(stock, cand):
    """Candidate against stock over the same windows: speedup (median of the per-window-pair
    ratios of tokens/s), memory (median peaks), loss difference per report, gradient check
    numbers."""
    pairs = list(zip(window_rates(stock), window_rates(cand)))
    metrics = {}
    if pairs:
        speedups = [c / s for s, c in pairs]
        peak_stock = statistics.median(stock["peak_memory"])
        peak_cand = statistics.median(cand["peak_memory"])
        metrics.update(training_speedup=statistics.median(speedups), speedups=speedups,
                       stock_tokens_per_second=statistics.median(s for s, _ in pairs),
                       candidate_tokens_per_second=statistics.median(c for _, c in pairs),
                       stock_peak_memory=peak_stock, candidate_peak_memory=peak_cand,
                       memory_ratio=peak_stock / peak_cand,
                       memory_reduction=1.0 - peak_cand / peak_stock)
    worst, final = loss_rel_diff([r["train_loss"] for r in stock["reports"]],
                                 [r["train_loss"] for r in cand["reports"]])
    metrics.update(loss_rel_diff=worst, final_loss_rel_diff=final,
                   loss_matches=worst <= REPORT_LOSS_TOLERANCE and final <= FINAL_LOSS_TOLERANCE)
    check = cand.get("grad_check") or {}
    for key in ("grad_cosine_min", "grad_rel_err_max"):
        if key in check:
            metrics[key] = check[key]
    return metrics


FINAL_LOSS_TOLERANCE = 0.01
REPORT_LOSS_TOLERANCE = 0.02


def loss_rel_diff(stock_losses, cand_losses):
    """(max relative difference over reports, relative difference of the final loss)."""
    if len(stock_losses) != len(cand_losses) or not stock_losses:
        return math.inf, math.inf
    diffs = [abs(c - s) / max(abs(s), 1e-12) for s, c in zip(stock_losses, cand_losses)]
    diffs = [d if math.isfinite(d) else math.inf for d in diffs]
    return max(diffs), diffs[-1]
