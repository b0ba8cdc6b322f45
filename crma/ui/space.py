"""Where the page's work executes: on ZeroGPU, inside `spaces.GPU` leases; elsewhere, on this machine.

The `spaces.GPU` wrappers are made when this module is imported, that is when the Space imports `app.py`: ZeroGPU
only grants leases to functions decorated at start-up. Handlers look the calls up here at call time
(`space.GPU_CALL`, `space.ANSWERS_CALL`), so a test replaces them in this one module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

try:  # ZeroGPU: must be imported before anything initialises CUDA; a no-op wrapper everywhere else
    import spaces
except ImportError:  # pragma: no cover - spaces is in requirements.txt
    spaces = None

from crma.ablation.data import MAX_UPLOAD_BYTES
from crma.ablation.spec.config import AblationConfig
from crma.lab import estimates, launcher, tryout
from crma.lab.page_assets import CSS

ZERO_GPU = estimates.on_zero_gpu()
# Hub sign-in is real only on a Space; elsewhere gradio would mock it with the host's own token, which is not a
# visitor's sign-in (and needs the Hub), so off a Space the page says how to push instead.
ON_SPACE = os.environ.get("SYSTEM") == "spaces"
# Gradio refuses a bigger upload before it reaches the app (the data reader streams, but a file must land first).
LAUNCH_OPTIONS: dict[str, Any] = {"css": CSS, "max_file_size": MAX_UPLOAD_BYTES}


def _gpu_seconds(cfg_json: str, *args: Any) -> int:
    return estimates.estimate_gpu_seconds(AblationConfig.from_json(cfg_json))


def choose_gpu_call(zero_gpu: bool) -> Callable[..., Any] | None:
    """Where a run trains: on ZeroGPU in the worker `spaces.GPU` forks for the estimated duration (and kills when
    it runs over); elsewhere (None) in a child process of this app. Either way the launcher completes the folder."""
    if zero_gpu and spaces is not None:
        return spaces.GPU(duration=_gpu_seconds)(launcher.visitor_run)
    return None


GPU_CALL = choose_gpu_call(ZERO_GPU)
# "Try the adapters" on ZeroGPU: inside the GPU lease too (its worker streams the answers back).
ANSWERS_CALL: Callable[..., Iterator[dict]] = (
    spaces.GPU(duration=int(tryout.TRY_CAPS["seconds"]) + 30)(tryout.stream_answers)
    if ZERO_GPU and spaces is not None
    else tryout.stream_answers
)
