"""`python -m kernel_lab.finetune`: train a LoRA / DoRA adapter with a program's kernels.

    python -m kernel_lab.finetune --program openevolve_output/best/best_program.py \\
        --iters 200 --adapter-path adapters
    mlx_lm.generate --model <model dir> --adapter-path adapters --prompt "..."

Flags follow `mlx_lm.lora` where they overlap. `--program` defaults to the
repository's initial_program.py; `--program stock` uses kernel_lab.ops.STOCK and
`--program none` trains with plain mlx-lm (no patching). `--model` defaults to the
embedded model and `--data` to the embedded Python-docs chat set. Training runs in
this process with mlx-lm's trainer and its progress display; the adapter
(adapters.safetensors + adapter_config.json, written as mlx_lm.lora writes them)
loads in plain mlx-lm: the patcher keeps every parameter name.
"""

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROGRAM = REPO_ROOT / "initial_program.py"


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m kernel_lab.finetune",
        description="LoRA/DoRA fine-tuning with mlx-lm's trainer and a program's kernels.",
    )
    p.add_argument("--program", default=None,
                   help="kernel program file; 'stock' (kernel_lab.ops.STOCK) or 'none' (plain "
                        f"mlx-lm). Default: {DEFAULT_PROGRAM.name} of this repository")
    p.add_argument("--model", default=None, help="model spec, local mlx-lm dir or hub id "
                   "(default: the embedded model)")
    p.add_argument("--data", default=None, help="folder with train.jsonl / valid.jsonl "
                   "(default: the embedded Python-docs chat set)")
    p.add_argument("--fine-tune-type", choices=["lora", "dora"], default="lora")
    p.add_argument("--num-layers", type=int, default=16,
                   help="number of last layers to adapt (-1: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--val-batches", type=int, default=25)
    p.add_argument("--learning-rate", type=float, default=1e-5)
    p.add_argument("--steps-per-report", type=int, default=10)
    p.add_argument("--steps-per-eval", type=int, default=200)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--adapter-path", default="adapters")
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-scale", type=float, default=20.0)
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="> 0 leaves the LoRA layers stock (the kernels have no dropout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32/float16/bfloat16 "
                   "(default: float32 on the CPU, the model's own dtype on a GPU)")
    p.add_argument("--max-chars", type=int, default=1500,
                   help="longest embedded-data example in characters")
    p.add_argument("--report-json", default=None, help="also write the run record here")
    return p


def adapter_config(args, model_spec, program):
    """adapter_config.json with the keys mlx_lm.lora writes (and load_adapters reads)."""
    num_layers = args.num_layers
    return {
        "model": str(model_spec),
        "fine_tune_type": args.fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": {"rank": args.lora_rank, "dropout": args.lora_dropout,
                            "scale": args.lora_scale},
        "batch_size": args.batch_size,
        "iters": args.iters,
        "learning_rate": args.learning_rate,
        "max_seq_length": args.max_seq_length,
        "seed": args.seed,
        "data": args.data,
        "optimizer": "adam",
        "train": True,
        "adapter_path": str(args.adapter_path),
        "kernel_program": program,
    }


def run(args):
    from mlx_lm.tuner.utils import print_trainable_parameters
    from mlx_lm.utils import save_config

    from .data import load_datasets
    from .models import DEFAULT_MODEL, load_model
    from .patching import apply_kernels
    from .training import convert_to_lora, resolve_kernels, run_training

    program = args.program or str(DEFAULT_PROGRAM)
    kernels = resolve_kernels(None if program == "none" else program)
    model_spec = args.model or DEFAULT_MODEL
    print(f"Loading model {model_spec}", flush=True)
    model, tokenizer = load_model(model_spec, dtype=args.dtype)
    print("Loading datasets", flush=True)
    train_set, valid_set = load_datasets(tokenizer, data=args.data, max_chars=args.max_chars)
    num_layers = len(model.layers) if args.num_layers == -1 else args.num_layers
    convert_to_lora(model, fine_tune_type=args.fine_tune_type, num_layers=num_layers,
                    rank=args.lora_rank, scale=args.lora_scale, dropout=args.lora_dropout,
                    seed=args.seed)
    print_trainable_parameters(model)
    if kernels is not None:
        print(apply_kernels(model, kernels), flush=True)
    else:
        print("Kernels: none (plain mlx-lm)", flush=True)
    adapter_path = Path(args.adapter_path)
    adapter_path.mkdir(parents=True, exist_ok=True)
    save_config(adapter_config(args, model_spec, program if kernels is not None else None),
                adapter_path / "adapter_config.json")
    record = run_training(
        model, train_set, kernels, valid_set=valid_set, iters=args.iters,
        batch_size=args.batch_size, max_seq_length=args.max_seq_length,
        learning_rate=args.learning_rate, steps_per_report=args.steps_per_report,
        steps_per_eval=args.steps_per_eval, val_batches=args.val_batches if valid_set else 0,
        seed=args.seed, adapter_file=adapter_path / "adapters.safetensors",
        save_every=args.save_every,
    )
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(record, indent=1, default=str))
    if not record["ok"]:
        print(f"Training failed: {record['error']}", file=sys.stderr)
        return 1
    print(f"Final loss {record['final_loss']:.3f}, {record['tokens_per_second']:.1f} tokens/s "
          f"(steady), peak memory {record['peak_memory'] / 1e9:.3f} GB. "
          f"Adapter saved to {adapter_path}", flush=True)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.iters < 1 or args.batch_size < 1:
        raise SystemExit("--iters and --batch-size must be at least 1")
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
