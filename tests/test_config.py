"""config.yaml loads in OpenEvolve 0.4 and agrees with the evaluator's own budgets and scores."""

from pathlib import Path

from openevolve.config import load_config

import evaluator
from kernel_lab import score

CONFIG = Path(__file__).resolve().parents[1] / "config.yaml"


def test_config_loads_and_matches_the_evaluator():
    config = load_config(str(CONFIG))
    settings = evaluator.Settings()
    assert config.evaluator.cascade_evaluation
    # stage 1 gives exactly STAGE1_PASS_SCORE to a correct program: the first gate is that score;
    # stage 2's score reaches STAGE3_FLOOR exactly at the micro gate: the second gate is that
    assert config.evaluator.cascade_thresholds == [score.STAGE1_PASS_SCORE, score.STAGE3_FLOOR]
    # our own child-process limits must fire before openevolve's (which cannot stop a stage)
    for limit in (settings.stage1_timeout, settings.stage2_timeout + settings.lock_timeout,
                  settings.stage3_timeout):
        assert limit < config.evaluator.timeout
    assert config.diff_based_evolution and config.max_code_length > 2 * len(
        (CONFIG.parent / "examples" / "optimized_program.py").read_text())
    assert "linear_cross_entropy" in config.prompt.system_message
