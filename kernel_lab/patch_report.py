"""What `kernel_lab.patching.apply_kernels` changed in a model, and the error when it cannot."""

from collections import Counter
from dataclasses import dataclass, field

KINDS = ("rms_norm", "rope", "attention", "swiglu", "lora_linear", "dora_linear", "loss")


class PatchError(ValueError):
    """The model cannot be patched at all (e.g. not an mlx-lm language model)."""


@dataclass
class PatchReport:
    """What `apply_kernels` changed: counts per kind, and what it left stock and why."""

    model_type: str = "?"
    patched: Counter = field(default_factory=Counter)
    stock: list = field(default_factory=list)  # (module path, kind, reason)
    loss: str = "stock"  # "linear_cross_entropy", "cross_entropy" or "stock"
    loss_reason: str = ""
    loss_fn: object = field(default=None, repr=False, compare=False)  # for trainer.train(loss=)

    def left_stock(self, kind=None):
        return [s for s in self.stock if kind is None or s[1] == kind]

    @property
    def fully_patched(self):
        return not self.stock and self.loss == "linear_cross_entropy"

    def as_dict(self):
        return {
            "model_type": self.model_type,
            "patched": dict(self.patched),
            "stock": [list(s) for s in self.stock],
            "loss": self.loss,
            "loss_reason": self.loss_reason,
        }

    def __str__(self):
        lines = [f"Kernel patch report ({self.model_type}):"]
        for kind in KINDS[:-1]:
            n = self.patched.get(kind, 0)
            left = self.left_stock(kind)
            line = f"  {kind:<12} {n:>4} patched"
            if left:
                line += f", {len(left)} left stock"
            lines.append(line)
        loss = f"  loss         {self.loss}"
        if self.loss_reason:
            loss += f" ({self.loss_reason})"
        lines.append(loss)
        # Group the stock modules by reason so a 30-layer model prints a few lines.
        by_reason = {}
        for path, kind, reason in self.stock:
            by_reason.setdefault((kind, reason), []).append(path)
        for (kind, reason), paths in by_reason.items():
            shown = ", ".join(paths[:3]) + (f", ... ({len(paths)} modules)" if len(paths) > 3 else "")
            lines.append(f"  stock {kind}: {reason}: {shown}")
        return "\n".join(lines)
