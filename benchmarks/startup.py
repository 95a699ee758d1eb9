"""Where a child process's start-up goes on this machine: each import and the device's first use,
in the order the evaluator's children meet them, in one fresh process per run.

    python benchmarks/startup.py [--runs 2]

Each line: seconds of that step (a fresh interpreter for each run, so the second run shows the
operating system's file cache warm). Which heavy packages each step pulled in is listed after it.
"""

import argparse
import subprocess
import sys

STEPS = [
    ("import mlx.core", "import mlx.core as mx"),
    ("first device op", "mx.eval(mx.zeros(1) + 1)"),
    ("first matmul", "mx.eval(mx.ones((256, 256)) @ mx.ones((256, 256)))"),
    ("import kernel_lab.correctness", "import kernel_lab.correctness"),
    ("import kernel_lab.microbench", "import kernel_lab.microbench"),
    ("import transformers", "import transformers"),
    ("import mlx_lm.tuner.trainer", "import mlx_lm.tuner.trainer"),
    ("first attention (bfloat16, 1x2x128x64)",
     "q = mx.ones((1, 2, 128, 64), mx.bfloat16); "
     "mx.eval(mx.fast.scaled_dot_product_attention(q, q, q, scale=0.125, mask='causal'))"),
]

CHILD = r"""
import sys, time
steps = {steps!r}
heavy = ("mlx_lm", "transformers", "torch", "numpy", "tokenizers")
for name, code in steps:
    before = set(m for m in heavy if m in sys.modules)
    tic = time.perf_counter()
    exec(code, globals())
    seconds = time.perf_counter() - tic
    new = sorted(set(m for m in heavy if m in sys.modules) - before)
    print(f"  {{name:42s}} {{seconds:7.3f}} s" + (f"  (+{{', '.join(new)}})" if new else ""), flush=True)
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args(argv)
    for run in range(args.runs):
        print(f"run {run + 1}:", flush=True)
        code = CHILD.format(steps=STEPS)
        subprocess.run([sys.executable, "-c", code], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
