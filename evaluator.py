"""OpenEvolve evaluator: correctness, then micro-benchmarks, then (stage 3) real fine-tuning.

    openevolve-run initial_program.py evaluator.py --config config.yaml
    python evaluator.py [PROGRAM] [--stage N] [--json] [--seed S]     # one program, by hand
    python evaluator.py --warmup      # once on a new GPU machine: compile MLX's kernels, not timed

This process never imports MLX: every stage runs the candidate in an isolated child process (`kernel_lab.sandbox`): whatever the
program does — a syntax error, an endless loop, os._exit, a segfault, NaN gradients, patching
mx.fast — the stage returns combined_score 0 with an `error` artifact naming the cause.
Stage 1 (`evaluate_stage1`): import + `kernel_lab.correctness.check_kernels` against the float64
oracle -> score.STAGE1_PASS_SCORE (0.1) when every kernel passes. Stage 2 (`evaluate_stage2`):
`kernel_lab.stage2` under the device lock: the program timed in its own audited process against
stock and the starting program in another, checked against stock on every timed round -> micro
score (1.0 = as fast and lean as MLX's own kernels), cached by program hash for stage 3. Stage 3
(`evaluate_stage3`): real mlx-lm LoRA fine-tuning, folded with the micro score by
`kernel_lab.score.combined_score`. The score formulas live in `kernel_lab/score.py`.
"""

import argparse
import dataclasses
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # openevolve loads this file by path
    sys.path.insert(0, str(HERE))

from kernel_lab import score, stage1, stage2, warmup, watch  # noqa: E402
from kernel_lab.sandbox import device_lock  # noqa: E402

INITIAL_PROGRAM = HERE / "initial_program.py"


