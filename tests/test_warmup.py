"""kernel_lab.warmup: the merge of private compile caches, and the marker on a machine with nothing to compile."""

from kernel_lab import warmup


def test_merge_adds_missing_files_and_each_ptx_after_its_txt(tmp_path, monkeypatch):
    private, shared = tmp_path / "private", tmp_path / "shared"
    (private / "sub").mkdir(parents=True)
    for name in ("a.ptx", "a.txt", "a.cu", "sub/b.ptx", "sub/b.txt"):
        (private / name).write_text(name)
    shared.mkdir()
    (shared / "a.ptx").write_text("kept")  # already there: never overwritten
    order = []
    real_replace = warmup.os.replace
    monkeypatch.setattr(warmup.os, "replace", lambda a, b: (order.append(b.name), real_replace(a, b)))
    assert warmup._merge(private, shared) == 4
    assert (shared / "a.ptx").read_text() == "kept" and (shared / "sub" / "b.ptx").read_text() == "sub/b.ptx"
    assert order.index("b.txt") < order.index("b.ptx")  # a reader takes a .ptx as complete
    assert not [p for p in shared.rglob("*.tmp")]


def test_run_on_the_cpu_only_writes_the_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path))
    assert not warmup.is_warm()
    summary = warmup.run(log=lambda line: None)
    assert summary["device"] == "cpu" and warmup.is_warm()
    assert warmup.run()["skipped"]


def test_variants_cover_every_base_of_stage_1():
    assert warmup.variants("rms_norm") == [None]
    assert len(warmup.variants("lora_linear")) == 6 and len(warmup.variants("linear_cross_entropy")) == 4


def test_the_queue_runs_every_job_over_fewer_children(tmp_path):
    jobs = [("lora_linear", "float32", (5, 32)), ("swiglu", "float32", None), ("rms_norm", "float32", None)]
    lines = []
    warmup._compile(jobs, None, 2, tmp_path, 600, lines.append)
    done = [line for line in lines if line.endswith("to start)")]
    assert len(done) == 3 and not [line for line in done if "failed" in line], lines
    assert any(line.startswith("[warm-up] lora_linear float32 (5, 32):") for line in done)
