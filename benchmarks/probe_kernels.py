"""Kernel probe for issue 11: attention and LoRA variants at SmolLM2 / Qwen2.5 training shapes.

    python benchmarks/probe_kernels.py [--only attention|lora] [-B 8] [--json out.json]

Each variant: forward+backward (mx.vjp w.r.t. its activations and trainable inputs, random
cotangent) inside mx.compile, bfloat16 on a GPU (float32 on the CPU), median ms of --reps after
3 warm-ups, and peak memory above the inputs. The variants' code is in benchmarks/variants.py.
Compare rows of one run only (one process, one machine).
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mlx.core as mx  # noqa: E402

import variants  # noqa: E402

SHAPES = {  # (hidden, intermediate, heads, kv heads, head dim)
    "smollm2": (576, 1536, 9, 3, 64),
    "qwen05": (896, 4864, 14, 2, 64),
}


def timed(fn, inputs, cotangent, argnums, reps):
    def fwd_bwd(cot, *xs):
        return mx.vjp(lambda *p: fn(*[p[argnums.index(i)] if i in argnums else xs[i]
                                      for i in range(len(xs))]),
                      [xs[i] for i in argnums], [cot])
    step = mx.compile(fwd_bwd)
    times = []
    for r in range(reps + 3):
        mx.synchronize()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        tic = time.perf_counter()
        mx.eval(step(cotangent, *inputs))
        mx.synchronize()
        if r >= 3:
            times.append(time.perf_counter() - tic)
    return 1e3 * statistics.median(times), (mx.get_peak_memory() - base) / 2**20


def attention_rows(model, B, L, dtype, reps):
    _, _, hq, hkv, d = SHAPES[model]
    key = mx.random.key(L)
    q, k, v = (mx.random.normal((B, h, L, d), key=mx.random.split(key, 3)[i]).astype(dtype)
               for i, h in enumerate((hq, hkv, hkv)))
    cot = mx.random.normal(q.shape).astype(dtype)
    mx.eval(q, k, v, cot)
    rows = []
    for name, fn in variants.ATTENTION.items():
        ms, mb = timed(lambda q, k, v: fn(q, k, v, scale=d ** -0.5, mask="causal"),
                       [q, k, v], cot, [0, 1, 2], reps)
        rows.append(dict(kind="attention", model=model, shape=f"{B}x{hq}x{L}x{d}", variant=name,
                         ms=round(ms, 3), peak_mb=round(mb, 1)))
    return rows


def lora_rows(model, B, L, dtype, reps):
    hidden, inter, *_ = SHAPES[model]
    rows = []
    for n_in, n_out in ((hidden, hidden), (hidden, inter), (inter, hidden)):
        key = mx.random.split(mx.random.key(n_in * n_out), 4)
        w = mx.random.normal((n_out, n_in), key=key[0]) * n_in ** -0.5
        wq, s, b = mx.quantize(w, group_size=64, bits=4)
        s, b = s.astype(dtype), b.astype(dtype)
        x = mx.random.normal((B, L, n_in), key=key[1]).astype(dtype)
        a = mx.random.uniform(-n_in ** -0.5, n_in ** -0.5, (n_in, 8), key=key[2])
        lb = mx.random.normal((8, n_out), key=key[3]) * 0.01
        cot = mx.random.normal((B, L, n_out)).astype(dtype)
        mx.eval(wq, s, b, x, a, lb, cot)
        for name, fn in variants.LORA.items():
            ms, mb = timed(lambda x, a, lb: fn(x, wq, s, b, a, lb, 20.0, group_size=64, bits=4),
                           [x, a, lb], cot, [0, 1, 2], reps)
            rows.append(dict(kind="lora", model=model, shape=f"{B * L}x{n_in}->{n_out}",
                             variant=name, ms=round(ms, 3), peak_mb=round(mb, 1)))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("attention", "lora"))
    ap.add_argument("-B", type=int, default=None)
    ap.add_argument("--lengths", default="1023,1024")
    ap.add_argument("--models", default="smollm2,qwen05")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    gpu = mx.default_device() == mx.gpu
    dtype = mx.bfloat16 if gpu else mx.float32
    B = args.B or (8 if gpu else 1)
    lengths = [int(n) for n in args.lengths.split(",")] if gpu else [127]
    rows = []
    for model in args.models.split(","):
        for L in lengths:
            if args.only in (None, "attention"):
                rows += attention_rows(model, B, L, dtype, args.reps)
        if args.only in (None, "lora"):
            rows += lora_rows(model, B, max(lengths), dtype, args.reps)
    print(f"{mx.default_device()} {dtype}")
    for r in rows:
        print(f"{r['kind']:9s} {r['model']:8s} {r['shape']:18s} {r['variant']:22s} "
              f"{r['ms']:9.3f} ms {r['peak_mb']:9.1f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
