"""kernel_lab.sandbox: whatever the child does, the parent gets a TaskResult with a clear error."""

import os
import threading
import time
from pathlib import Path

import psutil
import pytest

from kernel_lab.sandbox import Session, TaskResult, device_lock, run_task, stuck_location, wait_all

TASKS_DIR = str(Path(__file__).resolve().parent / "hostile")
ENV = {"PYTHONPATH": TASKS_DIR}


def run(function, timeout=10, **kwargs):
    options = {k: kwargs.pop(k) for k in ("memory_limit", "cwd", "env") if k in kwargs}
    options.setdefault("env", ENV)
    return run_task(f"sandbox_tasks:{function}", kwargs, timeout=timeout, **options)


def test_value_comes_back():
    result = run("add", a=2, b=40)
    assert isinstance(result, TaskResult)
    assert result.ok and result.value == 42 and result.error is None and result.returncode == 0


def test_env_is_passed_and_cwd_is_a_fresh_temp_dir_removed_afterwards():
    result = run("echo_env", name="H3_PROBE", env={**ENV, "H3_PROBE": "yes"})
    assert result.value["value"] == "yes"
    cwd = Path(result.value["cwd"])
    assert cwd != Path.cwd() and not cwd.exists()


def test_children_keep_compiled_kernels_in_the_user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNEL_LAB_CACHE", str(tmp_path))
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    result = run("echo_env", name="MLX_PTX_CACHE_DIR")
    assert result.value["value"].startswith(str(tmp_path / "mlx-ptx"))
    mine = run("echo_env", name="MLX_PTX_CACHE_DIR", env={**ENV, "MLX_PTX_CACHE_DIR": "/mine"})
    assert mine.value["value"] == "/mine"


def test_relative_writes_land_in_the_given_cwd(tmp_path):
    result = run("write_relative", name="out.txt", cwd=str(tmp_path))
    assert Path(result.value) == tmp_path / "out.txt" and (tmp_path / "out.txt").exists()


def test_exception_names_type_message_and_line():
    result = run("raise_value_error")
    assert not result.ok
    assert result.error.startswith("ValueError: the candidate's own message (at sandbox_tasks.py:")
    assert "raise_value_error" in result.error and "Traceback" in result.traceback


def test_timeout_kills_the_group_and_names_where_it_was_stuck():
    start = time.monotonic()
    result = run("loop_forever", timeout=2)
    assert time.monotonic() - start < 2 + 5
    assert not result.ok and result.error.startswith("timeout after 2 s")
    assert "sandbox_tasks.py" in result.error and "loop_forever" in result.error


def test_sleeping_child_is_killed_too():
    result = run("sleep_forever", timeout=1)
    assert result.error.startswith("timeout after 1 s")


def test_os_exit_and_sys_exit():
    hard = run("call_os_exit", code=3)
    assert not hard.ok and hard.returncode == 3 and "exited with status 3" in hard.error
    soft = run("call_sys_exit", code=4)
    assert not soft.ok and "exited with status 4 (sys.exit" in soft.error and "call_sys_exit" in soft.error


def test_segfault_is_reported_as_a_signal():
    result = run("segfault")
    assert not result.ok and result.error.startswith("killed by signal SIGSEGV")
    assert "segfault" in result.error  # faulthandler's dump names the function


def test_memory_watchdog_stops_a_growing_child():
    result = run("grow_memory", memory_limit=600 * 2**20, timeout=30)
    assert not result.ok and result.error.startswith("out of memory (RSS ")
    assert "limit 600 MiB" in result.error


def test_output_flood_is_capped():
    result = run("flood_stdout", timeout=30)
    assert not result.ok and result.error.startswith("output limit exceeded")
    assert len(result.stdout) < 16 * 1024  # head + tail only


def test_printed_fake_result_is_ignored():
    result = run("forge_result")
    assert result.ok and result.value == "real"
    assert "forged" in result.stdout


def test_fake_result_written_to_the_pipe_without_the_nonce_is_rejected():
    result = run("forge_result_pipe")
    assert not result.ok and "forged" != result.value


def test_non_json_result_is_an_error():
    result = run("not_json")
    assert not result.ok and "not JSON-serializable" in result.error


def test_grandchildren_do_not_outlive_the_task():
    result = run("spawn_orphan", marker="x")
    pid = result.value
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        pytest.fail("the grandchild survived the task")


