"""Stage 3's gradient check: a program's LoRA / DoRA gradients inside the real model against
stock mlx-lm's, before any training is timed.

In the candidate's worker, on the loaded model: cast to float32 (quantized weights stay as
they are), convert to LoRA / DoRA as training does, then give every `lora_b` random non-zero
values (mlx-lm starts it at 0, which makes every `lora_a` gradient 0 and hides a wrong one).
On a few batches of the timed shape, the gradient of every trainable tensor is computed twice,
each through `mx.compile` as mlx-lm's training step runs it: with stock mlx-lm (its layers and
`default_loss`) and with the program's kernels patched in. Per tensor
    cosine(g, g_stock) >= COSINE_MIN   and   ||g - g_stock|| / ||g_stock|| <= REL_ERR_MAX
must hold; a failure names the tensor (layer, module, lora_a / lora_b / m), both numbers, and
the kernel that reproduces it when patched in alone. The model is restored afterwards (LoRA
removed, the loaded weights put back), so training starts from exactly what was loaded.

Optionally (`compute_dtype=True`) the same comparison runs again in the model's own dtype
(bfloat16 on a GPU), with looser limits (COMPUTE_LIMITS): half-precision rounding makes legitimate
programs differ from stock by a few percent there (0.02-0.04 on the tiny test models), while a
gradient that is zeroed or halved only in that dtype is off by 0.5 or more.
"""

import time
import traceback
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .diagnose import explain_error, first_nonfinite_kernel
from .models import model_dtype
from .patching import KINDS, apply_kernels, restore_stock
from .training import LORA_SCALE, convert_to_lora, remove_lora

COSINE_MIN = 0.999
REL_ERR_MAX = 1e-2
COMPUTE_LIMITS = (0.98, 0.25)  # (cosine, relative error) in the compute dtype when not float32
LORA_B_SIZE = 0.1  # scale * lora_b entries: a LoRA update of ~10% of the base output


