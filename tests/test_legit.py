"""The legit corpus (tests/legit/): honest alternative kernels pass stage 1 on every seed.

Each variant is checked only on the kernels it replaces, in-process; entries on one seed share
inputs and references. CI runs every entry on a few seeds (20 seeds take ~4 min on 2 cores);
`python tests/legit/legit_corpus.py --seeds 0-19` runs all 20 on any device (the README says
where and when it last passed).
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "legit"))
import legit_corpus as corpus  # noqa: E402

PROGRAMS = ("stock", "initial-program", "optimized")
VARIANTS = [name for name in corpus.ENTRIES if name not in PROGRAMS]


def _quiet(line):
    pass


def test_legit_variants_pass_a_few_seeds():
    lines = []
    failures = corpus.run([100, 101, 102], VARIANTS, log=lines.append)
    assert not failures, "\n".join(failures)
    progress = [line.split(":")[0] for line in lines if line.startswith("seed ")]
    assert progress == ["seed 100 (1/3)", "seed 101 (2/3)", "seed 102 (3/3)"]  # one line a seed


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 7, 13, 19])
def test_every_legit_entry_and_program_passes(seed):
    """Variants, stock, the starting and the optimized program (with its forced paths)."""
    failures = corpus.run([seed], log=_quiet)
    assert not failures, "\n".join(failures)


def test_entries_replace_contract_kernels_only():
    for name, make in corpus.ENTRIES.items():
        kernels = make()
        assert kernels and set(kernels) <= set(corpus.KERNEL_NAMES), name
        assert all(callable(fn) for fn in kernels.values()), name
