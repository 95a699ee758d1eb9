"""A copy of a program whose device checks say CUDA, to count its compiled step on the CPU.

    python benchmarks/cuda_paths_on_cpu.py [--keep-weights] examples/optimized_program.py /tmp/as_cuda.py
    python benchmarks/profile_step.py --program /tmp/as_cuda.py --dtype bfloat16 --batch 1 \
        --length 32 --layers 4 --steps 1 --warmup 1 --no-parts

The optimized program picks its code paths at run time (`_cuda()`, `_half_lora()`, the GPU's
`mx.fast.cross_entropy`); with them forced, `profile_step.py`'s primitive count of the step runs the
CUDA paths' graph on a CPU. The CPU build splits some primitives that CUDA runs as one
(dequantize, the mx.fast fallbacks), so compare programs counted the same way, not with GPU counts.
`--keep-weights` also forces the backward to keep every dequantized weight, the branch taken where
a weight is at most half the size of the layer's input (SmolLM2 at 4 x 1023 tokens and up), which
a CPU counts at 32 tokens in seconds instead of at thousands in many minutes.
"""

import argparse
from pathlib import Path

SWAPS = [
    ("def _cuda():\n    return mx.default_device() == mx.gpu and mx.cuda.is_available()",
     "def _cuda():\n    return True"),
    ("return dtype in (mx.bfloat16, mx.float16) and mx.default_device() == mx.gpu",
     "return dtype in (mx.bfloat16, mx.float16)"),
    ("    if mx.default_device() == mx.gpu:\n        return mx.fast.cross_entropy",
     "    if True:\n        return mx.fast.cross_entropy"),
]


KEEP_WEIGHTS = ("or 2 * weight.shape[0] <= x.shape[0]:", "or True:")


def as_cuda(source, keep_weights=False):
    """The source with every device check of SWAPS forced (and the backward's weight kept, with
    keep_weights); a check not found is an error."""
    for old, new in SWAPS + [KEEP_WEIGHTS] * keep_weights:
        if old not in source:
            raise SystemExit(f"not found in the program (is it the optimized program?):\n{old}")
        source = source.replace(old, new)
    return source


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("program")
    parser.add_argument("copy")
    parser.add_argument("--keep-weights", action="store_true",
                        help="the backward keeps every dequantized weight (see above)")
    args = parser.parse_args()
    Path(args.copy).write_text(as_cuda(Path(args.program).read_text(), keep_weights=args.keep_weights))
    print(f"wrote {args.copy}")