def grad_function(model, loss):
    """(batch, lengths) -> (loss, grads of the trainable parameters), compiled with the model's
    state as input and output, as mlx_lm.tuner.trainer.train compiles its step (value_and_grad
    writes the traced parameters into the model)."""
    value_and_grad = nn.value_and_grad(model, loss)
    state = [model.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def grads(batch, lengths):
        (value, _), g = value_and_grad(model, batch, lengths)
        return value, g

    return grads


def randomize_lora_b(model, seed, scale=LORA_SCALE):
    """Non-zero random `lora_b` in every LoRA / DoRA layer (normal, std LORA_B_SIZE / scale)."""
    mx.random.seed(seed)
    found = [(path, m) for path, m in model.named_modules() if "lora_b" in m]
    for _, module in found:
        b = module["lora_b"]
        module["lora_b"] = (mx.random.normal(b.shape) * (LORA_B_SIZE / scale)).astype(b.dtype)
    return len(found)


def compare(stock, cand):
    """[(tensor name, cosine, relative error)] of two gradient trees, in stock's order.

    Non-finite values count as the worst: cosine -1, relative error inf."""
    flat_stock, flat_cand = tree_flatten(stock), dict(tree_flatten(cand))
    stats = []
    for name, ref in flat_stock:
        got = flat_cand.get(name)
        if got is None or got.shape != ref.shape:
            got = mx.full(ref.shape, float("nan"))
        a, b = ref.astype(mx.float32).reshape(-1), got.astype(mx.float32).reshape(-1)
        stats.append(mx.stack([(a * b).sum(), mx.linalg.norm(a), mx.linalg.norm(b),
                               mx.linalg.norm(b - a)]))
    rows = []
    values = np.array(mx.stack(stats), dtype=np.float64) if stats else []
    for (name, _), (dot, n_ref, n_got, n_diff) in zip(flat_stock, values):
        if not np.isfinite([dot, n_ref, n_got, n_diff]).all():
            cos, rel = -1.0, float("inf")
        elif n_ref == 0:
            cos, rel = (1.0, 0.0) if n_got == 0 else (0.0, float("inf"))
        else:
            cos = dot / (n_ref * n_got) if n_got > 0 else 0.0
            rel = n_diff / n_ref
        rows.append((name, float(cos), float(rel)))
    return rows


def failing(rows, limits=(COSINE_MIN, REL_ERR_MAX)):
    """The rows that break a limit."""
    return [r for r in rows if not (r[1] >= limits[0] and r[2] <= limits[1])]


def _describe(row, limits):
    name, cos, rel = row
    if cos == -1.0 and rel == float("inf"):
        return f"{name}: non-finite or missing gradient"
    return (f"{name}: cosine {cos:.4f} (needs >= {limits[0]}), relative error {rel:.3g} "
            f"(needs <= {limits[1]:g})")


def _alone(model, kernels, batch, bad_names, limits, default_loss):
    """The first kernel kind that, patched in alone, breaks one of `bad_names` again."""
    _, reference = grad_function(model, default_loss)(*batch)
    for kind in KINDS:
        report = apply_kernels(model, kernels)
        restore_stock(model, kinds=set(KINDS) - {kind})
        try:
            if kind != "loss" and not report.patched.get(kind):
                continue
            _, grads = grad_function(model, report.loss_fn if kind == "loss" else default_loss)(*batch)
            if any(r[0] in bad_names for r in failing(compare(reference, grads), limits)):
                return kind
        except Exception:  # noqa: BLE001 - a kernel that raises on its own is the culprit too
            return kind
        finally:
            restore_stock(model)
    return None


def _check_in(model, kernels, batches, dtype, limits, result):
    """One comparison with the model's floating parameters in `dtype` (LoRA layers already on)."""
    from mlx_lm.tuner.trainer import default_loss

    what = f"{result['fine_tune_type']}, {dtype}, {len(batches)} batch(es) of " \
           f"{'x'.join(map(str, result['shape']))} tokens"
    stock_fn = grad_function(model, default_loss)
    stock = [stock_fn(*b)[1] for b in batches]
    mx.eval(stock)
    cand_fn = grad_function(model, apply_kernels(model, kernels).loss_fn)
    rows, where = [], None
    for i, batch in enumerate(batches):
        try:
            _, grads = cand_fn(*batch)
            mx.eval(grads)
        except Exception as e:  # noqa: BLE001 - a kernel that breaks inside the model
            kind, path, at = explain_error(e, model, kernels, batch)
            return dict(kernel=kind, module=path, traceback=traceback.format_exc(limit=-8),
                        error=f"the kernels fail inside the model{at}: {type(e).__name__}: {e}")
        batch_rows = compare(stock[i], grads)
        if where is None and failing(batch_rows, limits):
            where = i
        rows = batch_rows if not rows else [
            (n, min(c, c2), max(r, r2)) for (n, c, r), (_, c2, r2) in zip(rows, batch_rows)]
    bad = failing(rows, limits)
    found = dict(tensors=len(rows), failures=len(bad), grad_cosine_min=min(r[1] for r in rows),
                 grad_rel_err_max=max(r[2] for r in rows),
                 worst=[list(r) for r in sorted(rows, key=lambda r: -r[2])[:3]])
    if not bad:
        return found
    nonfinite = next((r for r in bad if r[1] == -1.0 and r[2] == float("inf")), None)
    if nonfinite is not None:  # name the layer whose forward goes non-finite first, if one does
        kind, path = first_nonfinite_kernel(model, kernels, batches[where])
        if kind is not None:
            return dict(found, kernel=kind, module=path, error=(
                f"gradient check failed ({what}): {_describe(nonfinite, limits)}; first "
                f"non-finite output from kernel {kind} at {path} (forward)"))
    restore_stock(model)
    kind = _alone(model, kernels, batches[where], {r[0] for r in bad}, limits, default_loss)
    blame = (f"; kernel {kind} patched in alone reproduces it" if kind
             else "; no single kernel reproduces it alone")
    return dict(found, kernel=kind, error=(
        f"gradient check failed ({what}): {_describe(bad[0], limits)}; {len(bad)} of {len(rows)} "
        f"trainable tensors off{blame}"))


def check_gradients(model, kernels, batches, *, fine_tune_type="lora", num_layers=2, rank=8,
                    scale=LORA_SCALE, seed=0, compute_dtype=False):
    """Compare the patched model's trainable gradients with stock mlx-lm's, in float32 (then, with
    compute_dtype, in the model's own dtype too); a JSON-able dict: ok, grad_cosine_min,
    grad_rel_err_max (float32), tensors, failures, worst, error, kernel, seconds, compute."""
    tic = time.perf_counter()
    pristine = tree_flatten(model.parameters())
    floats = sorted({str(v.dtype) for _, v in pristine if mx.issubdtype(v.dtype, mx.floating)})
    own = model_dtype(model)
    result = {"ok": False, "fine_tune_type": fine_tune_type, "batches": len(batches),
              "shape": list(batches[0][0].shape), "dtype": "float32",
              "model_dtype": ",".join(floats), "error": None}
    passes = [(mx.float32, (COSINE_MIN, REL_ERR_MAX))]
    if compute_dtype and own != mx.float32:
        passes.append((own, COMPUTE_LIMITS))
    try:
        for dtype, limits in passes:
            model.set_dtype(dtype)  # floating parameters only: packed quantized weights stay
            convert_to_lora(model, fine_tune_type=fine_tune_type, num_layers=num_layers, rank=rank,
                            scale=scale, seed=seed)
            randomize_lora_b(model, seed + 1, scale)
            mx.eval(model.parameters())
            found = _check_in(model, kernels, batches, str(dtype).rpartition(".")[2], limits, result)
            if dtype == mx.float32:
                result.update(found)
            else:
                result["compute"] = {k: v for k, v in found.items() if k != "traceback"}
                result.update({k: found[k] for k in ("error", "kernel") if k in found})
            _restore(model, pristine)
            if result["error"]:
                return result
        result["ok"] = True
        return result
    finally:
        _restore(model, pristine)
        result["seconds"] = time.perf_counter() - tic


def _restore(model, pristine):
    """LoRA off, the loaded parameters (and their dtype) back."""
    restore_stock(model)
    remove_lora(model)
    model.update(tree_unflatten(pristine))
    mx.eval(model.parameters())
    mx.clear_cache()
