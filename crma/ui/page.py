"""The built page and its handlers: a run is its folder, which a handler starts (`slot.start`) and follows
(`live.follow`); the visitor's state is the run id, in a `gr.State` and the browser's localStorage."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from crma.ablation.output.run_folder import StoredRun, load_run
from crma.ablation.report.render import receipt_markdown
from crma.ablation.spec.config import AblationConfig
from crma.lab import estimates, form, launcher, runs, snippets, tryout
from crma.lab.live import LiveView, follow
from crma.ui import errors, slot, space
from crma.ui.sections import Charts, Results, Study, attribution_update
from crma.ui.settings import FORM_KEYS, Form


def page_url(request: gr.Request | None) -> str | None:
    """Where the visitor reached the app (None outside a request)."""
    return snippets.app_url(dict(request.headers)) if request is not None else None


def _reproduce(cfg: AblationConfig, app_url: str | None) -> str:
    """The Reproduce box: the CLI line, and the client call against this Space or the address the visitor used."""
    client = snippets.client_snippet(cfg, os.environ.get("SPACE_ID"), url=app_url)
    return f"{snippets.cli_command(cfg)}\n\n# or from Python:\n{client}"


def _plot_updates(plots: dict[str, gr.Plot], figures: dict[str, Any]) -> dict:
    return {plots[key]: gr.update(value=fig, visible=fig is not None) for key, fig in figures.items()}


@dataclass
class Page:
    """The built page: its sections, the visitor's run id, and the handlers that update them."""

    demo: gr.Blocks
    form: Form
    charts: Charts
    results: Results
    run_state: gr.State
    study: Study | None = None
    # The run id again, in the browser's localStorage: after a reload the page re-attaches to the run, or shows its
    # results while its folder lasts (`runs.cleanup_runs`: 6 h).
    browser_run: gr.BrowserState | None = None
    app_url: gr.State | None = None  # where this visitor reached the app (for the reproduce snippet)

    def run_outputs(self) -> list[gr.components.Component]:
        """Every component the run handler may update."""
        r, c, f = self.results, self.charts, self.form
        outputs = [
            self.run_state, c.progress, r.panel, f.run_btn, f.stop_btn, r.repro, *c.plots.values(), r.summary,
            r.receipt, r.notes, r.archive, r.report, r.embed, c.attribution, f.cancel_btn, r.tryout.row,
            r.tryout.answers,
        ]  # fmt: skip
        return outputs + ([self.browser_run] if self.browser_run is not None else [])

    def run(
        self, upload: str | None, smoothing: float, log_scale: bool, app_url: str | None, *values: Any
    ) -> Iterator[dict]:
        """Run the ablation from the form and stream charts and progress; the last update shows the results."""
        cfg = form.config_from_form(dict(zip(FORM_KEYS, values, strict=True)), upload=upload)
        charts, f = self.charts, self.form
        for _ in slot.wait_for_slot():
            yield {charts.progress: slot.WAITING_FOR_SLOT, f.cancel_btn: gr.update(visible=False)}
        folder = slot.start(cfg, slot.data_name(cfg, upload))
        view = LiveView(cfg, device=estimates.device_label(cfg), smoothing=smoothing, log_scale=log_scale)
        if space.ZERO_GPU:
            gr.Info(f"This run asks ZeroGPU for {estimates.estimate_gpu_seconds(cfg)} s of GPU time.")
        started = {
            self.run_state: folder.run_id,
            charts.progress: view.progress_html(),
            self.results.panel: gr.update(visible=False),
            charts.attribution: gr.update(visible=False),
            f.run_btn: gr.update(interactive=False),
            f.stop_btn: gr.update(interactive=True),
            f.cancel_btn: gr.update(visible=False),
            self.results.repro: _reproduce(cfg, app_url),
        }
        yield {**started, self.browser_run: folder.run_id} if self.browser_run is not None else started
        yield from self._follow(folder, view)

    def _follow(self, folder: runs.RunFolder, view: LiveView) -> Iterator[dict]:
        """Stream a run's progress and charts from its folder into `view`; the last update shows the results. The run
        does not depend on this generator: were the page to go away, the run trains on."""
        charts, warned = self.charts, len(view.diverged)
        for redraw in follow(folder.out_dir, view):
            if len(view.diverged) > warned:
                gr.Warning(f"{'; '.join(view.diverged[warned:])}. The other arms continue.")
                warned = len(view.diverged)
            if view.result is None:
                # A look without news still updates the progress line: its clocks keep ticking.
                yield {charts.progress: view.progress_html(), **(self._charts(view) if redraw else {})}
        run = load_run(folder.out_dir)
        final = {
            self.run_state: folder.run_id,
            charts.progress: view.progress_html(),
            **self._charts(view),
            self.form.stop_btn: gr.update(interactive=False),
            self.form.run_btn: gr.update(interactive=True),
        }
        if errors.failed_without_results(run):
            yield final
            raise errors.run_error(run)
        if run.status == "failed":
            gr.Warning(f"The run failed: {run.summary.get('error')}. The partial results are below.")
        yield {**final, **self._results(run)}

    def _charts(self, view: LiveView) -> dict:
        return _plot_updates(self.charts.plots, view.figures())

    def _results(self, run: StoredRun) -> dict:
        """The results panel of a run that ended, from its folder."""
        summary, r = run.summary or {}, self.results
        error = summary.get("error")
        notes = [f"Status: **{run.status}**" + (f" ({error})" if error else "")]
        notes += [f"- {note}" for note in summary.get("notes") or []]
        summary_md, report = run.folder / "summary.md", run.folder / "report.html"
        return {
            r.panel: gr.update(visible=True),
            r.summary: summary_md.read_text(encoding="utf-8") if summary_md.is_file() else "No summary was written.",
            r.receipt: receipt_markdown(summary),
            r.notes: "\n".join(notes),
            r.archive: str(runs.make_archive(run.folder)),
            r.report: str(report) if report.is_file() else None,
            r.embed: snippets.embed_snippet(os.environ.get("SPACE_ID")),
            self.charts.attribution: attribution_update(summary),
            r.tryout.row: gr.update(choices=_row_choices(summary), value=None),
            r.tryout.answers: _saved_answers_html(summary),
        }

    def reattach(
        self, run_id: str | None, smoothing: float, log_scale: bool, request: gr.Request | None = None
    ) -> Iterator[dict]:
        """On page load: follow the visitor's run from before a reload while it trains, then show its results (or
        those of a run that ended while the page was away); nothing when the browser holds no run id of a run that
        is still on disk."""
        folder = runs.get_run(run_id)
        run = _first_look(folder) if folder is not None else None
        if run is None:
            yield {self.run_state: None}  # a generator that ends without yielding would blank every output
            return
        view = LiveView(
            run.config,
            device=estimates.device_label(run.config),
            smoothing=smoothing,
            log_scale=log_scale,
            started=run.progress.get("started_at"),
        )
        common = {self.run_state: run_id, self.results.repro: _reproduce(run.config, page_url(request))}
        if not run.complete:
            yield {
                **common,
                self.form.run_btn: gr.update(interactive=False),
                self.form.stop_btn: gr.update(interactive=True),
                self.results.panel: gr.update(visible=False),
                self.charts.progress: view.progress_html(),
            }
        yield from self._follow(folder, view)

    def try_adapters(
        self,
        run_id: str | None,
        prompt: str,
        row: int | None,
        max_new_tokens: float,
        temperature: float,
        top_p: float,
        seed: float,
    ) -> Iterator[str]:
        """Every arm of the visitor's finished run, and the base model, answer the prompt (or the held-out row),
        streamed into the answers box; one request at a time, in turn with training runs."""
        folder = runs.get_run(run_id)
        run = load_run(folder.out_dir) if folder is not None else None
        if run is None or not run.complete:
            raise gr.Error(
                "There is no finished run to ask: run one first (runs are kept on the server for 6 hours; a "
                "downloaded run answers with `python -m crma generate RUN_FOLDER --prompt ...`)."
            )
        picked = tryout.held_out_rows(run.summary)[row] if isinstance(row, int) else None
        instruction = picked["instruction"] if picked else tryout.check_prompt(prompt)
        decoding = tryout.decoding(max_new_tokens, temperature, top_p, seed)
        stop_file = tryout.stop_file_of(folder.root)
        stop_file.unlink(missing_ok=True)
        for _ in slot.wait_for_slot():
            yield "<p>Waiting for the run that trains now to end…</p>"
        try:
            columns: dict[str, dict] = {}
            reference = picked.get("reference") if picked else None
            events = space.ANSWERS_CALL(
                str(run.folder), instruction, picked.get("input", "") if picked else "", decoding.to_json(), None,
                str(stop_file),
            )  # fmt: skip
            for event in events:
                columns[event["arm"]] = event
                yield tryout.answers_html(columns, reference=reference)
        finally:
            launcher.RUN_SLOT.release()

    @staticmethod
    def stop_answers(run_id: str | None) -> None:
        """Stop the answers of the visitor's run at their next token."""
        folder = runs.get_run(run_id)
        if folder is not None:
            tryout.stop_file_of(folder.root).touch()

    @staticmethod
    def stop_button(run_id: str | None) -> Any:
        """The Stop button: the visitor's own run (the id lives in their session state)."""
        if runs.request_stop(run_id):
            gr.Info("Stopping after the current step; the results so far will be kept.", duration=3)
        return gr.update(interactive=False)

    def rerender(self, run_id: str | None, smoothing: float, log_scale: bool) -> dict:
        """Redraw the charts of the visitor's run with new settings from its folder, without re-running (also while
        it trains)."""
        folder = runs.get_run(run_id)
        run = load_run(folder.out_dir) if folder is not None else None
        if run is None:
            return {}
        view = LiveView(run.config, smoothing=smoothing, log_scale=log_scale)
        for record in [*run.records, *run.evals]:
            view.update(record)
        if run.summary is not None:
            view.finish(run.summary)
        return self._charts(view)


def _row_choices(summary: dict) -> list[tuple[str, int]]:
    rows = tryout.held_out_rows(summary)
    return [(f"row {r.get('row')}: {r['instruction'][:80]}", i) for i, r in enumerate(rows)]


def _saved_answers_html(summary: dict) -> str:
    """The answers the run gave at its end to its first held-out row, shown before the visitor asks anything."""
    block = summary.get("answers") or {}
    if not block.get("prompts"):
        return ""
    first = block["prompts"][0]
    columns = {arm: {**answers[0], "done": True} for arm, answers in block["by_arm"].items() if answers}
    note = f"<p>At the end of the run, for held-out row {first.get('row')}: <i>{first['instruction']}</i></p>"
    return note + tryout.answers_html(columns, reference=first.get("reference"))


def _first_look(folder: runs.RunFolder, *, wait_s: float = 30.0) -> StoredRun | None:
    """The run in `folder`, waiting a little for a run that was started a moment ago to write its first file."""
    pause = threading.Event()
    for _ in range(int(wait_s / 0.25)):
        run = load_run(folder.out_dir)
        if run is not None or folder.finished():
            return run
        pause.wait(0.25)
    return None
