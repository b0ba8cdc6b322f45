"""CRMA Lab: the Gradio Space. Only layout and handlers live here; the logic is in `crma.lab` and `crma.ablation`.

The page is built from small sections (`build_form`, `build_charts`, `build_results`, `build_study`) that return
typed groups of components; `Page` holds them and its methods are the handlers. A run is its folder: a handler starts
it (`launcher.launch`) and follows the folder (`live.follow`); per-visitor state is the run id, in a `gr.State` and
the browser's localStorage.

Endpoints (gradio_client): `/ablate` streams a run from one JSON object of settings, `/follow` streams a run by its
id (from `/ablate`'s first event, after a lost connection), `/stop` ends a run at the next step, `/generate` has
every arm of a finished run answer a prompt, `/push` uploads a run with the visitor's own Hub sign-in, `/preview`
shows a data slice.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # ZeroGPU: must be imported before anything initialises CUDA; a no-op wrapper everywhere else
    import spaces
except ImportError:  # pragma: no cover - spaces is in requirements.txt
    spaces = None

import gradio as gr

from crma.ablation.data import MAX_UPLOAD_BYTES
from crma.ablation.models import describe_presets
from crma.ablation.output.publish import PushError, push_results
from crma.ablation.output.run_folder import StoredRun, load_run
from crma.ablation.report.charts import CHARTS
from crma.ablation.report.render import attribution_markdown, receipt_markdown
from crma.ablation.spec.arms import ARM_SPECS, AUTHOR_ARMS, GRID_ARMS, STUDY_ARMS
from crma.ablation.spec.config import AblationConfig
from crma.ablation.spec.schema import label
from crma.lab import estimates, form, launcher, published, runs, snippets, tryout
from crma.lab.live import LiveView, follow, watch
from crma.lab.page_assets import CSS, METHOD, PAGE_JS

logger = logging.getLogger("crma.app")

GENERIC_ERROR = "Something went wrong on our side (the details are in the server log). Your results so far are kept."
ZERO_GPU = estimates.on_zero_gpu()
# Hub sign-in is real only on a Space; elsewhere gradio would mock it with the host's own token, which is not a
# visitor's sign-in (and needs the Hub), so off a Space the page says how to push instead.
ON_SPACE = os.environ.get("SYSTEM") == "spaces"
# Gradio refuses a bigger upload before it reaches the app (the data reader streams, but a file must land first).
LAUNCH_OPTIONS: dict[str, Any] = {"css": CSS, "max_file_size": MAX_UPLOAD_BYTES}
WAITING_FOR_SLOT = "Waiting for the previous run to end (its page was closed; it stops at its time cap at the latest)."
# The form's settings, in the order the run handler receives them after (upload, smoothing, log_scale, app_url).
FORM_KEYS = (
    "model",
    "dataset",
    "start",
    "rows",
    "arms",
    "seeds",
    "steps",
    "tune_lr",
    "eval_rows",
    "lr",
    "structural_lr",
    "gate_lr",
    "batch_size",
    "seq_len",
    "lora_r",
    "lora_targets",
    "crma.n_streams",
    "crma.rank",
    "spike_at",
)


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


def _guard(fn: Callable) -> Callable:
    """Expected errors (bad input, failed push) become `gr.Error(message)`; anything else is logged with its
    traceback and shown as a generic error. The app keeps serving either way."""

    def convert(exc: Exception) -> gr.Error:
        if isinstance(exc, gr.Error):
            return exc
        if isinstance(exc, (ValueError, PushError)):
            return gr.Error(str(exc))
        logger.exception("unexpected error in %s", fn.__name__)
        return gr.Error(GENERIC_ERROR)

    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:
                raise convert(exc) from None

        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise convert(exc) from None

    return wrapper


def _data_name(cfg: AblationConfig, upload: str | None) -> str | None:
    # Gradio keeps an upload as <cache>/<hash>/<the visitor's file name>: runs record that name, never the path.
    return os.path.basename(upload) if upload and cfg.dataset == upload else None


def _wait_for_slot() -> Iterator[None]:
    """Yield once a second until this handler holds the run slot. A page (or API client) that leaves meanwhile stops
    resuming the generator, so no run starts for nobody."""
    while not launcher.RUN_SLOT.acquire(timeout=1.0):
        yield None


def _start(cfg: AblationConfig, data_name: str | None) -> runs.RunFolder:
    """Preflight `cfg`, give it a private folder and start it. The caller holds the run slot; the launch gives it
    back when the run ends, or this function when the preflight fails."""
    try:
        cfg = launcher.preflight(cfg, data_name, zero_gpu=ZERO_GPU)
        folder = runs.new_run()
        launcher.launch(cfg, folder, data_name=data_name, gpu_call=GPU_CALL)
    except BaseException:
        launcher.RUN_SLOT.release()
        raise
    return folder


# --------------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class Form:
    """The settings column: model, data, slice, arms, seeds, steps, evaluation, hyperparameters, Run and Stop."""

    model: gr.Dropdown
    dataset: gr.Radio
    upload: gr.File
    start: gr.Number
    rows: gr.Number
    preview_msg: gr.Markdown
    preview_table: gr.Dataframe
    arms: gr.CheckboxGroup
    presets: dict[str, gr.Button]
    seeds: gr.Textbox
    steps: gr.Number
    tune_lr: gr.Checkbox
    eval_rows: gr.Number
    lr: gr.Textbox
    structural_lr: gr.Textbox
    gate_lr: gr.Textbox
    batch_size: gr.Number
    seq_len: gr.Number
    lora_r: gr.Number
    lora_targets: gr.Textbox
    crma_streams: gr.Number
    crma_rank: gr.Number
    spike_at: gr.Number
    run_btn: gr.Button
    stop_btn: gr.Button
    cancel_btn: gr.Button

    def settings(self) -> list[gr.components.Component]:
        """The components of `FORM_KEYS`, in that order."""
        by_key = {"crma.n_streams": self.crma_streams, "crma.rank": self.crma_rank}
        return [by_key.get(key) or getattr(self, key) for key in FORM_KEYS]


def _short_description(description: str) -> str:
    # "SmolLM2-135M-Instruct: real pretrained chat model, ..." -> "SmolLM2-135M-Instruct": the box stays one line.
    return description.split(":")[0].split("(")[0].strip()


def build_form(cfg: AblationConfig) -> Form:
    """The settings column, filled with `cfg`; Run and Stop on top, where the first screen shows them."""
    with gr.Row():
        run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", interactive=False)
    # Shown while a run waits in the queue behind another visitor's run: leaving the queue costs nothing.
    cancel_btn = gr.Button("Leave the queue", size="sm", visible=False, elem_id="cancel-btn")
    model = gr.Dropdown(
        choices=[(f"{name}: {_short_description(desc)}", name) for name, desc in describe_presets()],
        value=cfg.model,
        allow_custom_value=True,
        label=label("model"),
        info="tiny-random: an instant smoke test; smollm2-135m: a real model, on CPU, offline; the others download "
        "from the Hub (GPU recommended). Or type any Hub id such as org/name.",
    )
    dataset = gr.Radio(
        choices=[
            ("Alpaca (tatsu-lab/alpaca, from the Hub)", "alpaca"),
            ("Bundled (offline, in this repo)", "bundled"),
            ("Upload a file", "upload"),
        ],
        value=cfg.dataset,
        label=label("dataset"),
    )
    upload = gr.File(
        label=f"JSON / JSONL / CSV with instruction, input, output (up to {MAX_UPLOAD_BYTES // 2**20} MB)",
        type="filepath",
        file_types=[".json", ".jsonl", ".csv"],
        visible=cfg.dataset == "upload",
    )
    with gr.Row():
        start = gr.Number(value=cfg.start, precision=0, label=label("start"), minimum=0)
        rows = gr.Number(value=cfg.rows, precision=0, label=label("rows"), minimum=1)
    with gr.Accordion("Preview of the slice", open=False):
        preview_msg = gr.Markdown()
        preview_table = gr.Dataframe(
            headers=["row", "instruction", "input", "output"], interactive=False, wrap=True, max_height=320
        )
    arms = gr.CheckboxGroup(
        choices=list(ARM_SPECS),
        value=cfg.arms,
        label=label("arms"),
        info="lora+zclip and lora+mix take one of lora+crma's two changes each (the 2×2 grid separates CRMA from "
        "ZClip); lora+crma-nomix is lora+crma with the mixing fixed to the identity; lora-matched is LoRA with as "
        "many trainable parameters as lora+crma. How CRMA works, at the bottom of the page, says more.",
    )
    with gr.Row():
        presets = {
            "grid": gr.Button("2×2 grid", size="sm"),
            "controls": gr.Button("The controls", size="sm"),
            "recipe": gr.Button("Author's recipe: two changes at once", size="sm"),
        }
    with gr.Row():
        seeds = gr.Textbox(value=str(cfg.seed), label=label("seeds"), info="one, or several: 1,2,3")
        steps = gr.Number(value=cfg.steps, precision=0, label=label("steps"), minimum=1)
    with gr.Row():
        tune_lr = gr.Checkbox(
            value=len(cfg.lr_grid) > 1,
            label="Tune the LR per arm (×0.3, ×1, ×3; about 3× the time)",
            info="each arm is judged at its own best LR, chosen on a validation slice; without it every arm shares "
            "one LR, and CRMA's own parameters train 25× faster than LoRA's",
        )
        eval_rows = gr.Number(
            value=cfg.eval_rows,
            precision=0,
            label=label("eval_rows"),
            minimum=0,
            info="rows after the training slice, never trained on (0 = training loss only)",
        )
    with gr.Accordion("Hyperparameters", open=False):
        gr.Markdown("CRMA's settings are explained under [How CRMA works](#method) at the bottom of the page.")
        with gr.Row():
            lr = gr.Textbox(value=f"{cfg.lr:g}", label=f"{label('lr')} (LoRA, CRMA projections)")
            structural_lr = gr.Textbox(
                value=f"{cfg.structural_lr:g}",
                label=label("structural_lr"),
                info="CRMA's mixing logits and read/write weights",
            )
            gate_lr = gr.Textbox(value=f"{cfg.gate_lr:g}", label=label("gate_lr"), info="CRMA's output gate α")
        with gr.Row():
            batch_size = gr.Number(value=cfg.batch_size, precision=0, label=label("batch_size"), minimum=1)
            seq_len = gr.Number(value=cfg.seq_len, precision=0, label=label("seq_len"), minimum=8)
        with gr.Row():
            lora_r = gr.Number(value=cfg.lora_r, precision=0, label=label("lora_r"), minimum=1)
            lora_targets = gr.Textbox(value=",".join(cfg.lora_targets), label=label("lora_targets"))
        with gr.Row():
            crma_streams = gr.Number(
                value=cfg.crma.n_streams,
                precision=0,
                label=label("crma.n_streams"),
                minimum=2,
                info="n parallel streams, mixed by an n × n doubly stochastic matrix",
            )
            crma_rank = gr.Number(
                value=cfg.crma.rank,
                precision=0,
                label=label("crma.rank"),
                minimum=1,
                info="r: each block's update is projected to r dimensions",
            )
        spike_at = gr.Number(
            value=0,
            precision=0,
            label=f"{label('spike_at')} (0 = off)",
            minimum=0,
            info=f"every arm gets the same corrupted batch at this step (loss ×{cfg.spike_scale:g} for the backward "
            "pass): how does each arm's clipping contain the spike?",
        )
    return Form(
        model, dataset, upload, start, rows, preview_msg, preview_table, arms, presets, seeds, steps, tune_lr,
        eval_rows, lr, structural_lr, gate_lr, batch_size, seq_len, lora_r, lora_targets, crma_streams, crma_rank,
        spike_at, run_btn, stop_btn, cancel_btn,
    )  # fmt: skip


@dataclass
class Charts:
    """The live column: progress line, chart settings, one plot per chart of `CHARTS`, and the attribution."""

    progress: gr.HTML
    smoothing: gr.Slider
    log_scale: gr.Checkbox
    plots: dict[str, gr.Plot]
    attribution: gr.Markdown


def build_charts() -> Charts:
    """Progress, smoothing and log-scale controls, every chart (hidden while it has nothing to show), and under
    them the run's attribution (hidden until a run ends)."""
    progress = gr.HTML("Ready: press Run to train the arms side by side.", elem_id="run-progress")
    with gr.Row():
        smoothing = gr.Slider(
            0, 0.99, value=0.6, step=0.01, label="Smoothing (EMA weight; the raw line stays faint behind)"
        )
        log_scale = gr.Checkbox(value=False, label="Log-scale grad norm")
    # Each figure carries its own title: a label above it would only repeat it (and push the title down).
    plots = {
        chart.key: gr.Plot(label=chart.title, elem_id=f"plot-{chart.key}", show_label=False, visible=i < 3)
        for i, chart in enumerate(CHARTS)
    }
    with gr.Accordion("What the charts show", open=False):
        gr.Markdown(
            "◆ dotted lines: each arm's loss on the held-out rows (it never trains on them). **CRMA mixing**: "
            "**σ₂**, the mixing matrix's second singular value (1 = the streams do not mix, 0 = full averaging); "
            "**‖M − I‖_F**, how far the mixing moved from the identity (0 = no mixing); **Composite gain**, the "
            "largest row or column sum of the product of every block's mixing matrix (at most 1: the mixing cannot "
            "amplify over depth). **LR sensitivity** (a tuned run): each arm's final validation loss at each LR "
            "multiplier, the one it is judged at ringed. More under [How CRMA works](#method)."
        )
    attribution = gr.Markdown(visible=False, elem_id="attribution", elem_classes=["crma-tables"])
    return Charts(progress, smoothing, log_scale, plots, attribution)