@dataclasses.dataclass
class Settings:
    """Budgets and options; each can be set with an environment variable KERNEL_LAB_<NAME>."""

    seed: int = None  # None: a fresh random seed per evaluation (reported in the artifacts)
    shape_set: str = "default"  # correctness cases (kernel_lab.shapes)
    dtypes: str = "float32,bfloat16,float16"  # correctness dtypes
    names: str = ""  # comma-separated kernels to evaluate ("" = all eight)
    stage1_timeout: float = 900.0  # seconds, the child of stage 1 (a cold GPU compiles for minutes)
    stage2_timeout: float = 900.0  # seconds for stage 2's workers (each call has its own limit too)
    lock_timeout: float = 600.0  # seconds to wait for another evaluation's timing to finish
    repeats: int = 5  # at least this many timed rounds per kernel and case (after 2 warm-ups)
    min_seconds: float = 2.0  # ... and more (at most 40) until a case's timed phase took this long
    bench_dtype: str = ""  # "" = float32 on the CPU, bfloat16 on a GPU
    stage3_timeout: float = 1400.0  # seconds for all of stage 3 (each worker call has its own limit too)
    stage3_budget: str = ""  # kernel_lab.budgets: "" = by device ("cpu" tiny, "gpu" real)
    stage3_models: str = ""  # comma-separated model specs ("" = the budget's offline models)
    stage3_options: str = ""  # budget overrides, e.g. "batch_size=8,seq_len=512,windows=4"
    report_dir: str = ""  # the CLI writes <dir>/<program>.json and .png ("" = runs/evaluation)
    memory_limit_gb: float = 0.0  # RSS cap of a child; 0 = half the RAM, at most 16 GB
    echo: bool = True  # stream the child's progress lines to our stderr
    watch_directory: bool = True  # fail a program that writes into this directory

    @classmethod
    def from_env(cls, **overrides):
        values = {}
        for field in dataclasses.fields(cls):
            raw = os.environ.get(f"KERNEL_LAB_{field.name.upper()}")
            if raw is not None and raw != "":
                kind = type(field.default) if field.default is not None else int
                values[field.name] = raw.lower() in ("1", "true", "yes") if kind is bool else kind(raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def kernel_names(self):
        return [n.strip() for n in self.names.split(",") if n.strip()] or None

    def memory_limit(self):
        return int(self.memory_limit_gb * 2**30) if self.memory_limit_gb else None


# ------------------------------------------------------------------ results

def _result(metrics, artifacts):
    """An openevolve EvaluationResult (a plain dict with `artifacts` if openevolve is absent)."""
    metrics = {k: float(v) for k, v in metrics.items()}
    artifacts = {k: v if isinstance(v, (str, bytes)) else json.dumps(v, indent=1)
                 for k, v in artifacts.items()}
    try:
        from openevolve.evaluation_result import EvaluationResult
    except ImportError:
        return {**metrics, "artifacts": artifacts}
    return EvaluationResult(metrics=metrics, artifacts=artifacts)


def _failure(stage, error, seed, seconds, task=None, extra_metrics=None):
    artifacts = {"error": f"stage {stage}: {error}", "seed": str(seed)}
    if task is not None:
        if task.traceback:
            artifacts["traceback"] = task.traceback[-4000:]
        if task.stderr.strip():
            artifacts["stderr"] = task.stderr[-4000:]
        if task.stdout.strip():
            artifacts["stdout"] = task.stdout[-2000:]
    metrics = {"combined_score": 0.0, f"stage{stage}_seconds": seconds, **(extra_metrics or {})}
    return _result(metrics, artifacts)


def _fingerprint(settings):
    """The example directory's fingerprint before a stage (None: not watched). Detection cannot
    tell a candidate's write from a person editing the directory meanwhile: KERNEL_LAB_WATCH_DIRECTORY=0."""
    return watch.fingerprint(HERE) if settings.watch_directory else None


def _seed(settings):
    return settings.seed if settings.seed is not None else secrets.randbelow(2**31 - 1)


def _log(settings, message):
    if settings.echo:
        print(message, file=sys.stderr, flush=True)


def evaluate_stage1(program_path, **overrides):
    """Import + correctness in a child: score.STAGE1_PASS_SCORE when every kernel passes, else 0."""
    settings = Settings.from_env(**overrides)
    seed = _seed(settings)
    warm = {} if warmup.is_warm() else warmup.run(log=lambda line: _log(settings, line))
    _log(settings, f"[stage 1] correctness of {program_path} (seed {seed})")
    before = _fingerprint(settings)
    task = stage1.run(Path(program_path).resolve(), seed=seed, shape_set=settings.shape_set,
                      dtypes=settings.dtypes.split(","), names=settings.kernel_names(),
                      timeout=settings.stage1_timeout, memory_limit=settings.memory_limit())
    error = watch.error_since(before, HERE) if task.ok else None
    if error:
        task.ok, task.error = False, error
    if not task.ok:
        return _failure(1, task.error, seed, task.seconds, task, {"correct_fraction": 0.0})
    results, failures = task.value["results"], task.value["failures"]
    combined, fraction = score.stage1_score([r["passed"] for r in results])
    phases = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in stage1.phases(task).items())
    artifacts = {"stage": "1 (correctness)", "seed": str(seed), "correctness": task.value["table"],
                 "stage1_setting": task.value["setting"],
                 "stage1_phases": f"{task.seconds:.1f} s: {phases}"
                 + (f" (the slowest of {task.value['children']} children checking at once)"
                    if task.value.get("children", 1) > 1 else "")}
    if failures:
        artifacts["error"] = "stage 1: " + "; ".join(failures)
    _log(settings, artifacts["correctness"] + "\n" + artifacts["stage1_setting"]
         + "\nstage 1 took " + artifacts["stage1_phases"])
    metrics = {"combined_score": combined, "correct_fraction": fraction, "stage1_seconds": task.seconds}
    if warm.get("seconds"):  # compiling MLX's kernels on a new machine: not charged to the program
        metrics["warmup_seconds"] = warm["seconds"]
    return _result(metrics, artifacts)


