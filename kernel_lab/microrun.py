"""Micro-benchmarks across processes: the coordinator (no MLX here; it runs in the evaluator).

`run(programs, reference=...)` starts one sandbox Session per program (a "candidate" worker: audited,
its kernel compared with stock every round) and one reference worker (stock, and the starting
program) that never imports a candidate; then, for each kernel and bench case:
1. compile and warm-up: every worker runs `warmup` untimed rounds, all at the same time;
2. timed rounds: the coordinator draws fresh random input seeds (`secrets`) for each round and calls
   the workers one at a time, rotating which goes first so that drift hits every side alike; a call
   times k rounds (k sized from the warm-up so that a call takes about TARGET_CALL_SECONDS) and
   synchronizes the device before it answers, so only one process is timed at a time. A candidate
   worker that uses CPU while another worker is timed (a thread, asynchronous work) fails;
3. until every side has `repeats` samples and the timed phase of the case took `min_seconds` (at
   most `max_repeats` samples). Per side and case: median time and median peak memory; per kernel,
   geometric means over cases and ratios against stock; for memory-bound kernels the share of the
   copy bandwidth measured once in the reference worker (the roofline).
Cross-checks each round, here, outside the candidate's process (where its code could have changed
the harness's state): the inputs (shapes, dtypes) are the reference's, the compiled steps run are
those prepared, stock's results and the program's (sampled values) agree with stock's in the
reference process within the limits; after each case, nobody changed the workers' scheduling
priority or CPU affinity. The comparison limits come from the reference worker.
"""

import math
import secrets
import statistics
import time
from pathlib import Path

import psutil

from .sandbox import Session, wait_all

WORKER = "kernel_lab.microbench"
TARGET_CALL_SECONDS = 0.3  # timed work per call: per-call overhead (IPC, polling) stays ~10%
MAX_ROUNDS_PER_CALL = 16
CALL_TIMEOUT = 300.0  # seconds, one call (compiling a case on a cold GPU included)
IDLE_CPU_SECONDS, IDLE_CPU_SHARE = 0.1, 0.2  # CPU a waiting candidate worker may use: max of these
MIN_PEAK_BYTES = 1024  # floor for memory ratios (a peak can be ~0 for an in-place-ish kernel)
# Calls of a kernel inside one compiled graph, on its first case at 1x8 tokens (checked against stock
# each): about what one layer-by-layer training trace makes (SmolLM2: 61 RMSNorms, 60 RoPEs, 30
# attentions and SwiGLUs, 7 adapted linears x 30 layers, one loss), so a kernel that counts its
# calls is caught.
GRAPH_CALLS = {"rms_norm": 64, "rope": 64, "attention": 32, "swiglu": 32, "cross_entropy": 4,
               "linear_cross_entropy": 4, "lora_linear": 64, "dora_linear": 64}
# glibc malloc (MLX's CPU allocator): keep freed memory instead of unmapping or trimming it, so that
# a timed call does not pay page faults that depend on what ran before it. Measured on the 2-core
# CPU: the same stock rms_norm took 23 ms alone and 18 ms beside another kernel without these, 13-16
# ms with them. Ignored off glibc; GPU backends have their own buffer caches.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**40),
              "MALLOC_TOP_PAD_": str(256 * 2**20)}


class MicroError(Exception):
    """A worker failed, or a program was caught; the message names who, kernel, case and what."""

    def __init__(self, message, task=None):
        super().__init__(message)
        self.task = task


