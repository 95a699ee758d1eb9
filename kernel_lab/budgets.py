"""How much fine-tuning the training comparison (`kernel_lab.macrobench`) runs, and on which models.

A budget's entries:
  models          "default" (the embedded default model), "all" (every real model available
                  offline) or comma-separated embedded names (those of them available offline)
  num_layers      LoRA / DoRA on the last N transformer blocks (-1: all of them)
  rank, scale     LoRA rank and scale (mlx_lm.lora's defaults: 8, 20)
  batch_size, seq_len   every batch is batch_size x (seq_len + 1) packed tokens (seq_len targets a row);
                  on a GPU seq_len is 1023, what mlx-lm trains on with max_seq_length 1024 when the
                  documents are longer (its batches are then max_seq_length tokens wide). At
                  multiples of 128 MLX's CUDA attention takes cuDNN's fused backward, which mlx-lm's
                  real batches rarely get (widths 1 + 32k or max_seq_length)
  window_steps    W: optimizer steps in one measured window (one mlx-lm report)
  warmup_windows  untimed windows first (the compile; all sides at the same time)
  windows         measured windows per side, alternating between the sides
  learning_rate   Adam's, as mlx_lm.lora
  grad_check      check a program's LoRA/DoRA gradients against stock's before training
  grad_batches    batches (of the timed shape) the gradient check runs on
  grad_rows       rows of each of those batches it uses (None: all), as long as the timed ones:
                  the float32 check of three sides at once at 8 x 1024 tokens of Qwen's 152k
                  vocabulary ran out of an H200's 139 GB (benchmarks/h200-2026-11-22b)
  grad_check_compute  check the gradients in the model's own dtype too (bfloat16 on a GPU), with
                  looser limits (kernel_lab.gradcheck.COMPUTE_LIMITS); it catches a kernel whose
                  gradients are wrong in that dtype only, at the cost of a second pass
  prepare_group   sides that prepare (gradient check, compile, warm-up) at the same time (0: all):
                  nine benchmark sides checking SmolLM2's gradients in float32 at once ran an H200
                  out of memory (benchmarks/h200-2026-11-22e). Stage 3 prepares its two sides
                  together; the table one side at a time: on an 80 GB H100 the candidate's float32
                  check of Qwen's DoRA gradients ran out of memory beside stock's 8 x 1024 warm-up
                  (benchmarks/h100-2026-12-06b), which at 4 x 1024 (stage 3) fit
  dtype           None: float32 on the CPU, the model's own dtype on a GPU
  max_chars       longest example of the embedded data set, in characters (before packing)
  preload         load every model's workers at the start, at the same time (else model by model)
  tf32            let CUDA run float32 matmuls in TF32 (MLX's default). Off by default
                  (MLX_ENABLE_TF32=0 in the workers): the gradient check runs in float32 and must
                  compare true float32; on an H200 with TF32 on, the starting program's (plain,
                  exact) kernels already differed from stock by 1.04e-2 in Qwen's LoRA gradients
                  (benchmarks/h200-2026-11-22b). Timed steps in bfloat16 change only where
                  float32 matmuls run: mlx-lm's rank-8 LoRA products (x is promoted to lora_a's
                  float32), thin and bandwidth-bound
  load_timeout, prepare_timeout, window_timeout   seconds per call: loading a model; the gradient
                  check + compile + warm-up (generous: a cold GPU compiles for minutes); one window
"""

_COMMON = dict(rank=8, scale=20.0, learning_rate=1e-5, grad_check=True, grad_check_compute=False,
               dtype=None,
               max_chars=1500, preload=True, tf32=False, grad_rows=None, load_timeout=300.0,
               prepare_timeout=900.0, prepare_group=0)

TWO_MODELS = "smollm2-135m-q4,qwen2.5-coder-0.5b-q4"  # vocabularies of 49k and 152k

