"""One LoRA / DoRA fine-tuning run with mlx-lm's own trainer, stock or with a program's kernels.

`run_training(model, ...)` trains an already converted model (`convert_to_lora`, as
`mlx_lm.lora` does with `linear_to_lora_layers`; `remove_lora` undoes it) with
`mlx_lm.tuner.trainer.train` (its compiled step; a program's kernels are patched in and
its loss passed as `loss=`), on mlx-lm's batches or on any iterator of batches, calling
`on_report` at every report (stage 3's workers pause there: `kernel_lab.trainworker`).
`train_once(...)` loads a model first; both return plain dicts. The finetune command
(`kernel_lab.finetune`) uses run_training too.

Recorded per run: the loss at every report, the final loss, tokens/s as mlx-lm
counts it (tokens of a report window / that window's step time), a steady rate
that leaves out the first window (it holds the mx.compile trace), peak memory
(reset after loading, read at the end) and wall time. Failures come back as
`ok: False` with `error_kind` "nan" (with the step, and the kernel and layer
that first goes non-finite when a replay finds it), "oom" or "error" (with
the kernel and module whose code raised, when it is a patched one).
"""

import math
import re
import tempfile
import time
import traceback
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map

from .diagnose import diagnose_nan, explain_error
from .patching import apply_kernels, restore_stock

LORA_SCALE = 20.0  # mlx_lm.lora's default lora_parameters
DEFAULT_DATA_CHARS = 1500

_OOM = re.compile(r"out of memory|outofmemory|\bmalloc\b|unable to allocate|insufficient memory", re.I)


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, step, loss):
        super().__init__(f"loss is {loss} at step {step}")
        self.step, self.loss = step, loss


def resolve_kernels(program):
    """None -> None (plain mlx-lm); "stock" -> kernel_lab.ops.STOCK; a path -> its kernels."""
    if program is None or program == "none":
        return None
    if program == "stock":
        from .ops import STOCK

        return STOCK
    if isinstance(program, (str, Path)):
        from .contract import load_program

        return load_program(program)
    return program  # already a kernel namespace