class _Side:
    """One worker process: its Session, role, implementations' labels and scheduling at start."""

    def __init__(self, name, role, programs, memory_limit):
        self.name, self.role, self.programs = name, role, programs
        self.labels = list(programs)
        self.session = Session(memory_limit=memory_limit, env=WORKER_ENV)
        self.process = psutil.Process(self.session.proc.pid)
        self.scheduling = self.sched()  # before any program is imported

    def cpu(self):
        try:
            t = self.process.cpu_times()
        except psutil.Error:
            return 0.0
        return t.user + t.system + t.children_user + t.children_system

    def sched(self):
        try:
            affinity = sorted(self.process.cpu_affinity()) if hasattr(self.process, "cpu_affinity") else None
            return self.process.nice(), affinity
        except psutil.Error:
            return None

    def who(self):
        if self.role == "candidate":
            return "the program" if self.name == "candidate" else f"the program {self.name}"
        return f"the reference worker ({', '.join(self.labels)})"


def _seed():
    return secrets.randbelow(2**31 - 1)


def _fail(side, doing, task):
    error = (task.error or "failed").removeprefix("KernelFailure: ").removeprefix("PendingWork: ")
    return MicroError(f"{side.who()} failed while {doing}: {error}", task)


def _call(side, function, kwargs, deadline, doing):
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise MicroError(f"the micro-benchmarks ran out of time while {doing}")
    task = side.session.call(f"{WORKER}:{function}", kwargs, timeout=min(CALL_TIMEOUT, remaining))
    if not task.ok:
        raise _fail(side, doing, task)
    return task.value


def _call_all(sides, function, kwargs_of, deadline, doing):
    """The same call in every worker at once (nothing is timed meanwhile)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise MicroError(f"the micro-benchmarks ran out of time while {doing}")
    for side in sides:
        side.session.submit(f"{WORKER}:{function}", kwargs_of(side))
    tasks = wait_all([s.session for s in sides], timeout=min(CALL_TIMEOUT, remaining))
    for side, task in zip(sides, tasks):
        if not task.ok:
            raise _fail(side, doing, task)
    return [t.value for t in tasks]


UNTIMED = "stock-untimed"  # kernel_lab.microbench.UNTIMED: a worker's untimed stock step


def _digest_error(digest, reference):
    """max |sampled a - b| (and of max|.|) / reference max|.|: digests of one output in two processes."""
    (values, top), (ref_values, ref_top) = digest, reference
    diff = max([abs(a - b) for a, b in zip(values, ref_values)] + [abs(top - ref_top)])
    return diff / ref_top if ref_top > 0 else diff


def _cross_check(side, ref_rows, rows, spec, step_ids, kernel, case_name):
    """A candidate worker's rounds against the reference's, seed by seed. Checked here, outside the
    candidate's process, so that nothing it changes there can hide it: the same inputs, the same
    compiled steps as prepared, stock's results equal to the reference's (within the limits) and the
    program's results close to them too (at the sampled positions)."""
    where = f"{kernel} on {case_name}"
    for ref_row, row in zip(ref_rows, rows):
        if row["inputs"] != ref_row["inputs"]:
            raise MicroError(f"{side.who()} changed the benchmark inputs in its process ({where}): "
                             f"{row['inputs']} != {ref_row['inputs']}")
        if row["step_ids"] != step_ids:
            raise MicroError(f"{side.who()} replaced the compiled steps the harness runs ({where})")
        reference = ref_row["digests"]["stock"]
        for label, digest in row["digests"].items():
            for name, limit, part, ref_part in zip(spec["names"], spec["limits"], digest, reference):
                error = _digest_error(part, ref_part)
                if error <= limit:
                    continue
                if label == UNTIMED:
                    raise MicroError(f"{side.who()} changed what it is compared with: stock's {name} in its "
                                     f"process differs from stock's in the reference process by {error:.3g} "
                                     f"x max|stock| ({where})")
                raise MicroError(f"{label} kernel {kernel} is wrong in benchmark case {case_name}: its {name} "
                                 f"differs from stock's in the reference process by {error:.3g} x max|stock| "
                                 f"> {limit:.3g} at sampled positions")


