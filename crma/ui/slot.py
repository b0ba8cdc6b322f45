"""The one run slot the page's runs, `/ablate` runs and answers share, and starting a run in it."""

from __future__ import annotations

import os
from collections.abc import Iterator

from crma.ablation.spec.config import AblationConfig
from crma.lab import launcher, runs
from crma.ui import space

WAITING_FOR_SLOT = "Waiting for the previous run to end (its page was closed; it stops at its time cap at the latest)."


def data_name(cfg: AblationConfig, upload: str | None) -> str | None:
    """The uploaded file's own name when `cfg` trains on the upload, else None."""
    # Gradio keeps an upload as <cache>/<hash>/<the visitor's file name>: runs record that name, never the path.
    return os.path.basename(upload) if upload and cfg.dataset == upload else None


def wait_for_slot() -> Iterator[None]:
    """Yield once a second until this handler holds the run slot. A page (or API client) that leaves meanwhile stops
    resuming the generator, so no run starts for nobody."""
    while not launcher.RUN_SLOT.acquire(timeout=1.0):
        yield None


def start(cfg: AblationConfig, data_name: str | None) -> runs.RunFolder:
    """Preflight `cfg`, give it a private folder and start it. The caller holds the run slot; the launch gives it
    back when the run ends, or this function when the preflight fails."""
    try:
        cfg = launcher.preflight(cfg, data_name, zero_gpu=space.ZERO_GPU)
        folder = runs.new_run()
        launcher.launch(cfg, folder, data_name=data_name, gpu_call=space.GPU_CALL)
    except BaseException:
        launcher.RUN_SLOT.release()
        raise
    return folder