def convert_to_lora(model, *, fine_tune_type="lora", num_layers=2, rank=8, scale=LORA_SCALE,
                    dropout=0.0, seed=0):
    """Freeze the model and add LoRA / DoRA layers exactly as mlx_lm.lora's train_model does."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if fine_tune_type not in ("lora", "dora"):
        raise ValueError(f"fine_tune_type must be 'lora' or 'dora', not {fine_tune_type!r}")
    if num_layers > len(model.layers):
        raise ValueError(
            f"num_layers={num_layers} but the model only has {len(model.layers)} layers"
        )
    mx.random.seed(seed)
    model.freeze()
    linear_to_lora_layers(
        model, num_layers, {"rank": rank, "scale": scale, "dropout": dropout},
        use_dora=fine_tune_type == "dora",
    )
    fix_dora_input_dims(model)
    return model


def fix_dora_input_dims(model):
    """Give DoRA layers over 3/5/6-bit bases an lora_a of the base's real input size.

    mlx-lm 0.32's DoRALinear.from_base takes input_dims *= 32 // bits, right only when bits
    divides 32 (its LoRALinear has the fix, dims * 32 // bits): a 5-bit layer of 896 inputs gets
    an (840, r) lora_a and the first forward fails, in plain mlx-lm too. Re-drawn like mlx-lm
    draws it (uniform +-1/sqrt(input_dims)); returns how many layers were fixed."""
    from mlx_lm.tuner.dora import DoRALinear

    fixed = 0
    for _, module in model.named_modules():
        if not isinstance(module, DoRALinear) or not isinstance(module.linear, nn.QuantizedLinear):
            continue
        linear = module.linear
        input_dims = linear.weight.shape[1] * 32 // linear.bits
        if module.lora_a.shape[0] != input_dims:
            bound = 1 / math.sqrt(input_dims)
            module.lora_a = mx.random.uniform(-bound, bound, (input_dims, module.lora_a.shape[1]))
            fixed += 1
    return fixed


def remove_lora(model):
    """Undo `convert_to_lora`: every LoRA / DoRA layer (patched or not) back to its base linear.

    The base layers are the very objects that were wrapped, so the model is as loaded
    (still frozen) and can be converted again without reloading it."""
    from mlx.utils import tree_unflatten
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    restore_stock(model)
    bases = [(path, m.linear) for path, m in model.named_modules()
             if isinstance(m, (LoRALinear, DoRALinear))]
    if bases:
        model.update_modules(tree_unflatten(bases))
    return len(bases)


class _Recorder:
    """mlx-lm TrainingCallback: keeps every report, stops on a non-finite loss, and
    snapshots the trainable state at each window start so a NaN can be replayed."""

    def __init__(self, model, optimizer, keep_snapshots, on_report=None):
        self.model, self.optimizer, self.keep = model, optimizer, keep_snapshots
        self.on_report = on_report
        self.reports, self.val = [], []
        self.step = 0  # batches handed to the trainer so far
        self.window = []  # (step, batch) since the last report
        self.last_batch = None
        self.snapshot = self._snapshot() if keep_snapshots else None

    def _snapshot(self):
        return (tree_map(lambda a: a, self.model.trainable_parameters()),
                tree_map(lambda a: a, self.optimizer.state))

    def batches(self, iterate):
        def wrapped(**kwargs):
            for batch in iterate(**kwargs):
                if kwargs.get("loop"):  # training batches (evaluation does not loop)
                    self.step += 1
                    self.last_batch = batch
                    if self.keep:
                        self.window.append((self.step, batch))
                yield batch

        return wrapped

    def on_train_loss_report(self, info):
        info = {k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()}
        self.reports.append(info)
        if not math.isfinite(info["train_loss"]):
            raise TrainingDiverged(info["iteration"], info["train_loss"])
        if self.keep:
            self.window = []
            self.snapshot = self._snapshot()
        if self.on_report is not None:
            self.on_report(info)

    def on_val_loss_report(self, info):
        self.val.append({k: (v.item() if hasattr(v, "item") else v) for k, v in info.items()})


def steady_tokens_per_second(reports):
    """Tokens/s over all report windows but the first (mx.compile traces during it).

    Each window's time is its tokens / its tokens_per_second, i.e. mlx-lm's own
    per-window step time. With a single report the first window is all there is.
    """
    windows, prev = [], 0
    for r in reports:
        tokens = r["trained_tokens"] - prev
        prev = r["trained_tokens"]
        windows.append((tokens, tokens / r["tokens_per_second"] if r["tokens_per_second"] else 0.0))
    used = windows[1:] or windows
    seconds = sum(t for _, t in used)
    return (sum(n for n, _ in used) / seconds if seconds else 0.0), len(used) != len(windows)


def run_training(model, train_set, kernels=None, *, valid_set=None, iters=8, batch_size=1,
                 max_seq_length=32, learning_rate=1e-5, steps_per_report=2, steps_per_eval=None,
                 val_batches=0, seed=0, adapter_file=None, save_every=None, diagnose=True,
                 iterate_batches=None, on_report=None):
    """Train an already LoRA-converted model with mlx-lm's trainer; returns the run record.

    `iterate_batches` replaces mlx-lm's batch iterator (same signature); `on_report(info)` is
    called at every report, after the loss was checked, outside mlx-lm's step timer."""
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, train

    if iterate_batches is None:
        from mlx_lm.tuner.trainer import iterate_batches

    report = None
    loss = None
    if kernels is not None:
        report = apply_kernels(model, kernels)
        loss = report.loss_fn
    np.random.seed(seed)  # iterate_batches shuffles with np.random
    mx.random.seed(seed)
    optimizer = optim.Adam(learning_rate=learning_rate)
    recorder = _Recorder(model, optimizer, keep_snapshots=diagnose, on_report=on_report)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(
            batch_size=batch_size, iters=iters, val_batches=val_batches,
            steps_per_report=steps_per_report, steps_per_eval=steps_per_eval or iters + 1,
            steps_per_save=save_every or iters + 1, max_seq_length=max_seq_length,
            adapter_file=str(adapter_file or Path(tmp) / "adapters.safetensors"),
        )
        record = {
            "ok": True, "patched": kernels is not None,
            "patch_report": report.as_dict() if report else None,
            "patch_report_text": str(report) if report else None,
            "iters": iters, "batch_size": batch_size, "max_seq_length": max_seq_length,
        }
        mx.synchronize()
        mx.reset_peak_memory()
        record["active_memory_before"] = mx.get_active_memory()
        tic = time.perf_counter()
        try:
            train(
                model=model, optimizer=optimizer, train_dataset=train_set,
                val_dataset=valid_set if val_batches else None, args=args,
                loss=loss or _default_loss(), iterate_batches=recorder.batches(iterate_batches),
                training_callback=recorder,
            )
        except TrainingDiverged as e:
            where = diagnose_nan(model, optimizer, recorder, loss or _default_loss(), kernels) \
                if diagnose else "not diagnosed"
            record.update(ok=False, error_kind="nan", failed_step=e.step,
                          error=f"loss became {e.loss} by step {e.step}; {where}")
        except Exception as e:  # a kernel that breaks inside the model, or running out of memory
            text = f"{type(e).__name__}: {e}"
            if isinstance(e, MemoryError) or _OOM.search(str(e)):
                record.update(ok=False, error_kind="oom", error=f"out of memory: {text}")
            else:
                kind, path, where = explain_error(e, model, kernels, recorder.last_batch)
                record.update(ok=False, error_kind="error", kernel=kind, module=path,
                              error=f"training failed at step {max(recorder.step, 1)}{where}: {text}",
                              traceback=traceback.format_exc(limit=-8))
            record["failed_step"] = max(recorder.step, 1)
        record["wall_seconds"] = time.perf_counter() - tic
        record["peak_memory"] = mx.get_peak_memory()
    reports = recorder.reports
    record["reports"] = reports
    record["val_reports"] = recorder.val
    record["losses"] = [r["train_loss"] for r in reports]
    record["final_loss"] = reports[-1]["train_loss"] if reports else None
    if reports:
        steady, excluded = steady_tokens_per_second(reports)
        record["tokens_per_second"] = steady
        record["tokens_per_second_first_excluded"] = excluded
        record["tokens_per_second_all"] = reports[-1]["trained_tokens"] / sum(
            (b["trained_tokens"] - a) / b["tokens_per_second"]
            for a, b in zip([0] + [r["trained_tokens"] for r in reports], reports)
        )
        record["trained_tokens"] = reports[-1]["trained_tokens"]
    return record


def _default_loss():
    from mlx_lm.tuner.trainer import default_loss

    return default_loss


def train_once(model=None, program=None, *, fine_tune_type="lora", iters=8, batch_size=1,
               max_seq_length=32, num_layers=2, rank=8, scale=LORA_SCALE, dropout=0.0,
               learning_rate=1e-5, seed=0, steps_per_report=2, dtype=None, data=None,
               max_chars=DEFAULT_DATA_CHARS, val_batches=0, adapter_path=None, diagnose=True):
    """Load `model` (a kernel_lab.models spec or path; default the embedded model), add
    LoRA/DoRA, patch in `program` (None: plain mlx-lm; "stock"; or a program path) and train.

    Returns a JSON-able dict (see the module docstring); the adapter goes to
    `adapter_path` when given (adapters.safetensors, as mlx_lm.lora writes it).
    """
    from .data import load_datasets
    from .models import DEFAULT_MODEL, load_model

    model_spec = model or DEFAULT_MODEL
    kernels = resolve_kernels(program)  # a broken program fails here, before the model loads
    tic = time.perf_counter()
    net, tokenizer = load_model(model_spec, dtype=dtype)
    load_seconds = time.perf_counter() - tic
    train_set, valid_set = load_datasets(tokenizer, data=data, max_chars=max_chars)
    convert_to_lora(net, fine_tune_type=fine_tune_type, num_layers=num_layers, rank=rank,
                    scale=scale, dropout=dropout, seed=seed)
    adapter_file = None
    if adapter_path is not None:
        Path(adapter_path).mkdir(parents=True, exist_ok=True)
        adapter_file = Path(adapter_path) / "adapters.safetensors"
    record = run_training(
        net, train_set, kernels, valid_set=valid_set, iters=iters, batch_size=batch_size,
        max_seq_length=max_seq_length, learning_rate=learning_rate,
        steps_per_report=steps_per_report, val_batches=val_batches, seed=seed,
        adapter_file=adapter_file, diagnose=diagnose,
    )
    record.update(
        model=str(model_spec), program=None if program is None else str(program),
        fine_tune_type=fine_tune_type, num_layers=num_layers, rank=rank, seed=seed,
        learning_rate=learning_rate, load_seconds=load_seconds,
        dtype=str(next((v.dtype for _, v in tree_flatten(net.parameters())
                        if mx.issubdtype(v.dtype, mx.floating)), None)),
        device=str(mx.default_device()),
    )
    return record
