"""Random-weight probe: one mlx-lm-style compiled LoRA/DoRA step, stock vs parts of a program.

Ablations for kernel work on a GPU, with no model files: a SmolLM2-135M or Qwen2.5-0.5B shaped
model with random 4-bit weights, batch B x L tokens, all layers LoRA rank 8, bfloat16.
    python benchmarks/probe.py [--model smollm2|qwen05] [--dora] [--parts swiglu,lora,lce]
                               [--variant qbase,dqnorm,chunk=N] [-B 8 -L 1024 --steps 10]
--parts installs the program's swiglu / lora_linear+dora_linear / linear_cross_entropy; --variant
overrides module-level choices of examples/optimized_program.py. One JSON line per run: tokens/s
over --steps after 2 warm-up steps, peak memory, losses. Each process measures one configuration,
so compare runs made back to back on one machine (benchmarks/h200-2026-11-22/probe/ holds some).
"""
import argparse, time, json, sys, os
from functools import partial
sys.path.insert(0, os.getcwd())
import mlx.core as mx, mlx.nn as nn, mlx.optimizers as optim
import mlx_lm.models.llama as llama, mlx_lm.models.qwen2 as qwen2
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.lora import LoRALinear
from mlx_lm.tuner.dora import DoRALinear
from kernel_lab.contract import load_module, kernels_from_module

CONFIGS = {
 "smollm2": (llama, dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, vocab_size=49152, rope_theta=100000, tie_word_embeddings=True, head_dim=64)),
 "qwen05": (qwen2, dict(model_type="qwen2", hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=151936, rope_theta=1000000, tie_word_embeddings=True)),
}

def build(name, dora, gs):
    mx.random.seed(0)
    mod, cfg = CONFIGS[name]
    model = mod.Model(mod.ModelArgs(**cfg))
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=gs, bits=4)
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 8, "scale": 20.0, "dropout": 0.0}, use_dora=dora)
    for m in model.modules():
        if isinstance(m, (LoRALinear, DoRALinear)):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.01
    mx.eval(model.parameters())
    return mod, model

def patch(mod, model, k, parts):
    if "swiglu" in parts:
        mod.swiglu = k.swiglu
    class FastLoRA(LoRALinear):
        def __call__(self, x):
            l = self.linear
            return k.lora_linear(x, l.weight, l.scales, l.biases, self.lora_a, self.lora_b, self.scale, group_size=l.group_size, bits=l.bits, bias=l.get("bias"))
    class FastDoRA(DoRALinear):
        def __call__(self, x):
            l = self.linear
            return k.dora_linear(x, l.weight, l.scales, l.biases, self.lora_a, self.lora_b, self.scale, self.m, group_size=l.group_size, bits=l.bits, bias=l.get("bias"))
    if "lora" in parts:
        for m in model.modules():
            if type(m) is LoRALinear: m.__class__ = FastLoRA
            if type(m) is DoRALinear: m.__class__ = FastDoRA
    if "lce" in parts:
        def loss(model, batch, lengths):
            inputs, targets = batch[:, :-1], batch[:, 1:]
            h = model.model(inputs)
            e = model.model.embed_tokens
            ce = k.linear_cross_entropy(h, e.weight, targets, scales=e.scales, biases=e.biases, group_size=e.group_size, bits=e.bits)
            steps = mx.arange(1, targets.shape[1] + 1)
            mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
            ce = ce * mask
            ntoks = mask.sum()
            return ce.astype(mx.float32).sum() / ntoks, ntoks
        return loss
    return default_loss

def run(name, dora, parts, program, B, L, steps, gs):
    mod, model = build(name, dora, gs)
    orig = mod.swiglu
    m = load_module(program)
    for v in VARIANT:
        if v == "qbase": m._dense_base = lambda: False
        if v == "dqnorm":
            def dq(weight, scales, biases, group_size, bits):
                w = mx.dequantize(weight, scales, biases, group_size=group_size, bits=bits)
                return mx.sum(mx.square(w.astype(mx.float32)), axis=1)
            m._row_sq_norms = dq
        if v.startswith("chunk="): m.LCE_CHUNK_ELEMENTS = int(v[6:])
    k = kernels_from_module(m)
    loss_fn = patch(mod, model, k, parts) if parts else default_loss
    opt = optim.Adam(learning_rate=1e-5)
    lvg = nn.value_and_grad(model, loss_fn)
    state = [model.state, opt.state, mx.random.state]
    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (lv, toks), g = lvg(model, batch, lengths)
        opt.update(model, g)
        return lv, toks
    mx.random.seed(0)
    batch = mx.random.randint(0, CONFIGS[name][1]["vocab_size"], (B, L + 1))
    lengths = mx.array([[0, L]] * B)
    mx.eval(batch, lengths)
    losses = []
    for i in range(2):
        lv, t = step(batch, lengths); mx.eval(state, lv); losses.append(lv.item())
    mx.synchronize(); mx.reset_peak_memory()
    tic = time.perf_counter()
    for i in range(steps):
        lv, t = step(batch, lengths); mx.eval(state, lv)
    mx.synchronize()
    dt = time.perf_counter() - tic
    losses.append(lv.item())
    mod.swiglu = orig
    return dict(model=name, dora=dora, parts=parts, variant=VARIANT, tok_s=round(B * L * steps / dt), peak_gb=round(mx.get_peak_memory() / 1e9, 2), loss=[round(l, 5) for l in losses])

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2"); ap.add_argument("--dora", action="store_true")
    ap.add_argument("--parts", default=""); ap.add_argument("--program", default="examples/optimized_program.py")
    ap.add_argument("-B", type=int, default=8); ap.add_argument("-L", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10); ap.add_argument("--gs", type=int, default=64)
    ap.add_argument("--variant", default="")
    a = ap.parse_args()
    VARIANT = [v for v in a.variant.split(",") if v]
    parts = [p for p in a.parts.split(",") if p]
    print(json.dumps(run(a.model, a.dora, parts, a.program, a.B, a.L, a.steps, a.gs)), flush=True)
