"""The benchmark table: stock mlx-lm vs any number of programs, measured side by side.

    python -m kernel_lab.benchmark [PROGRAM ...] [--budget cpu|gpu|table] [--model M ...]

Fine-tuning: for each model and fine-tune type, stock mlx-lm and every program train the
same model (seed, data, steps) in child processes under the device lock, one run per
side per trial, the order rotated each trial so drift hits every side alike. Per side:
median tokens/s (mlx-lm's count, compile window left out), median peak memory, final
loss; ratios against stock. Micro: each kernel's forward+backward time and peak memory
per program, measured as the evaluator's stage 2 does (kernel_lab.microrun: each program in
its own process, stock in another, rounds alternated), and for the memory-bound kernels the
fraction of the device's measured copy bandwidth they reach (the roofline). Writes
<out>/benchmark.json and <out>/benchmark.png.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

from . import macrobench
from .sandbox import run_task

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROGRAMS = (ROOT / "initial_program.py", ROOT / "examples" / "optimized_program.py")

# "table": the configuration of the README's table (issue targets): batch 8 x 1024
# tokens, LoRA rank 8 on every layer, bfloat16, long documentation chunks.
BUDGETS = dict(
    macrobench.BUDGETS,
    table=dict(iters=20, batch_size=8, max_seq_length=1024, num_layers=-1, rank=8,
               steps_per_report=5, trials=2, learning_rate=1e-5, timeout=600,
               models="all", dtype="bfloat16", max_chars=6000),
)


def _log(message):
    print(message, file=sys.stderr, flush=True)


def _median(records, key):
    return statistics.median(r[key] for r in records)


def compare_sides(model, fine_tune_type, programs, budget, seed=0):
    """Train stock and each program, rotated over trials; per-side records and medians."""
    keys = ("iters", "batch_size", "max_seq_length", "num_layers", "rank",
            "steps_per_report", "learning_rate", "dtype", "max_chars")
    common = {k: budget[k] for k in keys if k in budget}
    common.update(model=model, fine_tune_type=fine_tune_type, seed=seed)
    sides = {"stock": None, **{Path(p).stem: str(p) for p in programs}}
    records = {name: [] for name in sides}
    names = list(sides)
    for trial in range(budget["trials"]):
        shift = trial % len(names)
        for name in names[shift:] + names[:shift]:
            tic = time.perf_counter()
            rec = macrobench._run(dict(common, program=sides[name]), budget["timeout"], None,
                                  run_task)
            records[name].append(rec)
            status = (f"{rec['tokens_per_second']:.0f} tok/s, {rec['peak_memory'] / 1e9:.2f} GB, "
                      f"loss {rec['final_loss']:.4f}" if rec.get("ok") else f"FAILED: {rec['error']}")
            _log(f"  {model} {fine_tune_type} trial {trial + 1} {name}: {status} "
                 f"({time.perf_counter() - tic:.0f} s)")
    rows = []
    stock = records["stock"]
    for name in names:
        recs = records[name]
        row = {"side": name, "model": model, "fine_tune_type": fine_tune_type,
               "ok": all(r.get("ok") for r in recs)}
        if row["ok"]:
            row.update(tokens_per_second=_median(recs, "tokens_per_second"),
                       peak_memory_gb=_median(recs, "peak_memory") / 1e9,
                       final_loss=recs[0]["final_loss"], losses=recs[0]["losses"],
                       steps=[r["iteration"] for r in recs[0].get("reports", [])],
                       tokens_per_second_runs=[r["tokens_per_second"] for r in recs])
            if name != "stock" and all(r.get("ok") for r in stock):
                row["speedup"] = row["tokens_per_second"] / _median(stock, "tokens_per_second")
                row["memory_reduction"] = 1 - row["peak_memory_gb"] * 1e9 / _median(stock, "peak_memory")
                row["loss_rel_diff"] = macrobench.loss_rel_diff(stock[0]["losses"], recs[0]["losses"])[0]
        else:
            row["error"] = next(r["error"] for r in recs if not r.get("ok"))
        rows.append(row)
    return rows


def micro_table(programs, dtype=None, seed=0, names=None):
    """Per-kernel timings of stock and each program, measured as stage 2 measures them
    (kernel_lab.microrun: every program in its own audited process, checked against stock every
    round; stock alone in the reference process), with rooflines for memory-bound kernels.
    `seed` is unused: input seeds are drawn afresh for every round."""
    from . import microrun

    labels = {}
    for path in programs:
        label = Path(path).stem
        labels[label if label not in labels and label != "stock" else f"{label}-{len(labels)}"] = str(path)
    return microrun.run(labels, reference={"stock": None}, names=names, dtype=dtype, log=_log,
                        timeout=3600.0)


def format_tables(macro_rows, micro):
    lines = []
    if macro_rows:
        lines.append(f"{'model':<24} {'type':<5} {'side':<20} {'tok/s':>9} {'speedup':>8} "
                     f"{'peak GB':>8} {'memory':>8} {'final loss':>10} {'loss diff':>9}")
        for r in macro_rows:
            if not r["ok"]:
                lines.append(f"{r['model']:<24} {r['fine_tune_type']:<5} {r['side']:<20} FAILED: {r['error']}")
                continue
            speed = f"{r['speedup']:.2f}x" if "speedup" in r else "1.00x"
            memory = f"{-r['memory_reduction']:+.0%}" if "memory_reduction" in r else "-"
            diff = f"{r['loss_rel_diff']:.2%}" if "loss_rel_diff" in r else "-"
            lines.append(f"{r['model']:<24} {r['fine_tune_type']:<5} {r['side']:<20} "
                         f"{r['tokens_per_second']:>9.0f} {speed:>8} {r['peak_memory_gb']:>8.2f} "
                         f"{memory:>8} {r['final_loss']:>10.4f} {diff:>9}")
    if micro:
        sides = [k for k in micro["kernels"][0] if k not in ("kernel", "cases")]
        lines.append("")
        lines.append(f"micro ({micro['device']}, {micro['dtype']}, fwd+bwd; roofline = share of "
                     f"{micro['copy_bandwidth_gb_s']:.0f} GB/s copy bandwidth)")
        lines.append(f"{'':<22}" + "".join(f"{s[:27]:>27}   " for s in sides))
        lines.append(f"{'kernel':<22}" + "".join(f"{'ms':>10}{'x':>7}{'mem':>7}{'roof':>6}   " for s in sides))
        for k in micro["kernels"]:
            cells = []
            for s in sides:
                d = k[s]
                roof = f"{d['roofline']:.0%}" if "roofline" in d else "-"
                cells.append(f"{d['fwd_bwd_ms']:>10.3f}{d.get('speedup_vs_stock', 1.0):>7.2f}"
                             f"{d.get('memory_ratio_vs_stock', 1.0):>7.2f}{roof:>6}   ")
            lines.append(f"{k['kernel']:<22}" + "".join(cells))
    return "\n".join(lines)


def scores(macro_rows, micro):
    """Per program, the evaluator's formulas (kernel_lab.score) over these measurements.

    Differs from evaluator.py's stage 3 in its budget (these rows' configuration). A program
    whose loss drifted from stock's beyond macrobench's limits scores 0, as in the evaluator.
    """
    from . import score

    sides = {r["side"] for r in macro_rows if r["side"] != "stock"}
    if micro:
        sides |= {k for k in micro["kernels"][0] if k not in ("kernel", "cases", "stock")}
    result = {}
    for side in sorted(sides):
        entry = {}
        if micro and side in micro["kernels"][0]:
            entry["micro"] = score.micro_score({k["kernel"]: (k[side]["speedup_vs_stock"],
                                                              k[side]["memory_ratio_vs_stock"])
                                                for k in micro["kernels"]})
        rows = [r for r in macro_rows if r["side"] == side and "speedup" in r]
        if rows:
            entry["macro"] = score.macro_score(
                [(r["speedup"], 1 / (1 - r["memory_reduction"])) for r in rows])
            stock_final = {(r["model"], r["fine_tune_type"]): r["final_loss"]
                           for r in macro_rows if r["side"] == "stock" and r["ok"]}

            def final_diff(r):
                ref = stock_final[(r["model"], r["fine_tune_type"])]
                return abs(r["final_loss"] - ref) / abs(ref)

            entry["loss_matches"] = all(r["loss_rel_diff"] <= macrobench.REPORT_LOSS_TOLERANCE
                                        and final_diff(r) <= macrobench.FINAL_LOSS_TOLERANCE
                                        for r in rows)
        if "micro" in entry and "macro" in entry:
            entry["combined"] = score.combined_score(entry["micro"], entry["macro"],
                                                     loss_matches=entry["loss_matches"])
        result[side] = entry
    return result


def format_scores(table):
    lines = ["", "", "scores (kernel_lab.score over these measurements)"]
    for side, e in table.items():
        cells = [f"{k} {e[k]:.3f}" for k in ("micro", "macro", "combined") if k in e]
        if e.get("loss_matches") is False:
            cells.append("LOSS MISMATCH")
        lines.append(f"  {side:<22} " + "  ".join(cells))
    return "\n".join(lines)


def summarize(paths):
    """Merge saved benchmark.json files: their macro rows, the (last) micro table."""
    macro_rows, micro = [], None
    for path in paths:
        payload = json.loads(Path(path).read_text())
        macro_rows += payload.get("macro") or []
        micro = payload.get("micro") or micro
    print(format_tables(macro_rows, micro) + format_scores(scores(macro_rows, micro)))
    return 0


def plot(path, macro_rows, micro):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["model"], r["fine_tune_type"]) for r in macro_rows})
    panels = len(groups) + (1 if micro else 0)
    if not panels:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 3.8), squeeze=False)
    for ax, (model, ftt) in zip(axes[0], groups):
        for r in macro_rows:
            if (r["model"], r["fine_tune_type"]) == (model, ftt) and r["ok"]:
                label = (f"{r['side']}: {r['tokens_per_second']:.0f} tok/s, "
                         f"{r['peak_memory_gb']:.1f} GB")
                ax.plot(r["steps"][: len(r["losses"])], r["losses"], marker="o", ms=3, label=label)
        ax.set_title(f"{model} ({ftt})", fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=7)
    if micro:
        ax = axes[0][-1]
        sides = [k for k in micro["kernels"][0] if k not in ("kernel", "cases", "stock")]
        kernels = [k["kernel"] for k in micro["kernels"]]
        width = 0.8 / max(len(sides), 1)
        for i, s in enumerate(sides):
            ax.bar([x + i * width for x in range(len(kernels))],
                   [k[s].get("speedup_vs_stock", 0) for k in micro["kernels"]], width, label=s)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([x + width * (len(sides) - 1) / 2 for x in range(len(kernels))])
        ax.set_xticklabels(kernels, rotation=35, ha="right", fontsize=8)
        ax.set_title("kernel speedup vs stock (fwd+bwd)", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("programs", nargs="*", help="programs to compare with stock "
                        "(default: initial_program.py and examples/optimized_program.py)")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default=None,
                        help="cpu (CI-sized), gpu, or table (8x1024, all layers, bf16); "
                        "default: gpu on a GPU, cpu otherwise")
    parser.add_argument("--model", action="append", dest="models",
                        help="model spec, path or hub id (repeatable); default per budget")
    parser.add_argument("--fine-tune-type", action="append", dest="ftts", choices=["lora", "dora"])
    parser.add_argument("--iters", type=int)
    parser.add_argument("--trials", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-micro", action="store_true", help="skip the per-kernel table")
    parser.add_argument("--no-macro", action="store_true", help="skip the fine-tuning runs")
    parser.add_argument("--out", default="runs/benchmark", help="folder for benchmark.json/.png")
    parser.add_argument("--summarize", nargs="+", metavar="JSON",
                        help="print the tables and scores of saved benchmark.json files, run nothing")
    args = parser.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)

    programs = [Path(p).resolve() for p in (args.programs or DEFAULT_PROGRAMS)]
    for p in programs:
        if not p.is_file():
            parser.error(f"program not found: {p}")
    budget = dict(BUDGETS[args.budget or macrobench.default_budget()])
    budget.update({k: v for k, v in (("iters", args.iters), ("trials", args.trials)) if v})
    models = args.models or macrobench.default_models(budget.get("models", "all"))
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    _log(f"benchmark on {mx.default_device()}: {len(models)} model(s), budget {budget}")

    macro_rows = []
    if not args.no_macro:
        for model in models:
            for ftt in args.ftts or ("lora", "dora"):
                macro_rows += compare_sides(model, ftt, programs, budget, seed=args.seed)
    micro = None if args.no_micro else micro_table(programs, seed=args.seed)

    print(format_tables(macro_rows, micro) + format_scores(scores(macro_rows, micro)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"started": started, "device": str(mx.default_device()), "mlx": mx.__version__,
               "budget": budget, "programs": [str(p) for p in programs],
               "macro": macro_rows, "micro": micro}
    (out / "benchmark.json").write_text(json.dumps(payload, indent=1, default=str))
    png = plot(out / "benchmark.png", macro_rows, micro)
    _log(f"wrote {out / 'benchmark.json'}" + (f" and {png}" if png else ""))
    return 0 if all(r["ok"] for r in macro_rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
