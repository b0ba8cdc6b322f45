"""Run the engine where it can be cut off: a child process the app kills once the wall cap (or a stop) has had its
grace period, so no input — a huge download, a stuck kernel, a phase that never reaches a step boundary — can hold
the Space's one run slot for good.

The engine checks the stop flag and the wall cap at every step boundary and stops cleanly there; the child is killed
only when a phase outlives both by `grace_s`. Then the run's staging folder is salvaged: the steps that finished are
summarised and written like any run, with status `stopped` and a reason that names the phase.

On ZeroGPU the engine already runs in a worker `spaces.GPU` forks and kills at its duration, so the app uses
`runs.run_events` there and this module elsewhere.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crma.ablation.engine.records import Event, Phase, RunResult
from crma.ablation.spec.config import AblationConfig

from .runs import StopSignal, run_events

# The server process forks each run's child from a clean interpreter that has torch and the engine imported already:
# no per-run import cost (spawn) and no fork of the app's threads (fork).
_PRELOAD = ["torch", "crma.ablation.engine.loop", "crma.ablation.output.run_folder", "crma.lab.runs"]
_DONE = "__done__"


def _context() -> Any:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _child(target: str, cfg_json: str, out_dir: str, stop_file: str, data_name: str | None, events: Any) -> None:
    """The child's whole life: run `target` and send every event back; the last message is always `_DONE`."""
    import importlib

    try:
        module, _, name = target.rpartition(".")
        run = getattr(importlib.import_module(module), name)
        for event in run(AblationConfig.from_json(cfg_json), out_dir, stop_file, data_name):
            events.put(event)
    except BaseException as exc:  # reported, not raised: the parent decides what the visitor reads
        events.put(("error", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
    finally:
        events.put(_DONE)


def engine_events(cfg: AblationConfig, out_dir: str, stop_file: str, data_name: str | None) -> Iterator[Event]:
    """The default child target: a visitor's run (`runs.run_events`) with its files written to `out_dir`."""
    yield from run_events(cfg, out_dir, stop_file, data_name)


def run_cut_off(
    cfg: AblationConfig,
    out_dir: str | os.PathLike[str],
    stop_file: str | os.PathLike[str],
    *,
    data_name: str | None = None,
    grace_s: float = 30.0,
    poll_s: float = 0.25,
    target: str = f"{__name__}.engine_events",
) -> Iterator[Event]:
    """The events of one run trained in a child process; the last one is always a `RunResult`.

    Args:
        cfg (`AblationConfig`): the run (its `max_wall_s` is the cap; None means no cap).
        out_dir (`str | PathLike`): the run's folder (written by the child, or salvaged here after a kill).
        stop_file (`str | PathLike`): the stop flag (`runs.StopSignal`); once set, the child has `grace_s` to stop.
        data_name (`str | None`): what the run calls a local data file (an upload's own name).
        grace_s (`float`): how long past the wall cap, or past a stop, a phase may run before the child is killed.
        poll_s (`float`): how often the parent looks at the clock while no event arrives.
        target (`str`): `module.function` yielding the events (tests put a stand-in engine here).
    """
    ctx = _context()
    events = ctx.Queue()
    child = ctx.Process(
        target=_child,
        args=(target, cfg.to_json(), str(out_dir), str(stop_file), data_name, events),
        name="crma-run",
        daemon=True,
    )
    started = time.monotonic()
    child.start()
    stop, stop_seen = StopSignal(stop_file), None
    phase, records, error = "starting", [], None
    try:
        while True:
            try:
                item = events.get(timeout=poll_s)
            except queue.Empty:
                now = time.monotonic()
                if stop_seen is None and stop.is_set():
                    stop_seen = now
                over_cap = cfg.max_wall_s is not None and now - started > cfg.max_wall_s + grace_s
                over_stop = stop_seen is not None and now - stop_seen > grace_s
                if over_cap or over_stop:
                    child.kill()
                    child.join()
                    why = f"time cap of {cfg.max_wall_s:.0f} s" if over_cap else "stop request"
                    reason = f"cut off {grace_s:.0f} s after the {why}: '{phase}' did not reach a step boundary"
                    yield Phase("salvaging the finished steps")
                    yield salvage(cfg, Path(out_dir), status="stopped", error=reason, data_name=data_name)
                    return
                if not child.is_alive() and events.empty():
                    code = child.exitcode
                    why = error or f"the training process ended unexpectedly (exit code {code}; out of memory?)"
                    yield salvage(cfg, Path(out_dir), status="failed", error=why, data_name=data_name)
                    return
                continue
            if item == _DONE:
                if error is not None:
                    yield salvage(cfg, Path(out_dir), status="failed", error=error, data_name=data_name)
                return
            if isinstance(item, tuple) and item and item[0] == "error":
                error = f"internal error ({item[1]})"
                continue
            if isinstance(item, Phase):
                phase = item.message
            elif isinstance(item, RunResult):
                yield item
                return
            else:
                records.append(item)
            yield item
    finally:
        if child.is_alive():  # the visitor went away: the child stops at its next step boundary, or is killed
            stop.set()
            child.join(grace_s)
            if child.is_alive():
                child.kill()
                child.join()
        events.close()


def salvage(cfg: AblationConfig, out: Path, *, status: str, error: str, data_name: str | None = None) -> RunResult:
    """Finish a run whose process is gone: summarise the steps in its staging folder's `metrics.jsonl`, write the
    reports with `status` and `error`, and move the folder into place (see `RunWriter`)."""
    from crma.ablation.analysis.summary import build_summary
    from crma.ablation.engine.records import read_metrics_jsonl
    from crma.ablation.output.run_folder import RunWriter
    from crma.ablation.spec.arms import arm_labels

    partial = sorted(out.parent.glob(f".{out.name}.partial-*"), key=lambda p: p.stat().st_mtime)
    records = []
    if partial and (partial[-1] / "metrics.jsonl").is_file():
        try:
            records = read_metrics_jsonl(partial[-1] / "metrics.jsonl")
        except ValueError:  # a line cut off by the kill: the lines before it still count
            lines = (partial[-1] / "metrics.jsonl").read_text(encoding="utf-8").splitlines()[:-1]
            (partial[-1] / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
            records = read_metrics_jsonl(partial[-1] / "metrics.jsonl")
    summary = build_summary(records, labels=arm_labels(cfg.arms), receipts=[], arm_info={})
    result = RunResult(status=status, error=error, config=cfg, records=records, summary=summary)  # type: ignore[arg-type]
    result.notes.append("the fairness receipt is missing: the run was cut off before its seed ended")
    writer = RunWriter.resume(partial[-1], out) if partial else RunWriter(out, overwrite=True)
    writer.data_name = data_name
    writer.finish(result)
    return result