def attribution_update(summary: dict) -> dict:
    """The attribution box under the charts for a run's summary: whether its figures are held-out and its LRs tuned,
    the effects and one sentence per contrast (or why nothing can be credited), and where the published study is."""
    text = attribution_markdown(summary, level=3)
    if text:
        text += "\nCompare with [what a well-powered run found](#study), below: the same effects over several seeds."
    return gr.update(value=text, visible=bool(text))


@dataclass
class TryPanel:
    """ "Try the adapters": a prompt (or a held-out row), the decoding, and every arm's answer beside the base's."""

    prompt: gr.Textbox
    row: gr.Dropdown
    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    seed: gr.Number
    answer_btn: gr.Button
    stop_btn: gr.Button
    answers: gr.HTML


def build_try_panel() -> TryPanel:
    """The panel under the results: ask every arm of the finished run, and the base model, the same question."""
    with gr.Accordion("Try the adapters: every arm answers, beside the base model", open=True, elem_id="try"):
        gr.Markdown(
            "Each arm's adapter as the run saved it, and the base model with every adapter off (CRMA included), "
            "answer with the training prompt template; greedy unless you set a temperature (then every arm samples "
            "from the same seed). One request at a time, in turn with training runs."
        )
        prompt = gr.Textbox(label="Prompt (an instruction)", lines=2, max_lines=8, elem_id="try-prompt")
        row = gr.Dropdown(label="…or a held-out row (its reference answer is shown)", choices=[], value=None)
        with gr.Row():
            max_new = gr.Slider(1, tryout.TRY_CAPS["max_new_tokens"], value=64, step=1, label="Max new tokens")
            temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1, value=1, step=0.05, label="Top-p (with a temperature)")
            seed = gr.Number(value=0, precision=0, minimum=0, label="Seed (the same for every arm)")
        with gr.Row():
            answer_btn = gr.Button("Answer", variant="primary", elem_id="try-answer")
            stop_btn = gr.Button("Stop answering", variant="stop", elem_id="try-stop")
        answers = gr.HTML(elem_id="try-answers")
    return TryPanel(prompt, row, max_new, temperature, top_p, seed, answer_btn, stop_btn, answers)


