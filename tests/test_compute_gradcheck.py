"""benchmarks/compute_gradcheck.py on the embedded SmolLM2 (one layer, 4 tokens, bfloat16 on the CPU)."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_stock_against_stock_is_exact_in_both_passes(capsys):
    spec = importlib.util.spec_from_file_location("compute_gradcheck",
                                                  ROOT / "benchmarks/compute_gradcheck.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    script.main(["stock", "--layers", "1", "--length", "4"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("stock ")]
    assert [row[1] for row in rows] == ["lora", "dora"]
    for row in rows:  # float32 cos, rel err, bfloat16 cos, rel err, ok
        assert row[2:7] == ["1.000000", "0.00e+00", "1.000000", "0.00e+00", "yes"]
