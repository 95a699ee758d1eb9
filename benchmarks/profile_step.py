"""Profile one mlx-lm LoRA/DoRA training step of a real 4-bit model, by layer part.

    python benchmarks/profile_step.py --model smollm2-135m-q4 --fine-tune-type lora \
        --program none|initial_program.py|examples/optimized_program.py [--batch 8 --length 1024
        --steps 10 --layers 0 --no-parts --clear-cache --json out.json]

Stock mlx-lm (`--program none`) or with a program's kernels patched in (kernel_lab.patching);
every kept layer gets LoRA/DoRA rank 8 (--layers K keeps the model's last K layers; 0 = all).
1. step: mlx-lm's compiled training step (value_and_grad, Adam, mx.compile over model/optimizer/
   random state) on one fixed B x (L+1) batch, all positions counted: median ms, tokens/s, peak,
   weights' and resident (weights + Adam state + batch) memory.
2. parts of one real (converted, patched) layer, each its own compiled vjp w.r.t. its activation
   inputs and the LoRA parameters it owns (random cotangent, the step's shapes): median ms (short
   parts queue several calls per sample, as the step's kernels queue) and peak memory above the
   inputs; each part x its count as a share of the step, the rest "unattributed".
3. memory each layer keeps for the backward: (step transient with K layers - with K/2) / (K - K/2),
   next to the attention score matrix B x heads x L x L.
4. the compiled step's graph: how many primitives one step runs (after mx.compile's fusion), in
   all and per layer (the same halving), by kind: each is a launch and host work per step.
Tables last; --json writes everything.
"""

import argparse
import collections
import io
import json
import re
import statistics
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_flatten, tree_map, tree_unflatten  # noqa: E402

from kernel_lab.loss_patch import _head_of  # noqa: E402
from kernel_lab.patching import apply_kernels  # noqa: E402
from kernel_lab.training import convert_to_lora, resolve_kernels  # noqa: E402

MB = 2**20
LAYER_PARTS = ("input_norm", "qkv_proj", "rope_qk", "attention", "o_proj", "post_norm",
               "gate_up_proj", "swiglu", "down_proj")  # the layer's parts, run once per layer


def measure(run, repeats, warmup=3, target_s=0.02, after=None):
    """run() -> arrays to evaluate. (median ms, peak bytes above the active before, that active,
    {"ms": every sample, "cpu_share": process CPU time / wall time over the samples, "after_ms": the
    part of each sample spent in after(), "cached_mb": MLX's buffer cache just before it}).
    after(): called after each sample's synchronize, inside its time (as mlx-lm's clear_cache)."""
    for _ in range(warmup):
        mx.eval(run())
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    tic = time.perf_counter()
    mx.eval(run())
    mx.synchronize()
    single = time.perf_counter() - tic
    peak = max(mx.get_peak_memory() - before, 0)
    calls = max(1, min(16, round(target_s / max(single, 1e-6))))  # queue short parts
    samples, after_s, cached, cpu = [], [], [], time.process_time()
    for _ in range(repeats):
        tic = time.perf_counter()
        for _ in range(calls):
            mx.async_eval(run())
        mx.synchronize()
        if after is not None:
            cached.append(mx.get_cache_memory() / 2**20)
            toc = time.perf_counter()
            after()
            after_s.append((time.perf_counter() - toc) / calls)
        samples.append((time.perf_counter() - tic) / calls)
    spread = {"ms": [1e3 * t for t in samples], "after_ms": [1e3 * t for t in after_s], "cached_mb": cached,
              "cpu_share": (time.process_time() - cpu) / (sum(samples) * calls)}
    return 1e3 * statistics.median(samples), peak, before, spread


def build_step(model, loss_fn, optimizer):
    """mlx_lm.tuner.trainer.train's compiled step (no gradient accumulation, one process)."""
    loss_value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        (lvalue, toks), grad = loss_value_and_grad(model, batch, lengths)
        optimizer.update(model, grad)
        return lvalue, toks

    return step, state


