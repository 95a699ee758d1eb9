"""Write a run's numbers as JSON and a PNG: loss curves (stock vs evolved, per
model and fine-tune type) and per-kernel speed / memory bars.

    write_report("runs/report", macro=run_macro(...), micro=[{"kernel": ...,
                 "speedup_vs_stock": ..., "memory_ratio_vs_stock": ...}, ...])
"""

import json
import math
from pathlib import Path


def _finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def _json_safe(obj):
    """Replace NaN/inf (not valid JSON) by None, recursively."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _loss_curves(macro):
    """[(title, steps, stock losses, candidate losses)] from run_macro's runs."""
    curves = []
    for run in (macro or {}).get("runs", []):
        rec = run.get("records", {})
        stock, cand = rec.get("stock") or [], rec.get("candidate") or []
        if not stock or not stock[0].get("reports"):
            continue
        steps = [r["iteration"] for r in stock[0]["reports"]]
        s_loss = stock[0]["losses"]
        c_loss = cand[0]["losses"] if cand and cand[0].get("losses") else []
        title = f"{run['model']} ({run['fine_tune_type']})"
        if _finite(run.get("training_speedup")):
            title += f"\nspeedup {run['training_speedup']:.2f}x, memory {run['memory_ratio']:.2f}x"
        curves.append((title, steps, s_loss, c_loss))
    return curves


def plot(path, macro=None, micro=None):
    """Draw the PNG; returns its path (None when there is nothing to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _loss_curves(macro)
    micro = [m for m in (micro or []) if "kernel" in m]
    panels = len(curves) + (1 if micro else 0)
    if panels == 0:
        return None
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.8), squeeze=False)
    axes = list(axes[0])
    for ax, (title, steps, s_loss, c_loss) in zip(axes, curves):
        ax.plot(steps, s_loss, "o-", label="stock mlx-lm")
        if c_loss:
            ax.plot(steps[: len(c_loss)], c_loss, "x--", label="evolved kernels")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("iteration")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=8)
    if micro:
        ax = axes[-1]
        names = [m["kernel"] for m in micro]
        speed = [m.get("speedup_vs_stock") or 0.0 for m in micro]
        memory = [m.get("memory_ratio_vs_stock") or 0.0 for m in micro]
        xs = range(len(names))
        width = 0.4
        ax.bar([x - width / 2 for x in xs], speed, width, label="speedup vs stock")
        ax.bar([x + width / 2 for x in xs], memory, width, label="memory ratio vs stock")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
        ax.set_title("per-kernel (fwd+bwd), > 1 is better", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir, macro=None, micro=None, extra=None, name="report"):
    """Write <out_dir>/<name>.json (all numbers) and <name>.png; returns (json path, png path)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"macro": macro, "micro": micro}
    if extra:
        payload.update(extra)
    json_path = out / f"{name}.json"
    json_path.write_text(json.dumps(_json_safe(payload), indent=1, default=str))
    png_path = plot(out / f"{name}.png", macro=macro, micro=micro)
    return json_path, png_path
