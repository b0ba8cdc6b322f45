"""Run folders of the app: one private folder per run id (the run folder inside it, the stop flag beside it),
clean-up, the download archive.

A run id is 32 hex digits (uuid4): unguessable, so it is also the key to stop, re-attach to or push a run.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUNS_ENV = "CRMA_RUNS_DIR"
# How the app's runs reach the Hub: a visitor's model id is downloaded with no token (never the host's `HF_TOKEN`,
# which could open the owner's private or gated repositories to anyone) and never read from the server's folders.
VISITOR_HUB: dict[str, Any] = {"token": False, "allow_local": False}
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class StopSignal(threading.Event):
    """The engine's stop event, also set by a flag file: ZeroGPU runs the engine in a forked worker that cannot see
    an event set in the app's process, but both see the file system."""

    def __init__(self, flag_file: str | os.PathLike[str]):
        super().__init__()
        self.flag_file = Path(flag_file)

    def set(self) -> None:
        super().set()
        self.flag_file.parent.mkdir(parents=True, exist_ok=True)
        self.flag_file.touch()

    def is_set(self) -> bool:
        return super().is_set() or self.flag_file.exists()


@dataclass(frozen=True)
class RunFolder:
    """One run's private folder `root/<run_id>/`: results in `out_dir`, the stop flag next to them.

    Args:
        run_id (`str`): 32 hex digits (uuid4); unguessable, so it is also the key to stop or push the run.
        root (`Path`): `runs_root()/<run_id>`.
    """

    run_id: str
    root: Path

    @property
    def out_dir(self) -> Path:
        """Where the engine writes (named so the archive unpacks into a telling folder)."""
        return self.root / f"crma-{self.run_id[:8]}"

    @property
    def stop_file(self) -> Path:
        return self.root / "STOP"

    @property
    def archive(self) -> Path:
        return self.root / f"{self.out_dir.name}.zip"

    def finished(self) -> bool:
        """The engine wrote its summary (the run ended: finished, stopped or failed after steps)."""
        return (self.out_dir / "summary.json").is_file()


def runs_root() -> Path:
    """Parent of every run folder: `$CRMA_RUNS_DIR`, else `<tmp>/crma-lab-runs` (Gradio may serve files from tmp)."""
    return Path(os.environ.get(RUNS_ENV) or Path(tempfile.gettempdir()) / "crma-lab-runs")


def new_run(
    root: str | os.PathLike[str] | None = None, *, max_age_s: float = 6 * 3600, max_runs: int = 40
) -> RunFolder:
    """Create a fresh run folder under `root` (after removing old ones, so disk use stays bounded)."""
    base = Path(root) if root is not None else runs_root()
    base.mkdir(parents=True, exist_ok=True)
    cleanup_runs(base, max_age_s=max_age_s, max_runs=max_runs - 1)
    run_id = uuid.uuid4().hex
    folder = RunFolder(run_id, base / run_id)
    folder.root.mkdir()
    return folder


def get_run(run_id: Any, root: str | os.PathLike[str] | None = None) -> RunFolder | None:
    """The run folder of `run_id`, or None when the id is malformed (never a path) or the folder is gone."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        return None
    folder = RunFolder(run_id, (Path(root) if root is not None else runs_root()) / run_id)
    return folder if folder.root.is_dir() else None


def request_stop(run_id: Any, root: str | os.PathLike[str] | None = None) -> bool:
    """Ask the run to stop at its next step boundary; False when there is no such run or it already ended."""
    folder = get_run(run_id, root)
    if folder is None or folder.finished():
        return False
    StopSignal(folder.stop_file).set()
    return True


def cleanup_runs(
    root: str | os.PathLike[str],
    *,
    max_age_s: float = 6 * 3600,
    max_runs: int = 40,
    keep: tuple[str, ...] = (),
    now: float | None = None,
) -> list[str]:
    """Remove run folders older than `max_age_s` (by last change), then the oldest beyond `max_runs`.

    Returns:
        `list[str]`: the removed run ids.
    """
    base = Path(root)
    if not base.is_dir():
        return []
    now = time.time() if now is None else now
    runs = []
    for path in base.iterdir():
        if path.is_dir() and _RUN_ID.match(path.name):
            try:
                runs.append((_last_change(path), path))
            except FileNotFoundError:  # removed meanwhile by another visitor's clean-up
                continue
    runs.sort()
    left, removed = len(runs), []
    for changed, path in runs:
        if path.name in keep:
            continue
        if now - changed > max_age_s or left > max(max_runs, 0):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
            left -= 1
    return removed


def _last_change(path: Path) -> float:
    # The newest mtime inside: a long run keeps touching metrics.jsonl, so it never looks old while it trains.
    return max([path.stat().st_mtime] + [p.stat().st_mtime for p in path.rglob("*")])


def make_archive(out_dir: str | os.PathLike[str]) -> Path:
    """Zip everything in `out_dir` (config, metrics, summaries, report, PNGs, adapters) into `<out_dir>.zip` next to
    it, every entry under the folder's name; written to a temp name first, so a download never sees half a file."""
    folder = Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} does not exist")
    target = folder.parent / f"{folder.name}.zip"
    # A temp name of its own: two pages of one visitor (before and after a reload) may zip the same run at once.
    fd, name = tempfile.mkstemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".zip.part")
    partial = Path(name)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    zf.write(path, f"{folder.name}/{path.relative_to(folder).as_posix()}")
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return target