def step_graph(model, optimizer, step, batch, lengths):
    """Counter of the primitives one more step's lazy graph holds, by name (views included)."""
    loss, _ = step(batch, lengths)
    outputs = [loss] + [v for _, v in tree_flatten(model.trainable_parameters())]
    outputs += [v for _, v in tree_flatten(optimizer.state) if isinstance(v, mx.array)]
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    mx.eval(outputs)
    return collections.Counter(re.findall(r'label ="([^"]+)"', dot.getvalue()))


def time_step(model, loss_fn, batch, lengths, steps, warmup, clear_cache=False):
    """Median step ms, peak bytes, resident bytes (weights + Adam state + batch), last loss, the
    optimizer, every step's ms and the host's CPU share.

    The first warm-up step compiles and creates the Adam state; one step per sample. clear_cache:
    free MLX's buffer cache after every step, as mlx-lm's train() does by default
    (clear_cache_threshold 0), so that each step allocates its buffers anew."""
    warmup = max(warmup, 1)
    optimizer = optim.Adam(learning_rate=1e-5)
    step, state = build_step(model, loss_fn, optimizer)
    last = [None]

    def run():
        last[0], _ = step(batch, lengths)
        return [state, last[0]]

    ms, transient, resident, spread = measure(run, steps, warmup=warmup, target_s=0,
                                              after=mx.clear_cache if clear_cache else None)
    spread["graph"] = step_graph(model, optimizer, step, batch, lengths)
    return ms, resident + transient, resident, last[0].item(), optimizer, spread


def fwd_bwd(owners, call, inputs, seed=0):
    """run() for the compiled vjp of call(*inputs) w.r.t. inputs and the owners' trainable params."""
    flat = [tree_flatten(m.trainable_parameters()) for m in owners]
    params = [v for f in flat for _, v in f]

    def load(arrays):
        i = 0
        for m, f in zip(owners, flat):
            m.update(tree_unflatten([(k, a) for (k, _), a in zip(f, arrays[i:i + len(f)])]))
            i += len(f)

    def f(*primals):
        load(primals[len(inputs):])
        out = call(*primals[:len(inputs)])
        return list(out) if isinstance(out, (list, tuple)) else [out]

    outs = f(*inputs, *params)
    load(params)
    key = mx.random.key(seed)
    cots = [mx.random.normal(o.shape, key=key).astype(o.dtype) if o.ndim else mx.ones_like(o)
            for o in outs]
    mx.eval(cots)
    n = len(inputs) + len(params)
    compiled = mx.compile(lambda *a: mx.vjp(f, list(a[:n]), list(a[n:])))

    def run():
        try:
            return compiled(*inputs, *params, *cots)
        finally:
            load(params)  # tracing leaves tracers in the modules

    return run


def head_loss(model, report, batch, lengths):
    """loss(h): final norm + head + the step's loss on the pre-norm hidden state h."""
    from mlx_lm.tuner.trainer import default_loss

    get_head, why = _head_of(model)
    if get_head is None:
        raise ValueError(why)
    head = get_head(model)

    class Body:  # stands in for model.model: the layers already ran
        def __init__(self, h):
            self.h, self.embed_tokens = h, model.model.embed_tokens

        def __call__(self, inputs):
            return model.model.norm(self.h)

    class Outer:  # stands in for the Model with a `model` body and maybe an `lm_head`
        def __init__(self, h):
            self.model, self.lm_head = Body(h), head

        def __call__(self, inputs):
            out = self.model(inputs)
            return head.as_linear(out) if isinstance(head, (nn.Embedding, nn.QuantizedEmbedding)) \
                else head(out)

    loss_fn = report.loss_fn if report is not None else default_loss
    return lambda h: loss_fn(Outer(h), batch, lengths)[0]


