"""RunWriter: a run folder is complete, a marked partial run, or absent; a failed write fails the run's status."""

from __future__ import annotations

import errno
import json

import pytest

from crma.ablation.engine.records import RunResult, StepRecord
from crma.ablation.output import run_folder as writer_module
from crma.ablation.output.run_folder import RunFolderError, RunWriter, write_run
from crma.ablation.spec.schema import parse_config

CFG = dict(model="tiny-random", rows=8, steps=2, batch_size=2, seq_len=160, arms=["lora"], save_adapters=False)


def test_the_folder_appears_only_when_the_run_is_done(tmp_path) -> None:
    out = tmp_path / "run"
    events = write_run(parse_config(CFG), out, charts=False)
    for event in events:
        if isinstance(event, StepRecord):
            assert not out.exists()  # still in its staging folder
            (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".run.partial-")]
            assert (staging / "config.json").is_file() and (staging / "metrics.jsonl").stat().st_size > 0
        result = event
    assert isinstance(result, RunResult) and result.status == "finished"
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert result.out_dir == str(out)
    assert set(result.files) >= {"config.json", "metrics.jsonl", "metrics.csv", "summary.json", "summary.md"}
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


def test_an_abandoned_run_leaves_only_a_marked_partial_folder(tmp_path) -> None:
    out = tmp_path / "run"
    events = write_run(parse_config({**CFG, "steps": 5}), out, charts=False)
    for event in events:
        if isinstance(event, StepRecord):
            break  # the process dies here (kill -9): nothing after this point runs
    assert not out.exists()
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".run.partial-")
    assert len((partial / "metrics.jsonl").read_text().splitlines()) == 1


def test_an_existing_run_is_kept_unless_overwrite(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"status": "finished"}')
    with pytest.raises(RunFolderError, match="already holds files"):
        RunWriter(out)
    assert (out / "summary.json").read_text() == '{"status": "finished"}'


def test_a_failed_write_fails_the_run_with_one_line(tmp_path, monkeypatch) -> None:
    real = writer_module.atomic_write_text

    def disk_full(path, text):
        if path.name == "report.html":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(writer_module, "atomic_write_text", disk_full)
    *_, result = write_run(parse_config(CFG), tmp_path / "run", charts=False)
    assert result.status == "failed"
    assert result.error == "could not write the run's files: No space left on device"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == result.error
    assert not list((tmp_path / "run").glob(".*tmp-*"))  # no half-written file left behind


def test_missing_charts_are_a_note_not_a_silent_success(tmp_path, monkeypatch) -> None:
    def no_browser(*args, **kwargs):
        raise RuntimeError("PNG export failed: no browser")

    monkeypatch.setattr(writer_module, "write_png_charts", no_browser)
    *_, result = write_run(parse_config(CFG), tmp_path / "run")
    assert result.status == "finished"
    assert any(note.startswith("PNG charts not written") for note in result.notes)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["notes"] == result.notes


def test_an_upload_is_recorded_by_name_and_hash_never_by_server_path(tmp_path) -> None:
    import hashlib

    folder = tmp_path / "server" / "uploads" / "a1b2"
    folder.mkdir(parents=True)
    data = folder / "mine.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"say {i}", "output": f"{i}"}) + "\n" for i in range(8)))
    cfg = parse_config({**CFG, "dataset": str(data)})
    *_, result = write_run(cfg, tmp_path / "run", charts=False, data_name="mine.jsonl")
    assert result.status == "finished", result.error
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == "mine.jsonl"
    source = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]["source"]
    assert source["name"] == "mine.jsonl" and source["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    for name in result.files:
        assert str(folder) not in (tmp_path / "run" / name).read_text(errors="ignore"), name


def test_the_tiny_preset_runs_on_the_bundled_data_out_of_the_box(tmp_path) -> None:
    cfg = parse_config({"model": "tiny-random", "arms": ["lora"], "steps": 1, "save_adapters": False})
    assert cfg.seq_len == 128 and cfg.rows == 200  # the defaults; byte tokens make many prompts too long
    *_, result = write_run(cfg, tmp_path / "run", charts=False)
    assert result.status == "finished", result.error
    fit = result.summary["data"]["fit"]
    assert fit["prompts_truncated"] > 0
    assert any("prompts were cut to their last" in note for note in result.notes)
