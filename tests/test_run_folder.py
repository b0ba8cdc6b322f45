"""The run folder, the one interface of a run: complete, a marked partial run, or absent; every file in its place
(docs/run-folder.md); a failed write fails the run's status; readers see the same run whether it trains or ended."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

from crma.ablation.engine.records import RunResult, StepRecord
from crma.ablation.output import run_folder as run_folder_module
from crma.ablation.output.run_folder import FolderTail, RunFolderError, RunWriter, load_run, locate, run_to_folder
from crma.ablation.report import render
from crma.ablation.report.charts import CHART_KEYS
from crma.ablation.spec.schema import parse_config

CFG = dict(
    model="tiny-random", rows=8, steps=2, batch_size=2, seq_len=160, arms=["lora"], save_adapters=False, eval_rows=0
)


def test_the_folder_appears_only_when_the_run_is_done_and_readers_follow_it(tmp_path) -> None:
    out = tmp_path / "run"
    tail, seen = FolderTail(out), []

    def look(event) -> None:  # an observer beside the writer: what a page would read at this moment
        if isinstance(event, StepRecord):
            assert not out.exists()  # still in its staging folder
            (staging,) = [p for p in tmp_path.iterdir() if p.name.startswith(".run.partial-")]
            assert locate(out) == staging and (staging / "config.json").is_file()
            assert json.loads((staging / "progress.json").read_text())["phase"].startswith("seed 42")
            seen.extend(tail.poll().records)
            assert load_run(out).status == "running"

    result = run_to_folder(parse_config({**CFG, "eval_rows": 2}), out, charts=False, observers=(look,))
    assert isinstance(result, RunResult) and result.status == "finished"
    seen.extend(tail.poll().records)  # the rest, read from the same file after the move into place
    assert seen == [*load_run(out).evals[:1], *seen[1:]] and len(seen) == len(result.records) + len(result.evals)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert result.out_dir == str(out)
    assert set(result.files) >= {"config.json", "metrics.jsonl", "metrics.csv", "summary.json", "summary.md"}
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


def test_an_abandoned_run_leaves_only_a_marked_partial_folder_that_can_be_completed(tmp_path) -> None:
    out = tmp_path / "run"
    cfg = parse_config({**CFG, "steps": 5})

    class Killed(BaseException):  # not an Exception: the engine does not catch it, as it could not catch kill -9
        pass

    def die(event) -> None:
        if isinstance(event, StepRecord):
            raise Killed

    with pytest.raises(Killed):
        run_to_folder(cfg, out, charts=False, observers=(die,))
    assert not out.exists()
    (partial,) = tmp_path.iterdir()
    assert partial.name.startswith(".run.partial-")
    assert len((partial / "metrics.jsonl").read_text().splitlines()) == 1
    assert load_run(out).status == "running"  # what a reader can tell: no summary yet
    result = run_folder_module.finish_run_folder(out, cfg, status="stopped", error="the process was killed")
    assert [p.name for p in tmp_path.iterdir()] == ["run"] and result.status == "stopped"
    run = load_run(out)
    assert run.status == "stopped" and run.summary["error"] == "the process was killed" and len(run.records) == 1
    # Completing a complete folder again changes nothing.
    run_folder_module.finish_run_folder(out, cfg, status="failed", error="again")
    assert load_run(out).summary["error"] == "the process was killed"


def test_an_existing_run_is_kept_unless_overwrite(tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text('{"status": "finished"}')
    with pytest.raises(RunFolderError, match="already holds files"):
        RunWriter(out, parse_config(CFG))
    assert (out / "summary.json").read_text() == '{"status": "finished"}'


def test_a_failed_write_fails_the_run_with_one_line(tmp_path, monkeypatch) -> None:
    from crma.ablation import jsonio

    real = jsonio.atomic_write_text

    def disk_full(path, text):
        if path.name == "report.html":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, text)

    monkeypatch.setattr(jsonio, "atomic_write_text", disk_full)
    result = run_to_folder(parse_config(CFG), tmp_path / "run", charts=False)
    assert result.status == "failed"
    assert result.error == "could not write the run's files: No space left on device"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == result.error
    assert not list((tmp_path / "run").glob(".*tmp-*"))  # no half-written file left behind


def test_missing_charts_are_a_note_not_a_silent_success(tmp_path, monkeypatch) -> None:
    def no_browser(*args, **kwargs):
        raise RuntimeError("PNG export failed: no browser")

    monkeypatch.setattr(render, "write_png_charts", no_browser)
    result = run_to_folder(parse_config(CFG), tmp_path / "run")
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
    result = run_to_folder(cfg, tmp_path / "run", charts=False, data_name="mine.jsonl")
    assert result.status == "finished", result.error
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == "mine.jsonl"
    source = json.loads((tmp_path / "run" / "summary.json").read_text())["data"]["source"]
    assert source["name"] == "mine.jsonl" and source["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    for name in result.files:
        assert str(folder) not in (tmp_path / "run" / name).read_text(errors="ignore"), name


def test_the_tiny_preset_runs_on_the_bundled_data_out_of_the_box(tmp_path) -> None:
    cfg = parse_config({"model": "tiny-random", "arms": ["lora"], "steps": 1, "save_adapters": False})
    assert cfg.seq_len == 128 and cfg.rows == 200  # the defaults; byte tokens make many prompts too long
    result = run_to_folder(cfg, tmp_path / "run", charts=False)
    assert result.status == "finished", result.error
    fit = result.summary["data"]["fit"]
    assert fit["prompts_truncated"] > 0
    assert any("prompts were cut to their last" in note for note in result.notes)


def test_the_folder_holds_what_the_contract_says(tmp_path) -> None:
    """docs/run-folder.md lists each file; a finished run with adapters and charts has exactly those."""
    cfg = parse_config({**CFG, "arms": ["lora", "lora+crma"], "save_adapters": True, "eval_rows": 2})
    result = run_to_folder(cfg, tmp_path / "run")
    files = set(result.files)
    always = {"config.json", "progress.json", "metrics.jsonl", "metrics.csv", "summary.json", "summary.md"}
    assert always | {"report.html"} <= files
    pngs = {f for f in files if f.endswith(".png")}
    assert not pngs or pngs == {f"{key}.png" for key in ("loss", "grad_norm", "loss_delta", "mixing")}
    assert {"adapters/lora/adapter_config.json", "adapters/lora+crma/crma.safetensors"} <= files
    contract = (Path(__file__).parents[1] / "docs" / "run-folder.md").read_text()
    for name in always | {"report.html", "adapters/<arm>/", "tensorboard/"} | {f"{key}.png" for key in CHART_KEYS}:
        assert f"`{name}`" in contract, name
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert summary["status"] == "finished" and config["world_size"] == 1
