"""benchmarks/window_summary.py over made-up window lines of a stage-3 log."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

LOG = """\
[stage 3] smollm2-135m-q4 lora: prepared stock 3.8 s, candidate 6.6 s (gradient check 2.3 s)
  smollm2-135m-q4 lora window 1/3 stock                  27333.5 tok/s   5.903 GB loss 2.4973 (0.61 s, cpu 0.64 s)
  smollm2-135m-q4 lora window 1/3 candidate              32646.7 tok/s   4.408 GB loss 2.4965 (0.52 s, cpu 0.55 s)
  smollm2-135m-q4 lora window 2/3 candidate              30000.0 tok/s   4.500 GB loss 2.4768 (0.50 s, cpu 0.40 s)
  smollm2-135m-q4 lora window 2/3 stock                  25702.0 tok/s   5.757 GB loss 2.4773 (0.65 s, cpu 0.67 s)
  smollm2-135m-q4 lora window 3/3 stock                  26000.0 tok/s   8.000 GB loss 2.3234 (0.70 s, cpu 0.35 s)
  smollm2-135m-q4 lora window 3/3 candidate              31000.0 tok/s   4.400 GB loss 2.3241 (0.60 s, cpu 0.66 s)
  qwen2.5-coder-0.5b-q4 dora window 1/1 optimized_program      22880.8 tok/s   8.700 GB loss 1.8873 (0.73 s, cpu 0.77 s)
model                    type   speedup  memory loss diff  grad cos  grad err  status
"""


def load():
    spec = importlib.util.spec_from_file_location("window_summary", ROOT / "benchmarks/window_summary.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_windows_are_read_per_row_and_side_and_summarized_by_medians():
    script = load()
    rows = script.read_windows(LOG.splitlines())
    assert list(rows) == [("smollm2-135m-q4", "lora", "stock"), ("smollm2-135m-q4", "lora", "candidate"),
                          ("qwen2.5-coder-0.5b-q4", "dora", "optimized_program")]
    assert rows["smollm2-135m-q4", "lora", "stock"][2] == (26000.0, 8.0, 0.70, 0.35)
    s = script.summarize(rows["smollm2-135m-q4", "lora", "stock"])
    assert s["tokens_per_second"] == 26000.0 and s["peak_gb"] == 5.903
    assert s["wall_seconds"] == 0.65 and s["cpu_seconds"] == 0.64
    assert s["cpu_per_wall"] == pytest.approx(0.64 / 0.65)


def test_main_prints_every_side(tmp_path, capsys):
    (tmp_path / "eval.log").write_text(LOG)
    load().main([str(tmp_path / "eval.log")])
    out = capsys.readouterr().out
    assert "3 sides" in out and "optimized_program" in out and "22881" in out
