"""What gpu_session.sh's `diagnose` section found: the GPU's clocks and the host's share of each window.

    python benchmarks/diagnose_summary.py DIR     # e.g. benchmarks/h200-2026-11-22d/A-diagnose-table/diagnose
    python benchmarks/diagnose_summary.py --windows LOG...   # an evaluator's or benchmark's log

smi.csv (nvidia-smi every 200 ms): busy samples, their SM clock range, peak power, clock-event
reasons. optimized.json (`kernel_lab.stage3 --repeat N --json`): per side, every measured window's
process CPU seconds per wall second and the training thread's share of them. --windows: from the
window lines a log prints (`... lora window 2/6 candidate 31930.5 tok/s 4.4 GB ... (0.52 s, cpu 0.56 s)`),
per model, fine-tune type and side the median tokens/s, peak GB, wall and CPU seconds of a window and
CPU per wall. CPU per wall alone does not say whether the host or the GPU set the pace: the process's
CPU time also counts spinning on the GPU (profile_step.py shows ~100% on steps that are surely GPU-bound).
"""

import csv
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path


def _number(cell):
    return float(cell.strip().split()[0])


def clocks(path):
    rows = [r for r in list(csv.reader(Path(path).open()))[1:] if len(r) >= 7]
    busy = [r for r in rows if _number(r[5]) > 0]
    if not busy:
        return f"{len(rows)} samples, none busy"
    sm = [_number(r[1]) for r in busy]
    reasons = Counter(r[6].strip() for r in busy)
    return (f"{len(rows)} samples, {len(busy)} busy: SM clock {min(sm):.0f}-{max(sm):.0f} MHz, power up "
            f"to {max(_number(r[3]) for r in busy):.0f} W, clock-event reasons {dict(reasons)}")


def host_shares(path):
    lines = []
    evaluations = json.loads(Path(path).read_text())
    for side in ("stock", "candidate"):
        windows = [w for e in evaluations for run in e["runs"]
                   for w in run["records"][side][0]["reports"][1:]]  # [0]: the warm-up window
        cpu = [w["cpu_seconds"] / w["wall_seconds"] for w in windows]
        thread = [w["thread_cpu_seconds"] / w["cpu_seconds"] for w in windows]
        lines.append(f"{side}: {len(windows)} windows, CPU per wall second {min(cpu):.2f}-{max(cpu):.2f}, "
                     f"training thread {min(thread):.0%}-{max(thread):.0%} of it")
    return "\n".join(lines)


WINDOW = re.compile(r"^\s+(\S+) (lora|dora) window \d+/\d+ (\S+)\s+([\d.]+) tok/s\s+([\d.]+) GB.*"
                    r"\(([\d.]+) s, cpu ([\d.]+) s\)")


def window_lines(path):
    """Per (model, type, side) of a log's measured windows: medians of tokens/s, peak GB, wall, CPU,
    CPU/wall."""
    rows = {}
    for line in Path(path).read_text().splitlines():
        m = WINDOW.match(line)
        if m:
            tps, peak, wall, cpu = map(float, m.group(4, 5, 6, 7))
            rows.setdefault(m.group(1, 2, 3), []).append((tps, peak, wall, cpu, cpu / wall))
    return [f"{model} {ftt} {side}: {len(ws)} windows, median {statistics.median(w[0] for w in ws):.0f} "
            f"tok/s, {statistics.median(w[1] for w in ws):.2f} GB, {statistics.median(w[2] for w in ws):.3f} s wall, "
            f"{statistics.median(w[3] for w in ws):.3f} s CPU, CPU/wall {statistics.median(w[4] for w in ws):.2f}"
            for (model, ftt, side), ws in rows.items()]


if __name__ == "__main__":
    if sys.argv[1] == "--windows":
        for log in sys.argv[2:]:
            print(f"== {log}")
            print("\n".join(window_lines(log)))
        sys.exit(0)
    folder = Path(sys.argv[1])
    print(clocks(folder / "smi.csv"))
    print(host_shares(folder / "optimized.json"))