BUDGETS = {
    # A 2-core CI machine: one step of the 135M model at 1 x 32 tokens takes a few seconds.
    # 1 warm-up step + 2 measured one-step windows a side, LoRA on the last 2 blocks.
    "cpu": dict(_COMMON, models="default", num_layers=2, batch_size=1, seq_len=32, window_steps=1,
                warmup_windows=1, windows=2, grad_batches=1, window_timeout=120.0),
    # Stage 3 on Metal / CUDA (both models, LoRA and DoRA): all blocks, bfloat16, 4 rows of 1024
    # tokens (1023 inputs each); 6 measured windows of 4 steps a side (~0.4-0.9 s each on an H200).
    # With 3 windows stage 3 took 49-59 s on a warm H200 and one window's rate could swing 25%
    # (benchmarks/h200-2026-11-22c): 6 windows, rated by the median over window pairs.
    "gpu": dict(_COMMON, models=TWO_MODELS, num_layers=-1, batch_size=4, seq_len=1023, window_steps=4,
                warmup_windows=1, windows=6, grad_batches=2, dtype="bfloat16", window_timeout=60.0,
                prepare_group=3),
    # The benchmark table (`python -m kernel_lab.benchmark --budget table`): 8 rows of 1024 tokens,
    # bfloat16, all blocks, 6 measured windows of 5 steps a side.
    "table": dict(_COMMON, models=TWO_MODELS, num_layers=-1, batch_size=8, seq_len=1023, window_steps=5,
                  warmup_windows=1, windows=6, grad_batches=2, grad_rows=4, dtype="bfloat16", max_chars=6000,
                  window_timeout=120.0, prepare_group=1),
}


def resolve_budget(budget=None, *, gpu=None, **overrides):
    """A budget dict from a name (None: "gpu" on a GPU, else "cpu") or a dict, overrides applied
    (None values ignored); its name under "name"."""
    if budget is None:
        budget = "gpu" if gpu else "cpu"
    if isinstance(budget, str):
        if budget not in BUDGETS:
            raise ValueError(f"unknown budget {budget!r}; choose from {', '.join(BUDGETS)}")
        base = dict(BUDGETS[budget], name=budget)
    else:
        base = {**BUDGETS["cpu"], "name": "custom", **budget}
    unknown = set(overrides) - set(base) - {"name"}
    if unknown:
        raise ValueError(f"unknown budget entries: {', '.join(sorted(unknown))}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return base


def check_budget(budget):
    """The budget, or ValueError naming an entry that cannot work."""
    for key in ("window_steps", "warmup_windows", "windows", "batch_size", "grad_batches", "rank"):
        if int(budget[key]) < 1:
            raise ValueError(f"budget entry {key} must be at least 1, not {budget[key]}")
    if int(budget["seq_len"]) < 2:
        raise ValueError(f"budget entry seq_len must be at least 2, not {budget['seq_len']}")
    return budget


def parse_options(text):
    """'batch_size=8,seq_len=512,tf32=1' -> typed budget overrides (types of the gpu budget)."""
    types = {k: type(v) for k, v in BUDGETS["gpu"].items() if v is not None}
    types.update(dtype=str, grad_rows=int)
    options = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in types:
            raise ValueError(f"bad stage-3 option {item!r}: use key=value with a key of "
                             f"{', '.join(sorted(types))}")
        kind = types[key]
        options[key] = raw.strip().lower() in ("1", "true", "yes") if kind is bool else kind(raw)
    return options


def default_models(which="all"):
    """The real models available offline: all of them ("all"), the embedded default
    ("default"), or those of a comma-separated list of embedded names, in its order."""
    from .models import DEFAULT_MODEL, available_offline

    offline = list(available_offline())
    if which == "all":
        return offline
    if which == "default":
        return [m for m in offline if m == DEFAULT_MODEL] or offline[:1]
    return [m for m in (n.strip() for n in which.split(",")) if m in offline]
