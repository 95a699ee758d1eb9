"""Helpers for the float64 oracles: upcast inputs and run on the CPU stream.

float64 exists only on the CPU in MLX, so every oracle op is placed on `mx.cpu`
whatever the default device is; callers that differentiate an oracle (mx.vjp)
should do it inside `with mx.stream(mx.cpu)` as well.
"""

import functools

import mlx.core as mx


def upcast(value):
    """float64 copy of a floating mx.array; anything else unchanged."""
    if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
        return value.astype(mx.float64, stream=mx.cpu)
    return value


def float64_on_cpu(fn):
    """Decorator: call `fn` with floating array arguments upcast, on the CPU stream."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with mx.stream(mx.cpu):
            args = [upcast(a) for a in args]
            kwargs = {k: upcast(v) for k, v in kwargs.items()}
            return fn(*args, **kwargs)

    return wrapper


def dense_weight(weight, scales, biases, group_size, bits):
    """The float64 weight: dequantized when `scales` is given, else upcast."""
    if scales is None:
        return upcast(weight)
    if group_size is None or bits is None:
        raise ValueError("a quantized weight needs group_size and bits")
    return mx.dequantize(
        weight, upcast(scales), upcast(biases), group_size=group_size, bits=bits
    )
