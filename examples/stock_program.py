"""Every kernel is the one MLX / mlx-lm ship (kernel_lab.ops.STOCK): the evaluator's reference point.

    python evaluator.py examples/stock_program.py     # micro ~1.0, training speed and memory ~1.0

Its scores show the evaluator's noise on this machine: any difference from 1.0 is measurement.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernel_lab.ops import STOCK  # noqa: E402

rms_norm, rope, attention, swiglu = STOCK.rms_norm, STOCK.rope, STOCK.attention, STOCK.swiglu
cross_entropy, linear_cross_entropy = STOCK.cross_entropy, STOCK.linear_cross_entropy
lora_linear, dora_linear = STOCK.lora_linear, STOCK.dora_linear
