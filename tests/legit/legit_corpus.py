"""The legit corpus: honest alternative programs that stage 1 must accept on every seed.

    python tests/legit/legit_corpus.py --seeds 0-19                 # every entry, on this machine's device
    python tests/legit/legit_corpus.py --seeds 0-4 --names dense-base,optimized-dense-base

Entries: the variants of legit_kernels.py (each checked only on the kernels it replaces), the stock
kernels, the starting program, and examples/optimized_program.py as it runs here and with its
other platforms' paths forced on (dense dequantize + matmul bases as on CUDA, the token-chunked
loss with a custom VJP, mx.fast.cross_entropy as on a GPU). `run()` returns the failures;
the CLI exits 1 if there is any. Run it on the CPU, Metal and CUDA alike.
"""

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("MLX_ENABLE_TF32", "0")  # float32 checks in true float32 (read when MLX starts)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (ROOT, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import mlx.core as mx  # noqa: E402

import legit_kernels as legit  # noqa: E402
from kernel_lab.contract import KERNEL_NAMES, kernels_from_module, load_module, load_program  # noqa: E402
from kernel_lab.correctness import DEFAULT_DTYPES, check_kernels, format_failure  # noqa: E402
from kernel_lab.ops import STOCK  # noqa: E402

OPTIMIZED = ROOT / "examples" / "optimized_program.py"
INITIAL = ROOT / "initial_program.py"


def optimized(**overrides):
    """examples/optimized_program.py's kernels with module attributes replaced (paths forced)."""
    module = load_module(OPTIMIZED)
    for name, value in overrides.items():
        if not hasattr(module, name):
            raise AttributeError(f"optimized_program.py has no {name}")
        setattr(module, name, value)
    return vars(kernels_from_module(module))


def _three_chunks(n_rows, vocab):
    return max(1, -(-n_rows // 3))  # every case runs the chunked loss, in three chunks


ENTRIES = {
    **{name: (lambda kernels=kernels: kernels) for name, kernels in legit.VARIANTS.items()},
    "stock": lambda: vars(STOCK),
    "initial-program": lambda: vars(load_program(INITIAL)),
    "optimized": lambda: optimized(),
    "optimized-dense-base": lambda: {k: v for k, v in optimized(_dense_base=lambda: True).items()
                                     if k in ("linear_cross_entropy", "lora_linear", "dora_linear")},
    "optimized-chunked-loss": lambda: {"linear_cross_entropy": optimized(_chunk_rows=_three_chunks)[
        "linear_cross_entropy"]},
    "optimized-chunked-loss-dense-base": lambda: {"linear_cross_entropy": optimized(
        _chunk_rows=_three_chunks, _dense_base=lambda: True)["linear_cross_entropy"]},
    "optimized-gpu-cross-entropy": lambda: {"cross_entropy": optimized(
        cross_entropy=legit.fast_cross_entropy)["cross_entropy"]},
    # The adapters as they run on a GPU: half-precision low-rank product, with and without the
    # dense base (CUDA) or the quantized one (Metal).
    "optimized-half-lora": lambda: {k: v for k, v in optimized(
        _half_lora=_half_dtypes).items() if k in ("lora_linear", "dora_linear")},
    # Attention as on CUDA (causal lengths padded to a multiple of 128) and on Metal (blockwise
    # recomputed backward, blocks small enough that the cases span several).
    "optimized-padded-attention": lambda: {"attention": optimized(
        _pad_attention=lambda: True)["attention"]},
    "optimized-blockwise-attention": lambda: {"attention": optimized(
        _blockwise_attention_backward=lambda: True, ATTENTION_BLOCK=128)["attention"]},
    "optimized-cuda-adapters": lambda: {k: v for k, v in optimized(
        _half_lora=_half_dtypes, _dense_base=lambda: True).items()
        if k in ("lora_linear", "dora_linear")},
}


def _half_dtypes(dtype):
    return dtype in (mx.bfloat16, mx.float16)


def run(seeds, names=None, dtypes=DEFAULT_DTYPES, shape_set="default",
        log=partial(print, flush=True)):
    """Check each entry's kernels on every seed; returns failure lines (empty: all passed).

    Entries on one seed share inputs and references (check_kernels' cache). One progress line
    per seed: each seed draws new shapes, which a cold GPU compiles for minutes."""
    entries = {name: ENTRIES[name]() for name in names or ENTRIES}
    failures, seconds, start_all = [], dict.fromkeys(entries, 0.0), time.perf_counter()
    for done, seed in enumerate(seeds, 1):
        cache = {}
        for name, kernels in entries.items():
            start = time.perf_counter()
            results = check_kernels(kernels, seed=seed, shape_set=shape_set, dtypes=dtypes, cache=cache,
                                    names=[k for k in KERNEL_NAMES if k in kernels])
            failures += [f"{name} seed {seed}: {format_failure(r)}" for r in results if not r["passed"]]
            seconds[name] += time.perf_counter() - start
        log(f"seed {seed} ({done}/{len(seeds)}): {len(entries)} entries checked, "
            f"{len(failures)} failures so far, {time.perf_counter() - start_all:.0f} s")
    for name, kernels in entries.items():
        log(f"{name:36s} {','.join(k for k in KERNEL_NAMES if k in kernels):60s} {seconds[name]:6.1f} s")
    return failures


def parse_seeds(text):
    """'0-19' or '1,5,7' -> a list of ints."""
    if "-" in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0-19", help="'0-19' or '1,5,7'")
    parser.add_argument("--names", help=f"comma-separated entries (default all): {', '.join(ENTRIES)}")
    parser.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES))
    parser.add_argument("--shape-set", default="default", choices=("default", "full"))
    parser.add_argument("--calibrate", action="store_true",
                        help="print each entry's worst error in tolerance-model units instead")
    opts = parser.parse_args(argv)
    print(f"legit corpus on {mx.default_device()}, MLX_ENABLE_TF32={os.environ['MLX_ENABLE_TF32']}",
          flush=True)
    if opts.calibrate:
        from kernel_lab.calibration import calibrate, print_units

        seeds = parse_seeds(opts.seeds)
        impls = {name: ENTRIES[name]() for name in (opts.names.split(",") if opts.names else ENTRIES)}
        print_units(calibrate(impls, seeds, opts.shape_set, tuple(opts.dtypes.split(","))), seeds)
        return 0
    failures = run(parse_seeds(opts.seeds), opts.names.split(",") if opts.names else None,
                   tuple(opts.dtypes.split(",")), opts.shape_set)
    print("\n".join(failures) if failures else "all passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
