"""`RunWriter`: the files of one run, written from the engine's events (the CLI and the app share it).

A run folder is either complete, a marked partial run, or absent: everything is written into a hidden staging folder
beside the target (`.<name>.partial-<id>`) and moved into place in one rename when the run ends — finished, stopped or
failed, its status in `summary.json`. A crash or `kill -9` leaves only the staging folder, never a target folder that
mixes two runs; an existing target is replaced only with `overwrite=True`, and only once the new run is complete.

In a data-parallel launch only the main process writes (`write_run` makes no writer on the others); `config.json`
and `summary.json` record the launch's `world_size`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from ..engine.distributed import data_parallel, world_size
from ..engine.records import EvalRecord, Event, Phase, RunResult, StepRecord, record_line, write_metrics_csv
from ..jsonio import dumps
from ..report.render import report_html, summary_markdown, write_png_charts
from ..spec.arms import arm_labels
from ..spec.config import AblationConfig


class RunFolderError(ValueError):
    """The output folder cannot be used; the message says why and what to do."""


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temp file and a rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


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


class RunWriter:
    """Writes `config.json`, `metrics.jsonl` step by step, then `metrics.csv`, `summary.json`, `summary.md`,
    `report.html` and the PNG charts of one run, and moves the folder into place.

    Args:
        out_dir (`str | Path`): the run's folder.
        overwrite (`bool`): replace an existing, non-empty `out_dir` (at the end, once the new run is complete).
        charts (`bool`): export the PNG charts (needs a Chrome/Chromium for kaleido).
    """

    def __init__(self, out_dir: str | Path, *, overwrite: bool = False, charts: bool = True):
        self.out = Path(out_dir)
        check_out_dir(self.out, overwrite=overwrite)
        self.charts = charts
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.staging = self.out.parent / f".{self.out.name}.partial-{uuid.uuid4().hex[:8]}"
        self.staging.mkdir()
        self.data_name: str | None = None

    @classmethod
    def resume(cls, staging: Path, out_dir: str | Path) -> RunWriter:
        """A writer that finishes the staging folder another process started (whose process is gone)."""
        writer = cls.__new__(cls)
        writer.out, writer.staging, writer.charts, writer.data_name = Path(out_dir), Path(staging), True, None
        return writer

    @property
    def adapters_dir(self) -> Path:
        """Where the engine saves the arms' adapters."""
        return self.staging / "adapters"

    def wrap(self, cfg: AblationConfig, events: Iterator[Event], *, data_name: str | None = None) -> Iterator[Event]:
        """Pass the engine's events through, writing each one's files on the way; the last event is the
        `RunResult` with `out_dir` and `files` set (and status `failed` if a file could not be written).

        `data_name` stands in for a local data file's path in `config.json` (an upload's own name: the server's
        folders are nobody's business, and the file's hash is in `summary.json`)."""
        self.data_name = data_name
        atomic_write_text(self.staging / "config.json", config_json(self._public(cfg), world_size=world_size()))
        metrics = self.staging / "metrics.jsonl"
        metrics.touch()
        for event in events:
            if isinstance(event, (StepRecord, EvalRecord)):
                # Appended and flushed per record: a crash keeps every finished step.
                with metrics.open("a", encoding="utf-8") as fh:
                    fh.write(record_line(event))
            if isinstance(event, RunResult):
                yield Phase("writing the report")
                self.finish(event)
            yield event

    def finish(self, result: RunResult) -> None:
        """Write the summary files of `result`, then move the folder into place (`result.files` lists them)."""
        summary = dict(result.summary)
        try:
            if not (self.staging / "config.json").is_file():
                atomic_write_text(self.staging / "config.json", config_json(self._public(result.config)))
            self._write_reports(result, summary)
        except OSError as exc:
            result.status = "failed"
            result.error = f"could not write the run's files: {exc.strerror or exc}"
        summary.update(status=result.status, error=result.error, wall_s=result.wall_s, notes=list(result.notes))
        result.summary = summary
        try:
            atomic_write_text(self.staging / "summary.json", dumps(summary, indent=2) + "\n")
        except OSError as exc:
            result.status = "failed"
            result.error = f"could not write summary.json ({exc.strerror or exc}); partial files in {self.staging}"
            return
        self._move_into_place()
        result.out_dir = str(self.out)
        result.files = sorted(str(p.relative_to(self.out)) for p in self.out.rglob("*") if p.is_file())

    def _public(self, cfg: AblationConfig) -> AblationConfig:
        return replace(cfg, dataset=self.data_name) if self.data_name else cfg

    def _write_reports(self, result: RunResult, summary: dict) -> None:
        cfg = self._public(result.config)
        title = f"{' vs '.join(arm_labels(cfg.arms))} on {cfg.model}"
        summary = {**summary, "status": result.status, "error": result.error}
        if not result.records:
            atomic_write_text(self.staging / "summary.md", f"# {title}\n\nNo step finished: {result.error}\n")
            return
        write_metrics_csv([*result.records, *result.evals], self.staging / "metrics.csv")
        atomic_write_text(self.staging / "summary.md", summary_markdown(summary, title=title))
        page = report_html(result.records, summary, title=title, config=cfg.to_dict())
        atomic_write_text(self.staging / "report.html", page)
        if self.charts:
            try:
                write_png_charts(result.records, self.staging, baseline=summary.get("baseline"))
            except RuntimeError as exc:  # no Chrome for static export: the HTML report still has every chart
                result.notes.append(f"PNG charts not written: {exc}")

    def _move_into_place(self) -> None:
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.out, old)
        os.replace(self.staging, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        """Remove the staging folder (a run that never got going)."""
        shutil.rmtree(self.staging, ignore_errors=True)


def write_run(
    cfg: AblationConfig, out_dir: str | Path, *, overwrite: bool = False, charts: bool = True, **engine: object
) -> Iterator[Event]:
    """`run_ablation(cfg, **engine)` with every file written to `out_dir` (see `RunWriter`). In a data-parallel
    launch only the main process writes; the others train and yield their `RunResult`."""
    from ..engine.loop import run_ablation

    parallel = data_parallel(cfg.device)
    writer, error = None, None
    if parallel is None or parallel.is_main:
        try:
            writer = RunWriter(out_dir, overwrite=overwrite, charts=charts)
        except RunFolderError as exc:
            error = exc
    # Every process learns whether the main one can write before any of them trains (or they would wait forever).
    if parallel is not None and parallel.any(error is not None) and error is None:
        raise RunFolderError(f"the main process cannot write to {out_dir}")
    if error is not None:
        raise error
    if writer is None:
        yield from run_ablation(cfg, **engine)
        return
    data_name = engine.get("data_name")
    events = run_ablation(cfg, adapters_dir=writer.adapters_dir, **engine)
    yield from writer.wrap(cfg, events, data_name=data_name)
