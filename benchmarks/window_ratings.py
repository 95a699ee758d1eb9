"""Stage 3's training speedup recomputed from recorded runs under two ratings of a window.

    python benchmarks/window_ratings.py [JSON ...]     # default: every benchmarks/h200-*/**/*.json

"mean": mlx-lm's tokens/s of each window (every step counts: what stage 3 uses); "median step":
the window's tokens at its median step's pace (what stage 3 used before, hiding one slow step in
four). Per evaluation: the geometric mean over rows of the median over window pairs, both ways,
and, per file with several evaluations, each rating's coefficient of variation.
"""

import glob
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from kernel_lab.score import geometric_mean  # noqa: E402  (as stage 3 folds its rows)


def mean_rate(report):
    return report["tokens_per_second"]


def median_step_rate(report):
    steps = report["step_seconds"]
    return report["tokens_per_second"] * statistics.fmean(steps) / statistics.median(steps)


def evaluations(path):
    """The stage-3 results in a JSON written by the evaluator (--json) or kernel_lab.stage3."""
    data = json.loads(Path(path).read_text())
    items = data if isinstance(data, list) else [data]
    found = [item.get("macro", item) for item in items if isinstance(item, dict)]
    return [e for e in found if isinstance(e, dict) and e.get("runs")]


def speedup(evaluation, rate):
    """Geometric mean over rows of the median window-pair ratio; None without step times."""
    rows = []
    for run in evaluation["runs"]:
        records = run.get("records") or {}
        if not records.get("stock") or not records.get("candidate"):
            return None
        # The first report is the warm-up window's (stage 3 keeps it, unmeasured).
        stock, cand = records["stock"][0]["reports"][1:], records["candidate"][0]["reports"][1:]
        if not stock or not all("step_seconds" in r for r in stock + cand):
            return None
        rows.append(statistics.median(rate(c) / rate(s) for s, c in zip(stock, cand)))
    return geometric_mean(rows) if rows else None


def cv(values):
    return statistics.stdev(values) / statistics.fmean(values) if len(values) > 1 else 0.0  # as stage3


def main(paths):
    paths = paths or sorted(glob.glob(str(ROOT / "h200-*" / "**" / "*.json"), recursive=True))
    worst = 0.0
    for path in paths:
        pairs = []
        for evaluation in evaluations(path):
            mean, median = speedup(evaluation, mean_rate), speedup(evaluation, median_step_rate)
            if mean is not None:
                pairs.append((mean, median))
        if not pairs:
            continue
        name = Path(path).relative_to(ROOT) if Path(path).is_relative_to(ROOT) else path
        for mean, median in pairs:
            worst = max(worst, abs(mean / median - 1))
            print(f"{str(name):70s} mean {mean:.3f}  median step {median:.3f}")
        if len(pairs) > 1:
            print(f"{'':70s} CV   {cv([m for m, _ in pairs]):.2%}  median step CV "
                  f"{cv([m for _, m in pairs]):.2%}")
    print(f"largest difference between the ratings: {worst:.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
