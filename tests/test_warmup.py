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
