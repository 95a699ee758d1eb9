"""`python -m kernel_lab.finetune` writes an adapter that plain mlx-lm loads; the report writer."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from kernel_lab.finetune import main
from kernel_lab.report import write_report


@pytest.mark.slow
def test_finetune_adapter_loads_in_plain_mlx_lm(tmp_path):
    import mlx_lm

    from kernel_lab.models import model_path

    adapters = tmp_path / "adapters"
    rc = main([
        "--program", "stock", "--iters", "2", "--batch-size", "1", "--max-seq-length", "32",
        "--num-layers", "2", "--steps-per-report", "1", "--val-batches", "0",
        "--learning-rate", "1e-3", "--adapter-path", str(adapters),
        "--report-json", str(tmp_path / "run.json"),
    ])
    assert rc == 0
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 2
    assert config["lora_parameters"] == {"rank": 8, "dropout": 0.0, "scale": 20.0}
    saved = mx.load(str(adapters / "adapters.safetensors"))
    assert saved and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b") for k in saved)
    # Training moved lora_b away from its zero init.
    assert any(mx.abs(v).max().item() > 0 for k, v in saved.items() if k.endswith("lora_b"))

    # Plain mlx-lm: same parameter names, same values, and a finite forward.
    model, _ = mlx_lm.load(str(model_path("smollm2-135m-q4")), adapter_path=str(adapters))
    model.set_dtype(mx.float32)  # half precision is slow on the CPU
    params = dict(tree_flatten(model.parameters()))
    for name, value in saved.items():
        assert name in params
        assert mx.allclose(params[name], value.astype(mx.float32), atol=1e-6).item(), name
    logits = model(mx.array([[1, 2, 3, 4]]))
    assert logits.shape[:2] == (1, 4) and mx.all(mx.isfinite(logits)).item()
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["ok"] and len(record["losses"]) == 2


def test_report_writes_json_and_png(tmp_path):
    macro = {"runs": [{
        "model": "m", "fine_tune_type": "lora", "training_speedup": 1.2, "memory_ratio": 1.1,
        "records": {
            "stock": [{"reports": [{"iteration": 1}, {"iteration": 2}], "losses": [2.0, 1.8]}],
            "candidate": [{"losses": [2.0, 1.81]}],
        },
    }], "training_speedup": float("nan")}
    micro = [{"kernel": "rms_norm", "speedup_vs_stock": 1.3, "memory_ratio_vs_stock": 1.0},
             {"kernel": "swiglu", "speedup_vs_stock": 0.9, "memory_ratio_vs_stock": 2.0}]
    json_path, png_path = write_report(tmp_path, macro=macro, micro=micro)
    data = json.loads(json_path.read_text())  # NaN written as null: valid JSON
    assert data["macro"]["training_speedup"] is None
    assert data["micro"][1]["kernel"] == "swiglu"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert write_report(tmp_path / "empty", macro=None, micro=None)[1] is None