def test_output_is_captured():
    result = run("print_and_return", lines=3)
    assert result.ok and "line 2" in result.stdout and "progress" in result.stderr


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="package.module:function"):
        run_task("no_colon", {}, timeout=1)
    with pytest.raises(ValueError, match="timeout"):
        run_task("a:b", {}, timeout=0)


def test_unknown_module_is_a_clear_error():
    result = run_task("no_such_module_h3:f", {}, timeout=10)
    assert not result.ok and "ModuleNotFoundError" in result.error


def test_stuck_location_skips_harness_frames():
    dump = ('Thread 0x1 (most recent call first):\n'
            '  File "/x/kernel_lab/correctness.py", line 5 in check\n'
            '  File "/tmp/prog.py", line 12 in rope\n')
    dump = dump.replace("/x/kernel_lab", str(Path(__file__).resolve().parent.parent / "kernel_lab"))
    assert stuck_location(dump) == "prog.py:12 in rope"


def test_device_lock_excludes_other_holders(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNEL_LAB_CACHE", str(tmp_path))
    events = []

    def hold():
        with device_lock():
            events.append("in")
            time.sleep(0.3)
            events.append("out")

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert events == ["in", "out", "in", "out"]
    with device_lock():
        with pytest.raises(TimeoutError):
            with device_lock(timeout=0.2):
                pass


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_child_dies_with_its_parent(tmp_path):
    """Kill the process that called run_task: its sandboxed child must not keep running."""
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from kernel_lab.sandbox import run_task\n"
        f"run_task('sandbox_tasks:sleep_forever', {{}}, timeout=60, env={{'PYTHONPATH': {TASKS_DIR!r}}})\n")
    parent = subprocess.Popen([sys.executable, str(script)])
    deadline = time.monotonic() + 20
    worker = None
    while time.monotonic() < deadline and worker is None:
        children = psutil.Process(parent.pid).children()
        worker = next((c for c in children if "kernel_lab.worker" in " ".join(c.cmdline())), None)
        time.sleep(0.1)
    assert worker is not None, "the worker did not start"
    time.sleep(1.0)  # let it reach prctl
    parent.kill()
    parent.wait()
    try:
        worker.wait(timeout=5)
    except psutil.TimeoutExpired:
        worker.kill()
        pytest.fail("the worker outlived its parent")


# ------------------------------------------------------------------ sessions (several calls, one child)

def test_session_keeps_state_between_calls():
    with Session(env=ENV) as session:
        assert session.call("sandbox_tasks:count", {"step": 2}, timeout=10).value == 2
        assert session.call("sandbox_tasks:count", {"step": 5}, timeout=10).value == 7
        failed = session.call("sandbox_tasks:raise_value_error", timeout=10)
        assert not failed.ok and "the candidate's own message" in failed.error
        assert session.call("sandbox_tasks:count", timeout=10).value == 8  # an exception is not fatal
    assert session.proc.poll() is not None


def test_session_timeout_kills_it_and_later_calls_fail():
    with Session(env=ENV) as session:
        result = session.call("sandbox_tasks:loop_forever", timeout=1)
        assert result.error.startswith("timeout after 1 s") and "loop_forever" in result.error
        later = session.call("sandbox_tasks:add", {"a": 1, "b": 2}, timeout=5)
        assert not later.ok and "already ended: timeout after 1 s" in later.error


def test_session_crash_and_exit_are_reported():
    with Session(env=ENV) as session:
        result = session.call("sandbox_tasks:call_os_exit", {"code": 5}, timeout=10)
        assert not result.ok and "exited with status 5" in result.error
    with Session(env=ENV) as session:
        result = session.call("sandbox_tasks:segfault", timeout=10)
        assert result.error.startswith("killed by signal SIGSEGV")


def test_wait_all_watches_sessions_running_together():
    sessions = [Session(env=ENV) for _ in range(2)]
    try:
        sessions[0].submit("sandbox_tasks:sleep_then", {"seconds": 1.0, "value": "a"})
        sessions[1].submit("sandbox_tasks:sleep_then", {"seconds": 1.0, "value": "b"})
        (a, a_start, a_end), (b, b_start, b_end) = [r.value for r in wait_all(sessions, timeout=10)]
        assert (a, b) == ("a", "b")
        assert b_start < a_end and a_start < b_end  # they ran at the same time
        sessions[0].submit("sandbox_tasks:sleep_forever")
        sessions[1].submit("sandbox_tasks:add", {"a": 1, "b": 1})
        stuck, fine = wait_all(sessions, timeout=1)
        assert stuck.error.startswith("timeout") and fine.value == 2
    finally:
        for s in sessions:
            s.close()
