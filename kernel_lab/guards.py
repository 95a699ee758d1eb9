"""Tamper guards: a candidate program must not change what the harness measures with.

`snapshot()` records the identity of every public attribute of the modules the harness relies on
(mlx.core and its fast / random submodules, mlx.nn losses, time, the reference kernels STOCK and
ORACLE, the correctness and benchmark code) and of the `sys.modules` entries themselves. Taken
before a candidate is imported, it is compared after the import and again after the candidate ran:
`verify(before, when)` raises `TamperError` naming each attribute that was replaced, added or removed
(e.g. "mlx.core.fast.rms_norm replaced"). Identity (`is`), not equality, so a wrapper that forwards to
the original is caught too; Python functions' `__code__` and defaults are watched as well.
Also watched: builtins (a patched `sorted` would run inside the harness), the thread and signal
functions (kernel_lab.audit wraps them before the snapshot: swapping the originals back is caught),
and the hooks through which Python calls code later (sys.meta_path / path_hooks entries,
gc.callbacks, sys.excepthook & co., trace and profile functions, signal handlers).
"""

import importlib
import sys
from types import FunctionType


# Modules whose attributes the harness calls while checking or timing a candidate.
WATCHED_MODULES = (
    "builtins",
    "_thread",
    "threading",
    "signal",
    "_signal",
    "mlx.core",
    "mlx.core.fast",
    "mlx.core.random",
    "mlx.core.linalg",
    "mlx.nn",
    "mlx.nn.losses",
    "mlx.nn.layers.activations",
    "mlx.nn.layers.quantized",
    "mlx.utils",
    "time",
    "gc",
    "statistics",
    "math",
    "json",
    "kernel_lab.contract",
    "kernel_lab.ops",
    "kernel_lab.ops.rms_norm",
    "kernel_lab.ops.rope",
    "kernel_lab.ops.swiglu",
    "kernel_lab.ops.cross_entropy",
    "kernel_lab.ops.lora_linear",
    "kernel_lab.ops.dora_linear",
    "kernel_lab.ops.attention",
    "kernel_lab.shapes",
    "kernel_lab.cases",
    "kernel_lab.tolerances",
    "kernel_lab.references",
    "kernel_lab.correctness",
    "kernel_lab.microbench",
    "kernel_lab.guards",
    "kernel_lab.score",
    "kernel_lab.worker",
    "kernel_lab.audit",
    "kernel_lab.microcheck",
    "kernel_lab.microsteps",
    "kernel_lab.bench_cases",
)
# Namespaces of functions (attributes of a watched module) whose own entries are watched too.
WATCHED_NAMESPACES = ("kernel_lab.ops.STOCK", "kernel_lab.ops.ORACLE")
# Classes whose methods the harness relies on (a candidate could swap e.g. mx.array.__matmul__).
WATCHED_CLASSES = ("mlx.core.array",)
# Attributes that legitimately change while code runs (state, not behaviour).
MUTABLE_STATE = {"mlx.core.random.state"}


class TamperError(Exception):
    """The candidate replaced something the harness measures with."""


def _resolve(dotted):
    module_name, _, attribute = dotted.rpartition(".")
    return getattr(sys.modules.get(module_name) or importlib.import_module(module_name), attribute)


def _public_attributes(obj):
    try:
        names = vars(obj)
    except TypeError:
        names = {name: getattr(obj, name, None) for name in dir(obj)}
    return {name: value for name, value in dict(names).items()
            if not name.startswith("__") or name in _DUNDERS_OF_INTEREST}


_DUNDERS_OF_INTEREST = {
    "__add__", "__sub__", "__mul__", "__truediv__", "__matmul__", "__getitem__", "__neg__",
    "__pow__", "__radd__", "__rmul__", "__rsub__", "__rtruediv__", "__init__", "__new__",
    "__call__", "__array__", "__import__", "__build_class__",
}
SYS_HOOKS = ("excepthook", "unraisablehook", "displayhook", "breakpointhook")


def _hooks():
    """Where Python calls code later: {name: object}, one entry per list element."""
    import gc
    import signal

    found = {"sys.modules['sys']": sys, "sys.gettrace()": sys.gettrace(),
             "sys.getprofile()": sys.getprofile()}
    found.update({f"sys.{name}": getattr(sys, name, None) for name in SYS_HOOKS})
    for name in ("meta_path", "path_hooks"):
        found.update({f"sys.{name}[{i}]": item for i, item in enumerate(getattr(sys, name))})
    found.update({f"gc.callbacks[{i}]": item for i, item in enumerate(gc.callbacks)})
    for number in signal.valid_signals():
        try:
            found[f"signal.handler[{signal.Signals(number).name}]"] = signal.getsignal(number)
        except (ValueError, OSError):
            continue
    return found


# Watched when the process has already imported them (stage 3's training workers do, before the
# program is imported; importing mlx-lm's trainer costs ~1 s that stages 1 and 2 need not pay).
WATCHED_WHEN_LOADED = (
    "mlx.optimizers",
    "mlx_lm.tuner.trainer",
    "mlx_lm.tuner.lora",
    "mlx_lm.tuner.dora",
    "mlx_lm.models.base",
    "kernel_lab.training",
    "kernel_lab.patching",
    "kernel_lab.loss_patch",
    "kernel_lab.gradcheck",
    "kernel_lab.trainworker",
    "kernel_lab.diagnose",
    "kernel_lab.data",
)


def snapshot(modules=WATCHED_MODULES, when_loaded=WATCHED_WHEN_LOADED):
    """Identity of everything watched: {qualified name: object} (modules missing here are skipped)."""
    taken = {}
    for module_name in list(modules) + [m for m in when_loaded if m in sys.modules]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        taken[f"sys.modules[{module_name!r}]"] = module
        for name, value in _public_attributes(module).items():
            taken[f"{module_name}.{name}"] = value
    for dotted in WATCHED_NAMESPACES + WATCHED_CLASSES:
        try:
            namespace = _resolve(dotted)
        except (ImportError, AttributeError):
            continue
        for name, value in _public_attributes(namespace).items():
            taken[f"{dotted}.{name}"] = value
    taken.update(_hooks())
    for key, value in list(taken.items()):  # a Python function can be rewritten in place
        if isinstance(value, FunctionType):
            taken[f"{key}.__code__"] = value.__code__
            taken[f"{key}.__defaults__"] = value.__defaults__
            taken[f"{key}.__kwdefaults__"] = value.__kwdefaults__
    return taken


def changes(before, after):
    """Human-readable list of what differs between two snapshots (state attributes ignored)."""
    found = []
    for key, value in before.items():
        if key in MUTABLE_STATE:
            continue
        if key not in after:
            found.append(f"{key} removed")
        elif after[key] is not value:
            found.append(f"{key} replaced")
    for key in after.keys() - before.keys():
        if key.startswith("sys.modules["):
            continue  # a module the candidate imported for the first time: not a patch
        module_key = f"sys.modules[{key.rpartition('.')[0]!r}]"
        if module_key in before:
            found.append(f"{key} added")
    return sorted(found)


def verify(before, when):
    """Raise TamperError naming what the candidate patched since `before` ("after import", ...);
    first kernel_lab.audit's check (a no-op unless `audit.install` ran in this process)."""
    from kernel_lab import audit

    audit.check()
    found = changes(before, snapshot())
    if found:
        shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
        raise TamperError(f"tampering detected {when}: {shown} (programs must not monkeypatch "
                          "MLX, the clock or the harness)")


