"""What stage 1 compares a kernel with: references, and the errors of what MLX ships.

reference(): the float64 ORACLE on the kernel's own (rounded) inputs and cotangent, on the CPU
stream; for large cases STOCK run in float32 on the same values, on the default device.
stock_errors(): the normalized error of the STOCK kernel on the same inputs (and, for DoRA on a
quantized base, of mx.quantized_matmul, which a kernel may use where stock dequantizes).
"""

import mlx.core as mx

from . import shapes
from .ops import ORACLE, STOCK
from .ops._float64 import upcast


def normalized_error(out, ref, on_device=False):
    """(max |out - ref|, that divided by max |ref|): float64 on the CPU, or float32 on the
    default device for large tensors (resolving errors down to ~1e-6 is all a check needs)."""
    with mx.stream(mx.default_device() if on_device else mx.cpu):
        convert = (lambda a: a.astype(mx.float32)) if on_device else upcast
        abs_err = mx.max(mx.abs(convert(out) - convert(ref))).item()
        scale = mx.max(mx.abs(convert(ref))).item()
    return abs_err, abs_err / scale if scale > 0 else abs_err


def run(fn, args, kwargs, grad_argnums, cotangent):
    """Forward output and vjp grads of fn w.r.t. args[grad_argnums], evaluated (eagerly)."""
    out, grads = shapes.vjp_at(fn, args, kwargs, grad_argnums, cotangent)
    mx.eval(out, grads)
    return out, grads


def _as_float32(value):
    if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
        return value.astype(mx.float32)
    return value


def reference(kernel, case, args, kwargs, grad_argnums, cotangent):
    """(output, grads) to compare with: the float64 oracle, or stock in float32 for large cases."""
    if case.get("large"):
        args32 = [_as_float32(a) for a in args]
        kwargs32 = {k: _as_float32(v) for k, v in kwargs.items()}
        return run(getattr(STOCK, kernel), args32, kwargs32, grad_argnums, _as_float32(cotangent))
    with mx.stream(mx.cpu):
        return run(getattr(ORACLE, kernel), [upcast(a) for a in args], kwargs, grad_argnums,
                   upcast(cotangent))


def _primitive_errors(args, kwargs, cotangent):
    """Normalized errors of mx.quantized_matmul (x @ W.T, and cotangent @ W) on these inputs,
    against float64 on the CPU."""
    x, weight, scales, biases = args[:4]
    q = dict(group_size=kwargs["group_size"], bits=kwargs["bits"])
    with mx.stream(mx.cpu):
        w64 = mx.dequantize(weight, upcast(scales), upcast(biases), **q)
        ref_y, ref_dx = upcast(x) @ w64.T, upcast(cotangent) @ w64
    y = mx.quantized_matmul(x, weight, scales, biases, transpose=True, **q)
    dx = mx.quantized_matmul(cotangent, weight, scales, biases, transpose=False, **q)
    return max(normalized_error(y, ref_y)[1], normalized_error(dx, ref_dx)[1])


def stock_errors(kernel, case, args, kwargs, grad_argnums, cotangent, ref_out, ref_grads):
    """[forward error, grad errors...] of what MLX ships on these inputs (see module docstring)."""
    large = bool(case.get("large"))
    out, grads = run(getattr(STOCK, kernel), args, kwargs, grad_argnums, cotangent)
    errors = [normalized_error(v, r, large)[1] for v, r in zip([out, *grads], [ref_out, *ref_grads])]
    if kernel == "dora_linear" and kwargs.get("bits") is not None:
        primitive = _primitive_errors(args, kwargs, cotangent.astype(out.dtype))
        errors = [max(e, primitive) for e in errors]
    return errors