def profile_parts(model, report, batch, lengths, optimizer, repeats, warmup, dtype):
    """{part: {ms, peak_mb, count}} for one layer's parts, the head + loss, embedding and Adam."""
    from mlx_lm.models.base import scaled_dot_product_attention

    B, L = batch.shape[0], batch.shape[1] - 1
    layer, n = model.layers[-1], len(model.layers)
    attn, mlp = layer.self_attn, layer.mlp
    D = layer.input_layernorm.weight.shape[0]
    H, Hkv = attn.n_heads, attn.n_kv_heads
    hd = getattr(attn, "head_dim", D // H)  # llama has it; qwen2 uses hidden // heads
    inter = getattr(mlp.gate_proj, "linear", mlp.gate_proj).weight.shape[0]
    swiglu = type(mlp).__call__.__globals__["swiglu"]  # as the (patched) MLP calls it
    sdpa_fn = type(attn).__call__.__globals__.get("scaled_dot_product_attention",
                                                  scaled_dot_product_attention)
    key = iter(mx.random.split(mx.random.key(1), 16))

    def x(*shape):
        return mx.random.normal(shape, key=next(key)).astype(dtype)

    def heads(t, h):
        return t.reshape(B, L, h, -1).transpose(0, 2, 1, 3)

    def sdpa(q, k, v):  # v arrives as the transposed view of v_proj's output, as in the model
        o = sdpa_fn(q, k, heads(v, Hkv), cache=None, scale=attn.scale, mask="causal")
        return o.transpose(0, 2, 1, 3).reshape(B, L, -1)

    parts = [  # name, count, owners, call, inputs
        ("input_norm", n, [layer.input_layernorm], layer.input_layernorm, [x(B, L, D)]),
        ("qkv_proj", n, [attn.q_proj, attn.k_proj, attn.v_proj],
         lambda t: (attn.q_proj(t), attn.k_proj(t), attn.v_proj(t)), [x(B, L, D)]),
        ("rope_qk", n, [attn.rope], lambda q, k: (attn.rope(heads(q, H)), attn.rope(heads(k, Hkv))),
         [x(B, L, H * hd), x(B, L, Hkv * hd)]),
        ("attention", n, [], sdpa, [x(B, H, L, hd), x(B, Hkv, L, hd), x(B, L, Hkv * hd)]),
        ("o_proj", n, [attn.o_proj], attn.o_proj, [x(B, L, H * hd)]),
        ("post_norm", n, [layer.post_attention_layernorm], layer.post_attention_layernorm,
         [x(B, L, D)]),
        ("gate_up_proj", n, [mlp.gate_proj, mlp.up_proj],
         lambda t: (mlp.gate_proj(t), mlp.up_proj(t)), [x(B, L, D)]),
        ("swiglu", n, [], swiglu, [x(B, L, inter), x(B, L, inter)]),
        ("down_proj", n, [mlp.down_proj], mlp.down_proj, [x(B, L, inter)]),
        ("layer_whole", n, [layer], lambda t: layer(t, "causal"), [x(B, L, D)]),
        ("head_loss", 1, [], head_loss(model, report, batch, lengths), [x(B, L, D)]),
    ]
    results = {}
    for name, count, owners, call, inputs in parts:
        ms, peak, _, _ = measure(fwd_bwd(owners, call, inputs), repeats, warmup)
        results[name] = dict(count=count, ms=ms, peak_mb=peak / MB)
        mx.clear_cache()
    embed = mx.compile(lambda t: model.model.embed_tokens(t))  # forward only: frozen, no input grad
    ms, peak, _, _ = measure(lambda: embed(batch[:, :-1]), repeats, warmup)
    results["embedding"] = dict(count=1, ms=ms, peak_mb=peak / MB)
    grads = tree_map(lambda p: 1e-3 * mx.random.normal(p.shape).astype(p.dtype),
                     model.trainable_parameters())
    state = [model.state, optimizer.state]
    update = mx.compile(lambda g: optimizer.update(model, g), inputs=state, outputs=state)
    ms, peak, _, _ = measure(lambda: (update(grads), state)[1], repeats, warmup)
    results["adam_update"] = dict(count=1, ms=ms, peak_mb=peak / MB)
    return results, dict(B=B, L=L, D=D, heads=H, kv_heads=Hkv, head_dim=hd, intermediate=inter)


def main(argv=None):
    """Parse the CLI, profile, print the tables last; returns the JSON-able result."""
    from kernel_lab.models import load_model

    on_cpu = mx.default_device() == mx.cpu
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-q4")
    ap.add_argument("--fine-tune-type", choices=("lora", "dora"), default="lora")
    ap.add_argument("--program", default="none", help="none (stock mlx-lm), stock, or a path")
    ap.add_argument("--batch", type=int, default=1 if on_cpu else 8)
    ap.add_argument("--length", type=int, default=16 if on_cpu else 1024)
    ap.add_argument("--steps", type=int, default=3 if on_cpu else 10, help="timed repeats")
    ap.add_argument("--warmup", type=int, default=1 if on_cpu else 3,
                    help="untimed calls first (the first compiles)")
    ap.add_argument("--layers", type=int, default=2 if on_cpu else 0,
                    help="keep the model's last K layers (0: all), all converted")
    ap.add_argument("--dtype", default=None, help="default: float32 on the CPU, the model's on a GPU")
    ap.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--clear-cache", action="store_true",
                    help="free MLX's buffer cache after every step, as mlx-lm's train() does by default")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    start = time.perf_counter()
    kernels = resolve_kernels(a.program)
    model, _ = load_model(a.model, dtype=a.dtype)
    total_layers = len(model.layers)
    keep = a.layers or total_layers
    model.model.layers = model.model.layers[total_layers - keep:]
    convert_to_lora(model, fine_tune_type=a.fine_tune_type, num_layers=keep, rank=8)
    report = apply_kernels(model, kernels) if kernels is not None else None
    from mlx_lm.tuner.trainer import default_loss

    loss_fn = report.loss_fn if report is not None else default_loss
    model.train()
    dtype = model.model.norm.weight.dtype
    mx.synchronize()
    weights = mx.get_active_memory()
    vocab = model.model.embed_tokens.weight.shape[0]
    batch = mx.random.randint(0, vocab, (a.batch, a.length + 1), key=mx.random.key(0))
    lengths = mx.array([[0, a.length]] * a.batch)
    mx.eval(batch, lengths)

    load_s = time.perf_counter() - start
    ms, peak, resident, loss, optimizer, spread = time_step(model, loss_fn, batch, lengths, a.steps,
                                                            a.warmup, clear_cache=a.clear_cache)
    res = dict(model=a.model, fine_tune_type=a.fine_tune_type, program=a.program,
               device=str(mx.default_device()), dtype=str(dtype), batch=a.batch, length=a.length,
               layers=keep, layers_total=total_layers, steps=a.steps, load_s=load_s,
               clear_cache=a.clear_cache,
               patch=report.as_dict() if report else None,
               step=dict(ms=ms, tokens_per_s=a.batch * a.length / (ms / 1e3), loss=loss,
                         peak_mb=peak / MB, weights_mb=weights / MB, resident_mb=resident / MB,
                         transient_mb=(peak - resident) / MB, step_ms=spread["ms"],
                         cpu_share=spread["cpu_share"], clear_cache_ms=spread["after_ms"],
                         cached_mb=spread["cached_mb"], graph=dict(spread["graph"])))
    layers = model.model.layers
    if keep >= 2:  # memory each layer keeps for the backward: the step with half the layers
        half = keep // 2
        model.model.layers = layers[keep - half:]
        _, peak_h, resident_h, _, _, spread_h = time_step(model, loss_fn, batch, lengths, 1, a.warmup)
        model.model.layers = layers
        per_layer = ((peak - resident) - (peak_h - resident_h)) / (keep - half)
        res["memory"] = dict(per_layer_mb=per_layer / MB, half_layers=half,
                             half_transient_mb=(peak_h - resident_h) / MB)
        res["step"]["graph_per_layer"] = {
            k: (v - spread_h["graph"][k]) / (keep - half) for k, v in spread["graph"].items()
            if v != spread_h["graph"][k]}
    mx.clear_cache()
    if a.parts:
        try:  # a family whose layers differ (fused qkv, GeGLU) still gets the step's numbers
            res["parts"], res["shapes"] = profile_parts(model, report, batch, lengths, optimizer,
                                                        a.steps, a.warmup, dtype)
            s = res["shapes"]
            res.setdefault("memory", {})["attention_scores_mb"] = (
                s["B"] * s["heads"] * s["L"] ** 2 * dtype.size / MB)
        except Exception as e:  # noqa: BLE001 - reported, not hidden
            res["parts_error"] = f"{type(e).__name__}: {e}"
    res["seconds"] = time.perf_counter() - start
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    print_tables(res)
    return res


