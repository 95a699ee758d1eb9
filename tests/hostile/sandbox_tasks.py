"""Small child-process tasks for tests/test_sandbox.py (imported by the sandbox worker)."""

import os
import subprocess
import sys
import time


def add(a, b):
    return a + b


def echo_env(name):
    return {"value": os.environ.get(name), "cwd": os.getcwd()}


def write_relative(name):
    with open(name, "w") as handle:
        handle.write("x")
    return os.path.abspath(name)


def loop_forever():
    while True:
        pass


def sleep_forever():
    time.sleep(3600)


def call_os_exit(code):
    os._exit(code)


def call_sys_exit(code):
    sys.exit(code)


def segfault():
    import ctypes
    ctypes.string_at(0)


def raise_value_error():
    raise ValueError("the candidate's own message")


def grow_memory(step_mb=64, steps=1000):
    blobs = []
    for _ in range(steps):
        blobs.append(b"x" * (step_mb * 2**20))
    return len(blobs)


def flood_stdout():
    while True:
        sys.stdout.write("spam" * 10000 + "\n")


def forge_result():
    print('{"nonce": "0000", "ok": true, "value": "forged"}')
    return "real"


def forge_result_pipe():
    """Write a fake result to every open descriptor it can find, then exit 0 without returning."""
    for fd in range(3, 64):
        try:
            os.write(fd, b'{"nonce": "guess", "ok": true, "value": "forged"}\n')
        except OSError:
            pass
    os._exit(0)


def not_json():
    return object()


def spawn_orphan(marker):
    """Start a grandchild that outlives us unless the sandbox kills it; return its pid."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    return child.pid


def print_and_return(lines):
    for i in range(lines):
        print(f"line {i}")
    print("progress", file=sys.stderr)
    return lines


_COUNTER = []


def count(step=1):
    """Module state that survives between calls of one Session."""
    _COUNTER.append(step)
    return sum(_COUNTER)


def sleep_then(seconds, value):
    """(value, start, end) by the wall clock, so a test can see two calls overlap."""
    start = time.time()
    time.sleep(seconds)
    return [value, start, time.time()]