@dataclass
class Results:
    """What a finished (or stopped) run leaves: tables, receipt, trying the adapters, downloads, embed, push,
    reproduce."""

    panel: gr.Column
    tryout: TryPanel
    notes: gr.Markdown
    summary: gr.Markdown
    receipt: gr.Markdown
    archive: gr.File
    report: gr.File
    embed: gr.Code
    repo_name: gr.Textbox
    private: gr.Checkbox
    push_btn: gr.Button
    push_msg: gr.Markdown
    repro: gr.Code


def build_results() -> Results:
    """The results panel (hidden until a run ends) and the reproduce box."""
    with gr.Column(visible=False) as panel:
        gr.Markdown("## Results")
        notes = gr.Markdown()
        summary = gr.Markdown(elem_id="summary", elem_classes=["crma-tables"])
        with gr.Accordion("Fairness receipt: what is identical between the arms", open=True):
            receipt = gr.Markdown(elem_id="receipt", elem_classes=["crma-tables"])
        tryout_panel = build_try_panel()
        with gr.Row():
            archive = gr.File(label="Everything (.zip: adapters, metrics, summary, report, charts, config)")
            report = gr.File(label="report.html (self-contained, for blogs)")
        with gr.Accordion("Embed this Space", open=False):
            embed = gr.Code(language="html", label="Embed snippet")
        with gr.Accordion("Push to the Hugging Face Hub", open=False):
            if ON_SPACE:
                gr.Markdown("Uses your own account after you sign in; the token is never stored.")
                gr.LoginButton()
            else:
                gr.Markdown(
                    "Sign-in with Hugging Face works when this app runs as a Space. Running it yourself? Download "
                    "the archive and upload it with `hf upload`, or call "
                    "`crma.ablation.output.publish.push_results(folder, repo_id, token=...)`."
                )
            with gr.Row():
                repo_name = gr.Textbox(label="Repository", value="crma-ablation", info="name or namespace/name")
                private = gr.Checkbox(value=True, label="Private")
            push_btn = gr.Button("Push results")
            push_msg = gr.Markdown()
    with gr.Accordion("Reproduce: CLI and Python client", open=False):
        repro = gr.Code(language="shell", label="Same run elsewhere")
    return Results(
        panel, tryout_panel, notes, summary, receipt, archive, report, embed, repo_name, private, push_btn, push_msg,
        repro,
    )  # fmt: skip


