"""How far legitimate programs' LoRA/DoRA gradients sit from stock's in the model's own dtype.

    python benchmarks/compute_gradcheck.py [--model smollm2-135m-q4] [--dtype bfloat16]
        [--layers 2 --batch 1 --length 32] [PROGRAM_OR_LEGIT_ENTRY ...]

Stage 3's gradient check compares in float32; its optional second pass in the model's dtype
(budget entry grad_check_compute, limits kernel_lab.gradcheck.COMPUTE_LIMITS) is off because
nobody has yet measured, on real models at training sizes on a GPU, how far legitimate programs
land there. This prints both passes' worst cosine and relative error per program and fine-tune
type. Arguments: program paths, or entries of tests/legit/legit_corpus.py (e.g.
optimized-cuda-adapters: the optimized program's CUDA paths forced on). Default: stock, the
optimized program and its CUDA adapters.
"""

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests" / "legit"):
    sys.path.insert(0, str(path))

# The float32 pass compares true float32, as stage 3's workers do: without this, CUDA runs float32
# matmuls in TF32 and every program's DoRA gradients already miss the float32 limits (an H200 run
# of this script, benchmarks/h200-2026-11-22e).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

import mlx.core as mx  # noqa: E402

from kernel_lab.contract import KERNEL_NAMES  # noqa: E402
from kernel_lab.gradcheck import COMPUTE_LIMITS, check_gradients  # noqa: E402
from kernel_lab.models import load_model  # noqa: E402
from kernel_lab.ops import STOCK  # noqa: E402
from kernel_lab.training import resolve_kernels  # noqa: E402

DEFAULT = ("stock", "examples/optimized_program.py", "optimized-cuda-adapters")


def kernels_for(name):
    """"stock", a program path, or a legit-corpus entry with stock for the kernels it leaves alone."""
    if name == "stock" or Path(name).suffix == ".py":
        return resolve_kernels(name if name == "stock" else ROOT / name)
    import legit_corpus

    kernels = {k: getattr(STOCK, k) for k in KERNEL_NAMES}
    kernels.update(legit_corpus.ENTRIES[name]())
    return SimpleNamespace(**kernels)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("programs", nargs="*", default=list(DEFAULT))
    ap.add_argument("--model", default="smollm2-135m-q4")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=2, help="LoRA/DoRA layers (-1: all)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--length", type=int, default=32, help="input tokens per row")
    a = ap.parse_args(argv)
    print(f"{a.model} {a.dtype} on {mx.default_device()}, {a.batch}x{a.length} tokens, layers "
          f"{a.layers}; compute-dtype limits: cosine >= {COMPUTE_LIMITS[0]}, rel. error <= "
          f"{COMPUTE_LIMITS[1]}", flush=True)
    print(f"{'program':34s} {'type':5s} {'float32 cos':>12s} {'rel err':>9s} {a.dtype + ' cos':>14s} "
          f"{'rel err':>9s}  ok  seconds", flush=True)
    # check_gradients puts the loaded weights back after each check: one model serves them all
    model, _ = load_model(a.model, dtype=a.dtype)
    vocab = model.model.embed_tokens.weight.shape[0]
    tokens = mx.random.randint(0, vocab, (a.batch, a.length + 1), key=mx.random.key(0))
    batches = [(tokens, mx.array([[0, a.length]] * a.batch))]
    for name in a.programs:
        kernels = kernels_for(name)
        for ftt in ("lora", "dora"):
            tic = time.perf_counter()
            r = check_gradients(model, kernels, batches, fine_tune_type=ftt, num_layers=a.layers,
                                rank=8, compute_dtype=True)
            c = r.get("compute") or {}
            print(f"{name:34s} {ftt:5s} {r.get('grad_cosine_min', float('nan')):12.6f} "
                  f"{r.get('grad_rel_err_max', float('nan')):9.2e} "
                  f"{c.get('grad_cosine_min', float('nan')):14.6f} "
                  f"{c.get('grad_rel_err_max', float('nan')):9.2e}  {'yes' if r['ok'] else 'NO':3s} "
                  f"{time.perf_counter() - tic:7.0f}", flush=True)
            if r.get("error"):
                print(f"  {r['error'].splitlines()[0]}", flush=True)


if __name__ == "__main__":
    main()
