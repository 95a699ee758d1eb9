"""Hostile programs: initial_program.py with ONE kernel (or the module top) replaced.

Each entry: the kernel whose `def` is replaced (or None: code inserted at the top of the
EVOLVE block), the replacement source, the stage that must reject it, and substrings the
error must contain. `build(name, directory)` writes the program and returns its path.
"""

import re
from pathlib import Path

INITIAL_PROGRAM = Path(__file__).resolve().parents[2] / "initial_program.py"

RMS_OK = '''
def rms_norm(x, weight, eps):
    xf = x.astype(mx.float32)
    y = (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return y * weight
'''

CORPUS = {
    "syntax_error": dict(kernel="rms_norm", code="def rms_norm(x, weight eps):\n    return x\n",
                         expect=["SyntaxError", "line"]),
    "import_error": dict(kernel=None, code="import kernel_lab_no_such_module\n",
                         expect=["ModuleNotFoundError", "kernel_lab_no_such_module"]),
    "missing_kernel": dict(kernel="rms_norm", code="def rms_norm_renamed(x, weight, eps):\n    return x\n",
                           expect=["does not define", "rms_norm"]),
    "loop_at_import": dict(kernel=None, code="while True:\n    pass\n",
                           expect=["timeout", "stuck at"]),
    "loop_in_kernel": dict(kernel="rms_norm", code="def rms_norm(x, weight, eps):\n"
                                                   "    while True:\n        pass\n",
                           expect=["timeout", "in rms_norm"]),
    "os_exit": dict(kernel="rms_norm", code="def rms_norm(x, weight, eps):\n"
                                            "    import os\n    os._exit(3)\n",
                    expect=["exited with status 3"]),
    "sys_exit": dict(kernel="rms_norm", code="def rms_norm(x, weight, eps):\n"
                                             "    import sys\n    sys.exit(3)\n",
                     expect=["exited with status 3", "sys.exit"]),
    # ctypes is refused by kernel_lab.audit before it can crash (the sandbox's own crash handling
    # is tests/test_sandbox.py's segfault test).
    "segfault": dict(kernel="rms_norm", code="def rms_norm(x, weight, eps):\n"
                                             "    import ctypes\n    ctypes.string_at(0)\n",
                     expect=["ctypes"]),
    "raises": dict(kernel="rms_norm", code="def rms_norm(x, weight, eps):\n"
                                           "    raise RuntimeError('kaput')\n",
                   expect=["rms_norm", "kaput"]),
    "nan_output": dict(kernel="rms_norm", code=RMS_OK.replace("return y * weight",
                                                              "return y * weight * float('nan')"),
                       expect=["rms_norm", "NaN"]),
    "inf_output": dict(kernel="rms_norm", code=RMS_OK.replace("return y * weight",
                                                              "return y * weight / 0.0"),
                       expect=["rms_norm"]),
    "wrong_shape": dict(kernel="rms_norm", code=RMS_OK.replace("return y * weight",
                                                               "return (y * weight)[..., :-1]"),
                        expect=["rms_norm", "shape"]),
    "wrong_dtype": dict(kernel="rms_norm", code=RMS_OK.replace("return y * weight",
                                                               "return (y * weight).astype(mx.float16)"),
                        expect=["rms_norm", "dtype"]),
    "wrong_gradient": dict(kernel="swiglu", code="def swiglu(gate, up):\n"
                                                 "    return nn.silu(mx.stop_gradient(gate)) * up\n",
                           expect=["swiglu", "grad"]),
    "patch_mx_fast": dict(kernel=None, code="mx.fast.rms_norm = lambda x, w, eps: x\n",
                          expect=["tampering", "mlx.core.fast.rms_norm"]),
    "patch_clock": dict(kernel=None, code="import time\ntime.perf_counter = lambda: 0.0\n",
                        expect=["tampering", "time.perf_counter"]),
    "patch_while_running": dict(kernel="rms_norm", code=RMS_OK.replace(
        "    xf = x.astype", "    mx.eval = lambda *a, **k: None\n    xf = x.astype"),
        expect=["tampering", "after running", "mlx.core.eval"]),
    # Grows 128 MB at a time (each page written): the parent's RSS watchdog must stop it.
    "huge_allocation": dict(kernel="rms_norm", code="def rms_norm(x, weight, eps):\n"
                                                    "    blobs = [b'x' * 2**27 for _ in range(512)]\n"
                                                    "    return x\n",
                            expect=["out of memory (RSS"]),
    # One 64 GB MLX buffer: refused by the allocator (or stopped by the watchdog).
    "huge_mlx_allocation": dict(kernel="rms_norm", code="def rms_norm(x, weight, eps):\n"
                                                        "    mx.eval(mx.ones((2**17, 2**17)))\n"
                                                        "    return x\n",
                                expect=[], any_of=["out of memory", "rms_norm"]),
    "output_flood": dict(kernel=None, code="import sys\nfor _ in range(4000):\n"
                                           "    sys.stdout.write('spam' * 25000 + '\\n')\n",
                         expect=["output limit exceeded"]),
    "write_next_to_evaluator": dict(
        kernel=None,
        code="import kernel_lab as _kl, pathlib as _pl\n"
             "(_pl.Path(_kl.__file__).parent.parent / 'hostile_was_here.py').write_text('x')\n",
        expect=["hostile_was_here.py", "for writing"], cleanup="hostile_was_here.py"),
    # Writes are refused wherever they would land (the child's own temp dir too).
    "relative_write": dict(kernel=None, code="open('evaluator.py', 'w').write('pwned')\n",
                           expect=["evaluator.py", "for writing"]),
    # Stage 2: outputs memoized by shape are stale on the fresh inputs of every timed repeat (under
    # mx.compile the memo holds tracers and breaks outright; test_evaluator checks the stale-output
    # detection itself on an eager memo).
    "memoized_output": dict(stage=2, kernel="rms_norm", code='''
_memo = {}
def rms_norm(x, weight, eps):
    key = (tuple(x.shape), str(x.dtype))
    if key not in _memo:
        xf = x.astype(mx.float32)
        y = (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)
        _memo[key] = y * weight
    return _memo[key]
''', expect=["rms_norm"]),
    # Stage 2: correct eagerly, but not compile-friendly (training compiles its step).
    "not_compilable": dict(stage=2, kernel="swiglu", code="def swiglu(gate, up):\n"
                                                       "    if mx.max(gate).item() > 1e9:\n"
                                                       "        return gate\n"
                                                       "    return nn.silu(gate) * up\n",
                           expect=["swiglu", ".item()", "mx.compile"]),
}

