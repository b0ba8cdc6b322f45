"""Engines that misbehave on purpose, for the cut-off runner's tests (imported by name in a child process)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

from crma.ablation.engine.records import Phase, RunResult, StepRecord
from crma.ablation.output.run_folder import RunWriter


def _record(step: int) -> StepRecord:
    return StepRecord(
        arm="lora",
        seed=42,
        step=step,
        loss=2.0 - 0.1 * step,
        grad_norm_pre=1.0,
        grad_norm_post=1.0,
        clipped=False,
        lr=2e-4,
        tokens=100 * step,
        step_time_s=0.01,
        memory_mb=100.0,
    )


def _two_steps_then(cfg, out_dir: str, what) -> Iterator:
    def events():
        yield _record(1)
        yield _record(2)
        yield from what()

    writer = RunWriter(out_dir)
    yield from writer.wrap(cfg, events())


def hangs_in_a_phase(cfg, out_dir: str, stop_file: str, data_name: str | None) -> Iterator:
    """Two steps, then a phase that never returns (as a stuck download or kernel would)."""

    def hang():
        yield Phase("loading a model that never arrives")
        time.sleep(3600)
        yield RunResult(status="finished", error=None, config=cfg, records=[], summary={})  # pragma: no cover

    yield from _two_steps_then(cfg, out_dir, hang)


def dies(cfg, out_dir: str, stop_file: str, data_name: str | None) -> Iterator:
    """Two steps, then the process is killed from within (as the kernel's OOM killer would)."""

    def die():
        yield Phase("about to be killed")
        os._exit(3)

    yield from _two_steps_then(cfg, out_dir, die)
