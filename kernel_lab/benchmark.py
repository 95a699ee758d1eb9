"""The benchmark table: stock mlx-lm vs any number of programs, measured side by side.

    python -m kernel_lab.benchmark [PROGRAM ...] [--budget cpu|gpu|table] [--model M ...]

Fine-tuning (kernel_lab.macrobench, the code path stage 3 uses): per model, one worker per side
(stock mlx-lm, each program) loads the model once; LoRA then DoRA; all sides compile at the same
time, then measured windows of fixed-shape batches alternate between the sides (order rotated).
Per side: median tokens/s over windows (mlx-lm's rate of each window: macrobench.window_rates),
median peak memory, the loss curve;
against stock: the median of the per-window-pair speedups, the gradient check of each program.
A program "stock" is kernel_lab.ops.STOCK patched in, "none" is plain mlx-lm again (stock
against stock: the noise floor). Micro: each kernel's forward+backward time and peak memory
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

from . import budgets, macrobench

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROGRAMS = (ROOT / "initial_program.py", ROOT / "examples" / "optimized_program.py")

BUDGETS = budgets.BUDGETS  # "table": the README's table (8 x 1024 tokens, every block, bfloat16)


def _log(message):
    print(message, file=sys.stderr, flush=True)


def side_name(program):
    """A program's side name in the table: its file stem; "stock" -> "ops.STOCK" (the stock kernels
    patched in), "none" -> "mlx-lm" (plain mlx-lm again: stock against itself)."""
    return {"stock": "ops.STOCK", "none": "mlx-lm"}.get(str(program), Path(program).stem)


def compare_sides(programs, budget=None, *, models=None, fine_tune_types=("lora", "dora"), seed=0,
                  sandbox=None, log=None, **overrides):
    """Stock mlx-lm and every program, measured by kernel_lab.macrobench (alternating windows);
    (one row per model, fine-tune type and side, the comparison's full result)."""
    sides = {side_name(p): str(p) for p in programs}
    result = macrobench.run_sides(sides, models=models, fine_tune_types=fine_tune_types,
                                  budget=budget, seed=seed, stop_on_failure=False, sandbox=sandbox,
                                  log=log or _log, **overrides)
    rows = []
    for run in result["runs"]:
        stock = run["sides"].get("stock")
        stock_ok = stock is not None and "stock" not in run["errors"]
        for name in ["stock", *sides]:
            side, error = run["sides"].get(name), run["errors"].get(name)
            row = {"side": name, "model": run["model"], "fine_tune_type": run["fine_tune_type"],
                   "ok": side is not None and error is None and bool(side["tokens_per_second"])}
            if not row["ok"]:
                row["error"] = error or ("not measured: no program was left to compare with"
                                         if name == "stock" else "not measured (stock mlx-lm failed)")
                rows.append(row)
                continue
            reports = side["reports"]
            rates = macrobench.window_rates(side)
            row.update(tokens_per_second=statistics.median(rates),
                       peak_memory_gb=statistics.median(side["peak_memory"]) / 1e9,
                       final_loss=reports[-1]["train_loss"], losses=[r["train_loss"] for r in reports],
                       steps=[r["iteration"] for r in reports],
                       tokens_per_second_runs=rates)
            if name != "stock" and stock_ok:
                pair = macrobench.pair_metrics(stock, side)
                row.update(speedup=pair["training_speedup"], speedups=pair["speedups"],
                           memory_reduction=pair["memory_reduction"],
                           loss_rel_diff=pair["loss_rel_diff"],
                           **{k: pair[k] for k in ("grad_cosine_min", "grad_rel_err_max") if k in pair})
            rows.append(row)
    return rows, result


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
    parser.add_argument("--windows", type=int, help="measured windows a side")
    parser.add_argument("--option", default="", help="budget overrides, e.g. window_steps=8,seq_len=512")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-micro", action="store_true", help="skip the per-kernel table")
    parser.add_argument("--no-macro", action="store_true", help="skip the fine-tuning runs")
    parser.add_argument("--out", default="runs/benchmark", help="folder for benchmark.json/.png")
    parser.add_argument("--summarize", nargs="+", metavar="JSON",
                        help="print the tables and scores of saved benchmark.json files, run nothing")
    args = parser.parse_args(argv)
    if args.summarize:
        return summarize(args.summarize)

    programs = [p if p in ("stock", "none") else Path(p).resolve()
                for p in (args.programs or DEFAULT_PROGRAMS)]
    for p in programs:
        if p not in ("stock", "none") and not p.is_file():
            parser.error(f"program not found: {p}")
    overrides = budgets.parse_options(args.option)
    if args.windows:
        overrides["windows"] = args.windows
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    _log(f"benchmark on {mx.default_device()}: budget {args.budget or 'by device'} {overrides}")

    macro_rows, budget = [], None
    if not args.no_macro:
        macro_rows, compared = compare_sides(programs, args.budget, models=args.models,
                                             fine_tune_types=args.ftts or ("lora", "dora"),
                                             seed=args.seed, **overrides)
        budget = compared.get("budget")
        if compared["error"]:
            _log(f"fine-tuning: {compared['error']}")
    files = [p for p in programs if p not in ("stock", "none")]
    micro = None if args.no_micro or not files else micro_table(files, seed=args.seed)

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