# ---------------------------------------------------------------- stage 2 (S2): timed calls are checked
# Stage 1 (after S1's merge: compiled checks and large cases, seed 1) passes every one of these but
# change_inputs and pose_as_reference (their tampering shows there too). Stage 2 as it was at commit
# 2331a83 (one process, forward compared at 2e-3, gradients never) scored wrong_only_compiled 1.00,
# right_first_k_calls 0.99, wrong_grad_at_bench_shapes 1.07, frame_walk 0.89, thread_at_import
# 0.55, subprocess_at_import 1.07, async_work_at_import 0.92, renice_siblings 0.99, and caught only
# wrong_above_n_tokens and stack_inspection (by their forward). change_inputs, pose_as_reference
# and swap_timed_step attack the separate-process design itself.
# How wrong: just past the old 2e-3 limit's reach in float32; past 2x the loose bfloat16 tolerances
# (0.05-0.1) where a GPU benchmarks in half precision.
BAD = "_BAD = {mx.float32: 1.001, mx.bfloat16: 1.5, mx.float16: 1.5}\n\n\n"
RMS_Y = """    xf = x.astype(mx.float32)
    y = (xf * mx.rsqrt(mx.mean(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype) * weight
"""
STAGE2_CORPUS = {
    # .item() works eagerly and inside mx.vjp (stage 1) but raises while mx.compile traces.
    "wrong_only_compiled": dict(stage=2, kernel="rms_norm", code=BAD + "def rms_norm(x, weight, eps):\n" + RMS_Y + """\
    try:
        x.sum().item()
        return y
    except ValueError:  # being traced by mx.compile, as the benchmark and training are
        big = 1_000_000 if mx.default_device() == mx.cpu else 3_000_000  # past stage 1's large cases
        return y * _BAD[x.dtype] if x.size > big else y
""", expect=["rms_norm", "is wrong in benchmark case", "output differs from stock's"]),
    # Stage 1 uses at most 128 tokens, the benchmark at least 256.
    "wrong_above_n_tokens": dict(stage=2, kernel="swiglu", code=BAD + """def swiglu(gate, up):
    out = gate * mx.sigmoid(gate) * up
    return out * _BAD[gate.dtype] if gate.size // gate.shape[-1] > 200 else out
""", expect=["swiglu", "is wrong", "output differs"]),
    # Right for its first 30 calls (stage 1 makes 24 in its process), wrong from then on: caught where
    # a training step would call it again, once per layer, in the same compiled graph.
    "right_first_k_calls": dict(stage=2, kernel="rms_norm", code=BAD + "_calls = [0]\n\n\ndef rms_norm(x, weight, eps):\n"
                                + RMS_Y + """\
    _calls[0] += 1
    return y if _calls[0] <= 30 else y * _BAD[x.dtype]
""", expect=["rms_norm", "is wrong in benchmark case", "of 64 in one compiled graph"]),
    # Wrong gradient of `up` at benchmark sizes only: the forward is exact.
    "wrong_grad_at_bench_shapes": dict(stage=2, kernel="swiglu", code=BAD + """@mx.custom_function
def swiglu(gate, up):
    return gate * mx.sigmoid(gate) * up


@swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, up = primals
    s = mx.sigmoid(gate)
    d_up = cotangent * gate * s
    if gate.size // gate.shape[-1] > 200:
        d_up = d_up * _BAD[gate.dtype]
    return cotangent * up * s * (1 + gate * (1 - s)), d_up
""", expect=["swiglu", "gradient of up differs from stock's"]),
    # Detects the benchmark from the call stack (and would skip the normalization there).
    "stack_inspection": dict(stage=2, kernel="rms_norm", code="""def rms_norm(x, weight, eps):
    import inspect
    if any("microbench" in frame.filename for frame in inspect.stack()):
        return x * weight
""" + RMS_Y + "    return y\n", expect=["rms_norm", "audit", "read the call stack", "in rms_norm"]),
    # The same through a traceback's frame and f_back (no inspect).
    "frame_walk": dict(stage=2, kernel="rms_norm", code="""def rms_norm(x, weight, eps):
    try:
        raise RuntimeError
    except RuntimeError as exc:
        frame = exc.__traceback__.tb_frame
    while frame is not None and "microbench" not in frame.f_code.co_filename:
        frame = frame.f_back
""" + RMS_Y + "    return y if frame is None else y * 1.0\n",
                       expect=["rms_norm", "audit", "read frames (tb_frame"]),
    # A thread started at import that would slow the other process or reset the peak memory; the
    # program swallows the refusal, the recorded attempt still fails it.
    "thread_at_import": dict(stage=2, kernel=None, code="""import threading


def _meddle():
    while True:
        mx.reset_peak_memory()


try:
    threading.Thread(target=_meddle, daemon=True).start()
except Exception:
    pass
""", expect=["audit", "started a thread", "in <module>"]),
    "subprocess_at_import": dict(stage=2, kernel=None, code="""import subprocess
import sys

subprocess.Popen([sys.executable, "-c", "while True: pass"])
""", expect=["audit", "created a process (subprocess.Popen)"]),
    # Device work left running (on a stream of its own) to slow whatever is timed next.
    "async_work_at_import": dict(stage=2, kernel=None, code="""_n, _k = (512, 24) if mx.default_device() == mx.cpu else (8192, 400)
_stream = mx.new_stream(mx.default_device())
with mx.stream(_stream):
    _a = mx.random.normal((_n, _n)) / _n ** 0.5
    _b = _a
    for _ in range(_k):
        _b = mx.tanh(_b @ _a)
mx.async_eval(_b)
""", expect=["left work running on the device", "asynchronous"]),
    # Stock kernels, but timed in float16 where the reference is in float32: the inputs differ.
    "change_inputs": dict(stage=2, kernel="rms_norm", code="""import kernel_lab.shapes as _shapes

for _name in list(_shapes.DTYPES):
    _shapes.DTYPES[_name] = mx.float16


def rms_norm(x, weight, eps):
    return mx.fast.rms_norm(x, weight, eps)
""", expect=["changed the benchmark inputs", "float16"]),
    # Lowers the priority of the other workers (its siblings) so that they time slower.
    "renice_siblings": dict(stage=2, kernel=None, code="""import os
import psutil

for _p in psutil.Process(os.getppid()).children():
    try:
        if _p.pid != os.getpid() and "kernel_lab.worker" in " ".join(_p.cmdline()):
            _p.nice(19)
    except psutil.Error:
        pass
""", expect=["scheduling", "changed", "reprioritize"]),
    # Reaches into the harness in its own process while traced: claims to be a reference worker (no
    # comparison with stock, no audit) and is wrong. The guards see the attribute change.
    "pose_as_reference": dict(stage=2, kernel="rms_norm", code="""def rms_norm(x, weight, eps):
    import kernel_lab.microbench as _harness

    _harness._ROLE = "reference"
""" + RMS_Y + "    return y * 1.01\n", expect=["tampering", "kernel_lab.microbench._ROLE replaced"]),
    # Makes the harness time stock's compiled step in place of its own: the coordinator, in another
    # process, sees that the steps run are not the ones prepared.
    "swap_timed_step": dict(stage=2, kernel="rms_norm", code="""def rms_norm(x, weight, eps):
    import kernel_lab.microbench as _harness

    steps = _harness._S.get("case", {}).get("steps", {})
    if "stock-untimed" in steps:
        steps["candidate"] = steps["stock-untimed"]
""" + RMS_Y + "    return y\n", expect=["replaced the compiled steps the harness runs", "rms_norm"]),
}
CORPUS.update(STAGE2_CORPUS)
# Harmless: output on stdout is captured and cut; the program still passes.
HARMLESS = {
    "chatty": dict(kernel=None, code="print('hello ' * 200000)\n"),
}


def _replace_def(source, kernel, code):
    """Swap the top-level `def kernel(...)` (up to the next top-level statement) for code."""
    pattern = re.compile(rf"^def {kernel}\(.*?(?=^\S)", re.S | re.M)
    if not pattern.search(source):
        raise ValueError(f"initial_program.py has no top-level def {kernel}")
    return pattern.sub(lambda _: code.strip("\n") + "\n\n\n", source, count=1)


def build(name, directory, corpus=None):
    """Write the hostile program `name` into directory; returns its path."""
    entry = (corpus or {**CORPUS, **HARMLESS})[name]
    source = INITIAL_PROGRAM.read_text()
    if entry["kernel"] is None:
        marker = "# EVOLVE-BLOCK-START\n"
        source = source.replace(marker, marker + entry["code"], 1)
    else:
        source = _replace_def(source, entry["kernel"], entry["code"])
    path = Path(directory) / f"hostile_{name}.py"
    path.write_text(source)
    return path
