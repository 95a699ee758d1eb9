"""benchmarks/diagnose_summary.py over a made-up diagnose folder."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_clocks_and_host_shares(tmp_path):
    spec = importlib.util.spec_from_file_location("diagnose_summary", ROOT / "benchmarks/diagnose_summary.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    (tmp_path / "smi.csv").write_text(
        "timestamp, clocks.sm, clocks.mem, power, temp, util, reasons\n"
        "t, 345 MHz, 3201 MHz, 98.0 W, 37, 0 %, 0x1\n"
        "t, 1980 MHz, 3201 MHz, 500.0 W, 50, 90 %, 0x0\n"
        "t, 1755 MHz, 3201 MHz, 700.0 W, 60, 100 %, 0x4\n")
    assert script.clocks(tmp_path / "smi.csv") == (
        "3 samples, 2 busy: SM clock 1755-1980 MHz, power up to 700 W, clock-event reasons "
        "{'0x0': 1, '0x4': 1}")

    def window(cpu, wall, thread):
        return {"cpu_seconds": cpu, "wall_seconds": wall, "thread_cpu_seconds": thread}

    warm = window(9.0, 1.0, 9.0)  # the warm-up window: left out
    run = {"records": {"stock": [{"reports": [warm, window(0.6, 1.0, 0.54)]}],
                       "candidate": [{"reports": [warm, window(1.1, 1.0, 1.0), window(1.05, 1.0, 1.0)]}]}}
    (tmp_path / "optimized.json").write_text(json.dumps([{"runs": [run]}]))
    assert script.host_shares(tmp_path / "optimized.json").splitlines() == [
        "stock: 1 windows, CPU per wall second 0.60-0.60, training thread 90%-90% of it",
        "candidate: 2 windows, CPU per wall second 1.05-1.10, training thread 91%-95% of it"]


def test_window_lines(tmp_path):
    spec = importlib.util.spec_from_file_location("diagnose_summary", ROOT / "benchmarks/diagnose_summary.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    log = tmp_path / "run.log"
    log.write_text(
        "[stage 3] something else\n"
        "  smollm2-135m-q4 lora window 1/6 stock                  30000.0 tok/s   6.245 GB loss 2.4 (0.50 s, cpu 0.40 s)\n"
        "  smollm2-135m-q4 lora window 1/6 candidate              40000.0 tok/s   5.047 GB loss 2.4 (0.40 s, cpu 0.44 s)\n"
        "  smollm2-135m-q4 lora window 2/6 candidate              20000.0 tok/s   5.010 GB loss 2.4 (0.80 s, cpu 0.80 s)\n"
        "  smollm2-135m-q4 lora window 3/6 candidate              30000.0 tok/s   5.010 GB loss 2.4 (0.60 s, cpu 0.66 s)\n")
    assert script.window_lines(log) == [
        "smollm2-135m-q4 lora stock: 1 windows, median 30000 tok/s, 6.25 GB, 0.500 s wall, 0.400 s CPU, CPU/wall 0.80",
        "smollm2-135m-q4 lora candidate: 3 windows, median 30000 tok/s, 5.01 GB, 0.600 s wall, 0.660 s CPU, CPU/wall 1.10"]