def _bench_case(sides, kernel, case, spec, options, deadline, log):
    """Warm up, then time rounds until enough samples; one row of per-side medians."""
    where = f"{kernel} on {case['name']}"
    index = next(i for i, c in enumerate(spec["cases"]) if c is case)
    checks = {"names": spec["names"], "limits": spec["limits"][index]}
    graph_calls = GRAPH_CALLS.get(kernel, 8) if index == 0 else 0
    preps = _call_all(sides, "prepare", lambda s: {"kernel": kernel, "case": case, **checks,
                                                    "graph_calls": graph_calls if s.role == "candidate" else 0,
                                                    "seeds": [_seed() for _ in range(options["warmup"])]},
                      deadline, f"compiling and warming up {where}")
    round_seconds = max([p["round_seconds"] for p in preps if p["round_seconds"] is not None] or [1.0])
    per_call = max(TARGET_CALL_SECONDS / max(round_seconds, 1e-4), 1)
    samples = {label: {"ms": [], "peak": []} for s in sides for label in s.labels}
    count, turn, idle, started = 0, 0, 0.0, time.monotonic()
    while count < options["repeats"] or (time.monotonic() - started < options["min_seconds"]
                                         and count < options["max_repeats"]):
        seeds = [_seed() for _ in range(int(min(per_call, MAX_ROUNDS_PER_CALL)))]
        results = {}
        for side in sides[turn % len(sides):] + sides[:turn % len(sides)]:
            waiting = [s for s in sides if s is not side and s.role == "candidate"]
            before = [s.cpu() for s in waiting]
            start = time.monotonic()
            value = _call(side, "measure", {"seeds": seeds, "first_round": options["warmup"] + count, **checks},
                          deadline, f"timing {where}")
            elapsed = time.monotonic() - start
            for s, used in zip(waiting, (s.cpu() - b for s, b in zip(waiting, before))):
                idle = max(idle, used)
                if used > max(IDLE_CPU_SECONDS, IDLE_CPU_SHARE * elapsed):
                    raise MicroError(f"{s.who()} kept working ({used:.2f} s of CPU) while another process "
                                     f"was timed ({where}): threads or asynchronous work left running")
            results[side.name] = value["rounds"]
            for row in value["rounds"]:
                for label in side.labels:
                    samples[label]["ms"].append(row[label]["ms"])
                    samples[label]["peak"].append(row[label]["peak"])
        for side, prep in zip(sides[1:], preps[1:]):
            _cross_check(side, results[sides[0].name], results[side.name], checks, prep["step_ids"], kernel,
                         case["name"])
        count += len(seeds)
        turn += 1
    for side in sides:
        if side.sched() != side.scheduling:
            raise MicroError(f"the scheduling (nice, CPU affinity) of {side.who()} changed from "
                             f"{side.scheduling} to {side.sched()} ({where}): a program may not "
                             "reprioritize processes")
    row = {"case": case["name"], "tokens": list(case["tokens"]), "repeats": count, "bytes": preps[0]["bytes"],
           "idle_cpu_s": idle}
    for label, s in samples.items():
        row[label] = {"fwd_bwd_ms": statistics.median(s["ms"]), "peak_mb": statistics.median(s["peak"]) / 2**20,
                      "fwd_bwd_spread": _spread(s["ms"]), "peak_mb_max": max(s["peak"]) / 2**20}
    log(f"  {kernel:22s} {case['name']:40s} x{count:<3d}" + "  ".join(
        f"{label} {row[label]['fwd_bwd_ms']:.3f} ms / {row[label]['peak_mb']:.1f} MB" for label in samples)
        + f"  (idle CPU {idle:.2f} s)")
    return row


def _spread(samples):
    """Interquartile range / median of the samples: how noisy this measurement was."""
    if len(samples) < 2:
        return 0.0
    low, _, high = statistics.quantiles(samples, n=4)
    median = statistics.median(samples)
    return (high - low) / median if median > 0 else 0.0


def _geomean(values):
    return math.exp(sum(math.log(v) for v in values) / len(values))