@dataclass
class Study:
    """The "What a well-powered run found" panel: the committed study, shown without training."""

    panel: gr.Accordion
    text: gr.Markdown
    charts: gr.Gallery


def build_study(folder: str | os.PathLike[str] | None = None) -> Study:
    """The published study in `folder` (default `published.study_dir()`: `$CRMA_STUDY_DIR` or `assets/study/`), or
    a plain message that there is none yet."""
    study = published.load_published_study(folder)
    with gr.Accordion("What a well-powered run found", open=True, elem_id="study") as panel:
        text = gr.Markdown(study.markdown, elem_id="study-text", elem_classes=["crma-tables"])
        charts = gr.Gallery(
            value=study.charts or None,
            visible=bool(study.charts),
            label="The study's charts (click to enlarge)",
            columns=2,
            height="auto",
            object_fit="contain",
            elem_id="study-charts",
        )
    return Study(panel, text, charts)


# --------------------------------------------------------------------------------------------------------------------
# The page and its handlers


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
        for _ in _wait_for_slot():
            yield {charts.progress: WAITING_FOR_SLOT, f.cancel_btn: gr.update(visible=False)}
        folder = _start(cfg, _data_name(cfg, upload))
        view = LiveView(cfg, device=estimates.device_label(cfg), smoothing=smoothing, log_scale=log_scale)
        if ZERO_GPU:
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
        if run is None or (run.status == "failed" and not run.records):
            yield final
            raise gr.Error(((run.summary or {}).get("error") if run is not None else None) or GENERIC_ERROR)
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
        common = {self.run_state: run_id, self.results.repro: _reproduce(run.config, _page_url(request))}
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
        for _ in _wait_for_slot():
            yield "<p>Waiting for the run that trains now to end…</p>"
        try:
            columns: dict[str, dict] = {}
            reference = picked.get("reference") if picked else None
            events = ANSWERS_CALL(
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


@_guard
def preview(dataset: str, upload: str | None, start: float, rows: float) -> tuple[list[list[str]], str]:
    """The first rows of the selected slice, or the reason it cannot be used."""
    try:
        source = form.resolve_dataset(dataset, upload)
        table = form.preview_rows(source, start, rows)
    except ValueError as exc:
        return [], f"⚠️ {exc}"
    return table, f"The slice reads fine; its first {len(table)} rows:"


def _follow_events(folder: runs.RunFolder) -> Iterator[tuple[dict, str | None]]:
    """The API's stream of a run: one event per phase and record as the folder grows, then the result and the
    archive. The run does not depend on the stream: a client that goes away can `/follow` it again by its id."""
    for look in watch(folder.out_dir):
        for event in [look.phase] if look.phase is not None else []:
            yield snippets.event_json(event, run_id=folder.run_id), None
        for record in look.records:
            yield snippets.event_json(record, run_id=folder.run_id), None
    run = load_run(folder.out_dir)
    if run is None or (run.status == "failed" and not run.records):
        raise gr.Error(((run.summary or {}).get("error") if run is not None else None) or GENERIC_ERROR)
    yield snippets.result_json(run, run_id=folder.run_id), str(runs.make_archive(run.folder))


@_guard
def ablate(config: dict | str | None, data_file: str | None) -> Iterator[tuple[dict, str | None]]:
    """API: run one ablation from a JSON object of settings (the CLI's fields) and stream its events.

    Yields `(event, archive)`: first `{"type": "started", "run_id", "config", "gpu_seconds"}`, then one
    `{"type": "record" | "eval", ...}` per step record and held-out evaluation, last `{"type": "result", "status",
    "summary", "files", ...}` with the path of the zip archive. The run trains on if the client goes away: stop it
    with `/stop`, or pick the stream up again with `/follow`, by its `run_id`. `data_file` is an uploaded
    .json/.jsonl/.csv used when `dataset` is "upload" (or absent).
    """
    if isinstance(config, str):
        try:
            config = json.loads(config) if config.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"the config is not valid JSON: {exc}") from None
        except RecursionError:
            raise ValueError("the config is nested too deeply: send one JSON object of settings") from None
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValueError(f"the config must be a JSON object of settings; got {type(config).__name__}")
    if data_file and config.get("dataset", "upload") != "upload":
        raise ValueError(
            f"a data_file was sent but Data is {config['dataset']!r}: set `dataset` to 'upload' (or leave "
            "it out) to train on the file"
        )
    cfg = form.config_from_form(config, upload=data_file)
    data_name = _data_name(cfg, data_file)
    for _ in _wait_for_slot():
        yield {"type": "phase", "run_id": None, "message": WAITING_FOR_SLOT, "seed": None}, None
    folder = _start(cfg, data_name)
    shown = dataclasses.replace(cfg, dataset=data_name) if data_name else cfg  # the file's name, not its server path
    started = {"type": "started", "run_id": folder.run_id, "config": shown.to_dict()}
    yield {**started, "gpu_seconds": estimates.estimate_gpu_seconds(cfg)}, None
    yield from _follow_events(folder)


