"""Compiled forward+backward steps and their timing, for the micro-benchmark workers.

`make_step` compiles a kernel's forward+backward as mlx-lm's training step runs it (`mx.vjp` w.r.t.
the case's differentiable inputs inside `mx.compile`); `timed` runs a step with outputs and
gradients evaluated inside the timed region and measures its peak memory above what was active
before; `sync_all` waits for all device work of this process, streams a program created included
(`track_streams` wraps mx.new_stream & co. before a program is imported).
"""

import time

import mlx.core as mx

from kernel_lab import shapes

_clock = time.perf_counter  # bound before any candidate is imported
_STREAMS = []  # streams created in this process


def track_streams():
    """Wrap mx.new_stream & co. so that `sync_all` also waits for streams a program creates."""
    for name in ("new_stream", "new_thread_local_stream", "new_thread_unsafe_stream"):
        original = getattr(mx, name, None)
        if original is None or getattr(original, "_kernel_lab_tracked", False):
            continue

        def tracked(*args, _original=original, **kwargs):
            stream = _original(*args, **kwargs)
            _STREAMS.append(stream)
            return stream

        tracked._kernel_lab_tracked = True
        setattr(mx, name, tracked)


def sync_all():
    """Wait for all work this process launched; returns the seconds waited."""
    start = _clock()
    for device in (mx.default_device(), mx.cpu):
        mx.synchronize(device)
    for stream in _STREAMS:
        mx.synchronize(stream)
    return _clock() - start


def _slots(args, kwargs):
    """Where the array inputs are: [("arg", i) | ("kw", name)] (the rest are Python constants)."""
    return [("arg", i) for i, a in enumerate(args) if isinstance(a, mx.array)] + \
        [("kw", k) for k, v in kwargs.items() if isinstance(v, mx.array)]


def gather(args, kwargs):
    """A function picking the array inputs (passed to the compiled step) from (args, kwargs)."""
    slots = _slots(args, kwargs)
    return lambda a, k: [a[i] if kind == "arg" else k[i] for kind, i in slots]


def forward_backward(kernel_fn, args, kwargs, grad_argnums):
    """(cotangent, *arrays) -> (output, grads): the vjp w.r.t. the case's differentiable inputs, the
    arrays passed in, the Python constants (eps, dims, group size ...) closed over."""
    slots = _slots(args, kwargs)
    args = [None if isinstance(a, mx.array) else a for a in args]  # arrays come with each call
    kwargs = {k: None if isinstance(v, mx.array) else v for k, v in kwargs.items()}

    def step(cotangent, *arrays):
        full_args, full_kwargs = list(args), dict(kwargs)
        for (kind, i), value in zip(slots, arrays):
            if kind == "arg":
                full_args[i] = value
            else:
                full_kwargs[i] = value
        return shapes.vjp_at(kernel_fn, full_args, full_kwargs, grad_argnums, cotangent)

    return step


def make_step(kernel_fn, args, kwargs, grad_argnums):
    """The mx.compile'd `forward_backward`, as mlx-lm compiles its training step."""
    return mx.compile(forward_backward(kernel_fn, args, kwargs, grad_argnums))


def timed(fn, *inputs):
    """Run fn and evaluate what it returns: (result, seconds, peak bytes above what was active)."""
    mx.enable_compile()  # a program may have switched compilation off while it was traced
    mx.synchronize()
    mx.reset_peak_memory()
    active_before = mx.get_active_memory()
    start = _clock()
    result = fn(*inputs)
    mx.eval(result)
    mx.synchronize()
    seconds = _clock() - start
    return result, seconds, max(mx.get_peak_memory() - active_before, 0)
