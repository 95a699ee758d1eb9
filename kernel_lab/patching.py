"""Install a program's kernels into an mlx-lm model, in place (cf. Liger-Kernel's
`apply_liger_kernel_to_*`).

Modules keep their parameters and names; only their class is swapped for a
subclass whose `__call__` routes through the kernel, so adapters trained on a
patched model load in plain mlx-lm, and `restore_stock` swaps the classes back.

Two ways of routing:
- RMSNorm, RoPE, attention and SwiGLU modules run their own, unchanged `__call__`
  code with its globals rebound: `mx.fast.rms_norm` / `mx.fast.rope` /
  `scaled_dot_product_attention` / `swiglu` resolve to the kernel. This covers every
  family (nn.RMSNorm, Gemma's `1 + weight` norm, nn.RoPE and all of mlx-lm's `freqs`
  RoPE variants, each family's attention and MLP) without copying any of them, and
  whatever else that code does stays exactly as is.
- LoRA / DoRA linears get an explicit `__call__` that calls `lora_linear` /
  `dora_linear` with the module's tensors.
The training loss is returned as a function for `mlx_lm.tuner.trainer.train(loss=...)`.
Everything stays plain Python calls on mx arrays, so it traces under `mx.compile`.
"""

import re
import types

import mlx.core as mx
import mlx.nn as nn

from .loss_patch import _source, make_loss  # noqa: F401  (make_loss: part of this module's API)
from .patch_report import KINDS, PatchError, PatchReport  # noqa: F401  (part of this module's API)


# ---------------------------------------------------------------- rebinding


class _FastProxy:
    """Stands in for `mx.fast`: the patched names go to the kernels, the rest to MLX."""

    def __init__(self, overrides):
        self.__dict__.update(overrides)

    def __getattr__(self, name):
        return getattr(mx.fast, name)


class _MxProxy:
    """Stands in for the `mx` module inside one rebound `__call__`."""

    def __init__(self, fast):
        self.fast = fast

    def __getattr__(self, name):
        return getattr(mx, name)


def _rebind(fn, **names):
    """A copy of function `fn` whose global `names` are replaced."""
    glb = dict(fn.__globals__)
    glb.update(names)
    new = types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__qualname__ = fn.__qualname__
    return new


def _kernel_rms_norm(kernels):
    def rms_norm(x, weight, eps):
        return kernels.rms_norm(x, weight, eps)

    return rms_norm


def _kernel_rope(kernels):
    def rope(x, dims, *, traditional, base, scale, offset, freqs=None):
        return kernels.rope(
            x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs
        )

    return rope


def _kernel_attention(kernels, stock_sdpa):
    """mlx-lm's `scaled_dot_product_attention(q, k, v, cache, scale, mask, sinks)` through the
    kernel; a quantized KV cache or attention sinks (generation, gpt-oss) stay with mlx-lm's."""

    def scaled_dot_product_attention(queries, keys, values, cache=None, scale=1.0, mask=None,
                                     sinks=None):
        if sinks is not None or hasattr(cache, "bits"):
            return stock_sdpa(queries, keys, values, cache=cache, scale=scale, mask=mask,
                              sinks=sinks)
        return kernels.attention(queries, keys, values, scale=scale, mask=mask)

    return scaled_dot_product_attention


_WEIGHTLESS_NORM = re.compile(r"rms_norm\(\s*[^,()]+,\s*(weight\s*=\s*)?None\b")


def _classify(module):
    """(kind, reason): kind is what a rebinding can patch; reason says why not (or "")."""
    cls = type(module)
    fn = cls.__call__
    src = _source(fn)
    code = getattr(fn, "__code__", None)
    names = code.co_names if code else ()
    if "mx.fast.rms_norm(" in src:
        if src.count("mx.fast.rms_norm(") > 1:
            return "rms_norm", f"{cls.__name__} calls rms_norm more than once"
        if _WEIGHTLESS_NORM.search(src):
            return "rms_norm", f"{cls.__name__} normalizes without a weight (the kernel takes one)"
        return "rms_norm", ""
    if "mx.fast.rope(" in src:
        return "rope", ""
    if "scaled_dot_product_attention" in names:
        return "attention", ""
    if "swiglu" in names:
        return "swiglu", ""
    name = cls.__name__
    if "RMSNorm" in name:
        return "rms_norm", f"{name} does not call mx.fast.rms_norm directly"
    if "RoPE" in name or "Rotary" in name:
        return "rope", f"{name} does not call mx.fast.rope directly"
    if name.endswith("MLP"):
        acts = [n for n in ("gelu_approx", "gelu", "silu", "relu2", "relu") if n in names]
        if acts:
            what = "GeGLU" if acts[0].startswith("gelu") else f"{acts[0]} inline"
            return "swiglu", f"{name} is {what} ({acts[0]}), not a swiglu() call"
        return "swiglu", f"{name} has no swiglu() call"
    return None, ""


# ---------------------------------------------------------------- LoRA / DoRA


def _dropout_p(module):
    keep = getattr(module.dropout, "_p_1", 1.0)
    return 1.0 - keep


def _base_tensors(linear):
    """(weight, scales, biases, group_size, bits, bias) of an nn.Linear / affine QuantizedLinear."""
    bias = linear["bias"] if "bias" in linear else None
    if isinstance(linear, nn.QuantizedLinear):
        return (linear["weight"], linear["scales"], linear.get("biases"),
                linear.group_size, linear.bits, bias)
    return linear["weight"], None, None, None, None, bias


