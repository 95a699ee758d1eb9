"""The training loss with a program's kernels, for `mlx_lm.tuner.trainer.train(loss=...)`:
mlx-lm's default_loss, with the head fused into `linear_cross_entropy` where the model's head is a
plain hidden -> logits linear (found by reading the model's own `__call__`), else `cross_entropy` on
the model's logits. Used by kernel_lab.patching.apply_kernels."""

import inspect
import re

import mlx.core as mx
import mlx.nn as nn


def _source(fn):
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        return ""


_HEAD_CALL = re.compile(
    r"out=self\.model\((?P<args>[^)]*)\)"
    r"if(?P<flag>self\.args\.tie_word_embeddings|self\.tie_word_embeddings):"
    r"out=self\.model\.embed_tokens\.as_linear\(out\)"
    r"else:out=self\.lm_head\(out\)returnout"
)


def _head_tensors(head):
    """Kernel arguments of a head module, read live (the arrays may be replaced)."""
    if isinstance(head, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        return dict(weight=head["weight"], scales=head["scales"], biases=head.get("biases"),
                    group_size=head.group_size, bits=head.bits)
    return dict(weight=head["weight"])


def _head_of(model):
    """(function model -> head module, "") for a plain hidden -> logits head, or (None, why not)."""
    src = _source(type(model).__call__)
    flat = re.sub(r"\s+", "", re.sub(r"#[^\n]*", "", src))
    flat = flat[flat.find("out=self.model(") :] if "out=self.model(" in flat else flat
    match = _HEAD_CALL.fullmatch(flat)
    if match is None:
        return None, (
            f"{type(model).__module__}.Model.__call__ is not the plain "
            "`model(...) -> embed_tokens.as_linear / lm_head` head (it post-processes logits "
            "or differs), so the loss runs on the model's own logits"
        )
    if match["flag"] == "self.args.tie_word_embeddings":
        tied = model.args.tie_word_embeddings
    else:
        tied = model.tie_word_embeddings
    head = model.model.embed_tokens if tied else model.lm_head
    name = "tied embed_tokens" if tied else "lm_head"
    if isinstance(head, (nn.QuantizedEmbedding, nn.QuantizedLinear)):
        if getattr(head, "mode", "affine") != "affine":
            return None, f"{name} is quantized in mode {head.mode!r}"
    elif type(head) not in (nn.Embedding, nn.Linear):
        return None, f"{name} is a {type(head).__name__} (LoRA on the head?), not a plain linear"
    if "bias" in head:
        return None, f"{name} has a bias"
    if tied:
        return (lambda m: m.model.embed_tokens), ""
    return (lambda m: m.lm_head), ""


def _mask(targets, lengths):
    """mlx-lm's default_loss mask: positions offset < step <= length."""
    steps = mx.arange(1, targets.shape[1] + 1)
    return mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])


def make_loss(model, kernels):
    """(loss_fn, kind, reason): mlx-lm's default_loss computed with the program's kernels.

    kind "linear_cross_entropy" fuses the head into the loss (hidden state and the
    head's weight, quantized or not); "cross_entropy" runs the kernel on the model's
    own logits, kept for heads that post-process logits (softcapping, scaling).
    """
    get_head, why = _head_of(model)
    if get_head is not None:

        def loss(model, batch, lengths):
            inputs, targets = batch[:, :-1], batch[:, 1:]
            hidden = model.model(inputs)
            tensors = _head_tensors(get_head(model))
            q = {k: tensors[k] for k in ("scales", "biases", "group_size", "bits") if k in tensors}
            per_token = kernels.linear_cross_entropy(
                hidden.reshape(-1, hidden.shape[-1]), tensors["weight"], targets.reshape(-1), **q
            ).reshape(targets.shape)
            mask = _mask(targets, lengths)
            ntoks = mask.sum()
            return (per_token * mask).astype(mx.float32).sum() / ntoks, ntoks

        return loss, "linear_cross_entropy", ""

    def loss(model, batch, lengths):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        mask = _mask(targets, lengths)
        per_token = kernels.cross_entropy(logits, targets)
        ntoks = mask.sum()
        return (per_token * mask).astype(mx.float32).sum() / ntoks, ntoks

    return loss, "cross_entropy", why
