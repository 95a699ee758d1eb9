"""benchmarks/profile_step.py on the embedded SmolLM2, tiny sizes on the CPU: stock and patched."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = {"input_norm", "qkv_proj", "rope_qk", "attention", "o_proj", "post_norm", "gate_up_proj",
         "swiglu", "down_proj", "layer_whole", "head_loss", "embedding", "adam_update"}


def _script():
    spec = importlib.util.spec_from_file_location("profile_step", ROOT / "benchmarks/profile_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_profile_stock_and_patched_step(tmp_path, capsys):
    script = _script()
    results = {}
    for program in ("none", str(ROOT / "initial_program.py")):
        out = tmp_path / f"{Path(program).stem}.json"
        script.main(["--program", program, "--batch", "1", "--length", "4", "--layers", "2",
                     "--steps", "1", "--warmup", "1", "--dtype", "float32", "--json", str(out)])
        res = json.loads(out.read_text())
        results[program] = res
        assert set(res["parts"]) == PARTS
        for name, part in res["parts"].items():
            assert part["ms"] > 0 and part["peak_mb"] > 0, name
            assert part["count"] == (2 if name not in {"head_loss", "embedding", "adam_update"} else 1)
        step = res["step"]
        assert step["ms"] > 0 and step["tokens_per_s"] > 0 and math.isfinite(step["loss"])
        assert step["peak_mb"] >= step["resident_mb"] >= step["weights_mb"] > 0
        assert res["memory"]["per_layer_mb"] > 0  # a layer keeps activations for the backward
        assert res["memory"]["attention_scores_mb"] == pytest.approx(1 * 9 * 4 * 4 * 4 / 2**20)
        assert res["layers"] == 2 and res["layers_total"] == 30
    stock, patched = results.values()
    assert stock["patch"] is None
    assert patched["patch"]["loss"] == "linear_cross_entropy" and not patched["patch"]["stock"]
    # Same model, LoRA init, batch and number of Adam steps: the same loss, stock or patched.
    assert patched["step"]["loss"] == pytest.approx(stock["step"]["loss"], rel=1e-3)
    printed = capsys.readouterr().out
    assert printed.count("unattributed") == 2  # the table comes last: the device tool keeps the tail
    assert printed.rstrip().splitlines()[-1].startswith("layer whole")


def _cuda_copy(tmp_path, keep_weights=False):
    """(benchmarks/cuda_paths_on_cpu.py as a module, the optimized program with CUDA paths forced)."""
    from kernel_lab.contract import load_module

    script = load_module(ROOT / "benchmarks/cuda_paths_on_cpu.py")
    copy = tmp_path / f"as_cuda_{int(keep_weights)}.py"
    copy.write_text(script.as_cuda((ROOT / "examples/optimized_program.py").read_text(), keep_weights))
    return script, load_module(copy)


def test_cuda_paths_on_cpu_forces_every_device_check(tmp_path):
    import mlx.core as mx

    script, program = _cuda_copy(tmp_path)

    assert program._cuda() and program._dense_base() and program._pad_attention()
    assert program._half_lora(mx.bfloat16) and not program._half_lora(mx.float32)
    with pytest.raises(SystemExit):  # a program without those checks is an error, not a silent copy
        script.as_cuda((ROOT / "initial_program.py").read_text())
    # --keep-weights: the backward keeps the forward's weight however few the tokens
    _, kept = _cuda_copy(tmp_path, keep_weights=True)
    x = mx.zeros((4, 32))  # 4 tokens
    weight, scales = mx.zeros((64, 4), dtype=mx.uint32), mx.ones((64, 1))  # 64 outputs, 4-bit
    assert kept._backward_base("forward's", x, x, weight, scales, scales, 32, 4) == "forward's"
    assert program._backward_base("forward's", x, x, weight, scales, scales, 32, 4) != "forward's"


@pytest.mark.parametrize("kernel", ["lora_linear", "dora_linear"])
@pytest.mark.parametrize("tokens", [64, 512])  # the forward's weight dequantized again / kept
def test_cuda_paths_match_stock_on_cpu(tmp_path, kernel, tokens):
    # The CUDA branches of lora_linear / dora_linear (a dense base; the backward keeps the forward's
    # dequantized weight where out <= tokens / 2, here 128 <= 256, else dequantizes it again) never
    # run on a CPU otherwise: values and gradients against stock mlx-lm's, float32.
    import mlx.core as mx

    from kernel_lab.ops import STOCK

    _, program = _cuda_copy(tmp_path)
    mx.random.seed(tokens)
    in_dim, out_dim, rank = 96, 128, 8
    weight, scales, biases = mx.quantize(mx.random.normal((out_dim, in_dim)) * 0.1, group_size=32, bits=4)
    x = mx.random.normal((2, tokens // 2, in_dim))
    a, b = mx.random.normal((in_dim, rank)) * 0.1, mx.random.normal((rank, out_dim)) * 0.1
    extra = (mx.random.uniform(0.5, 1.5, (out_dim,)),) if kernel == "dora_linear" else ()
    cotangent = mx.random.normal((2, tokens // 2, out_dim))

    def run(fn):
        def f(x, a, b, *m):
            return fn(x, weight, scales, biases, a, b, 2.0, *m, group_size=32, bits=4)
        out, grads = mx.vjp(f, [x, a, b, *extra], [cotangent])
        return [out[0], *grads]

    got, want = run(getattr(program, kernel)), run(getattr(STOCK, kernel))
    for name, g, w in zip(["out", "dx", "da", "db", "dm"], got, want):
        assert mx.allclose(g, w, rtol=1e-4, atol=1e-4).item(), (name, mx.abs(g - w).max().item())