@_guard
def follow_run(run_id: str) -> Iterator[tuple[dict, str | None]]:
    """API: the events of run `run_id` (from `/ablate`'s first event) from its first record on, as `/ablate`
    streams them; a run that ended gives its records and its result at once."""
    folder = runs.get_run(run_id)
    if folder is None or load_run(folder.out_dir) is None:
        raise ValueError(f"no run with id {run_id!r} (runs are kept for 6 hours)")
    yield from _follow_events(folder)


@_guard
def generate(run_id: str, prompt: str, settings: dict | None = None) -> Iterator[dict]:
    """API: every arm of finished run `run_id`, and the base model, answer `prompt`; streams `{"arm", "text",
    "done", ...}` after each token (the last event of an arm has its `tokens`, `seconds` and `ended`). `settings`:
    `max_new_tokens`, `temperature`, `top_p`, `seed`, `arms` (a list of labels; default every arm), `input`."""
    settings = settings if isinstance(settings, dict) else {}
    folder = runs.get_run(run_id)
    run = load_run(folder.out_dir) if folder is not None else None
    if run is None or not run.complete:
        raise ValueError(f"no finished run with id {run_id!r} (runs are kept for 6 hours)")
    instruction = tryout.check_prompt(prompt)
    decoding = tryout.decoding(
        settings.get("max_new_tokens", 64), settings.get("temperature", 0), settings.get("top_p", 1),
        settings.get("seed", 0),
    )  # fmt: skip
    arms = settings.get("arms")
    for _ in _wait_for_slot():
        yield {"arm": None, "text": "", "done": False, "waiting": True}
    try:
        yield from ANSWERS_CALL(
            str(run.folder), instruction, str(settings.get("input", "")), decoding.to_json(), arms,
            str(tryout.stop_file_of(folder.root)),
        )  # fmt: skip
    finally:
        launcher.RUN_SLOT.release()


