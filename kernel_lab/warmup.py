"""Fill MLX's compiled-kernel cache on a new GPU machine, in parallel, before anything is judged.

MLX's CUDA backend compiles its kernels at first use (NVRTC, one CPU core each) and keeps them in
MLX_PTX_CACHE_DIR (kernel_lab.machine.ptx_cache_dir). Stage 1 checks every kernel in three dtypes
with 4/5/8-bit bases and group sizes 32/64, and every such quantized matmul is a kernel of its own:
measured on an H200, stage 1 of a cold machine ran past 900 s, 10-40 s per new LoRA/DoRA case.
`run()` does that compiling once, spread over the machine's cores: a queue of jobs, one per
(kernel, dtype, bits x group size), longest first, served by one child per core, each checking
stock's and the starting program's kernels on stage 1's cases into its private cache folder (MLX
writes its cache files in place, so children that compile the same kernel must not share a
folder), then merged into the shared one, each .ptx last
(MLX takes a .ptx as the sign that its .txt is complete). A marker file says it is done; on the CPU
there is nothing to compile and the marker is written at once.
"""

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .sandbox import Session, ptx_cache_dir
from .stage1 import ENV as STAGE1_ENV  # compile as stage 1 runs: true float32

MARKER = "kernel_lab-warmup.json"


def cache_folder():
    return Path(os.environ.get("MLX_PTX_CACHE_DIR") or ptx_cache_dir())


def is_warm():
    return (cache_folder() / MARKER).is_file()


# ------------------------------------------------------------------ in a child


def device():
    """'cpu' or 'gpu': where this child's MLX runs."""
    import mlx.core as mx

    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def variants(kernel):
    """Stage 1's (bits, group size) pairs for a quantized `kernel`, else [None]."""
    from .cases import BITS, GROUP_SIZES, HEAD_BITS

    if kernel not in ("lora_linear", "dora_linear", "linear_cross_entropy"):
        return [None]
    bits = HEAD_BITS if kernel == "linear_cross_entropy" else BITS
    return [(b, g) for b in bits for g in GROUP_SIZES]


def compile_kernel(kernel, dtype, program=None, variant=None):
    """Run stock's (and `program`'s) `kernel` through stage 1's checks; seconds.

    `variant` = [bits, group size] limits quantized cases to that base (the unquantized cases run
    with the first variant), so one kernel's compiling can be spread over several children."""
    from . import correctness
    from .contract import load_program
    from .ops import STOCK

    start = time.perf_counter()
    impls = [getattr(STOCK, kernel)] + ([getattr(load_program(program), kernel)] if program else [])
    pairs = variants(kernel)
    chosen = [tuple(variant)] if variant else pairs
    for case in correctness.cases_for(kernel, "default"):
        if dtype not in correctness.case_dtypes(case, (dtype,)):
            continue
        if case.get("quantized"):
            todo = [dict(case, bits=b, group_size=g) for b, g in chosen]
        else:
            todo = [case] if (variant is None or tuple(variant) == pairs[0]) else []
        for one in todo:
            for fn in impls:
                try:
                    correctness.check_case(fn, kernel, one, dtype, seed=0)
                except correctness.CheckFailure:
                    pass  # compiling is the point; stage 1 itself judges
    return time.perf_counter() - start


# ------------------------------------------------------------------ the evaluator's side


def _merge(private, shared):
    """Copy what `private` holds and `shared` lacks, atomically, .txt/.cu before each .ptx."""
    copied = 0
    files = sorted((p for p in Path(private).rglob("*") if p.is_file()), key=lambda p: p.suffix == ".ptx")
    for source in files:
        target = shared / source.relative_to(private)
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, temporary)
        os.replace(temporary, target)
        copied += 1
    return copied


def run(program=None, *, parallel=None, timeout=3600.0, log=print):
    """Compile stage 1's kernels for stock (and `program`) in parallel children; a summary dict.

    Does nothing (but report) when the marker says it was done for this cache folder."""
    from .contract import KERNEL_NAMES

    shared = cache_folder()
    shared.mkdir(parents=True, exist_ok=True)
    if is_warm():
        return {"skipped": True, "cache": str(shared)}
    start = time.monotonic()
    with Session(env=STAGE1_ENV) as probe:
        where = probe.call("kernel_lab.warmup:device", timeout=600)
    if not where.ok:
        return {"error": f"warm-up: {where.error}"}
    # quantized matmuls first: they compile longest (longest job first keeps the cores busy)
    jobs = [(k, d, v) for k in sorted(KERNEL_NAMES, key=lambda k: variants(k) == [None])
            for d in ("float32", "bfloat16", "float16") for v in variants(k)]
    if where.value == "gpu":
        parallel = parallel or max(1, min(len(jobs), (os.cpu_count() or 2) - 1))
        log(f"[warm-up] compiling stage 1's kernels in {parallel} children into {shared} (once per machine)")
        _compile(jobs, program, parallel, shared, timeout, log)
    (shared / MARKER).write_text(json.dumps({"device": where.value, "seconds": time.monotonic() - start,
                                             "time": time.time()}))
    return {"device": where.value, "seconds": time.monotonic() - start, "cache": str(shared)}


def _compile(jobs, program, parallel, shared, timeout, log):
    program = str(Path(program).resolve()) if program else None
    scratch = Path(tempfile.mkdtemp(prefix="kernel_lab_warmup_"))
    try:
        folders = [scratch / str(i) for i in range(parallel)]
        sessions = [Session(env={**STAGE1_ENV, "MLX_PTX_CACHE_DIR": str(f)}) for f in folders]
        try:
            pending, running = list(jobs), {}
            while pending or running:
                for session in sessions:
                    if session not in running and pending and session.dead is None:
                        kernel, dtype, variant = job = pending.pop(0)
                        session.submit("kernel_lab.warmup:compile_kernel", {
                            "kernel": kernel, "dtype": dtype, "program": program, "variant": variant})
                        running[session] = (job, session._call_start + timeout)
                for session, (job, deadline) in list(running.items()):
                    result = session._poll(deadline)
                    if result is not None:
                        del running[session]
                        state = f"{result.value:.0f} s" if result.ok else f"failed: {result.error}"
                        name = " ".join(str(part) for part in job if part is not None)
                        log(f"[warm-up] {name}: {state} ({len(pending)} to start)")
                if running:
                    time.sleep(0.2)
                if pending and not running and all(s.dead is not None for s in sessions):
                    log(f"[warm-up] every child failed; {len(pending)} jobs not run")
                    break
        finally:
            for session in sessions:
                session.close()
        copied = sum(_merge(f, shared) for f in folders if f.exists())
        log(f"[warm-up] {copied} compiled modules added to {shared}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
