"""Where kernel_lab keeps things on this machine, and the lock that keeps two timings off one device.

`cache_dir()` holds the stage-2 cache, MLX's compiled CUDA kernels (`ptx_cache_dir()`) and the lock
files of `device_lock()` (converted models: kernel_lab/models/cache.py).
"""

import contextlib
import os
import time
from pathlib import Path


def cache_dir():
    """The user cache dir of kernel_lab ($KERNEL_LAB_CACHE, else $XDG_CACHE_HOME/kernel_lab)."""
    root = os.environ.get("KERNEL_LAB_CACHE")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kernel_lab"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def device_lock(name="device", timeout=None):
    """Hold a cross-process exclusive lock while timing on the device.

    Uses fcntl.flock on `<cache_dir>/locks/<name>.lock` (released by the OS if the holder dies).
    Threads of one process exclude each other too, as each opens its own file description.
    Raises TimeoutError if `timeout` seconds pass without getting the lock.
    """
    import fcntl

    lock_path = cache_dir() / "locks" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    with open(lock_path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"could not take the device lock {lock_path} in {timeout} s")
                time.sleep(0.05)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield lock_path
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def ptx_cache_dir():
    """Where children keep MLX's compiled CUDA kernels: <cache_dir>/mlx-ptx/<mlx version>.

    MLX's default, <tmp>/mlx/<version>/ptx, is lost with the temp dir; a cold cache costs minutes
    of compiling. A MLX_PTX_CACHE_DIR set by the user wins."""
    try:
        from importlib.metadata import version

        mlx_version = version("mlx")
    except Exception:  # noqa: BLE001 - no metadata: one shared folder still works
        mlx_version = "unknown"
    return cache_dir() / "mlx-ptx" / mlx_version
