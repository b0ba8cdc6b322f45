"""The run folder: the one interface of a run. The engine's `RunWriter` writes it while the run trains; the CLI, the
study, the Space (its page, `/ablate`, a page that re-attaches, a download by id, a dead child's recovery), the Hub
push and the report read it. `docs/run-folder.md` is the contract: each file, who writes it, when it is complete.

    out/                       complete: summary.json is there (status finished, stopped or failed)
    .out.partial-<hex>/        while the run trains: config.json, progress.json, metrics.jsonl growing line by line

A run trains in the hidden staging folder beside its target and moves into place in one rename when it ends, so a
target folder is always a complete run; a crash or `kill -9` leaves only the staging folder, which `finish_run_folder`
completes (status `stopped` or `failed`, the finished steps intact) with the same code as a run that ended itself. An
existing target is replaced only with `overwrite=True`, and only once the new run is complete.

In a data-parallel launch only the main process writes (`run_to_folder` makes no writer on the others).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..engine.distributed import data_parallel, world_size
from ..engine.records import (
    EvalRecord,
    Event,
    Phase,
    Record,
    RunResult,
    StepRecord,
    parse_record_line,
    read_metrics_jsonl,
    record_line,
)
from ..jsonio import atomic_write_text, dumps
from ..spec.config import AblationConfig

CONFIG, PROGRESS, METRICS, SUMMARY = "config.json", "progress.json", "metrics.jsonl", "summary.json"
ADAPTERS = "adapters"


class RunFolderError(ValueError):
    """The output folder cannot be used; the message says why and what to do."""


def check_out_dir(out: Path, *, overwrite: bool) -> None:
    """Raise `RunFolderError` unless a run can be written to `out` (checked before any work starts)."""
    if str(out).strip() in ("", "."):
        raise RunFolderError("the output folder is empty: give a folder name, e.g. --out runs/demo")
    for parent in [out, *out.parents]:
        if parent.exists() and not parent.is_dir():
            where = "is a file" if parent == out else f"lies below a file ({parent.name})"
            raise RunFolderError(f"the output folder {out} {where}: choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise RunFolderError(f"{out} already holds files: pass --overwrite to replace them, or choose another --out")
    existing = next((p for p in [out, *out.parents] if p.exists()), Path.cwd())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunFolderError(f"cannot write into {existing}: it is read-only; choose another --out")


def config_json(cfg: AblationConfig, *, world_size: int = 1) -> str:
    """`config.json`'s text: the config's fields and `world_size`, the number of processes the run was launched
    with (a fact of the launch, not a setting: `AblationConfig.from_dict` skips it when the file is read back)."""
    return json.dumps({**cfg.to_dict(), "world_size": world_size}, indent=2, sort_keys=True)


def staging_folders(out: Path) -> list[Path]:
    """The staging folders of target `out`, oldest first."""
    found = [p for p in out.parent.glob(f".{out.name}.partial-*") if p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def locate(out: str | os.PathLike[str]) -> Path | None:
    """Where run `out` is now: `out` itself once complete, else its newest staging folder; None if neither exists."""
    target = Path(out)
    if (target / SUMMARY).is_file():
        return target
    staging = staging_folders(target)
    return staging[-1] if staging else None


class RunWriter:
    """The run folder's writer, an observer of the engine (`train(cfg, observers=[writer])`): `config.json` and
    `progress.json` at once, `metrics.jsonl` line by line (flushed: a crash keeps every finished step), a new
    `progress.json` at each phase, then at the `RunResult` the reports and `summary.json`, and the move into place.

    Args:
        out_dir (`str | Path`): the run's folder.
        cfg (`AblationConfig`): the run's config.
        overwrite (`bool`): replace an existing, non-empty `out_dir` (at the end, once the new run is complete).
        charts (`bool`): export the PNG charts (needs a Chrome/Chromium for kaleido).
        data_name (`str | None`): stands in for a local data file's path in `config.json` (an upload's own name: the
            server's folders are nobody's business; the file's hash is in `summary.json`).
    """

    def __init__(
        self,
        out_dir: str | Path,
        cfg: AblationConfig,
        *,
        overwrite: bool = False,
        charts: bool = True,
        data_name: str | None = None,
    ):
        self.out = Path(out_dir)
        check_out_dir(self.out, overwrite=overwrite)
        self.cfg, self.charts, self.data_name = cfg, charts, data_name
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out.parent / f".{self.out.name}.partial-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self.started = time.time()
        atomic_write_text(self.staging / CONFIG, config_json(self.public_config(cfg), world_size=world_size()))
        (self.staging / METRICS).touch()
        self._progress(Phase("starting"))

    @classmethod
    def resume(cls, staging: Path, out_dir: str | Path, cfg: AblationConfig) -> RunWriter:
        """A writer that finishes the staging folder of a run whose process is gone."""
        writer = cls.__new__(cls)
        writer.out, writer.staging, writer.cfg = Path(out_dir), staging, cfg
        writer.charts, writer.data_name = True, None
        writer.started = read_progress(staging).get("started_at", time.time())
        return writer

    @property
    def adapters_dir(self) -> Path:
        """Where the engine saves the arms' adapters."""
        return self.staging / ADAPTERS

    def public_config(self, cfg: AblationConfig) -> AblationConfig:
        """`cfg` as the run's files show it: an uploaded file under its own name."""
        return replace(cfg, dataset=self.data_name) if self.data_name else cfg

    def __call__(self, event: Event) -> None:
        if isinstance(event, (StepRecord, EvalRecord)):
            with (self.staging / METRICS).open("a", encoding="utf-8") as fh:
                fh.write(record_line(event))
        elif isinstance(event, Phase):
            self._progress(event)
        elif isinstance(event, RunResult):
            self.finish(event)

    def _progress(self, phase: Phase) -> None:
        state = {"phase": phase.message, "seed": phase.seed, "started_at": self.started, "updated_at": time.time()}
        atomic_write_text(self.staging / PROGRESS, json.dumps({**state, "pid": os.getpid()}))

    def finish(self, result: RunResult) -> None:
        """Write the reports and `summary.json` of `result`, then move the folder into place (`result.out_dir` and
        `result.files` say where and what); a file that cannot be written fails the run with one line."""
        from ..report.render import write_reports

        self._progress(Phase("writing the report"))
        summary = dict(result.summary)
        try:
            if not (self.staging / CONFIG).is_file():
                atomic_write_text(self.staging / CONFIG, config_json(self.public_config(result.config)))
            write_reports(self.staging, result, self.public_config(result.config), charts=self.charts)
        except OSError as exc:
            result.status = "failed"
            result.error = f"could not write the run's files: {exc.strerror or exc}"
        summary.update(status=result.status, error=result.error, wall_s=result.wall_s, notes=list(result.notes))
        result.summary = summary
        try:
            atomic_write_text(self.staging / SUMMARY, dumps(summary, indent=2) + "\n")
        except OSError as exc:
            result.status = "failed"
            result.error = f"could not write summary.json ({exc.strerror or exc}); partial files in {self.staging}"
            return
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        result.out_dir = str(self.out)
        result.files = sorted(p.relative_to(self.out).as_posix() for p in self.out.rglob("*") if p.is_file())