def summarize(kernel, rows, labels, bandwidth=None):
    """Per-kernel figures: geometric means over cases, ratios against stock (and initial), rooflines."""
    result = {"kernel": kernel, "cases": rows}
    floor_mb = MIN_PEAK_BYTES / 2**20
    for row in rows:
        for label in labels:
            if row.get("bytes") and bandwidth:
                row[label]["roofline"] = row["bytes"] / (row[label]["fwd_bwd_ms"] / 1e3) / bandwidth
    for label in labels:
        result[label] = {
            "fwd_bwd_ms": _geomean([r[label]["fwd_bwd_ms"] for r in rows]),
            "peak_mb": _geomean([max(r[label]["peak_mb"], floor_mb) for r in rows]),
        }
        if all("roofline" in r[label] for r in rows):
            result[label]["roofline"] = statistics.median(r[label]["roofline"] for r in rows)
        if label == "stock":
            continue
        result[label]["speedup_vs_stock"] = _geomean(
            [r["stock"]["fwd_bwd_ms"] / r[label]["fwd_bwd_ms"] for r in rows])
        result[label]["memory_ratio_vs_stock"] = _geomean(
            [max(r["stock"]["peak_mb"], floor_mb) / max(r[label]["peak_mb"], floor_mb) for r in rows])
        if "initial" in labels and label != "initial":
            result[label]["speedup_vs_initial"] = _geomean(
                [r["initial"]["fwd_bwd_ms"] / r[label]["fwd_bwd_ms"] for r in rows])
    return result


def run(programs, *, reference, names=None, dtype=None, repeats=5, warmup=2, min_seconds=2.0,
        max_repeats=40, timeout=420.0, memory_limit=None, log=None):
    """Benchmark each program {label: path} against `reference` {label: path or None (stock)}.

    Returns {"dtype", "device", "kernels": [summarize(...)], "copy_bandwidth_gb_s", ...}; raises
    MicroError naming who failed (or cheated), the kernel, case and what."""
    log = log or (lambda line: None)
    programs = {label: str(Path(path).resolve()) for label, path in programs.items()}
    reference = {label: path and str(Path(path).resolve()) for label, path in reference.items()}
    labels = list(reference) + list(programs)
    if "stock" not in reference or len(set(labels)) != len(labels):
        raise ValueError(f"the reference must include 'stock' and labels must be unique: {labels}")
    deadline = time.monotonic() + timeout
    options = dict(repeats=repeats, warmup=warmup, min_seconds=min_seconds, max_repeats=max_repeats)
    sides = []
    try:
        sides.append(_Side("reference", "reference", reference, memory_limit))
        sides += [_Side(label, "candidate", {label: path}, memory_limit) for label, path in programs.items()]
        info = _call_all(sides, "start", lambda s: {"role": s.role, "programs": s.programs, "dtype": dtype},
                         deadline, "importing the programs")[0]
        cases = _call(sides[0], "cases", {"names": names}, deadline, "listing the bench cases")
        bandwidth = _call(sides[0], "bandwidth", {}, deadline, "measuring the copy bandwidth")
        log(f"micro-benchmarks on {info['device']} in {info['dtype']}: {', '.join(labels)}, each program in "
            f"its own process; >= {repeats} rounds (+{warmup} warm-up) and >= {min_seconds:g} s a case")
        kernels = []
        for kernel, spec in cases.items():
            start = time.monotonic()
            rows = [_bench_case(sides, kernel, case, spec, options, deadline, log) for case in spec["cases"]]
            kernels.append(summarize(kernel, rows, labels, bandwidth))
            log(f"  {kernel}: {time.monotonic() - start:.1f} s")
    finally:
        for side in sides:
            side.session.close()
    return {"dtype": info["dtype"], "device": info["device"], "mlx": info["mlx"], "repeats": repeats,
            "compiled": True, "processes": "separate", "kernels": kernels,
            "copy_bandwidth_gb_s": bandwidth / 1e9}
