"""`crma.lab.runs`: private run folders, the file-backed stop signal, clean-up and the archive."""

from __future__ import annotations

import os
import threading
import time
import zipfile
from pathlib import Path

import pytest

from crma.lab import runs


def test_run_folders_are_private_per_run(tmp_path):
    a, b = runs.new_run(tmp_path), runs.new_run(tmp_path)
    assert a.run_id != b.run_id and len(a.run_id) == 32 and int(a.run_id, 16) >= 0
    assert a.root.parent == b.root.parent == tmp_path and a.root.is_dir() and b.root.is_dir()
    assert a.out_dir.parent == a.root and a.archive.parent == a.root
    assert a.out_dir.name == f"crma-{a.run_id[:8]}" and a.archive.name == f"{a.out_dir.name}.zip"
    assert runs.get_run(a.run_id, tmp_path) == a
    for bad in ("../" + a.run_id, a.run_id.upper(), "", None, 42, "0" * 32):
        assert runs.get_run(bad, tmp_path) is None


def test_stop_signal_crosses_processes_through_the_file(tmp_path):
    folder = runs.new_run(tmp_path)
    engine_side = runs.StopSignal(folder.stop_file)  # what the (possibly forked) engine holds
    assert isinstance(engine_side, threading.Event) and not engine_side.is_set()
    assert runs.request_stop(folder.run_id, tmp_path) is True
    assert engine_side.is_set()  # set by another object: as in a forked ZeroGPU worker
    assert runs.request_stop("f" * 32, tmp_path) is False
    folder.out_dir.mkdir()
    (folder.out_dir / "summary.json").write_text("{}")
    assert folder.finished() and runs.request_stop(folder.run_id, tmp_path) is False


def test_cleanup_removes_old_and_surplus_runs(tmp_path):
    folders = [runs.new_run(tmp_path) for _ in range(5)]
    now = time.time()
    for i, folder in enumerate(folders):  # runs 0..4, oldest first; run 0 is a day old
        (folder.root / "f.txt").write_text("x")
        stamp = now - 86400 if i == 0 else now - 100 * (5 - i)
        for path in (folder.root / "f.txt", folder.root):
            os.utime(path, (stamp, stamp))
    removed = runs.cleanup_runs(tmp_path, max_age_s=3600, max_runs=3, keep=(folders[1].run_id,), now=now)
    assert set(removed) == {folders[0].run_id, folders[2].run_id}
    assert [f.root.is_dir() for f in folders] == [False, True, False, True, True]
    (tmp_path / "not-a-run").mkdir()
    runs.cleanup_runs(tmp_path, max_age_s=0, max_runs=0, now=now + 10)
    assert (tmp_path / "not-a-run").is_dir()  # only run folders are ever removed
    assert runs.cleanup_runs(tmp_path / "missing") == []


def test_cleanup_keeps_a_long_run_that_still_writes(tmp_path):
    folder = runs.new_run(tmp_path)
    metrics = folder.out_dir / "metrics.jsonl"
    metrics.parent.mkdir()
    metrics.write_text("{}\n")
    now = time.time()
    for path in (folder.root, folder.out_dir):  # the folders were made a day ago; the metrics file is fresh
        os.utime(path, (now - 86400, now - 86400))
    assert runs.cleanup_runs(tmp_path, max_age_s=3600, now=now) == []
    assert folder.root.is_dir()


def test_new_run_keeps_disk_bounded(tmp_path):
    for _ in range(4):
        runs.new_run(tmp_path, max_runs=3)
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 3


def test_runs_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv(runs.RUNS_ENV, str(tmp_path / "runs"))
    assert runs.runs_root() == Path(tmp_path / "runs")
    assert runs.new_run().root.parent == tmp_path / "runs"
    monkeypatch.delenv(runs.RUNS_ENV)
    assert runs.runs_root().name == "crma-lab-runs"


def test_make_archive_holds_everything(tmp_path):
    out = tmp_path / "crma-1234abcd"
    files = [
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "summary.md",
        "report.html",
        "loss.png",
        "grad_norm.png",
        "loss_delta.png",
        "adapters/lora/adapter_model.safetensors",
        "adapters/lora+crma/adapter_config.json",
        "adapters/lora+crma/crma.safetensors",
    ]
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(name.encode() * 3)
    archive = runs.make_archive(out)
    assert archive == tmp_path / "crma-1234abcd.zip" and not list(tmp_path.glob("*.part"))
    with zipfile.ZipFile(archive) as zf:
        assert sorted(zf.namelist()) == sorted(f"crma-1234abcd/{name}" for name in files)
        content = zf.read("crma-1234abcd/adapters/lora+crma/crma.safetensors")
    assert content == b"adapters/lora+crma/crma.safetensors" * 3
    with pytest.raises(FileNotFoundError):
        runs.make_archive(tmp_path / "missing")
