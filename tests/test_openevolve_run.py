"""A real `openevolve-run` of config.yaml and evaluator.py against an OpenAI-compatible server on
localhost that answers every prompt with one SEARCH/REPLACE edit: rms_norm through mx.fast.

OpenEvolve 0.4.1 fails a run in which no iteration produced a candidate, which a small local model's
poor edits made the rule here; a scripted answer makes the loop deterministic: the prompt, the diff,
the cascade on the evolved program (one kernel, float32, reduced timings) and the checkpoint. One
iteration: each evaluation includes stage 3's CPU smoke run (about a minute on 2 cores).
"""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from kernel_lab import score

ROOT = Path(__file__).resolve().parent.parent
SEARCH = """    xf = x.astype(mx.float32)
    y = xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)
    y = y.astype(x.dtype)
    return y if weight is None else y * weight
"""
REPLACE = """    return mx.fast.rms_norm(x, weight, eps)
"""
EDIT = f"Use MLX's fused kernel.\n\n<<<<<<< SEARCH\n{SEARCH}=======\n{REPLACE}>>>>>>> REPLACE\n"


class _Scripted(BaseHTTPRequestHandler):
    prompts = []

    def do_POST(self):  # noqa: N802 - http.server's name
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.prompts.append(request["messages"])
        body = json.dumps({
            "id": "scripted", "object": "chat.completion", "created": 0, "model": request["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": EDIT}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def llm_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Scripted.prompts.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_the_edit_applies_to_the_starting_program():
    assert SEARCH in (ROOT / "initial_program.py").read_text()


@pytest.mark.slow
def test_openevolve_run_evolves_a_program(llm_server, tmp_path):
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["llm"].update(api_base=llm_server, timeout=60, retries=1)
    config["checkpoint_interval"] = 1
    config["evaluator"]["timeout"] = 240
    config["database"]["num_islands"] = 1
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    output = tmp_path / "run"
    env = {**os.environ, "KERNEL_LAB_NAMES": "rms_norm", "KERNEL_LAB_DTYPES": "float32",
           "KERNEL_LAB_REPEATS": "2", "KERNEL_LAB_MIN_SECONDS": "0.5", "KERNEL_LAB_STAGE1_TIMEOUT": "120",
           "KERNEL_LAB_STAGE2_TIMEOUT": "180", "KERNEL_LAB_ECHO": "0"}
    run = subprocess.run(
        [sys.executable, "-m", "openevolve.cli", str(ROOT / "initial_program.py"),
         str(ROOT / "evaluator.py"), "--config", str(config_path), "--iterations", "1",
         "--output", str(output)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    tail = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 0, tail
    # The prompt OpenEvolve built holds config.yaml's system message and the starting program.
    system, user = _Scripted.prompts[0][0]["content"], _Scripted.prompts[0][-1]["content"]
    assert system == config["prompt"]["system_message"] and "def rms_norm" in user
    checkpoints = sorted((output / "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[1]))
    assert checkpoints, f"no checkpoint written\n{tail}"
    programs = [json.loads(p.read_text()) for p in (checkpoints[-1] / "programs").glob("*.json")]
    evolved = [p for p in programs if "mx.fast.rms_norm(x, weight, eps)" in p["code"]]
    assert evolved, f"the edit never became a program\n{tail}"
    # The evolved program went through the cascade: correct in stage 1, timed in stage 2.
    metrics = evolved[0]["metrics"]
    assert metrics["correct_fraction"] == 1.0 and metrics["combined_score"] > score.STAGE1_PASS_SCORE, metrics
    assert metrics["micro_score"] > 0, metrics
    best = checkpoints[-1] / "best_program.py"
    assert best.is_file() and "def rms_norm" in best.read_text()
    info = json.loads((checkpoints[-1] / "best_program_info.json").read_text())
    # The best program (starting or evolved) passes stage 1 and is timed in stage 2.
    assert info["metrics"]["combined_score"] > score.STAGE1_PASS_SCORE, info["metrics"]
    assert info["metrics"]["correct_fraction"] == 1.0
    assert "micro_score" in info["metrics"]
