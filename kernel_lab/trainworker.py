"""One side of a training comparison (stock mlx-lm, or a program's kernels), served in a long-lived
`kernel_lab.sandbox.Session`; `kernel_lab.macrobench` is the coordinator that calls it.

Calls, in order (each a Session target; state lives in this module):
  hello()                 the device
  load(model, program, ...)   import the program (guarded), load the model once, pack fixed-shape batches
  prepare(fine_tune_type, ...)    [the gradient check], LoRA/DoRA conversion, the kernels patched in,
                          then mlx-lm's own `train()` started; returns after the untimed warm-up
                          windows (compile) with train() paused inside its report callback
  window()                lets train() run one window of W steps; mlx-lm's report of it
  finish(abort=False)     lets train() end (or stops it), undoes the conversion; the run record
`prepare` again for the next fine-tune type reuses the loaded weights.

mlx-lm's step timer starts after the batch is produced and stops before the report callback, so
the pause at each window boundary (in the callback) is never timed. All MLX work runs in one
thread of this worker, since MLX streams belong to the thread that made them; train() pauses in
that thread while the worker's main thread answers the coordinator's next call.
"""

import queue
import threading
import time

_STATE = {}  # model, kernels, batches, pristine weights, ...
_JOBS = queue.Queue()  # (function, kwargs, reply queue) for the MLX thread
_EVENTS = queue.Queue()  # ("report" | "error" | "done", dict) from a running train()
_GO = queue.Queue()  # one item lets a paused train() run its next window
_THREAD = []


class _Aborted(BaseException):
    """The coordinator stopped a paused training (not an Exception: run_training lets it pass)."""


def _serve():
    while True:
        function, kwargs, reply = _JOBS.get()
        try:
            reply.put((True, function(**kwargs)))
        except BaseException as exc:  # noqa: BLE001 - handed to the calling thread
            reply.put((False, exc))


def _in_mlx(function, **kwargs):
    """Run `function(**kwargs)` in this worker's MLX thread and return (or raise) its result."""
    if not _THREAD:
        _THREAD.append(threading.Thread(target=_serve, name="kernel_lab-mlx", daemon=True))
        _THREAD[0].start()
    reply = queue.Queue(maxsize=1)
    _JOBS.put((function, kwargs, reply))
    ok, value = reply.get()
    if not ok:
        raise value
    return value


# ------------------------------------------------------------------ calls


def hello():
    """{"device", "gpu", "backend", "mlx"}: what this worker trains on."""
    return _in_mlx(_hello)


def load(model, program=None, *, dtype=None, data=None, max_chars=1500, batch_size=1, seq_len=32,
         steps=8, seed=0):
    """Import the program (None / "none": plain mlx-lm; "stock": kernel_lab.ops.STOCK; a path),
    load `model` once and pack `steps` batches of batch_size x (seq_len + 1) tokens."""
    return _in_mlx(_load, model=model, program=program, dtype=dtype, data=data,
                   max_chars=max_chars, batch_size=batch_size, seq_len=seq_len, steps=steps, seed=seed)


def prepare(fine_tune_type="lora", *, num_layers=2, rank=8, scale=20.0, learning_rate=1e-5,
            window_steps=2, warmup_windows=1, windows=2, grad_check=True, grad_batches=2,
            grad_rows=None, grad_check_compute=False, seed=0):
    """Gradient check (for a program), conversion, then train() (which patches the kernels in)
    until the end of the warm-up windows. {"ok", "warmup": [reports], "grad_check", "seconds"}."""
    tic = time.perf_counter()
    _STATE["run"] = None  # nothing of an earlier fine-tune type's run may be taken for this one
    info = _in_mlx(_setup, fine_tune_type=fine_tune_type, num_layers=num_layers, rank=rank,
                   scale=scale, grad_check=grad_check, grad_batches=grad_batches, grad_rows=grad_rows,
                   grad_check_compute=grad_check_compute, seed=seed)
    if not info["ok"]:
        return {**info, "seconds": time.perf_counter() - tic}
    iters = (warmup_windows + windows) * window_steps
    _STATE["run"] = {"iters": iters, "window_steps": window_steps, "running": True,
                     "pause_from": warmup_windows * window_steps}
    _JOBS.put((_train, dict(learning_rate=learning_rate, iters=iters, window_steps=window_steps,
                            seed=seed), queue.Queue()))
    warmup = []
    for _ in range(warmup_windows):
        kind, event = _next_event()
        if kind != "report":
            return {**info, **event, "ok": False, "warmup": warmup,
                    "seconds": time.perf_counter() - tic}
        warmup.append(event)
    return {**info, "warmup": warmup, "seconds": time.perf_counter() - tic}


