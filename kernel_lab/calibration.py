"""`python -m kernel_lab.correctness`: check a program, or measure the errors the tolerances rest on.

    python -m kernel_lab.correctness [PROGRAM] [--seed S]       # stage 1's check, as a table
    python -m kernel_lab.correctness --calibrate --seeds 20 [PROGRAM ...]

--calibrate runs stock (and each PROGRAM) on every case and dtype for seeds 0..N-1, like stage 1
(compiled forward+vjp, same references), and prints per kernel, dtype and direction the worst
error in units of u(dtype) + u32 * growth(case), i.e. the C a tolerance needs for it to pass (the
coefficient in use beside it). Cases where MLX's own quantized matmul runs in half precision on
the CPU are listed apart ("qmm-bound"): there the stock term carries the check, not C.
"""

import argparse
import sys

import mlx.core as mx

from . import correctness as c
from .cases import on_accelerator
from .contract import KERNEL_NAMES, load_program
from .ops import STOCK
from .references import normalized_error, reference
from .tolerances import COEFFICIENTS, model_tolerance


def _qmm_bound(kernel, case, dtype):
    """MLX's quantized matmul in half precision on the CPU: stock itself is far off there."""
    return (not on_accelerator() and dtype != "float32" and case.get("quantized")
            and kernel in ("linear_cross_entropy", "lora_linear", "dora_linear"))


def case_units(fn, kernel, case, dtype, seed):
    """{kind: worst error in model units} of one implementation on one case (compiled vjp)."""
    args, kwargs, argnums = c.shapes.make_inputs(kernel, case, dtype, seed)
    expected = getattr(STOCK, kernel)(*args, **kwargs)
    step, arrays = c.compiled_vjp(fn, args, kwargs, argnums)
    cotangent = mx.random.normal(expected.shape, key=mx.random.key(seed ^ 0x5EED))
    out, grads = step(cotangent.astype(fn(*args, **kwargs).dtype), *arrays)
    mx.eval(out, grads)
    ref_out, ref_grads = reference(kernel, case, args, kwargs, argnums, cotangent.astype(out.dtype))
    units = {}
    for kind, value, ref in [("forward", out, ref_out)] + [("grad", g, r) for g, r in zip(grads, ref_grads)]:
        err = normalized_error(value, ref, bool(case.get("large")))[1]
        unit = model_tolerance(kernel, case, dtype, kind) / COEFFICIENTS[kernel][kind]
        if case.get("large"):
            unit += model_tolerance(kernel, case, "float32", kind) / COEFFICIENTS[kernel][kind]
        units[kind] = max(units.get(kind, 0.0), err / unit)
    return units


def calibrate(impls, seeds, shape_set="default", dtypes=c.DEFAULT_DTYPES, names=None):
    """{(kernel, dtype, kind, group): (units, impl, case, seed)}, group "model" or "qmm-bound".

    impls: {label: namespace or dict of kernels}; an implementation lacking a kernel is skipped."""
    worst = {}
    for kernel in names or KERNEL_NAMES:
        for seed in seeds:
            for case in c.cases_for(kernel, shape_set, seed):
                for dtype in c.case_dtypes(case, dtypes):
                    s = c.case_seed(seed, kernel, case["name"], dtype)
                    group = "qmm-bound" if _qmm_bound(kernel, case, dtype) else "model"
                    for label, ns in impls.items():
                        fn = ns.get(kernel) if isinstance(ns, dict) else getattr(ns, kernel, None)
                        if fn is None:
                            continue
                        for kind, u in case_units(fn, kernel, case, dtype, s).items():
                            key = (kernel, dtype, kind, group)
                            if u > worst.get(key, (-1.0,))[0]:
                                worst[key] = (u, label, case["name"], seed)
    return worst


def print_units(worst, seeds):
    """One line per (kernel, dtype, direction, group): the worst units and where (seeds: a range)."""
    print(f"# worst error in units of u(dtype) + u32*growth over seeds {seeds[0]}..{seeds[-1]} "
          f"on {mx.default_device()}: units (C in use) implementation case seed")
    for (kernel, dtype, kind, group), (u, label, case, seed) in sorted(worst.items()):
        print(f"{kernel:21s} {dtype:9s} {kind:8s} {group:9s} {u:9.3g} (C {COEFFICIENTS[kernel][kind]:g})"
              f"  {label}  {case}  seed {seed}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("programs", nargs="*", help="program file(s) (default: stock kernels)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape-set", default="default", choices=("smoke", "default", "full"))
    parser.add_argument("--calibrate", action="store_true", help="measure errors in model units")
    parser.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 for --calibrate")
    parser.add_argument("--names", help="comma-separated kernels (default: all)")
    parser.add_argument("--dtypes", default=",".join(c.DEFAULT_DTYPES))
    opts = parser.parse_args(argv)
    names = opts.names.split(",") if opts.names else None
    dtypes = tuple(opts.dtypes.split(","))
    if opts.calibrate:
        impls = {"stock": STOCK, **{p: load_program(p) for p in opts.programs}}
        print_units(calibrate(impls, range(opts.seeds), opts.shape_set, dtypes, names), range(opts.seeds))
        return 0
    if len(opts.programs) > 1:
        parser.error("give one program to check (several only with --calibrate)")
    kernels = load_program(opts.programs[0]) if opts.programs else STOCK
    results = c.check_kernels(kernels, seed=opts.seed, shape_set=opts.shape_set, dtypes=dtypes, names=names)
    print(c.format_table(results))
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