def stop(run_id: str) -> str:
    """API: stop the run `run_id` (from `/ablate`'s first event) at its next step; its partial results are kept."""
    if runs.request_stop(run_id):
        return f"stopping run {run_id} after the current step"
    return f"no running run with id {run_id!r} (it may have ended already)"


def push(run_id: str | None, repo_id: str, private: bool, oauth_token: gr.OAuthToken | None) -> str:
    """Push the session's results to a Hub model repo with the visitor's own token (never logged or stored)."""
    if oauth_token is None or not getattr(oauth_token, "token", None):
        where = "the button above" if ON_SPACE else "available when the app runs as a Hugging Face Space"
        raise gr.Error(f"Sign in with Hugging Face first ({where}): the push uses your own account.")
    folder = runs.get_run(run_id)
    if folder is None or not folder.finished():
        raise gr.Error("There are no finished results to push yet: run (or stop) an ablation first.")
    try:
        url = push_results(folder.out_dir, repo_id, token=oauth_token.token, private=bool(private))
    except PushError as exc:
        raise gr.Error(f"{exc} (your results are still available to download)") from None
    except Exception as exc:  # never log the traceback here: its frames hold the token
        logger.error("push failed unexpectedly: %s", type(exc).__name__)
        raise gr.Error(GENERIC_ERROR) from None
    return f"Pushed to [{url}]({url})."