def window():
    """Let train() run one window; {"ok", mlx-lm's report: "tokens_per_second", "train_loss",
    "iteration", ...; "peak_memory" (bytes, reset at the window start), "wall_seconds",
    "step_seconds" (each step, from taking its batch to taking the next or the report),
    "cpu_seconds" and "thread_cpu_seconds" (this process's, and the training thread's, CPU time in
    the window: near wall_seconds when the host, not the device, sets the pace)}."""
    run = _STATE.get("run")
    if not run or not run["running"] or not run.get("paused"):
        return {"ok": False, "error": "no training is paused here (prepare first)"}
    _GO.put(True)
    kind, event = _next_event()
    if kind == "report":
        from . import guards

        try:  # the candidate's code ran in the window: nothing it measures with may have changed
            guards.verify(_STATE["guards"], "during training")
        except guards.TamperError as exc:
            return {"ok": False, "error": str(exc), "error_kind": "tamper"}
    return event if kind != "done" else {"ok": False, "error": "train() ended early"}


def finish(abort=False):
    """Wait for train() to end (abort: stop it at its pause), undo the conversion; the run
    record (reports, losses, errors)."""
    run = _STATE.get("run") or {}
    record = run.get("record")
    if abort and run.get("paused"):  # only a paused train() takes the signal: none may linger
        run["abort"] = True
        _GO.put(True)
    while run.get("running"):
        kind, event = _next_event()
        if kind in ("done", "error"):
            record = event
    _in_mlx(_teardown)
    return record or {"ok": False, "error": "no training ran"}


def _next_event():
    kind, event = _EVENTS.get()
    run = _STATE["run"]
    if kind in ("done", "error"):
        run["running"] = False
        run["record"] = event
    return kind, event


# ------------------------------------------------------------------ the MLX thread


def _hello():
    import mlx.core as mx

    def available(name):  # not every MLX build has every backend module
        module = getattr(mx, name, None)
        return bool(module is not None and module.is_available())

    backend = "cuda" if available("cuda") else "metal" if available("metal") else "cpu"
    return {"device": str(mx.default_device()), "gpu": mx.default_device() == mx.gpu,
            "backend": backend, "mlx": mx.__version__}


def _load(model, program, dtype, data, max_chars, batch_size, seq_len, steps, seed):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from . import audit, guards
    from .data import fixed_batches, load_datasets
    from .models import load_model
    from .training import resolve_kernels

    import mlx_lm.tuner.trainer  # noqa: F401 - loaded before the snapshot, so the guards watch it

    from . import gradcheck, training  # noqa: F401 - likewise

    tic = time.perf_counter()
    if program not in (None, "none", "stock"):
        audit.install(program)  # no threads, processes, frame reads or file writes from its code
    before = guards.snapshot()
    kernels = resolve_kernels(program)
    guards.verify(before, "after importing the program")
    net, tokenizer = load_model(model, dtype=dtype)
    load_seconds = time.perf_counter() - tic
    train_set, _ = load_datasets(tokenizer, data=data, max_chars=max_chars)
    batches = [(mx.array(tokens), mx.array(lengths)) for tokens, lengths in
               fixed_batches(train_set, batch_size=batch_size, seq_len=seq_len, count=steps, seed=seed)]
    mx.eval(batches)
    pristine = tree_flatten(net.parameters())
    _STATE.update(model=net, kernels=kernels, batches=batches, pristine=pristine, guards=before,
                  spec=model, program=program)
    floats = {str(v.dtype) for _, v in pristine if mx.issubdtype(v.dtype, mx.floating)}
    return {"ok": True, "model": str(model), "program": program, "load_seconds": load_seconds,
            "seconds": time.perf_counter() - tic, "dtype": ",".join(sorted(floats)),
            "layers": len(net.layers), "model_type": getattr(net, "model_type", None),
            "batch_shape": list(batches[0][0].shape), **_hello()}