def run_to_folder(
    cfg: AblationConfig,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    charts: bool = True,
    observers: tuple = (),
    tracker: Any = None,
    data_name: str | None = None,
    **engine: Any,
) -> RunResult:
    """Train `cfg` (`engine.loop.train`) with its run folder written to `out_dir`: what the CLI, the study and the
    Space's runs all call. In a data-parallel launch only the main process writes; the others train.

    Args:
        cfg (`AblationConfig`): the run.
        out_dir (`str | Path`): its folder (see `RunWriter`).
        overwrite (`bool`): replace a non-empty `out_dir` once the new run is complete.
        charts (`bool`): export the PNG charts.
        observers (`tuple`): more observers of the run (e.g. a progress bar), main process only.
        tracker (`TrackerConfig | None`): also log to trackio / W&B / TensorBoard (its logs go into the run folder).
        data_name (`str | None`): what the run calls a local data file (see `RunWriter`).
        **engine: passed to `train` (`stop`, `loaded`, `token`, `allow_local`).

    Raises:
        `RunFolderError`: `out_dir` cannot be used (before anything trains).
    """
    from ..engine.loop import train

    parallel = data_parallel(cfg.device)
    writer, error = None, None
    if parallel is None or parallel.is_main:
        try:
            writer = RunWriter(out_dir, cfg, overwrite=overwrite, charts=charts, data_name=data_name)
        except RunFolderError as exc:
            error = exc
    # Every process learns whether the main one can write before any of them trains (or they would wait forever).
    if parallel is not None and parallel.any(error is not None) and error is None:
        raise RunFolderError(f"the main process cannot write to {out_dir}")
    if error is not None:
        raise error
    if writer is None:
        return train(cfg, data_name=data_name, **engine)
    from .trackers import open_reporter

    if tracker is not None:
        tracker = replace(tracker, log_dir=tracker.log_dir or writer.staging / "tensorboard")
    reporter = open_reporter(tracker, cfg, world_size=parallel.world_size if parallel else 1)
    observers = (writer, *observers, *([reporter] if reporter is not None else []))
    return train(cfg, observers=observers, adapters_dir=writer.adapters_dir, data_name=data_name, **engine)


def _records_of(staging: Path) -> tuple[list[StepRecord], list[EvalRecord]]:
    """The records a dead run left, its last line dropped when a kill cut it off."""
    metrics = staging / METRICS
    if not metrics.is_file():
        return [], []
    try:
        return read_metrics_jsonl(metrics)
    except ValueError:  # a line cut off by the kill: the lines before it still count
        lines = metrics.read_text(encoding="utf-8").splitlines()[:-1]
        metrics.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        return read_metrics_jsonl(metrics)


