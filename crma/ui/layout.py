"""The whole page: the header, Run and the settings beside the live charts, the results, the published study and how
CRMA works; `build_demo` is what the Space serves."""

from __future__ import annotations

import os

import gradio as gr

from crma.ablation.report import render
from crma.lab import estimates
from crma.lab.page_assets import METHOD
from crma.ui.page import Page
from crma.ui.sections import build_charts, build_results, build_study
from crma.ui.settings import build_form
from crma.ui.wiring import LIGHT, PRIVATE, wire


def build_page(study_dir: str | os.PathLike[str] | None = None) -> Page:
    """The CRMA Lab page: Run and the settings on the left, live charts and the run's attribution on the right, then
    the results, the published study and how CRMA works.

    Args:
        study_dir (`str | PathLike | None`): the published study's folder (default `$CRMA_STUDY_DIR` or
            `assets/study/`).
    """
    has_gpu = estimates.gpu_available()
    cfg, note = estimates.default_config(has_gpu)
    # Gradio keeps its own copy of every file it serves (archives, reports): clear copies older than 6 h, hourly.
    with gr.Blocks(title="CRMA Lab: LoRA vs LoRA+CRMA", delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(
            "# CRMA Lab\nTrain plain LoRA and LoRA + CRMA (a Sinkhorn-constrained residual mixing adapter) side by "
            "side: same seed, same batches, same LoRA init, one chart, judged on rows no arm trained on. Stop any "
            "time; the results so far are kept."
        )
        default_note = gr.Markdown(f"ℹ️ {note}", elem_id="default-note")
        if render.png_browser() is None:  # a newcomer's machine without Chromium: say so before a run lacks its PNGs
            gr.Markdown(f"ℹ️ {render.NO_BROWSER[0].upper()}{render.NO_BROWSER[1:]}.", elem_id="no-png-note")
        run_state = gr.State(None)
        browser_run = gr.BrowserState(None, storage_key="crma-lab-run")
        app_url = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2, min_width=340):
                settings = build_form(cfg)
            with gr.Column(scale=3):
                charts = build_charts()
        results = build_results()
        study = build_study(study_dir)
        gr.Markdown(METHOD, elem_id="method")
        page = Page(demo, settings, charts, results, run_state, study, browser_run, app_url)
        wire(page)
        if not has_gpu:  # the CPU estimate is measured: measure it again for each visitor, at the machine's load now
            demo.load(
                lambda: f"ℹ️ {estimates.default_note(cfg, has_gpu=False)}", None, default_note,
                show_progress="hidden", **LIGHT, **PRIVATE,
            )  # fmt: skip
    return page


def build_demo() -> gr.Blocks:
    """The page's `gr.Blocks` (what `demo.launch()` serves)."""
    return build_page().demo
