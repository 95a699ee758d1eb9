"""The patcher on tiny random models of every family: coverage, exactness, reversibility."""

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from kernel_lab.contract import KERNEL_NAMES
from kernel_lab.ops import STOCK
from kernel_lab.patching import PatchError, apply_kernels, patched_modules, restore_stock
from kernel_lab.tiny_models import FAMILIES, tiny_model

LORA = dict(rank=4, scale=10.0, dropout=0.0)


def counting(kernels):
    """The same kernels, counting how often each is called (at trace time)."""
    calls = {n: 0 for n in KERNEL_NAMES}

    def wrap(name):
        fn = getattr(kernels, name)

        def counted(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return counted

    return SimpleNamespace(**{n: wrap(n) for n in KERNEL_NAMES}), calls


def lora_model(family, dora=False, dropout=0.0):
    model = tiny_model(family)
    model.freeze()
    linear_to_lora_layers(model, 2, dict(LORA, dropout=dropout), use_dora=dora)
    # lora_b starts at zero; make the adapter path contribute to the output and grads.
    for _, m in model.named_modules():
        if hasattr(m, "lora_b"):
            m.lora_b = 0.01 * mx.random.normal(m.lora_b.shape)
    return model


def loss_and_grads(model, loss):
    batch = mx.random.randint(1, 256, (2, 19), key=mx.random.key(1))
    lengths = mx.array([[0, 18], [3, 12]])  # offsets and lengths, as iterate_batches makes
    (value, ntoks), grads = nn.value_and_grad(model, loss)(model, batch, lengths)
    return value.item(), ntoks.item(), dict(tree_flatten(grads))


# Expected patched counts per family on the 2-layer tiny configs (all layers LoRA'd: 7
# linears a layer, phi3 has fused qkv and gate_up: 4).
EXPECTED = {
    "llama": dict(rms_norm=5, rope=2, attention=2, swiglu=2, lora_linear=14),
    "qwen2": dict(rms_norm=5, rope=2, attention=2, swiglu=2, lora_linear=14),
    "qwen3": dict(rms_norm=9, rope=2, attention=2, swiglu=2, lora_linear=14),  # + q_norm, k_norm
    "phi3": dict(rms_norm=5, rope=2, attention=2, swiglu=2, lora_linear=8),
    "gemma3_text": dict(rms_norm=13, rope=2, attention=2, lora_linear=14),  # GeGLU MLP stays stock
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_family_patches_fully_and_matches_stock(family, dora):
    model = lora_model(family, dora=dora)
    ref_loss, ref_ntoks, ref_grads = loss_and_grads(model, default_loss)
    names_before = [k for k, _ in tree_flatten(model.parameters())]

    kernels, calls = counting(STOCK)
    report = apply_kernels(model, kernels)
    expected = dict(EXPECTED[family])
    if dora:
        expected["dora_linear"] = expected.pop("lora_linear")
    assert dict(report.patched) == expected, str(report)
    assert report.loss == "linear_cross_entropy"
    if family == "gemma3_text":
        assert {k for _, k, _ in report.stock} == {"swiglu"}
        assert "GeGLU" in str(report)
    else:
        assert report.stock == [] and report.fully_patched

    loss, ntoks, grads = loss_and_grads(model, report.loss_fn)
    # Every patched kind really went through the kernels.
    lin = "dora_linear" if dora else "lora_linear"
    for name in ("rms_norm", "rope", lin, "linear_cross_entropy"):
        assert calls[name] > 0, name
    assert (calls["swiglu"] > 0) == (family != "gemma3_text")
    assert ntoks == ref_ntoks
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        assert mx.allclose(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6).item(), k
    # Parameter names are unchanged, so adapters load in plain mlx-lm.
    assert [k for k, _ in tree_flatten(model.parameters())] == names_before


def test_restore_stock_and_repatch():
    model = lora_model("llama")
    report = apply_kernels(model, STOCK)
    n = sum(report.patched.values())
    assert len(patched_modules(model)) == n
    assert restore_stock(model, kinds={"rope"}) == 2
    assert len(patched_modules(model)) == n - 2
    assert restore_stock(model) == n - 2
    assert patched_modules(model) == []
    # Patching twice re-patches (no double wrapping).
    apply_kernels(model, STOCK)
    again = apply_kernels(model, STOCK)
    assert dict(again.patched) == dict(report.patched)
    assert all(type(m).__mro__[1] is type(m)._stock_class for _, _, m in patched_modules(model))


def test_dropout_lora_is_left_stock_and_reported():
    model = lora_model("qwen2", dropout=0.1)
    report = apply_kernels(model, STOCK)
    assert report.patched["lora_linear"] == 0
    assert len(report.left_stock("lora_linear")) == 14
    assert "dropout p=0.1" in str(report)


def test_patched_modules_use_the_kernel_in_their_forward():
    """A kernel that changes the result must change the model's output (the patch is live)."""
    model = tiny_model("qwen3")
    x = mx.array([[5, 6, 7, 8]])
    before = model(x)
    broken = SimpleNamespace(**{n: getattr(STOCK, n) for n in KERNEL_NAMES})
    broken.swiglu = lambda g, u: 2.0 * STOCK.swiglu(g, u)
    apply_kernels(model, broken)
    assert not mx.allclose(model(x), before).item()
    restore_stock(model)
    assert mx.allclose(model(x), before).item()


class _ScaledLogitsModel(tiny_model("llama").__class__):
    """A head that post-processes its logits (like softcapping): no fused loss allowed."""

    def __call__(self, inputs, cache=None):
        return 0.5 * super().__call__(inputs, cache)


def test_logit_postprocessing_falls_back_to_cross_entropy_on_logits():
    model = lora_model("llama")
    model.__class__ = _ScaledLogitsModel
    ref_loss, _, _ = loss_and_grads(model, default_loss)
    kernels, calls = counting(STOCK)
    report = apply_kernels(model, kernels)
    assert report.loss == "cross_entropy"
    assert "post-processes logits" in str(report)
    loss, _, _ = loss_and_grads(model, report.loss_fn)
    assert calls["cross_entropy"] > 0 and calls["linear_cross_entropy"] == 0
    assert loss == pytest.approx(ref_loss, rel=1e-5)


def test_rejects_non_models():
    with pytest.raises(PatchError, match="mlx-lm language model"):
        apply_kernels(nn.Linear(4, 4), STOCK)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_routes_through_the_kernel_and_matches_stock(family):
    from kernel_lab.ops import attention

    model = lora_model(family)
    ref_loss, _, ref_grads = loss_and_grads(model, default_loss)
    calls = []

    def counted(*args, **kwargs):
        calls.append(kwargs.get("mask") if isinstance(kwargs.get("mask"), str) else "array")
        return attention.stock(*args, **kwargs)

    report = apply_kernels(model, SimpleNamespace(**{**vars(STOCK), "attention": counted}))
    assert report.patched["attention"] == len(model.layers), str(report)
    loss, _, grads = loss_and_grads(model, report.loss_fn)
    assert calls and abs(loss - ref_loss) < 1e-5
    for name, g in ref_grads.items():
        assert mx.allclose(grads[name], g, atol=1e-5), name
    restore_stock(model)
    assert not patched_modules(model)
