"""The cut-off runner: a run trains in a child process the app can kill, and the finished steps survive the kill."""

from __future__ import annotations

import json

import pytest

from crma.ablation.engine.records import Phase, RunResult, StepRecord
from crma.ablation.spec.schema import parse_config
from crma.lab.runs import StopSignal
from crma.lab.worker import run_cut_off

TINY = dict(model="tiny-random", rows=8, steps=2, batch_size=2, seq_len=160, arms=["lora"], save_adapters=False)


def _run(tmp_path, target: str | None = None, **cfg_overrides) -> list:
    cfg = parse_config({**TINY, **cfg_overrides})
    kwargs = {"target": f"stand_in_engines.{target}"} if target else {}
    return list(run_cut_off(cfg, tmp_path / "run", tmp_path / "STOP", grace_s=1.0, poll_s=0.05, **kwargs))


def test_a_normal_run_streams_every_event_and_finishes(tmp_path) -> None:
    events = _run(tmp_path)
    assert isinstance(events[-1], RunResult) and events[-1].status == "finished", events[-1].error
    assert len([e for e in events if isinstance(e, StepRecord)]) == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "finished"


def test_a_phase_past_the_wall_cap_is_cut_off_and_the_finished_steps_kept(tmp_path) -> None:
    events = _run(tmp_path, "hangs_in_a_phase", max_wall_s=0.5)
    result = events[-1]
    assert isinstance(result, RunResult) and result.status == "stopped"
    assert "time cap" in result.error and "'loading a model that never arrives'" in result.error
    assert [r.step for r in result.records] == [1, 2]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["arms"]["lora"]["steps"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # the staging folder became the run folder


def test_a_stop_is_enforced_even_inside_a_phase(tmp_path) -> None:
    cfg = parse_config(TINY)
    stop = StopSignal(tmp_path / "STOP")
    events = []
    for event in run_cut_off(
        cfg, tmp_path / "run", tmp_path / "STOP", grace_s=0.5, poll_s=0.05, target="stand_in_engines.hangs_in_a_phase"
    ):
        events.append(event)
        if isinstance(event, Phase) and "never arrives" in event.message:
            stop.set()
    assert events[-1].status == "stopped" and "stop request" in events[-1].error


def test_a_killed_child_is_a_failed_run_with_its_steps(tmp_path) -> None:
    result = _run(tmp_path, "dies")[-1]
    assert result.status == "failed" and "exit code 3" in result.error
    assert len(result.records) == 2 and (tmp_path / "run" / "metrics.jsonl").is_file()


@pytest.mark.parametrize("bad", ["no_such_module.engine", "stand_in_engines.no_such_function"])
def test_a_broken_target_fails_with_one_line(tmp_path, bad) -> None:
    cfg = parse_config(TINY)
    result = list(run_cut_off(cfg, tmp_path / "run", tmp_path / "STOP", grace_s=1.0, poll_s=0.05, target=bad))[-1]
    assert result.status == "failed" and result.error.startswith("internal error (") and "\n" not in result.error
