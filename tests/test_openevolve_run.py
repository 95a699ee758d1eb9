"""A real `openevolve-run` against a real OpenAI-compatible server on localhost.

`mlx_lm.server` serves the embedded SmolLM2-135M, cut to its first layers and dequantized to
float32 (see `serving_copy`: the full model is far too slow on a 2-core CPU). Two iterations on a reduced evaluation (one kernel, float32)
check the loop, config.yaml, the cascade and the checkpoints; the tiny model's edits are poor.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from kernel_lab import score

ROOT = Path(__file__).resolve().parent.parent
SPEC = "smollm2-135m-q4"
SERVED_LAYERS = 2


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serving_copy(source, target, layers=SERVED_LAYERS):
    """The model's first `layers` decoder layers, dequantized to float32, as an mlx-lm dir.

    On a 2-core CPU the full 30-layer model prefills ~10 tokens/s (quantized matmuls are slow
    there), so a 2,000-token OpenEvolve prompt would take minutes; the cut model's real weights
    and tokenizer answer in seconds (its edits are poor, which this test does not mind).
    """
    import mlx.core as mx

    shutil.copytree(source, target)
    config = json.loads((Path(target) / "config.json").read_text())
    quantization = config.pop("quantization", None) or {}
    config.pop("quantization_config", None)
    config["num_hidden_layers"] = layers
    for path in Path(target).glob("*.safetensors"):
        weights = mx.load(str(path))
        kept = {}
        for key, value in weights.items():
            parts = key.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= layers:
                continue
            if key.endswith((".scales", ".biases")) and key[:-7] + ".weight" in weights \
                    and weights[key[:-7] + ".weight"].dtype == mx.uint32:
                continue
            if value.dtype == mx.uint32 and key[:-7] + ".scales" in weights:
                module = key[: -len(".weight")]
                spec = quantization.get(module, quantization)
                value = mx.dequantize(value, weights[module + ".scales"], weights[module + ".biases"],
                                      group_size=spec["group_size"], bits=spec["bits"])
            kept[key] = value.astype(mx.float32) if mx.issubdtype(value.dtype, mx.floating) else value
        mx.save_safetensors(str(path), kept, metadata={"format": "mlx"})
    (Path(target) / "config.json").write_text(json.dumps(config, indent=2))
    return Path(target)


@pytest.fixture(scope="module")
def llm_server(tmp_path_factory):
    try:
        from kernel_lab.models import available_offline, model_path
    except ImportError as exc:
        pytest.fail(f"kernel_lab.models is needed for the served model: {exc}")
    if SPEC not in available_offline():
        pytest.skip(f"{SPEC} is not installed (python -m kernel_lab.models fetch {SPEC})")
    model_dir = serving_copy(model_path(SPEC), tmp_path_factory.mktemp("served") / "model")
    port = _free_port()
    log = open(tmp_path_factory.mktemp("server_log") / "server.log", "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlx_lm.server", "--model", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"mlx_lm.server exited: {log.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            time.sleep(0.5)
    else:
        server.kill()
        pytest.fail("mlx_lm.server did not answer within 120 s")
    yield base
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.mark.slow
def test_openevolve_run_two_iterations(llm_server, tmp_path):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["llm"].update(api_base=llm_server, max_tokens=150, timeout=180, retries=1)
    config["checkpoint_interval"] = 1
    config["evaluator"]["timeout"] = 240
    config["database"]["num_islands"] = 1
    # A short prompt: on the CPU, the served model reads ~300 tokens/s.
    config["prompt"].update(num_top_programs=1, num_diverse_programs=0, include_artifacts=False,
                            system_message="Make these MLX kernels faster. Keep signatures.")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "run"
    env = {**os.environ, "KERNEL_LAB_NAMES": "rms_norm", "KERNEL_LAB_DTYPES": "float32",
           "KERNEL_LAB_REPEATS": "2", "KERNEL_LAB_MIN_SECONDS": "0.5", "KERNEL_LAB_STAGE1_TIMEOUT": "120",
           "KERNEL_LAB_STAGE2_TIMEOUT": "180", "KERNEL_LAB_ECHO": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "openevolve.cli", str(ROOT / "initial_program.py"),
         str(ROOT / "evaluator.py"), "--config", str(config_path), "--iterations", "2",
         "--output", str(output)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    checkpoints = sorted((output / "checkpoints").glob("checkpoint_*"))
    assert checkpoints, f"no checkpoint written\n{tail}"
    best = checkpoints[-1] / "best_program.py"
    assert best.is_file() and "def rms_norm" in best.read_text()
    info = json.loads((checkpoints[-1] / "best_program_info.json").read_text())
    # The starting program passes stage 1 and is timed in stage 2 (micro score > 0).
    assert info["metrics"]["combined_score"] > score.STAGE1_PASS_SCORE, info["metrics"]
    assert info["metrics"]["correct_fraction"] == 1.0
    assert "micro_score" in info["metrics"]
