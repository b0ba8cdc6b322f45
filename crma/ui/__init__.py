"""The CRMA Lab page in Gradio: everything that imports gradio, over the logic in `crma.lab` and `crma.ablation`.

One job per module: `space` (where runs and answers execute: ZeroGPU or this machine), `slot` (the one run slot and
starting a run in it), `errors` (what a visitor sees of a failure), `settings` (the form column), `sections` (charts,
results, trying the adapters, the study), `page` (the `Page` and its handlers), `api` (the gradio_client endpoints),
`wiring` (the events between them) and `layout` (`build_page`, `build_demo`). `app.py` at the repository root is only
the Space's entry point.
"""

import os

# Before any of these modules imports gradio: no call home from a page that only serves runs.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
