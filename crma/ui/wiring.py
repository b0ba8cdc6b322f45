"""The page's events: which handler each button, box and page load calls, in which queue, and the API-only
endpoints. Registered in the order gradio shows them (the Run button's first, the API's last)."""

from __future__ import annotations

import json

import gradio as gr

from crma.ablation.spec.arms import AUTHOR_ARMS, GRID_ARMS, STUDY_ARMS
from crma.lab.page_assets import PAGE_JS
from crma.ui import api
from crma.ui.errors import guard
from crma.ui.page import Page, page_url

# Page-only events stay off the API page; light ones (previews, redraws) share a small queue of their own.
PRIVATE = {"api_visibility": "private"}
LIGHT = {"concurrency_id": "light", "concurrency_limit": 4}


def _wire_run(page: Page) -> None:
    """Run, its queue and its end, Leave the queue, and Stop."""
    f, c = page.form, page.charts
    # At once, before the queue: Run cannot be pressed twice, and a run that has to wait can leave the queue.
    f.run_btn.click(
        lambda: (gr.update(interactive=False), gr.update(visible=True)), None, [f.run_btn, f.cancel_btn],
        queue=False, **PRIVATE,
    )  # fmt: skip
    run_event = f.run_btn.click(
        guard(page.run),
        [f.upload, c.smoothing, c.log_scale, page.app_url, *f.settings()],
        page.run_outputs(),
        api_name="run",
        api_visibility="undocumented",
        concurrency_limit=1,
        concurrency_id="gpu",
        show_progress="full",
        show_progress_on=[c.progress],
    )
    # Whatever happened (error included), the buttons come back; `.then` runs after failures too.
    run_event.then(
        lambda: (gr.update(interactive=True), gr.update(interactive=False), gr.update(visible=False)),
        None, [f.run_btn, f.stop_btn, f.cancel_btn], queue=False, **PRIVATE,
    )  # fmt: skip
    # A run still waiting in gradio's queue is removed from it. A started run hides this button first; were that one
    # cancelled anyway, only its page stops following: the run trains on, and a reload shows it.
    f.cancel_btn.click(
        lambda: (
            gr.update(interactive=True), gr.update(interactive=False), gr.update(visible=False),
            "Left the queue: nothing ran. Press Run to queue again.",
        ),
        None, [f.run_btn, f.stop_btn, f.cancel_btn, c.progress], cancels=[run_event], queue=False, **PRIVATE,
    )  # fmt: skip
    f.stop_btn.click(page.stop_button, page.run_state, f.stop_btn, concurrency_id="control", **PRIVATE)


def _wire_load(page: Page) -> None:
    """On page load: the page script, the address the visitor used, and the visitor's run from before a reload."""
    page.demo.load(None, None, None, js=PAGE_JS)  # live clocks, and zoom / hidden traces kept through updates
    page.demo.load(page_url, None, page.app_url, queue=False, **PRIVATE)
    page.demo.load(
        guard(page.reattach), [page.browser_run, page.charts.smoothing, page.charts.log_scale], page.run_outputs(),
        concurrency_id="reattach", concurrency_limit=None, **PRIVATE,
    )  # fmt: skip


def _wire_form(page: Page) -> None:
    """The arm presets; the upload box follows the data choice, the slice's preview the data and the slice (and
    `/preview`)."""
    f = page.form
    # In the browser, no round trip; a JS function's returned array is spread over the outputs, hence [[...]].
    for key, arms in {"grid": GRID_ARMS, "controls": STUDY_ARMS, "recipe": AUTHOR_ARMS}.items():
        f.presets[key].click(None, None, f.arms, js=f"() => [{json.dumps(list(arms))}]")
    f.dataset.change(lambda d: gr.update(visible=d == "upload"), f.dataset, f.upload, queue=False, **PRIVATE)
    preview_io = ([f.dataset, f.upload, f.start, f.rows], [f.preview_table, f.preview_msg])
    gr.Button("preview", visible=False).click(api.preview, *preview_io, api_name="preview", **LIGHT)
    for trigger in (f.dataset.change, f.upload.change, f.start.submit, f.rows.submit, f.start.blur, f.rows.blur):
        trigger(api.preview, *preview_io, trigger_mode="always_last", **LIGHT, **PRIVATE)
    page.demo.load(api.preview, *preview_io, **LIGHT, **PRIVATE)


def _wire_results(page: Page) -> None:
    """Chart settings redraw; Answer and Stop answering; Push."""
    c, r, t = page.charts, page.results, page.results.tryout
    # Smoothing and log scale redraw from the run folder; no re-run.
    for trigger in (c.smoothing.release, c.log_scale.change):
        trigger(
            guard(page.rerender), [page.run_state, c.smoothing, c.log_scale], list(c.plots.values()),
            trigger_mode="always_last", concurrency_id="light", **PRIVATE,
        )  # fmt: skip
    answering = t.answer_btn.click(
        guard(page.try_adapters),
        [page.run_state, t.prompt, t.row, t.max_new_tokens, t.temperature, t.top_p, t.seed],
        t.answers,
        concurrency_id="gpu",
        concurrency_limit=1,
        **PRIVATE,
    )
    t.stop_btn.click(page.stop_answers, page.run_state, None, cancels=[answering], queue=False, **PRIVATE)
    r.push_btn.click(
        api.push, [page.run_state, r.repo_name, r.private], r.push_msg, api_name="push", concurrency_id="push",
        concurrency_limit=2,
    )  # fmt: skip


def _wire_api() -> None:
    """The API-only endpoints (gradio_client), on hidden components of their own."""
    with gr.Group(visible=False):
        api_config, api_data = gr.JSON(label="config"), gr.File(label="data_file", type="filepath")
        api_event, api_archive = gr.JSON(label="event"), gr.File(label="archive")
        api_run_id, api_message = gr.Textbox(label="run_id"), gr.Textbox(label="message")
        api_run, api_follow, api_stop = gr.Button("ablate"), gr.Button("follow"), gr.Button("stop")
        api_prompt, api_settings, api_answer = gr.Textbox(label="prompt"), gr.JSON(label="settings"), gr.JSON()
        api_generate = gr.Button("generate")
    api_run.click(
        api.ablate, [api_config, api_data], [api_event, api_archive], api_name="ablate", concurrency_limit=1,
        concurrency_id="gpu",
    )  # fmt: skip
    api_follow.click(api.follow_run, api_run_id, [api_event, api_archive], api_name="follow", concurrency_limit=None)
    api_generate.click(
        api.generate, [api_run_id, api_prompt, api_settings], api_answer, api_name="generate", concurrency_id="gpu",
        concurrency_limit=1,
    )  # fmt: skip
    # Stop must never wait behind the run it stops: its own, unlimited concurrency group.
    api_stop.click(
        api.stop, api_run_id, api_message, api_name="stop", concurrency_id="control", concurrency_limit=None
    )


def wire(page: Page) -> None:
    """Every event of the page, section by section, then the API-only endpoints."""
    _wire_run(page)
    _wire_load(page)
    _wire_form(page)
    _wire_results(page)
    _wire_api()
