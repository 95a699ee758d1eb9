"""Checks of the micro-benchmark workers (kernel_lab.microbench): results against stock's.

`compare` judges a candidate's timed output and gradients against stock's on the same inputs;
`digest` condenses results so that two processes can be compared; `in_one_graph` calls a kernel on
several inputs inside ONE compiled graph, as a training step calls it once per layer (a kernel that
keeps state between calls, memoizes by shape or counts its calls, is wrong there).
"""

import math

import mlx.core as mx

from kernel_lab import shapes

PROBES = 64  # values sampled per output and gradient in a result's digest
TOLERANCE_FACTOR = 2.0  # times correctness.tolerance: candidate vs stock on the same inputs


def compare(kernel, result, reference, names, limits, dtype):
    """How (output, grads) differs from stock's beyond the limits ('what: why'), or None."""
    from kernel_lab.correctness import FLOAT32_LOSS

    values = [result[0], *result[1]]
    refs = [reference[0], *reference[1]]
    if len(values) != len(refs):
        return f"{len(values) - 1} gradients where stock has {len(refs) - 1}"
    for what, value, ref in zip(names, values, refs):
        if not isinstance(value, mx.array):
            return f"{what} is a {type(value).__name__}, not an mx.array"
        if tuple(value.shape) != tuple(ref.shape):
            return f"{what} shape {tuple(value.shape)} != stock's {tuple(ref.shape)}"
        allowed = {ref.dtype} | ({mx.float32} if kernel in FLOAT32_LOSS and what == "output" else set())
        if value.dtype not in allowed:
            return f"{what} dtype {value.dtype} != stock's {ref.dtype}"
    stats = [_errors(value, ref) for value, ref in zip(values, refs)]
    mx.eval(stats)
    for what, limit, value, ref, (diff, scale, total) in zip(names, limits, values, refs,
                                                              (s.tolist() for s in stats)):
        if not math.isfinite(scale):  # stock is not finite everywhere: judge where it is
            diff, scale, total = _masked_errors(value, ref)
        if not math.isfinite(total):
            return f"{what} has NaN or inf where stock's is finite"
        error = diff / scale if scale > 0 else diff
        if not error <= limit:
            return (f"{what} differs from stock's on the same inputs by {error:.3g} x max|stock| "
                    f"> {limit:.3g} ({TOLERANCE_FACTOR:g} x the {dtype} tolerance)")
    return None


def _errors(value, ref):
    """[max|v - r|, max|r|, sum|v - r|] in float32 (a NaN or inf in v makes the sum non-finite on
    every backend, whatever a max reduction does with NaN)."""
    v, r = value.astype(mx.float32), ref.astype(mx.float32)
    d = mx.abs(v - r)
    return mx.stack([mx.max(d), mx.max(mx.abs(r)), mx.sum(d)])


def _masked_errors(value, ref):
    """_errors where stock's values are finite (the sum is inf when v is not finite there)."""
    v, r = value.astype(mx.float32), ref.astype(mx.float32)
    finite = mx.isfinite(r)
    lost = mx.any(mx.logical_and(finite, mx.logical_not(mx.isfinite(v))))
    d = mx.where(finite, mx.abs(v - r), 0.0)
    stats = mx.stack([mx.max(d), mx.max(mx.where(finite, mx.abs(r), 0.0)),
                      mx.where(lost, float("inf"), mx.sum(d))])
    return stats.tolist()


def digest(result, seed):
    """[[PROBES values at random positions, max|.|] per output and gradient]: stock's results in
    brief, for the coordinator to compare across processes (same seed, same positions)."""
    key = mx.random.key(seed ^ 0xD16E57)
    parts = []
    for array in [result[0], *result[1]]:
        flat = array.reshape(-1).astype(mx.float32)
        positions = mx.random.randint(0, flat.size, (PROBES,), key=key)
        parts.append((flat[positions], mx.max(mx.abs(flat))))
    mx.eval(parts)
    return [[values.tolist(), top.item()] for values, top in parts]


def in_one_graph(kernel, kernel_fn, stock_fn, case, dtype, seeds, calls, names, limits):
    """Problem text (or None) unless each of `calls` calls of kernel_fn (forward+backward) inside ONE
    compiled graph matches stock's on the same inputs; the calls cycle through one input set a seed."""
    from kernel_lab.microsteps import forward_backward, gather, make_step

    inputs = [shapes.make_inputs(kernel, case, dtype, seed) for seed in seeds]
    steps = [forward_backward(kernel_fn, *inp) for inp in inputs]
    stock = make_step(stock_fn, *inputs[0])
    gathered = [gather(args, kwargs)(args, kwargs) for args, kwargs, _ in inputs]
    out = stock_fn(*inputs[0][0], **inputs[0][1])  # lazy: the cotangent's shape and dtype
    cotangents = [mx.random.normal(out.shape, key=mx.random.key(seed ^ 0x5EED)).astype(out.dtype) for seed in seeds]
    references = [stock(cot, *arrays) for cot, arrays in zip(cotangents, gathered)]
    count = len(gathered[0])

    def all_calls(*flat):
        cots, arrays = flat[:len(seeds)], flat[len(seeds):]
        return [steps[i % len(seeds)](cots[i % len(seeds)], *arrays[(i % len(seeds)) * count:][:count])
                for i in range(calls)]

    results = mx.compile(all_calls)(*cotangents, *[a for arrays in gathered for a in arrays])
    mx.eval(results, references)
    for which, result in enumerate(results):
        problem = compare(kernel, result, references[which % len(seeds)], names, limits, dtype)
        if problem:
            return (f"call {which + 1} of {calls} in one compiled graph (a training step calls a kernel "
                    f"once per layer): {problem}")
    return None
