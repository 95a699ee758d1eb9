"""The hand-optimized example program passes stage 1 on every code path it has.

On the CPU it takes the quantized-matmul path and (for the small default vocabularies)
the one-chunk loss; the chunked loss, the dequantize-and-dense base and the half-precision
low-rank product (its CUDA choices) are forced here so CI checks them against the float64
oracle too.
"""

import mlx.core as mx

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


@pytest.mark.parametrize("dense,half", [(True, False), (False, True), (True, True)],
                         ids=["dense-base", "half-lora", "dense-base-half-lora"])
def test_gpu_paths_of_the_adapters(dense, half):
    kernels = _kernels(_dense_base=lambda: dense,
                       _half_lora=lambda dtype: half and dtype != mx.float32)
    results = check_kernels(kernels, seed=SEED, names=["lora_linear", "dora_linear"])
    assert all(r["passed"] for r in results), format_table(results)
