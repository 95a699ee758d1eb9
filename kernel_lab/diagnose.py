"""Where a program's kernels go wrong inside a model: the kernel, the module path, the step.

Used by the training runs (`kernel_lab.training`), the gradient check (`kernel_lab.gradcheck`)
and stage 3's workers (`kernel_lab.trainworker`):
- `probe_forward` runs the patched loss eagerly with every kernel call recorded next to
  kernel_lab.ops.STOCK on the same inputs;
- `first_nonfinite_kernel` / `first_mismatch` name the first call that returns NaN/inf, raises
  or returns another shape than stock;
- `blame` names the innermost patched module on a traceback;
- `diagnose_nan` replays the report window that went NaN step by step;
- `explain_error` turns an exception raised with the kernels patched in into one line.
"""

import math
from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .patching import apply_kernels, patched_modules, restore_stock

BACKWARD_KINDS = ("rms_norm", "rope", "swiglu", "lora_linear", "dora_linear")


def all_finite(tree):
    return all(mx.all(mx.isfinite(v)).item() for _, v in tree_flatten(tree))


def probe_forward(model, kernels, batch):
    """Run the patched loss eagerly with every kernel call recorded.

    Returns ([(kernel, module path, output or None, stock output)], exception or None):
    each call also runs kernel_lab.ops.STOCK on the same inputs, and the path is that
    of the innermost patched module being called. The model is left patched as before.
    """
    from .contract import KERNEL_NAMES
    from .ops import STOCK

    records, stack = [], []

    def checked(name):
        def call(*args, **kwargs):
            ref = getattr(STOCK, name)(*args, **kwargs)
            where = stack[-1] if stack else "the training loss"
            records.append([name, where, None, ref])
            out = getattr(kernels, name)(*args, **kwargs)
            records[-1][2] = out
            return out

        return call

    probe_kernels = SimpleNamespace(**{n: checked(n) for n in KERNEL_NAMES})
    loss_fn = apply_kernels(model, probe_kernels).loss_fn
    for path, _, module in patched_modules(model):
        cls = type(module)

        def traced(self, *args, __cls=cls, __path=path, **kwargs):
            stack.append(__path)
            try:
                return __cls.__call__(self, *args, **kwargs)
            finally:
                stack.pop()

        module.__class__ = type(cls.__name__, (cls,), {"__call__": traced})
    error = None
    try:
        loss, _ = loss_fn(model, *batch)
        mx.eval(loss, [r[2] for r in records if r[2] is not None])
    except Exception as e:  # the failure being diagnosed
        error = e
    finally:
        apply_kernels(model, kernels, loss=False)  # also drops the tracing classes
    return records, error


def first_nonfinite_kernel(model, kernels, batch):
    """(kernel, path) of the first kernel call with a non-finite output in an eager forward."""
    records, _ = probe_forward(model, kernels, batch)
    for name, path, out, _ in records:
        if out is not None and not mx.all(mx.isfinite(out)).item():
            return name, path
    return None, None


def first_mismatch(model, kernels, batch):
    """(kernel, path, what) of the first kernel call that raises or returns another shape than stock."""
    records, _ = probe_forward(model, kernels, batch)
    for name, path, out, ref in records:
        if out is None:
            return name, path, "raised"
        if out.shape != ref.shape:
            return name, path, f"returned shape {tuple(out.shape)}, stock returns {tuple(ref.shape)}"
    return None, None, None


def backward_culprit(model, kernels, grads_finite):
    """The kernel kind whose revert to stock makes `grads_finite()` true, else None.

    The model stays patched with `kernels` afterwards."""
    for kind in BACKWARD_KINDS:
        if restore_stock(model, kinds={kind}) == 0:
            continue
        finite = grads_finite()
        apply_kernels(model, kernels, loss=False)
        if finite:
            return kind
    return None


def diagnose_nan(model, optimizer, recorder, loss_fn, kernels):
    """Replay the report window that went NaN, eagerly, and say where it starts.

    Restores the trainable state from the window start, re-runs its steps one by
    one to find the first with a non-finite loss or gradient, then names the first
    patched module with a non-finite output; if the forward is finite, reverts one
    kernel kind at a time to see whose backward produces it.
    """
    if recorder.snapshot is None or not recorder.window:
        return "no replay data"
    params, opt_state = recorder.snapshot
    model.update(params)
    optimizer.state = opt_state
    value_and_grad = nn.value_and_grad(model, loss_fn)
    for step, batch in recorder.window:
        (loss, _), grads = value_and_grad(model, *batch)
        if math.isfinite(loss.item()) and all_finite(grads):
            optimizer.update(model, grads)
            mx.eval(model.parameters(), optimizer.state)
            continue
        where = f"step {step}"
        if kernels is None:
            return f"{where}: non-finite with stock mlx-lm (the training itself diverges)"
        kind, path = first_nonfinite_kernel(model, kernels, batch)
        if kind is not None:
            return f"{where}: first non-finite output from kernel {kind} at {path} (forward)"
        kind = backward_culprit(model, kernels, lambda: all_finite(value_and_grad(model, *batch)[1]))
        if kind is not None:
            return f"{where}: non-finite gradients from the backward of kernel {kind}"
        return f"{where}: non-finite gradients (the loss kernel's backward, or several kernels)"
    return "the eager replay of the window stayed finite (not reproducible outside mx.compile)"


def blame(tb, model):
    """(kind, path) of the innermost patched module on a traceback, else (None, None)."""
    owners = {id(m): (kind, path) for path, kind, m in patched_modules(model)}
    found = (None, None)
    while tb is not None:
        frame = tb.tb_frame
        me = frame.f_locals.get("self")
        if me is not None and id(me) in owners:
            found = owners[id(me)]
        elif frame.f_code.co_name == "loss" and frame.f_globals.get("__name__") == "kernel_lab.patching":
            found = ("loss", "the training loss")
        tb = tb.tb_next
    return found


def explain_error(exc, model, kernels, batch):
    """(kernel, module path, ' in kernel K at P' or ': kernel K at P returned ...') for an
    exception raised while the kernels were patched in; (None, None, '') when unknown."""
    kind, path = blame(exc.__traceback__, model)
    where = f" in kernel {kind} at {path}" if kind else ""
    if kernels is not None and batch is not None:
        bad_kind, bad_path, what = first_mismatch(model, kernels, batch)
        if bad_kind is not None:
            return bad_kind, bad_path, f": kernel {bad_kind} at {bad_path} {what}"
    return kind, path, where