# --------------------------------------------------------------------------------------------------------------------
# Layout and wiring

_PRIVATE = {"api_visibility": "private"}
_LIGHT = {"concurrency_id": "light", "concurrency_limit": 4}


def _wire(page: Page) -> None:
    f, c, r = page.form, page.charts, page.results
    # At once, before the queue: Run cannot be pressed twice, and a run that has to wait can leave the queue.
    f.run_btn.click(
        lambda: (gr.update(interactive=False), gr.update(visible=True)), None, [f.run_btn, f.cancel_btn],
        queue=False, **_PRIVATE,
    )  # fmt: skip
    run_event = f.run_btn.click(
        _guard(page.run),
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
        None, [f.run_btn, f.stop_btn, f.cancel_btn], queue=False, **_PRIVATE,
    )  # fmt: skip
    # A run still waiting in gradio's queue is removed from it. A started run hides this button first; were that one
    # cancelled anyway, only its page stops following: the run trains on, and a reload shows it.
    f.cancel_btn.click(
        lambda: (
            gr.update(interactive=True), gr.update(interactive=False), gr.update(visible=False),
            "Left the queue: nothing ran. Press Run to queue again.",
        ),
        None, [f.run_btn, f.stop_btn, f.cancel_btn, c.progress], cancels=[run_event], queue=False, **_PRIVATE,
    )  # fmt: skip
    f.stop_btn.click(page.stop_button, page.run_state, f.stop_btn, concurrency_id="control", **_PRIVATE)
    # In the browser, no round trip; a JS function's returned array is spread over the outputs, hence [[...]].
    for key, arms in {"grid": GRID_ARMS, "controls": STUDY_ARMS, "recipe": AUTHOR_ARMS}.items():
        f.presets[key].click(None, None, f.arms, js=f"() => [{json.dumps(list(arms))}]")
    page.demo.load(None, None, None, js=PAGE_JS)  # live clocks, and zoom / hidden traces kept through updates
    page.demo.load(_page_url, None, page.app_url, queue=False, **_PRIVATE)
    page.demo.load(
        _guard(page.reattach), [page.browser_run, c.smoothing, c.log_scale], page.run_outputs(),
        concurrency_id="reattach", concurrency_limit=None, **_PRIVATE,
    )  # fmt: skip
    f.dataset.change(lambda d: gr.update(visible=d == "upload"), f.dataset, f.upload, queue=False, **_PRIVATE)
    preview_io = ([f.dataset, f.upload, f.start, f.rows], [f.preview_table, f.preview_msg])
    gr.Button("preview", visible=False).click(preview, *preview_io, api_name="preview", **_LIGHT)
    for trigger in (f.dataset.change, f.upload.change, f.start.submit, f.rows.submit, f.start.blur, f.rows.blur):
        trigger(preview, *preview_io, trigger_mode="always_last", **_LIGHT, **_PRIVATE)
    page.demo.load(preview, *preview_io, **_LIGHT, **_PRIVATE)
    # Smoothing and log scale redraw from the run folder; no re-run.
    for trigger in (c.smoothing.release, c.log_scale.change):
        trigger(
            _guard(page.rerender), [page.run_state, c.smoothing, c.log_scale], list(c.plots.values()),
            trigger_mode="always_last", concurrency_id="light", **_PRIVATE,
        )  # fmt: skip
    t = r.tryout
    answering = t.answer_btn.click(
        _guard(page.try_adapters),
        [page.run_state, t.prompt, t.row, t.max_new_tokens, t.temperature, t.top_p, t.seed],
        t.answers,
        concurrency_id="gpu",
        concurrency_limit=1,
        **_PRIVATE,
    )
    t.stop_btn.click(page.stop_answers, page.run_state, None, cancels=[answering], queue=False, **_PRIVATE)
    r.push_btn.click(
        push, [page.run_state, r.repo_name, r.private], r.push_msg, api_name="push", concurrency_id="push",
        concurrency_limit=2,
    )  # fmt: skip
    # API-only endpoints (gradio_client).
    with gr.Group(visible=False):
        api_config, api_data = gr.JSON(label="config"), gr.File(label="data_file", type="filepath")
        api_event, api_archive = gr.JSON(label="event"), gr.File(label="archive")
        api_run_id, api_message = gr.Textbox(label="run_id"), gr.Textbox(label="message")
        api_run, api_follow, api_stop = gr.Button("ablate"), gr.Button("follow"), gr.Button("stop")
        api_prompt, api_settings, api_answer = gr.Textbox(label="prompt"), gr.JSON(label="settings"), gr.JSON()
        api_generate = gr.Button("generate")
    api_run.click(
        ablate, [api_config, api_data], [api_event, api_archive], api_name="ablate", concurrency_limit=1,
        concurrency_id="gpu",
    )  # fmt: skip
    api_follow.click(follow_run, api_run_id, [api_event, api_archive], api_name="follow", concurrency_limit=None)
    api_generate.click(
        generate, [api_run_id, api_prompt, api_settings], api_answer, api_name="generate", concurrency_id="gpu",
        concurrency_limit=1,
    )  # fmt: skip
    # Stop must never wait behind the run it stops: its own, unlimited concurrency group.
    api_stop.click(stop, api_run_id, api_message, api_name="stop", concurrency_id="control", concurrency_limit=None)


def _page_url(request: gr.Request | None) -> str | None:
    return snippets.app_url(dict(request.headers)) if request is not None else None


def _reproduce(cfg: AblationConfig, app_url: str | None) -> str:
    """The Reproduce box: the CLI line, and the client call against this Space or the address the visitor used."""
    client = snippets.client_snippet(cfg, os.environ.get("SPACE_ID"), url=app_url)
    return f"{snippets.cli_command(cfg)}\n\n# or from Python:\n{client}"


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
        _wire(page)
        if not has_gpu:  # the CPU estimate is measured: measure it again for each visitor, at the machine's load now
            demo.load(
                lambda: f"ℹ️ {estimates.default_note(cfg, has_gpu=False)}", None, default_note,
                show_progress="hidden", **_LIGHT, **_PRIVATE,
            )  # fmt: skip
    return page


def build_demo() -> gr.Blocks:
    """The page's `gr.Blocks` (what `demo.launch()` serves)."""
    return build_page().demo


demo = build_demo()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1, max_size=20).launch(**LAUNCH_OPTIONS)