def _lora_call(self, x):
    w, scales, biases, group_size, bits, bias = _base_tensors(self.linear)
    return type(self)._kernels.lora_linear(
        x, w, scales, biases, self.lora_a, self.lora_b, self.scale,
        group_size=group_size, bits=bits, bias=bias,
    )


def _dora_call(self, x):
    w, scales, biases, group_size, bits, bias = _base_tensors(self.linear)
    return type(self)._kernels.dora_linear(
        x, w, scales, biases, self.lora_a, self.lora_b, self.scale, self.m,
        group_size=group_size, bits=bits, bias=bias,
    )


def _lora_unsupported(module):
    """Why a LoRA/DoRA module must stay stock, or ""."""
    linear = module.linear
    if _dropout_p(module) > 0:
        return f"dropout p={_dropout_p(module):g} (the kernel has no dropout)"
    if isinstance(linear, nn.QuantizedLinear):
        mode = getattr(linear, "mode", "affine")
        if mode != "affine":
            return f"base quantized in mode {mode!r} (the kernel takes affine scales/biases)"
        return ""
    if type(linear) is nn.Linear:
        return ""
    return f"base layer {type(linear).__name__} is neither nn.Linear nor nn.QuantizedLinear"


# ---------------------------------------------------------------- class swap

_CLASS_CACHE = {}


def _patched_class(cls, kind, kernels, call):
    """One subclass per (stock class, kernels): same name, new `__call__`."""
    key = (cls, kind, id(kernels))
    cached = _CLASS_CACHE.get(key)
    if cached is None or cached._kernels is not kernels:  # ids of dead objects get reused
        _CLASS_CACHE[key] = type(
            cls.__name__,
            (cls,),
            {
                "__call__": call,
                "__module__": cls.__module__,
                "_stock_class": cls,
                "_kernel_kind": kind,
                "_kernels": kernels,
            },
        )
    return _CLASS_CACHE[key]


def is_patched(module):
    return hasattr(type(module), "_stock_class")


def stock_class(module):
    """The mlx-lm class a (possibly patched) module had before patching."""
    return getattr(type(module), "_stock_class", type(module))


def restore_stock(model, kinds=None):
    """Swap patched modules back to their stock classes (all, or only `kinds`); returns a count."""
    n = 0
    for _, m in model.named_modules():
        if is_patched(m) and (kinds is None or type(m)._kernel_kind in kinds):
            m.__class__ = stock_class(m)
            n += 1
    return n


def patched_modules(model):
    """[(path, kind, module)] of every patched module, in the model's order."""
    return [(p, type(m)._kernel_kind, m) for p, m in model.named_modules() if is_patched(m)]


def _call_for(kind, cls, kernels):
    if kind == "rms_norm":
        fast = _FastProxy({"rms_norm": _kernel_rms_norm(kernels)})
        return _rebind(cls.__call__, mx=_MxProxy(fast))
    if kind == "rope":
        fast = _FastProxy({"rope": _kernel_rope(kernels)})
        return _rebind(cls.__call__, mx=_MxProxy(fast))
    if kind == "attention":
        stock_sdpa = cls.__call__.__globals__["scaled_dot_product_attention"]
        return _rebind(cls.__call__,
                       scaled_dot_product_attention=_kernel_attention(kernels, stock_sdpa))
    if kind == "swiglu":
        return _rebind(cls.__call__, swiglu=kernels.swiglu)
    raise AssertionError(kind)


def _lora_classes():
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    return LoRALinear, DoRALinear


# ---------------------------------------------------------------- entry point


def apply_kernels(model, kernels, *, loss=True):
    """Install `kernels` (a contract namespace) into `model` in place.

    Call it after `linear_to_lora_layers` so the LoRA/DoRA layers exist. Returns a
    PatchReport; with loss=True, `report.loss_fn` is the loss for `trainer.train`.
    A module already patched is re-patched with the new kernels.
    """
    if not isinstance(model, nn.Module) or not hasattr(model, "layers"):
        raise PatchError("apply_kernels needs an mlx-lm language model (an nn.Module with .layers)")
    LoRALinear, DoRALinear = _lora_classes()
    report = PatchReport(model_type=str(getattr(model, "model_type", type(model).__module__)))
    restore_stock(model)
    for path, module in model.named_modules():
        cls = type(module)
        if isinstance(module, (LoRALinear, DoRALinear)):
            kind = "dora_linear" if isinstance(module, DoRALinear) else "lora_linear"
            if cls not in (LoRALinear, DoRALinear):
                report.stock.append((path, kind, f"{cls.__name__} subclasses {kind}'s stock class"))
                continue
            why = _lora_unsupported(module)
            if why:
                report.stock.append((path, kind, why))
                continue
            call = _dora_call if kind == "dora_linear" else _lora_call
            module.__class__ = _patched_class(cls, kind, kernels, call)
            report.patched[kind] += 1
            continue
        kind, why = _classify(module)
        if kind is None or not callable(getattr(kernels, kind, None)):
            continue
        if why:
            report.stock.append((path, kind, why))
            continue
        module.__class__ = _patched_class(cls, kind, kernels, _call_for(kind, cls, kernels))
        report.patched[kind] += 1
    if loss:
        report.loss_fn, report.loss, report.loss_reason = make_loss(model, kernels)
    return report
