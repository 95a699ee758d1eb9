"""Hostile programs for stage 3: right everywhere stage 1 looks, wrong only inside a model.

Each is initial_program.py with one kernel rebound at the end of the file: the honest kernel runs
as before except on inputs of training length (a sequence axis of at least 32 tokens, which
stage 1's default cases never have), where its forward values stay exact but its gradients are
zero or partly wrong. A few steps at learning rate 1e-5 move the loss so little that the loss
check cannot see the difference; stage 3's gradient check must (tests/test_training.py).
Each entry: the code appended, and what the error must name (kernel, tensor).
`build(name, directory)` writes the program and returns its path.
"""

from pathlib import Path

INITIAL_PROGRAM = Path(__file__).resolve().parents[2] / "initial_program.py"
# Training sequences (>= 32 tokens on the axis before the features), not stage 1's (1, 8) cases.
IN_MODEL = "{0}.ndim == 3 and {0}.shape[-2] >= 32"

TRAINING = {
    # LoRA never learns: lora_a / lora_b get zero gradients, the forward and dx are exact.
    "zero_lora_gradients": dict(code=f'''
_honest_lora_linear = lora_linear


def lora_linear(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size=None, bits=None,
                bias=None):
    if {IN_MODEL.format("x")}:
        lora_a, lora_b = mx.stop_gradient(lora_a), mx.stop_gradient(lora_b)
    return _honest_lora_linear(x, weight, scales, biases, lora_a, lora_b, scale,
                               group_size=group_size, bits=bits, bias=bias)
''', expect=["lora_linear", ".lora_a", "cosine 0.0000"]),
    # Half the gradient through SwiGLU's gate (same value: 0.5 g + 0.5 g == g exactly).
    "half_swiglu_gate_gradient": dict(code=f'''
_honest_swiglu = swiglu


def swiglu(gate, up):
    if {IN_MODEL.format("gate")}:
        gate = 0.5 * gate + 0.5 * mx.stop_gradient(gate)
    return _honest_swiglu(gate, up)
''', expect=["swiglu", "relative error"]),
    # Every gradient 10% short: the direction is right (cosine 1), the size is not.
    "scaled_loss_gradient": dict(code=f'''
_honest_linear_cross_entropy = linear_cross_entropy


def linear_cross_entropy(hidden, weight, targets, **quantization):
    if hidden.shape[0] >= 32:  # tokens of a training batch (the model's hidden states, flattened)
        hidden = 0.9 * hidden + mx.stop_gradient(0.1 * hidden)
    return _honest_linear_cross_entropy(hidden, weight, targets, **quantization)
''', expect=["loss", "relative error 0.1"], fine_tune_type="lora"),
    # DoRA's magnitude never learns.
    "frozen_dora_magnitude": dict(code=f'''
_honest_dora_linear = dora_linear


def dora_linear(x, weight, scales, biases, lora_a, lora_b, scale, magnitude, *, group_size=None,
                bits=None, bias=None):
    if {IN_MODEL.format("x")}:
        magnitude = mx.stop_gradient(magnitude)
    return _honest_dora_linear(x, weight, scales, biases, lora_a, lora_b, scale, magnitude,
                               group_size=group_size, bits=bits, bias=bias)
''', expect=["dora_linear", ".m:", "cosine 0.0000"], fine_tune_type="dora"),
    # Zero LoRA gradients in bfloat16 only: the float32 gradient check cannot see it, the check in
    # the compute dtype (budget entry grad_check_compute) must.
    "zero_lora_gradients_in_bfloat16": dict(code=f'''
_honest_lora_linear = lora_linear


def lora_linear(x, weight, scales, biases, lora_a, lora_b, scale, *, group_size=None, bits=None,
                bias=None):
    if x.dtype == mx.bfloat16 and {IN_MODEL.format("x")}:
        lora_a, lora_b = mx.stop_gradient(lora_a), mx.stop_gradient(lora_b)
    return _honest_lora_linear(x, weight, scales, biases, lora_a, lora_b, scale,
                               group_size=group_size, bits=bits, bias=bias)
''', expect=["lora_linear", "bfloat16", ".lora_a", "cosine 0.0000"], compute_only=True),
}


def build(name, directory):
    """Write the hostile program `name` into directory; returns its path."""
    source = INITIAL_PROGRAM.read_text() + f"\n\n# hostile: {name}\n" + TRAINING[name]["code"]
    path = Path(directory) / f"hostile_{name}.py"
    path.write_text(source)
    return path
