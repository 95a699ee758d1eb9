"""What gpu_session.sh's `diagnose` section found: the GPU's clocks and the host's share of each window.

    python benchmarks/diagnose_summary.py DIR     # e.g. benchmarks/h200-2026-11-22d/A-diagnose-table/diagnose

smi.csv (nvidia-smi every 200 ms): busy samples, their SM clock range, peak power, clock-event
reasons. optimized.json (`kernel_lab.stage3 --repeat N --json`): per side, every measured window's
process CPU seconds per wall second and the training thread's share of them.
"""

import csv
import json
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


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    print(clocks(folder / "smi.csv"))
    print(host_shares(folder / "optimized.json"))