def evaluate_stage2(program_path, **overrides):
    """Micro-benchmarks (kernel_lab.stage2) under the device lock; combined_score from the micro
    score (score.combined_score)."""
    settings = Settings.from_env(**overrides)
    seed = _seed(settings)
    initial = str(INITIAL_PROGRAM) if INITIAL_PROGRAM.is_file() else None
    _log(settings, f"[stage 2] micro-benchmarks of {program_path} (seed {seed}; input seeds are drawn "
                   "afresh for every round)")
    wait_start = time.monotonic()
    try:
        with device_lock(timeout=settings.lock_timeout):
            start = time.monotonic()
            before = _fingerprint(settings)
            bench = stage2.run(program_path, initial=initial, names=settings.kernel_names(),
                               dtype=settings.bench_dtype or None, repeats=settings.repeats,
                               min_seconds=settings.min_seconds, timeout=settings.stage2_timeout,
                               memory_limit=settings.memory_limit(), log=lambda line: _log(settings, line))
    except TimeoutError as exc:
        return _failure(2, str(exc), seed, time.monotonic() - wait_start)
    except stage2.MicroError as exc:
        return _failure(2, str(exc), seed, time.monotonic() - start, exc.task)
    seconds = time.monotonic() - start
    error = watch.error_since(before, HERE)
    if error:
        return _failure(2, error, seed, seconds)
    metrics = stage2.metrics(bench)
    metrics.update(stage2_seconds=seconds, lock_wait_seconds=start - wait_start)
    artifacts = {"stage": "2 (micro-benchmarks)", "seed": str(seed), "benchmarks": stage2.table(bench)}
    _log(settings, artifacts["benchmarks"] + f"\nmicro score {metrics['micro_score']:.4f}")
    stage2.write_cache(program_path, metrics, bench, seed)
    return _result(metrics, artifacts)


cached_stage2 = stage2.cached  # stage 3 folds in the cached micro score
_write_stage2_cache = stage2.write_cache


def evaluate_stage3(program_path, **overrides):
    """Real fine-tuning (kernel_lab.stage3) folded with the cached micro score:
    band(micro**0.25 * macro**0.75); 0 when a gradient check, a training or the loss check fails."""
    from kernel_lab import stage3  # no MLX here: the training runs in sandboxed workers

    settings = Settings.from_env(**overrides)
    entry = cached_stage2(program_path)
    if entry is None:  # stage 3 alone (CLI): time it first
        timed = evaluate_stage2(program_path, **overrides)
        entry = cached_stage2(program_path)
        if entry is None:
            return timed
    micro = entry["metrics"]["micro_score"]
    seed = _seed(settings)
    _log(settings, f"[stage 3] fine-tuning benchmark of {program_path} (seed {seed})")
    before = _fingerprint(settings)
    macro = stage3.evaluate(
        str(Path(program_path).resolve()), seed=seed, budget=settings.stage3_budget,
        models=settings.stage3_models, options=settings.stage3_options,
        timeout=settings.stage3_timeout, lock_timeout=settings.lock_timeout,
        memory_limit=settings.memory_limit(), echo=settings.echo)
    _LAST_MACRO[str(program_path)] = macro.get("raw")
    error = watch.error_since(before, HERE)
    if error and not macro.get("error"):
        macro["error"] = f"stage 3: {error}"
    metrics = {**macro.get("metrics", {}), "micro_score": micro}
    artifacts = {"stage": "3 (fine-tuning)", "seed": str(seed), **(macro.get("artifacts") or {})}
    if macro.get("error"):
        artifacts["error"] = macro["error"]
        return _result({**metrics, "combined_score": 0.0}, artifacts)
    macro_value = score.macro_score(macro["runs"])
    combined = score.combined_score(micro, macro_value, loss_matches=macro["loss_matches"])
    metrics.update(macro_score=macro_value, combined_score=combined,
                   fine_tuning_score=score.fine_tuning_score(micro, macro_value))
    _log(settings, artifacts["fine_tuning"] + f"\nmacro score {macro_value:.4f}, combined {combined:.4f}")
    return _result(metrics, artifacts)


_LAST_MACRO = {}  # program path -> stage 3's full result, for the CLI's report


def _merge(into, result):
    metrics, artifacts = _split(result)
    into[0].update(metrics)
    into[1].update(artifacts)


def _split(result):
    if isinstance(result, dict):
        result = dict(result)
        return result, result.pop("artifacts", {})
    return dict(result.metrics), dict(result.artifacts)


