"""CRMA Lab: the Gradio Space's entry point. The page lives in `crma.ui`, its logic in `crma.lab` and `crma.ablation`.

On a Space, gradio imports this file and serves `demo`; `python app.py` serves it here. Importing `crma.ui` makes the
`spaces.GPU` calls runs and answers execute in (`crma.ui.space`), which ZeroGPU needs done at start-up.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # ZeroGPU: must be imported before anything initialises CUDA; a no-op wrapper everywhere else
    import spaces  # noqa: F401
except ImportError:  # pragma: no cover - spaces is in requirements.txt
    pass

from crma.ui.layout import build_demo
from crma.ui.space import LAUNCH_OPTIONS

demo = build_demo()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1, max_size=20).launch(**LAUNCH_OPTIONS)
