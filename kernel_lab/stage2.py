"""Stage 2 of the evaluator: the program's kernels timed against MLX's own (no MLX import here).

`run(program, initial=...)` measures with kernel_lab.microrun: the program in its own audited worker
process, checked against stock on every timed round; stock and the starting program in a reference
process that never imports it. `metrics(bench)` gives OpenEvolve's numbers (micro_score,
<kernel>_speedup, <kernel>_memory_ratio, <kernel>_roofline for memory-bound kernels, ...), `table(bench)`
the readable artifact. Results are cached by program hash for stage 3 (`write_cache`, `cached`).
"""

import hashlib
import json
import os
import time
from pathlib import Path

from . import score
from .microrun import MicroError, run as _run_micro  # noqa: F401  (MicroError: for callers)
from .machine import cache_dir

CACHE_VERSION = 2  # 2: separate processes, medians of memory, rooflines


def run(program, *, initial=None, names=None, dtype=None, repeats=5, min_seconds=2.0, timeout=420.0,
        memory_limit=None, log=None):
    """The bench dict of `program` ("candidate") against stock (and the starting program)."""
    reference = {"stock": None}
    if initial:
        reference["initial"] = str(Path(initial).resolve())
    return _run_micro({"candidate": str(Path(program).resolve())}, reference=reference, names=names,
                      dtype=dtype, repeats=repeats, min_seconds=min_seconds, timeout=timeout,
                      memory_limit=memory_limit, log=log)


def metrics(bench, side="candidate"):
    """Numeric metrics: micro score, per-kernel ratios and rooflines, geometric means."""
    kernels = {k["kernel"]: k[side] for k in bench["kernels"]}
    micro = score.micro_score({name: (c["speedup_vs_stock"], c["memory_ratio_vs_stock"])
                               for name, c in kernels.items()})
    result = {"combined_score": score.combined_score(micro), "micro_score": micro}
    for key in ("speedup_vs_stock", "memory_ratio_vs_stock", "speedup_vs_initial"):
        values = [c[key] for c in kernels.values() if key in c]
        if values:
            result[key] = score.geometric_mean(values)
    for k in bench["kernels"]:
        name, c = k["kernel"], k[side]
        result[f"{name}_speedup"] = c["speedup_vs_stock"]
        result[f"{name}_memory_ratio"] = c["memory_ratio_vs_stock"]
        if "roofline" in c:
            result[f"{name}_roofline"] = c["roofline"]
            result[f"{name}_stock_roofline"] = k["stock"]["roofline"]
    if bench.get("copy_bandwidth_gb_s"):
        result["copy_bandwidth_gb_s"] = bench["copy_bandwidth_gb_s"]
    return result


def table(bench, side="candidate"):
    """The per-kernel table of the stage-2 artifact."""
    lines = [f"{'kernel':22s} {'speedup':>8s} {'memory':>7s} {'vs init':>8s} {'cand ms':>9s} "
             f"{'stock ms':>9s} {'cand MB':>8s} {'stock MB':>8s} {'roofline':>13s}"]
    for k in bench["kernels"]:
        c, s = k[side], k["stock"]
        roof = f"{c['roofline']:6.1%}/{s['roofline']:6.1%}" if "roofline" in c else "-"
        lines.append(f"{k['kernel']:22s} {c['speedup_vs_stock']:8.3f} {c['memory_ratio_vs_stock']:7.3f} "
                     f"{c.get('speedup_vs_initial', float('nan')):8.3f} {c['fwd_bwd_ms']:9.3f} "
                     f"{s['fwd_bwd_ms']:9.3f} {c['peak_mb']:8.2f} {s['peak_mb']:8.2f} {roof:>13s}")
    lines.append("speedup/memory: stock / candidate (forward+backward time, peak memory: medians over rounds, "
                 "geometric means over cases); roofline: candidate/stock share of the "
                 f"{bench.get('copy_bandwidth_gb_s', 0):.0f} GB/s copy bandwidth (memory-bound kernels); "
                 f"{bench['dtype']} on {bench['device']}, candidate and references in separate processes, "
                 "the candidate checked against stock on every round")
    return "\n".join(lines)


def _cache_path(program_path):
    digest = hashlib.sha256(Path(program_path).read_bytes()).hexdigest()
    return cache_dir() / "stage2" / f"{digest}.json"


def write_cache(program_path, metrics, bench, seed):
    """Keep stage 2's result for this exact program text (stage 3 folds in the micro score)."""
    path = _cache_path(program_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {"version": CACHE_VERSION, "metrics": metrics, "bench": bench, "seed": seed, "time": time.time()}
    temporary = path.with_suffix(f".{os.getpid()}.tmp")
    temporary.write_text(json.dumps(entry))
    os.replace(temporary, path)


def cached(program_path):
    """Stage 2's entry for this exact program text, or None if it was not timed here yet."""
    try:
        entry = json.loads(_cache_path(program_path).read_text())
    except (OSError, ValueError):
        return None
    return entry if entry.get("version") == CACHE_VERSION else None
