"""Each side's measured training windows, summarized from stage-3 logs (medians per row and side).

    python benchmarks/window_summary.py LOG [LOG ...]

Reads the window lines that `python evaluator.py`, `python -m kernel_lab.stage3` and
`python -m kernel_lab.benchmark` print ("  MODEL TYPE window i/n SIDE  R tok/s  P GB loss L (W s, cpu C s)")
and prints, per log, row and side, the medians over the measured windows of tokens/s, peak GB, wall
and CPU seconds, and CPU / wall, to compare runs on different machines side by side. CPU / wall alone
does not say whether the host or the GPU set the pace: the process's CPU time counts the training
thread's graph building and launches, and also any time it spins waiting for the GPU (profile_step.py
shows ~100% on steps that are surely GPU-bound).
"""

import re
import statistics
import sys
from collections import defaultdict

WINDOW = re.compile(r"^\s+(?P<model>\S+) (?P<type>lora|dora) window \d+/\d+ (?P<side>\S+)\s+"
                    r"(?P<rate>[\d.]+) tok/s\s+(?P<peak>[\d.]+) GB loss \S+ "
                    r"\((?P<wall>[\d.]+) s, cpu (?P<cpu>[\d.]+) s\)")


def read_windows(lines):
    """{(model, type, side): [(tok/s, peak GB, wall s, cpu s)]} in the order the windows ran."""
    rows = defaultdict(list)
    for line in lines:
        m = WINDOW.match(line)
        if m:
            rows[m["model"], m["type"], m["side"]].append(
                tuple(float(m[k]) for k in ("rate", "peak", "wall", "cpu")))
    return dict(rows)


def summarize(windows):
    """Medians over windows: tok/s, peak GB, wall s, cpu s, and cpu / wall."""
    rate, peak, wall, cpu = (statistics.median(w[i] for w in windows) for i in range(4))
    return dict(tokens_per_second=rate, peak_gb=peak, wall_seconds=wall, cpu_seconds=cpu,
                cpu_per_wall=cpu / wall)


def main(paths):
    if not paths:
        sys.exit(__doc__)
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            rows = read_windows(f)
        print(f"{path}: {len(rows)} sides")
        print(f"  {'model':<22} {'type':<5} {'side':<20} {'tok/s':>8} {'peak GB':>8} {'wall s':>7} "
              f"{'cpu s':>6} {'cpu/wall':>8}")
        for (model, ftt, side), windows in rows.items():
            s = summarize(windows)
            print(f"  {model:<22} {ftt:<5} {side:<20} {s['tokens_per_second']:8.0f} {s['peak_gb']:8.2f} "
                  f"{s['wall_seconds']:7.2f} {s['cpu_seconds']:6.2f} {s['cpu_per_wall']:8.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