def print_tables(res):
    """The compact summary (last in the output: the device tool returns the tail)."""
    st = res["step"]
    print(f"\n== {res['model']} {res['fine_tune_type']} program={res['program']} {res['device']} "
          f"{res['dtype']} B={res['batch']} L={res['length']} layers={res['layers']}/"
          f"{res['layers_total']}{' clear_cache' if res.get('clear_cache') else ''} "
          f"({res['seconds']:.0f} s, load {res['load_s']:.0f} s)")
    if res["patch"]:
        print(f"patched {res['patch']['patched']} loss={res['patch']['loss']} "
              f"stock={len(res['patch']['stock'])}")
    ms = st.get("step_ms") or [st["ms"]]
    print(f"step {st['ms']:.2f} ms (min {min(ms):.2f}, max {max(ms):.2f}, host CPU "
          f"{st.get('cpu_share', 0):.0%} of wall)  {st['tokens_per_s']:,.0f} tok/s  "
          f"loss {st['loss']:.4f}  peak {st['peak_mb']:.0f} MB = resident {st['resident_mb']:.0f} (weights "
          f"{st['weights_mb']:.0f}) + transient {st['transient_mb']:.0f}")
    if st.get("clear_cache_ms"):  # how much of a step mx.clear_cache() itself took
        print(f"of which mx.clear_cache() {statistics.median(st['clear_cache_ms']):.2f} ms (median), freeing "
              f"{statistics.median(st['cached_mb']):.0f} MB of cached buffers")
    graph, per_layer = st.get("graph", {}), st.get("graph_per_layer", {})
    if graph:
        top = ", ".join(f"{k[:40]} {v:g}" for k, v in sorted(per_layer.items(), key=lambda kv: -kv[1])[:6])
        print(f"graph: {sum(graph.values())} primitives a step, {sum(per_layer.values()):g} a layer ({top})")
    mem, line = res.get("memory", {}), []
    if "per_layer_mb" in mem:
        line.append(f"kept per layer {mem['per_layer_mb']:.1f} MB, x{res['layers']} = "
                    f"{mem['per_layer_mb'] * res['layers']:.0f} MB (step transient with "
                    f"{mem['half_layers']} layers: {mem['half_transient_mb']:.0f} MB)")
    if "attention_scores_mb" in mem:
        line.append(f"attention scores B*H*L*L {mem['attention_scores_mb']:.1f} MB")
    print("; ".join(line))
    parts = res.get("parts")
    if not parts:
        print(f"parts not profiled: {res.get('parts_error', '--no-parts')}")
        return
    print(f"{'part':<13}{'n':>4}{'ms each':>10}{'ms total':>10}{'share':>8}{'peak MB':>10}")
    for name, p in parts.items():
        total = p["ms"] * p["count"]
        print(f"{name:<13}{p['count']:>4}{p['ms']:>10.3f}{total:>10.2f}"
              f"{total / st['ms']:>8.1%}{p['peak_mb']:>10.1f}")
    attributed = sum(p["ms"] * p["count"] for k, p in parts.items() if k != "layer_whole")
    in_layer = sum(parts[k]["ms"] for k in LAYER_PARTS)
    print(f"{'sum of parts':<27}{attributed:>10.2f}{attributed / st['ms']:>8.1%}")
    print(f"{'unattributed':<27}{st['ms'] - attributed:>10.2f}{1 - attributed / st['ms']:>8.1%}")
    print(f"layer whole {parts['layer_whole']['ms']:.3f} ms vs its parts {in_layer:.3f} ms")


if __name__ == "__main__":
    main()
