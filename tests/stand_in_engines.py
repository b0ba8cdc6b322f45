"""Runs that misbehave on purpose, for the launcher's tests (imported by name in a child process): each writes its run
folder through the real `RunWriter`, trains two steps, then gets stuck or dies mid-step."""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any

from crma.ablation.engine.records import Phase, StepRecord
from crma.ablation.output.run_folder import RunWriter
from crma.ablation.spec.config import AblationConfig


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


def _two_steps(cfg_json: str, out_dir: str) -> RunWriter:
    writer = RunWriter(out_dir, AblationConfig.from_json(cfg_json))
    writer(Phase("seed 42: training"))
    writer(_record(1))
    writer(_record(2))
    return writer


def hangs_in_a_step(cfg_json: str, out_dir: str, stop_file: str, data_name: str | None) -> None:
    """Two steps, then a step that never returns (as a stuck kernel or a huge download would)."""
    writer = _two_steps(cfg_json, out_dir)
    writer(Phase("step 3 that never ends"))
    time.sleep(3600)


def dies_mid_step(cfg_json: str, out_dir: str, stop_file: str, data_name: str | None) -> None:
    """Two steps and half a line of the third, then the process dies (as the kernel's OOM killer would)."""
    writer = _two_steps(cfg_json, out_dir)
    with (writer.staging / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        fh.write('{"arm": "lora", "seed": 42, "step": 3, "lo')
    os._exit(3)


def gpu_worker(duration_s: float):
    """A stand-in for `spaces.GPU(duration=...)`: the call runs in a forked worker, which is killed once its duration
    is over, and the call then raises, as ZeroGPU's does."""

    def decorate(fn):
        def call(*args: Any) -> None:
            worker = multiprocessing.get_context("fork").Process(target=fn, args=args)
            worker.start()
            worker.join(duration_s)
            if worker.is_alive():
                worker.kill()
                worker.join()
                raise RuntimeError(f"GPU task aborted: it ran over its {duration_s:g} s")
            if worker.exitcode:
                raise RuntimeError(f"GPU task failed (exit code {worker.exitcode})")

        return call

    return decorate
