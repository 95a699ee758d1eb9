"""The score OpenEvolve maximises (`combined_score`), as pure functions.

One scale across the cascade: a program that got further never ranks below one that stopped
earlier (a stage-3 program has passed the micro gate, so its micro score is higher too):
    failed anywhere                       0
    correct, not timed (stage 1)          0.1
    stopped at stage 2 (micro < gate)     0.1 + 0.4 * micro / MICRO_GATE      in (0.1, 0.5)
    fine-tuned (stage 3)                  band(micro**0.25 * macro**0.75)     in (0.5, inf)
band(x) = x for x >= 0.75 (a number you can read: 1.0 = as good as stock MLX / mlx-lm, 1.2 = 20%
better), and 0.5 + x / 3 below (continuous, monotone, above every stage-2 score).
config.yaml's cascade_thresholds are [STAGE1_PASS_SCORE, STAGE3_FLOOR]: stage 2's score reaches 0.5
exactly when micro >= MICRO_GATE.

Stage 1 (correctness): every kernel passes or the program scores 0.
Stage 2 (micro-benchmarks), per kernel k:
    k_score = speedup_vs_stock ** 0.75 * memory_ratio_vs_stock ** 0.25
with speedup = stock time / candidate time of forward+backward and memory_ratio = stock peak /
candidate peak (> 1 = leaner), both clipped to [0.01, 100]; micro = geometric mean of k_score over
the kernels. 1.0 means "as good as what MLX ships", > 1 better.
Stage 3 (real LoRA fine-tuning), per training run r:
    r_score = training_speedup ** 0.7 * memory_ratio ** 0.3
macro = geometric mean of r_score over runs; fine_tuning_score = micro ** 0.25 * macro ** 0.75, and
0 when any run's loss or gradients do not match stock's (the kernels changed what training computes).
Any correctness failure anywhere scores 0.
"""

import math

STAGE1_PASS_SCORE = 0.1
MICRO_GATE = 0.9  # stage 3 runs for programs within 10% of MLX's own kernels in stage 2
STAGE3_FLOOR = 0.5  # every fine-tuned program scores above every program that stopped at stage 2
BAND_IDENTITY = 0.75  # from here up, combined_score = the fine-tuning score itself
RATIO_CLIP = (0.01, 100.0)
SPEED_WEIGHT, MEMORY_WEIGHT = 0.75, 0.25  # micro: per kernel
TRAIN_SPEED_WEIGHT, TRAIN_MEMORY_WEIGHT = 0.7, 0.3  # macro: per training run
MICRO_WEIGHT, MACRO_WEIGHT = 0.25, 0.75  # combined


def clip_ratio(value):
    """Clip a ratio to RATIO_CLIP (inf -> 100); NaN or a non-positive ratio is a measuring bug: raise."""
    value = float(value)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"a speed or memory ratio must be positive, got {value}")
    return min(max(value, RATIO_CLIP[0]), RATIO_CLIP[1])


def geometric_mean(values):
    values = [float(v) for v in values]
    if not values:
        raise ValueError("geometric mean of nothing")
    if any(v <= 0 or math.isnan(v) for v in values):
        return 0.0
    return math.exp(sum(math.log(v) for v in values) / len(values))


def stage1_score(passed):
    """(combined_score, correct_fraction) from one pass/fail flag per kernel."""
    passed = [bool(p) for p in passed]
    if not passed:
        raise ValueError("no kernel results")
    fraction = sum(passed) / len(passed)
    return (STAGE1_PASS_SCORE if all(passed) else 0.0), fraction


def kernel_score(speedup_vs_stock, memory_ratio_vs_stock):
    """One kernel's micro score: speedup**0.75 * memory_ratio**0.25 (ratios clipped)."""
    return clip_ratio(speedup_vs_stock) ** SPEED_WEIGHT * \
        clip_ratio(memory_ratio_vs_stock) ** MEMORY_WEIGHT


def micro_score(kernel_ratios):
    """Geometric mean of kernel_score over {kernel: (speedup_vs_stock, memory_ratio_vs_stock)}."""
    if not kernel_ratios:
        raise ValueError("no kernel measurements")
    return geometric_mean(kernel_score(s, m) for s, m in kernel_ratios.values())


def run_score(training_speedup, memory_ratio):
    """One training run's macro score: training_speedup**0.7 * memory_ratio**0.3 (clipped)."""
    return clip_ratio(training_speedup) ** TRAIN_SPEED_WEIGHT * \
        clip_ratio(memory_ratio) ** TRAIN_MEMORY_WEIGHT


def macro_score(runs):
    """Geometric mean of run_score over runs [(training_speedup, memory_ratio), ...]."""
    if not runs:
        raise ValueError("no training runs")
    return geometric_mean(run_score(s, m) for s, m in runs)


def stage2_score(micro, gate=MICRO_GATE):
    """combined_score of a program timed in stage 2 (not fine-tuned): 0.1 + 0.4 * micro / gate."""
    if micro is None or micro <= 0:
        return 0.0
    return STAGE1_PASS_SCORE + (STAGE3_FLOOR - STAGE1_PASS_SCORE) * float(micro) / gate


def fine_tuning_score(micro, macro):
    """micro**0.25 * macro**0.75: the measured result of a program that reached stage 3."""
    return float(micro) ** MICRO_WEIGHT * float(macro) ** MACRO_WEIGHT


def band(value):
    """Monotone map of a fine-tuning score onto (STAGE3_FLOOR, inf), identity from BAND_IDENTITY up."""
    if value >= BAND_IDENTITY:
        return float(value)
    slope = (BAND_IDENTITY - STAGE3_FLOOR) / BAND_IDENTITY
    return STAGE3_FLOOR + slope * float(value)


def combined_score(micro, macro=None, *, loss_matches=True, gate=MICRO_GATE):
    """The score of the furthest stage a program reached (see the module docstring).

    macro None: stage 2's score. Otherwise the banded fine-tuning score; a loss or gradient
    mismatch in fine-tuning (loss_matches=False) or a zero part zeroes it.
    """
    if micro is None or micro <= 0 or not loss_matches:
        return 0.0
    if macro is None:
        return stage2_score(micro, gate)
    if macro <= 0:
        return 0.0
    return band(fine_tuning_score(micro, macro))
