"""Turn a model spec into an mlx-lm (model, tokenizer).

A spec is an embedded model name (converted once into the user cache), a local
mlx-lm model directory, or a Hugging Face hub id (downloaded by mlx-lm as usual).
"""

import re
import sys
from pathlib import Path

from . import cache, registry
from .registry import EMBEDDED, ModelError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = ("float32", "float16", "bfloat16")


def _log(message):
    print(f"[kernel_lab.models] {message}", file=sys.stderr, flush=True)


def convert_embedded(name, parts, final_dir, size=None, sha256=None, log=_log):
    """Verify the GGUF `parts` and convert them into `final_dir` (atomically). Returns final_dir."""
    from .gguf_convert import UnsupportedModel, convert_gguf

    def build(tmp):
        if len(parts) == 1:
            source = Path(parts[0])
            digest = cache.hash_file(source, size, sha256)
        else:
            source = tmp / "source.gguf"
            log(f"joining {len(parts)} parts of {name}")
            digest = cache.join_and_verify(parts, source, size, sha256)
        log(f"converting {name} from {source.name if len(parts) == 1 else 'its parts'} into {final_dir}")
        try:
            summary = convert_gguf(source, tmp)
        except UnsupportedModel as e:
            raise ModelError(f"cannot convert {name!r}: {e}. Fix: use a supported model or an mlx-lm directory.") from e
        except (ValueError, OSError, IndexError, KeyError, EOFError) as e:
            raise ModelError(
                f"the GGUF of {name!r} is damaged or truncated ({type(e).__name__}: {e}). "
                f"Fix: reinstall it with `python -m kernel_lab.models fetch --force {name}`."
            ) from e
        finally:
            if len(parts) > 1:
                source.unlink(missing_ok=True)
        return {"name": name, "source_sha256": digest, **summary}

    result = cache.build_atomically(final_dir, build, log=log)
    marker = cache.read_marker(result)
    log(f"{name}: converted in {marker.get('seconds')} s, {cache.directory_size(result) / 2**20:.0f} MB cached")
    return result


def _unknown_spec(spec):
    return ModelError(
        f"unknown model {spec!r}: not an embedded model ({', '.join(EMBEDDED)}), not a local mlx-lm "
        "directory, and not a Hugging Face id like 'mlx-community/Qwen2.5-0.5B-Instruct-4bit'. "
        "Fix: pass one of those (`python -m kernel_lab.models list` shows the embedded ones)."
    )


def _download(spec):
    """A hub id through mlx-lm's own download; no network becomes one clear ModelError."""
    from mlx_lm.utils import _download as mlx_lm_download

    try:
        return Path(mlx_lm_download(spec))
    except Exception as e:  # huggingface_hub raises many types: offline, 404, gated, ...
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise ModelError(
            f"cannot get Hugging Face model {spec!r} ({reason}). Fix: check the id and the network "
            "(or HF_HUB_OFFLINE / a populated HF cache), pass a local mlx-lm directory, or use an embedded "
            f"model: {', '.join(EMBEDDED)}."
        ) from e


def model_path(spec):
    """The mlx-lm model directory for `spec` (embedded models are converted and cached on first use)."""
    if not isinstance(spec, (str, Path)) or not str(spec):
        raise ModelError(f"model spec must be a non-empty string, got {spec!r}")
    spec = str(spec)
    if spec in EMBEDDED:
        model = EMBEDDED[spec]
        final_dir = cache.cache_root() / spec
        if cache.is_complete(final_dir, model.sha256):
            return final_dir
        parts = registry.gguf_parts(spec)
        return convert_embedded(spec, parts, final_dir, model.size, model.sha256)
    local = Path(spec).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local} is not an mlx-lm model directory (no config.json). Fix: point at one.")
        return local
    if _HUB_ID.match(spec):
        return _download(spec)
    raise _unknown_spec(spec)


def _as_dtype(dtype):
    import mlx.core as mx

    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ModelError(f"dtype {dtype!r} is not supported; use one of {', '.join(_DTYPES)}")
    return getattr(mx, dtype)


def compute_dtype(model_dtype):
    """The activation/parameter dtype to run in: float32 on the CPU backend (MLX's
    half-precision CPU kernels, quantized matmul above all, are far slower), the model's
    own dtype on Metal/CUDA."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return mx.float32
    return _as_dtype(model_dtype)


def model_dtype(model):
    """The float dtype holding most of the model's float parameters (its scales/biases when quantized)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    counts = {}
    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            counts[p.dtype] = counts.get(p.dtype, 0) + p.size
    return max(counts, key=counts.get) if counts else mx.float32


def load_model(spec, dtype=None):
    """(model, tokenizer) for `spec`, with float parameters cast to `dtype`
    (None: `compute_dtype` of the model's own dtype). Quantized weights are untouched."""
    import mlx.core as mx
    import mlx_lm

    target = _as_dtype(dtype) if dtype is not None else None
    path = model_path(spec)
    model, tokenizer = mlx_lm.load(str(path))
    target = target or compute_dtype(model_dtype(model))
    model.set_dtype(target)  # floating parameters only
    mx.eval(model.parameters())
    return model, tokenizer
