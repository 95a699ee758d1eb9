"""Does stage 2's micro score order programs as real fine-tuning (stage 3's macro score) does?

    python benchmarks/micro_vs_macro.py write DIR          # single-kernel variant programs
    python -m kernel_lab.benchmark DIR/*.py initial_program.py examples/optimized_program.py \
        --budget gpu --model smollm2-135m-q4 --fine-tune-type lora --out DIR/run
    python benchmarks/micro_vs_macro.py analyze DIR/run/benchmark.json

`write` makes, for each base (the starting and the optimized program) and each kernel that runs
in training, a program with that one kernel from the base and stock MLX / mlx-lm's everywhere
else. `analyze` prints every program's micro and macro score (kernel_lab.score over the
benchmark's measurements), both rankings, Spearman's rank correlation and the pairs the micro
score orders the other way round.
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASES = {"initial": ROOT / "initial_program.py", "optimized": ROOT / "examples" / "optimized_program.py"}
# Kernels a LoRA step of the llama / qwen2 models calls (cross_entropy is not: the patched loss
# is linear_cross_entropy; dora_linear only in DoRA runs).
TRAINING_KERNELS = ("rms_norm", "rope", "attention", "swiglu", "linear_cross_entropy", "lora_linear")

TEMPLATE = '''"""{base} program's {kernel}; stock MLX / mlx-lm everywhere else (benchmarks/micro_vs_macro.py)."""
from kernel_lab.contract import load_module
from kernel_lab.ops import STOCK

_BASE = load_module({path!r})
{assignments}
'''


def write(directory):
    from kernel_lab.contract import KERNEL_NAMES

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for base, path in BASES.items():
        for kernel in TRAINING_KERNELS:
            lines = [f"{name} = _BASE.{name}" if name == kernel else f"{name} = STOCK.{name}"
                     for name in KERNEL_NAMES]
            target = directory / f"{base}_{kernel}.py"
            target.write_text(TEMPLATE.format(base=base, kernel=kernel, path=str(path),
                                              assignments="\n".join(lines)))
            written.append(target)
    print("\n".join(str(p) for p in written))
    return written


def spearman(a, b):
    """Spearman's rank correlation of two equally long lists (no ties expected)."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0] * len(values)
        for rank, i in enumerate(order):
            result[i] = rank
        return result

    ra, rb, n = ranks(a), ranks(b), len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def analyze(path):
    from kernel_lab import benchmark

    payload = json.loads(Path(path).read_text())
    table = benchmark.scores(payload["macro"], payload["micro"])
    rows = [(side, e["micro"], e["macro"]) for side, e in table.items() if "micro" in e and "macro" in e]
    rows.sort(key=lambda r: r[2], reverse=True)
    print(f"{'program':32s} {'micro':>7s} {'macro':>7s}")
    for side, micro, macro in rows:
        print(f"{side:32s} {micro:7.3f} {macro:7.3f}")
    rho = spearman([r[1] for r in rows], [r[2] for r in rows])
    flipped = [(a[0], b[0]) for i, a in enumerate(rows) for b in rows[i + 1:]
               if (a[1] - b[1]) * (a[2] - b[2]) < 0]
    print(f"\nSpearman rank correlation micro vs macro over {len(rows)} programs: {rho:.3f}")
    print(f"pairs the micro score orders against the macro score: {len(flipped)} of "
          f"{len(rows) * (len(rows) - 1) // 2}")
    for a, b in flipped:
        print(f"  {a} > {b} in fine-tuning, < in micro")
    return rho


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("write").add_argument("directory")
    sub.add_parser("analyze").add_argument("json")
    args = parser.parse_args(argv)
    if args.command == "write":
        write(args.directory)
    else:
        analyze(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