def _setup(fine_tune_type, num_layers, rank, scale, grad_check, grad_batches, grad_rows,
           grad_check_compute, seed):
    import mlx.core as mx

    from .training import convert_to_lora

    model, kernels = _STATE["model"], _STATE["kernels"]
    num_layers = len(model.layers) if num_layers in (-1, None) else num_layers
    info = {"ok": True, "fine_tune_type": fine_tune_type, "grad_check": None}
    if kernels is not None and grad_check:
        from .gradcheck import check_gradients

        # the first grad_rows rows of each batch (all when None): as long as timed, fewer rows
        batches = [tuple(part[:grad_rows] for part in batch) for batch in _STATE["batches"][:grad_batches]]
        check = check_gradients(model, kernels, batches,
                                fine_tune_type=fine_tune_type, num_layers=num_layers, rank=rank,
                                scale=scale, seed=seed + 7, compute_dtype=grad_check_compute)
        info["grad_check"] = check
        info["grad_check_seconds"] = check.get("seconds")
        if not check["ok"]:
            return {**info, "ok": False, "error_kind": "gradients", "error": check["error"],
                    "kernel": check.get("kernel")}
    convert_to_lora(model, fine_tune_type=fine_tune_type, num_layers=num_layers, rank=rank,
                    scale=scale, seed=seed)
    mx.eval(model.parameters())
    return info


def _train(learning_rate, iters, window_steps, seed):
    """mlx-lm's train() over the fixed batches; pauses after each report from `pause_from` on."""
    import mlx.core as mx

    from .training import run_training

    batches, run = _STATE["batches"], _STATE["run"]
    clock = {"start": time.perf_counter(), "cpu": time.process_time(), "thread": time.thread_time()}
    fetched = []  # when train() took each batch: a step lasts until it takes the next one

    def iterate(dataset=None, batch_size=None, max_seq_length=None, loop=False, seed=None,
                comm_group=None):
        while True:
            for batch in batches:
                fetched.append(time.perf_counter())
                yield batch
            if not loop:
                return

    def on_report(info):
        now = time.perf_counter()
        marks = fetched[-window_steps:] + [now]  # the window's steps end here, before the pause
        report = {"ok": True, **info, "peak_memory": mx.get_peak_memory(),
                  "wall_seconds": now - clock["start"],
                  "step_seconds": [b - a for a, b in zip(marks, marks[1:])],
                  "cpu_seconds": time.process_time() - clock["cpu"],
                  "thread_cpu_seconds": time.thread_time() - clock["thread"]}
        pause = run["pause_from"] <= info["iteration"] < run["iters"]
        run["paused"] = pause  # set before the report goes out: the coordinator may answer at once
        _EVENTS.put(("report", report))
        if pause:
            _GO.get()
            run["paused"] = False
            if run.get("abort"):
                raise _Aborted()
        mx.reset_peak_memory()
        clock.update(start=time.perf_counter(), cpu=time.process_time(), thread=time.thread_time())

    try:
        record = run_training(_STATE["model"], batches, _STATE["kernels"], iters=iters,
                              batch_size=int(batches[0][0].shape[0]),
                              max_seq_length=int(batches[0][0].shape[1]),
                              learning_rate=learning_rate, steps_per_report=window_steps, seed=seed,
                              iterate_batches=iterate, on_report=on_report)
    except _Aborted:
        record = {"ok": False, "error_kind": "aborted", "error": "stopped by the coordinator"}
    except BaseException as exc:  # noqa: BLE001 - e.g. patching failed: reported, not fatal
        record = {"ok": False, "error_kind": "error", "error": f"{type(exc).__name__}: {exc}"}
    _EVENTS.put(("done" if record["ok"] else "error", record))


def _teardown():
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    from .training import remove_lora

    model = _STATE["model"]
    remove_lora(model)
    model.update(tree_unflatten(_STATE["pristine"]))
    mx.eval(model.parameters())
    mx.clear_cache()