def finish_run_folder(out: str | os.PathLike[str], cfg: AblationConfig, *, status: str, error: str) -> RunResult:
    """Complete the run folder of a process that is gone (killed past its cap, cut off by ZeroGPU, out of memory):
    summarise the steps its `metrics.jsonl` holds and write every file with `status` and `error`, with the same
    `RunWriter.finish` as a run that ended itself. A folder that is complete already is left as it is."""
    from ..analysis.summary import build_summary

    target = Path(out)
    staging = staging_folders(target)
    records, evals = _records_of(staging[-1]) if staging else ([], [])
    summary = build_summary(records, labels=cfg.arm_labels, receipts=[], arm_info={}, evals=evals)
    result = RunResult(status=status, error=error, config=cfg, records=records, summary=summary, evals=evals)  # type: ignore[arg-type]
    result.notes.append("the fairness receipt is missing: the run was cut off before its seed ended")
    if (target / SUMMARY).is_file():
        return result
    writer = RunWriter.resume(staging[-1], target, cfg) if staging else RunWriter(target, cfg, overwrite=True)
    writer.finish(result)
    return result


# ---------------------------------------------------------------------------------------------------------------------
# Reading a run


def read_progress(folder: Path) -> dict[str, Any]:
    """`progress.json` of a (staging) folder; {} when it is missing or being replaced."""
    try:
        data = json.loads((folder / PROGRESS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@dataclass
class StoredRun:
    """A run as its folder holds it, complete or still training.

    Args:
        folder (`Path`): where it is now (the target, or its staging folder while it trains).
        config (`AblationConfig`): `config.json`.
        records (`list[StepRecord]`), evals (`list[EvalRecord]`): `metrics.jsonl`.
        summary (`dict | None`): `summary.json` once the run is complete.
        progress (`dict`): `progress.json` (phase, seed, started_at, pid).
    """

    folder: Path
    config: AblationConfig
    records: list[StepRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    summary: dict[str, Any] | None = None
    progress: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """The run ended and every file is written."""
        return self.summary is not None

    @property
    def status(self) -> str:
        """`finished` / `stopped` / `failed` once complete, else `running`."""
        return (self.summary or {}).get("status") or ("running" if self.summary is None else "finished")

    @property
    def files(self) -> list[str]:
        """The folder's files, relative to it."""
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())


def load_run(out: str | os.PathLike[str]) -> StoredRun | None:
    """Read run `out` from disk (complete, or still training); None when there is no such run or its `config.json`
    cannot be read."""
    folder = locate(out)
    if folder is None:
        return None
    try:
        cfg = AblationConfig.from_json((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    summary = None
    if (folder / SUMMARY).is_file():
        try:
            summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            summary = {"status": "failed", "error": "summary.json cannot be read"}
    records, evals = _records_of(folder) if summary is not None else _complete_lines(folder / METRICS)
    return StoredRun(folder, cfg, records, evals, summary, read_progress(folder))


def _complete_lines(path: Path) -> tuple[list[StepRecord], list[EvalRecord]]:
    steps: list[StepRecord] = []
    evals: list[EvalRecord] = []
    tail = FolderTail.parse(path.read_bytes() if path.is_file() else b"")[0]
    for record in tail:
        (evals if isinstance(record, EvalRecord) else steps).append(record)
    return steps, evals


@dataclass
class TailUpdate:
    """What a run folder gained since the last look."""

    records: list[Record]
    progress: dict[str, Any]
    summary: dict[str, Any] | None


class FolderTail:
    """Follow run `out` as it trains: each `poll()` returns the records appended since the last one (whole lines
    only), the current `progress.json`, and `summary.json` once the run is complete. The staging folder's rename into
    place keeps `metrics.jsonl` the same file, so the read position carries over."""

    def __init__(self, out: str | os.PathLike[str]):
        self.out = Path(out)
        self.offset = 0
        self.summary: dict[str, Any] | None = None

    @staticmethod
    def parse(data: bytes) -> tuple[list[Record], int]:
        """The records of the complete lines in `data`, and how many bytes they take."""
        end = data.rfind(b"\n") + 1
        records = [parse_record_line(line) for line in data[:end].decode("utf-8").splitlines() if line.strip()]
        return records, end

    def poll(self) -> TailUpdate:
        """The news since the last poll."""
        folder = locate(self.out)
        if folder is None:
            return TailUpdate([], {}, None)
        complete = (folder / SUMMARY).is_file()
        records: list[Record] = []
        try:
            with (folder / METRICS).open("rb") as fh:
                fh.seek(self.offset)
                records, used = self.parse(fh.read())
                self.offset += used
        except FileNotFoundError:  # the rename into place happened between locate() and open(): next poll
            return TailUpdate([], {}, None)
        if complete:
            self.summary = json.loads((folder / SUMMARY).read_text(encoding="utf-8"))
        return TailUpdate(records, read_progress(folder), self.summary)

    def wait(self, interval_s: float = 0.5, *, stop: threading.Event | None = None) -> None:
        """Pause between two polls (`stop` wakes it early)."""
        (stop or threading.Event()).wait(interval_s)