def evaluate(program_path, **overrides):
    """All stages in order, as openevolve's cascade would run them (stops at the first failure)."""
    settings = Settings.from_env(**overrides)
    if settings.seed is None:
        overrides["seed"] = _seed(settings)  # one seed for every stage, reported
    merged = ({}, {})
    _merge(merged, evaluate_stage1(program_path, **overrides))
    if merged[0]["combined_score"] < score.STAGE1_PASS_SCORE:
        return _result(*merged)
    _merge(merged, evaluate_stage2(program_path, **overrides))
    if merged[0]["combined_score"] < score.STAGE3_FLOOR or "error" in merged[1]:
        return _result(*merged)  # openevolve's cascade stops here too
    _merge(merged, evaluate_stage3(program_path, **overrides))
    return _result(*merged)


# ------------------------------------------------------------------ command line

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("program", nargs="?", default=str(INITIAL_PROGRAM))
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), help="run one stage only")
    parser.add_argument("--json", action="store_true", help="metrics as JSON on the last line")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--names", help="comma-separated kernels (default: all)")
    parser.add_argument("--shape-set", choices=("default", "full"))
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.add_argument("--warmup", action="store_true",
                        help="evaluate the starting program once, to fill MLX's kernel caches on a "
                        "new machine (a cold CUDA machine compiles for minutes); its score is not kept")
    args = parser.parse_args(argv)
    if args.warmup:
        return warm_up(echo=not args.quiet)
    overrides = dict(seed=args.seed, names=args.names, shape_set=args.shape_set,
                     repeats=args.repeats, echo=False if args.quiet else None)
    function = {None: evaluate, 1: evaluate_stage1, 2: evaluate_stage2, 3: evaluate_stage3}[args.stage]
    metrics, artifacts = _split(function(args.program, **overrides))
    for key, value in artifacts.items():
        if key not in ("correctness", "benchmarks") or args.quiet:
            print(f"--- {key}\n{value}" if "\n" in str(value) else f"{key}: {value}")
    for key, value in metrics.items():
        print(f"{key:28s} {value:.4g}" if math.isfinite(value) else f"{key:28s} {value}")
    paths = write_evaluation_report(args.program, metrics, artifacts, Settings.from_env(**overrides))
    print(f"report: {', '.join(str(p) for p in paths if p)}", file=sys.stderr)
    if args.json:
        print(json.dumps(metrics))
    return 0 if metrics.get("combined_score", 0) > 0 else 1


def warm_up(echo=True):
    """Compile (and cache on disk, kernel_lab.machine.ptx_cache_dir) the kernels stock and the
    starting program need: stage 1's in parallel (kernel_lab.warmup), then one evaluation of the
    starting program for stages 2 and 3; print its seconds and scores. Timing never includes
    compiling (warm-up rounds and windows come first) and the first stage 1 on a machine does the
    parallel part by itself; this takes the rest out of the first real evaluation's wall time."""
    start = time.monotonic()
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if echo else (lambda line: None)
    warmup.run(str(INITIAL_PROGRAM), log=log)
    metrics, artifacts = _split(evaluate(str(INITIAL_PROGRAM), echo=echo, watch_directory=False))
    shown = {k: round(v, 4) for k, v in metrics.items()
             if k.endswith("_seconds") or k in ("combined_score", "micro_score", "macro_score")}
    print(f"warm-up done in {time.monotonic() - start:.0f} s: {shown}"
          + (f"; {artifacts['error']}" if "error" in artifacts else ""))
    return 0


def write_evaluation_report(program, metrics, artifacts, settings):
    """<report_dir>/<program stem>.json (every number) and .png (loss curves, kernel bars)."""
    from kernel_lab.report import write_report

    entry = cached_stage2(program)
    micro = [{"kernel": k["kernel"], **k["candidate"]} for k in entry["bench"]["kernels"]] if entry else None
    out = Path(settings.report_dir or HERE / "runs" / "evaluation")
    return write_report(out, macro=_LAST_MACRO.get(str(program)), micro=micro,
                        extra={"program": str(program), "metrics": metrics, "artifacts": artifacts},
                        name=Path(program).stem)


if __name__ == "__main__":
    sys.exit(main())
