"""The launcher: a visitor's run trains in a process of its own, and whatever happens to that process, the run folder
ends complete — on the plain path (a child the app can kill) and on ZeroGPU's (a worker killed at its duration)."""

from __future__ import annotations

import json
import threading

import pytest
from stand_in_engines import gpu_worker, hangs_in_a_step

from crma.ablation.output.run_folder import load_run, locate
from crma.ablation.spec.schema import parse_config
from crma.lab import launcher, runs

TINY = dict(model="tiny-random", rows=8, steps=2, batch_size=2, seq_len=160, arms=["lora"], save_adapters=False)
TIMEOUT_S = 300  # generous: a fresh forkserver imports torch and the engine first


def _launch(
    tmp_path, target: str | None = None, *, gpu_call=None, **overrides
) -> tuple[launcher.Launch, runs.RunFolder]:
    cfg = parse_config({**TINY, "eval_rows": 0, **overrides})
    folder = runs.new_run(tmp_path)
    kwargs = {"target": f"stand_in_engines.{target}"} if target else {}
    return launcher.Launch(cfg, folder, gpu_call=gpu_call, grace_s=1.0, poll_s=0.05, **kwargs).start(), folder


def _summary(folder: runs.RunFolder) -> dict:
    return json.loads((folder.out_dir / "summary.json").read_text())


def test_a_normal_run_writes_its_folder_and_gives_the_slot_back(tmp_path) -> None:
    slot = threading.BoundedSemaphore(1)
    slot.acquire()
    cfg = parse_config({**TINY, "eval_rows": 2})
    folder = runs.new_run(tmp_path)
    launch = launcher.Launch(cfg, folder, slot=slot, poll_s=0.05).start()
    assert launch.join(TIMEOUT_S) and launch.ending is None
    run = load_run(folder.out_dir)
    assert run.status == "finished" and [r.step for r in run.records] == [1, 2] and len(run.evals) == 2
    assert slot.acquire(blocking=False)  # the watcher gave the slot back


def test_a_step_past_the_wall_cap_is_killed_and_the_finished_steps_kept(tmp_path) -> None:
    launch, folder = _launch(tmp_path, "hangs_in_a_step", max_wall_s=0.5)
    assert launch.join(TIMEOUT_S)
    summary = _summary(folder)
    assert summary["status"] == "stopped" and "time cap" in summary["error"]
    assert "'step 3 that never ends' did not reach a step boundary" in summary["error"]
    assert summary["arms"]["lora"]["steps"] == 2
    assert [p.name for p in folder.root.iterdir() if p.name != "STOP"] == [folder.out_dir.name]  # no staging left


def test_a_stop_is_enforced_inside_a_step(tmp_path) -> None:
    launch, folder = _launch(tmp_path, "hangs_in_a_step")
    # The stop comes once the run is stuck in its third step (what the stand-in writes before it hangs).
    for _ in range(TIMEOUT_S * 20):
        staging = locate(folder.out_dir)
        if staging is not None and "never ends" in (staging / "progress.json").read_text():
            break
        threading.Event().wait(0.05)
    runs.request_stop(folder.run_id, folder.root.parent)
    assert launch.join(TIMEOUT_S)
    summary = _summary(folder)
    assert summary["status"] == "stopped" and "stop request" in summary["error"]


def test_a_child_killed_mid_step_leaves_a_complete_failed_folder(tmp_path) -> None:
    launch, folder = _launch(tmp_path, "dies_mid_step")
    assert launch.join(TIMEOUT_S)
    run = load_run(folder.out_dir)
    assert run.status == "failed" and "exit code 3" in run.summary["error"]
    assert [r.step for r in run.records] == [1, 2]  # the half-written third line is dropped, the two steps intact
    assert (folder.out_dir / "summary.md").is_file() and (folder.out_dir / "report.html").is_file()


def test_on_zero_gpu_a_worker_killed_at_its_duration_leaves_a_complete_stopped_folder(tmp_path) -> None:
    # The real call path of the Space: spaces.GPU(...)(visitor_run), here a stand-in that forks and kills.
    gpu_call = gpu_worker(duration_s=8.0)(hangs_in_a_step)
    launch, folder = _launch(tmp_path, gpu_call=gpu_call)
    assert launch.join(TIMEOUT_S)
    run = load_run(folder.out_dir)
    assert run.status == "stopped" and "GPU task aborted" in run.summary["error"]
    assert [r.step for r in run.records] == [1, 2] and (folder.out_dir / "report.html").is_file()


def test_on_zero_gpu_a_run_that_ends_itself_is_left_as_it_is(tmp_path) -> None:
    gpu_call = gpu_worker(duration_s=TIMEOUT_S)(launcher.visitor_run)
    launch, folder = _launch(tmp_path, gpu_call=gpu_call)
    assert launch.join(TIMEOUT_S) and launch.ending is None
    assert _summary(folder)["status"] == "finished"


@pytest.mark.parametrize("bad", ["no_such_module.engine", "stand_in_engines.no_such_function"])
def test_a_target_that_cannot_start_is_a_failed_run(tmp_path, bad) -> None:
    cfg = parse_config(TINY)
    folder = runs.new_run(tmp_path)
    launch = launcher.Launch(cfg, folder, target=bad, poll_s=0.05).start()
    assert launch.join(TIMEOUT_S)
    summary = _summary(folder)
    assert summary["status"] == "failed" and "ended unexpectedly (exit code 1" in summary["error"]
