"""The hand-optimized example program passes stage 1 on every code path it has.

On the CPU it takes the quantized-matmul path and (for the small default vocabularies)
the one-chunk loss; the chunked loss and the dequantize-and-dense path (its CUDA choice)
are forced here so CI checks them against the float64 oracle too.
"""

from pathlib import Path

import pytest

from kernel_lab.contract import kernels_from_module, load_module
from kernel_lab.correctness import check_kernels, format_table

PROGRAM = Path(__file__).resolve().parents[1] / "examples" / "optimized_program.py"
SEED = 4321


def _kernels(**overrides):
    module = load_module(PROGRAM)
    for name, value in overrides.items():
        assert hasattr(module, name), name
        setattr(module, name, value)
    return kernels_from_module(module)


def test_optimized_program_passes():
    results = check_kernels(_kernels(), seed=SEED)
    assert all(r["passed"] for r in results), format_table(results)


@pytest.mark.parametrize("dense", [False, True], ids=["quantized-head", "dense-base"])
def test_chunked_linear_cross_entropy(dense):
    # One row a chunk: as many sequential chunks as tokens in every case.
    kernels = _kernels(LCE_CHUNK_ELEMENTS=1, _dense_base=lambda: dense)
    results = check_kernels(kernels, seed=SEED, names=["linear_cross_entropy"])
    assert all(r["passed"] for r in results), format_table(results)


def test_dense_base_path():
    kernels = _kernels(_dense_base=lambda: True)
    results = check_kernels(kernels, seed=SEED, names=["lora_linear", "dora_linear"])
    assert all(r["passed"] for r in results), format_table(results)
