"""CRMA Lab: the Gradio Space. Only layout and handlers live here; the logic is in `crma.lab` and `crma.ablation`.

The page is built from small sections (`build_form`, `build_charts`, `build_results`) that return typed groups of
components; `Page` holds them and its methods are the handlers. Per-visitor state is the run id in a `gr.State`.

Endpoints (gradio_client): `/ablate` streams a run from one JSON object of settings, `/stop` ends a run (by its run
id) at the next step, `/push` uploads the session's results with the visitor's own Hub sign-in, `/preview` shows a
data slice.
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
from crma.ablation.engine.records import RunResult
from crma.ablation.models import describe_presets
from crma.ablation.output.publish import PushError, push_results
from crma.ablation.report.render import attribution_markdown, receipt_markdown
from crma.ablation.spec.arms import ARM_SPECS, AUTHOR_ARMS, GRID_ARMS
from crma.ablation.spec.config import AblationConfig
from crma.ablation.spec.schema import label
from crma.lab import estimates, form, published, runs, snippets, worker
from crma.lab.live import LiveView, ViewRegistry
from crma.lab.pump import PumpRegistry, RunPump

logger = logging.getLogger("crma.app")

GENERIC_ERROR = "Something went wrong on our side (the details are in the server log). Your results so far are kept."
ZERO_GPU = estimates.on_zero_gpu()
# Hub sign-in is real only on a Space; elsewhere gradio would mock it with the host's own token, which is not a
# visitor's sign-in (and needs the Hub), so off a Space the page says how to push instead.
ON_SPACE = os.environ.get("SYSTEM") == "spaces"
# Gradio 6.31 ships a truncated SourceSansPro-SemiBold.woff2 (5 KB): weight-600 text such as the title falls back
# glyph by glyph ("CRMᴀ Lab"). Serve the Bold face for weight 600 instead.
CSS = (
    '@font-face { font-family: "Source Sans Pro"; font-weight: 600; font-style: normal; '
    'src: url("static/fonts/SourceSansPro/SourceSansPro-Bold.woff2") format("woff2"); }\n'
    # Result tables: on a narrow screen a table scrolls sideways inside its box; a header or a number never breaks
    # mid-word (Gradio's prose style lets table cells break anywhere, one letter per line on a phone).
    ".crma-tables table { display: block; width: max-content; max-width: 100%; overflow-x: auto; }\n"
    ".crma-tables th, .crma-tables td { white-space: nowrap; word-break: normal; overflow-wrap: normal; }\n"
    # The receipt's config diff holds long JSON: those cells wrap at spaces, at a readable width.
    "#receipt td { white-space: normal; min-width: 12em; }\n"
    "#receipt td:first-child { min-width: 0; white-space: nowrap; }\n"
)
# Runs once per page load, in the browser.
# 1. The progress line's clocks (`<span class="crma-tick">`, see LiveView.progress_html) advance every second, so
#    the elapsed time keeps moving through a long set-up or step, between two server updates.
# 2. Zoom, pan and legend clicks survive live updates. Gradio 6.31's Plot re-creates the chart element whenever its
#    figure changes (a `{#key}` block in Plot.svelte around PlotlyPlot), so Plotly's `uirevision` memory, which lives
#    on the element, is lost each time. The visitor's axis ranges and hidden traces are recorded per chart from
#    Plotly's own `plotly_relayout` / `plotly_restyle` events and applied to the next figure inside `Plotly.react`,
#    as long as its `uirevision` is the same (one run); a new run, or an axis changing type (log scale), starts
#    afresh, as in Plotly. Gradio's Plotly chunk sets `window.Plotly` when it loads: the wrapper goes on then.
PAGE_JS = """() => {
  if (window.__crmaPage) return;
  window.__crmaPage = true;
  const clock = (s) => {
    s = Math.max(0, Math.round(s));
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), two = (x) => String(x).padStart(2, "0");
    return h ? `${h}:${two(m)}:${two(s % 60)}` : `${m}:${two(s % 60)}`;
  };
  setInterval(() => {
    for (const el of document.querySelectorAll(".crma-tick")) {
      if (!el.dataset.seen) el.dataset.seen = String(performance.now());
      const dt = (performance.now() - Number(el.dataset.seen)) / 1000;
      el.textContent = clock(Number(el.dataset.s) + (el.dataset.dir === "down" ? -dt : dt));
    }
  }, 1000);
  const views = {};
  const keyOf = (gd) => gd && gd.closest && gd.closest(".block[id]")?.id;
  const record = (gd) => {
    const key = keyOf(gd), full = gd._fullLayout;
    if (!key || !gd.layout || !full) return;
    const axes = {}, hidden = {};
    for (const name of Object.keys(gd.layout)) {
      const ax = gd.layout[name];
      if (/^[xy]axis[0-9]*$/.test(name) && ax && ax.autorange === false && Array.isArray(ax.range))
        axes[name] = { range: ax.range.slice(), type: full[name] && full[name].type };
    }
    for (const t of gd.data || [])
      if (t.name && t.visible !== undefined && t.visible !== true) hidden[t.name] = t.visible;
    views[key] = { rev: gd.layout.uirevision, axes, hidden };
  };
  const wrap = (P) => {
    if (!P || P.__crmaKeepsView) return;
    P.__crmaKeepsView = true;
    const react = P.react;
    P.react = function (gd, data, layout, config) {
      const key = keyOf(gd), view = key && views[key];
      if (view && layout && Array.isArray(data) && view.rev === layout.uirevision) {
        for (const [name, ax] of Object.entries(view.axes)) {
          const type = (layout[name] && layout[name].type) || "linear";
          if (type === ax.type || (ax.type === "linear" && type === "-"))
            layout[name] = Object.assign({}, layout[name], { range: ax.range.slice(), autorange: false });
        }
        for (const t of data) if (t.name in view.hidden) t.visible = view.hidden[t.name];
      }
      const drawn = react.apply(this, arguments);
      if (key && !gd.__crmaWatched) {
        gd.__crmaWatched = true;
        Promise.resolve(drawn).then(() => {
          gd.on("plotly_relayout", () => record(gd));
          gd.on("plotly_restyle", () => record(gd));
        });
      }
      return drawn;
    };
  };
  if (window.Plotly) wrap(window.Plotly);
  else {
    let plotly;
    Object.defineProperty(window, "Plotly", {
      configurable: true, enumerable: true, get: () => plotly, set: (v) => { plotly = v; wrap(v); },
    });
  }
}"""
METHOD = """## How CRMA works

CRMA (Constrained Residual Mixing Adapter) is a low-rank side channel that trains beside LoRA. At every decoder block
l, with h the block's input and y its output:

    u  = rmsnorm(y − h) @ A        A: d × r  (r = CRMA rank)
    M  = sinkhorn(log_mix)         n × n, doubly stochastic (n = CRMA streams)
    S' = M · (S + post ⊗ u)        write into the n streams, then mix; S flows from block to block
    y' = y + α · (ρᵀ S') @ B       B = 0 at the start, so the model is unchanged at step 0

- **CRMA streams** (n) and **CRMA rank** (r) size the side channel: L · (2·d·r + n² + 2n + 1) parameters.
- **Structural LR** trains the mixing logits `log_mix` and the read and write weights ρ and post; **gate LR** trains
  the gate α = exp(log_alpha). Neither has weight decay (it would pull M toward full averaging). LoRA and CRMA's A
  and B use **LR**.
- Every doubly stochastic M has spectral norm ‖M‖₂ = 1, the identity and full averaging alike, so that figure only
  says Sinkhorn converged. What says how much the streams mix: **σ₂**, M's second singular value (1 = no mixing,
  0 = full averaging); **‖M − I‖_F**, the distance from the identity (0 = no mixing); and the **composite gain**, the
  largest row or column sum of the product of every block's M (at most 1 up to Sinkhorn's error: the mixing cannot
  amplify over depth; the bound does not cover B or α).
- The author's recipe adds **ZClip** (adaptive gradient clipping: a step whose gradient norm is a z-score outlier is
  scaled down; the first 25 steps only collect statistics). lora+zclip and lora+mix take one change each, so the
  2×2 grid can tell which of the two does what.
- **Spike stress at step k** gives every arm the same corrupted batch at step k (its loss ×20 for the backward pass):
  a controlled gradient spike, to see how each arm's clipping contains it.

What is here is a reconstruction from the author's published description and the papers it cites (mHC, PiSSA,
ZClip), not the author's code.
"""
# Gradio refuses a bigger upload before it reaches the app (the data reader streams, but a file must land first).
LAUNCH_OPTIONS: dict[str, Any] = {"css": CSS, "max_file_size": MAX_UPLOAD_BYTES}
VIEWS = ViewRegistry()  # live views by unguessable run id: each visitor only ever holds their own ids
PUMPS = PumpRegistry()  # the runs' event pumps, by run id: a reloaded page follows its run through them
# One run trains at a time. Gradio's queue serialises the handlers; this also covers a run whose page went away
# (its handler is gone, its pump reads on until the run ends, at its time cap at the latest).
RUN_SLOT = threading.BoundedSemaphore(1)
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


def _gpu_duration(cfg: AblationConfig, out_dir: str, stop_file: str, data_name: str | None = None) -> int:
    return estimates.estimate_gpu_seconds(cfg)


def _run_cut_off(cfg: AblationConfig, out_dir: str, stop_file: str, data_name: str | None = None) -> Iterator:
    return worker.run_cut_off(cfg, out_dir, stop_file, data_name=data_name)


# Where a run trains. On ZeroGPU, in the worker `spaces.GPU` forks for the estimated duration and kills when it runs
# over; elsewhere, in a child process the app kills once a phase outlives the wall cap or a stop (`crma.lab.worker`):
# either way no input can hold the run slot past its cap.
def choose_run_engine(zero_gpu: bool) -> Callable[..., Iterator]:
    """`(cfg, out_dir, stop_file, data_name) -> events` of a run: the ZeroGPU worker, or the cut-off child."""
    if zero_gpu and spaces is not None:
        return spaces.GPU(duration=_gpu_duration)(runs.run_events)
    return _run_cut_off


run_engine = choose_run_engine(ZERO_GPU)


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


def _start(cfg: AblationConfig, data_name: str | None) -> tuple[runs.RunFolder, RunPump]:
    """Check the run, then give it a private folder and start its pump (inside the GPU lease on ZeroGPU).

    The caller holds `RUN_SLOT`; the pump gives it back when the run ends, or this function when a check fails.
    """
    try:
        form.check_data(cfg, data_name)  # a bad file or slice fails here, before a GPU is requested
        # An unknown or gated id too; on ZeroGPU this process has no GPU before the lease, so no device checks here.
        model_config = form.check_model(cfg, device_checks=not ZERO_GPU)
        form.check_memory(cfg, model_config=model_config, zero_gpu=ZERO_GPU)  # one step must fit, before loading
        folder = runs.new_run()
        if ZERO_GPU:
            cfg = estimates.fit_wall_cap(cfg, estimates.estimate_gpu_seconds(cfg))
        events = run_engine(cfg, str(folder.out_dir), str(folder.stop_file), data_name)
    except BaseException:
        RUN_SLOT.release()
        raise
    pump = RunPump(events, slot=RUN_SLOT).start()
    PUMPS.add(folder.run_id, pump)
    return folder, pump


# --------------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class Form:
    """The settings column: model, data, slice, arms, seeds, steps, hyperparameters, Run and Stop."""

    model: gr.Dropdown
    dataset: gr.Radio
    upload: gr.File
    start: gr.Number
    rows: gr.Number
    preview_msg: gr.Markdown
    preview_table: gr.Dataframe
    arms: gr.CheckboxGroup
    grid_btn: gr.Button
    seeds: gr.Textbox
    steps: gr.Number
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
    recipe_btn: gr.Button
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
        info="lora+zclip and lora+mix take one of lora+crma's two changes each, so the 2×2 grid separates CRMA's "
        "mixing from its ZClip; lora-matched is LoRA with as many trainable parameters as lora+crma (capacity "
        "control).",
    )
    with gr.Row():
        grid_btn = gr.Button("2×2 attribution grid", size="sm")
        recipe_btn = gr.Button("Author's recipe: two changes at once", size="sm")
    with gr.Row():
        seeds = gr.Textbox(value=str(cfg.seed), label=label("seeds"), info="one, or several: 1,2,3")
        steps = gr.Number(value=cfg.steps, precision=0, label=label("steps"), minimum=1)
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
            info="every arm gets the same corrupted batch at this step (loss ×20 for the backward pass): how does "
            "each arm's clipping contain the spike?",
        )
    return Form(
        model, dataset, upload, start, rows, preview_msg, preview_table, arms, grid_btn, seeds, steps, lr,
        structural_lr, gate_lr, batch_size, seq_len, lora_r, lora_targets, crma_streams, crma_rank, spike_at,
        run_btn, stop_btn, recipe_btn, cancel_btn,
    )  # fmt: skip


@dataclass
class Charts:
    """The live column: progress line, chart settings and the three charts."""

    progress: gr.HTML
    smoothing: gr.Slider
    log_scale: gr.Checkbox
    loss: gr.Plot
    grad: gr.Plot
    delta: gr.Plot
    attribution: gr.Markdown


def build_charts() -> Charts:
    """Progress, smoothing and log-scale controls, the loss, gradient-norm and loss-difference charts, and under them
    the run's attribution (hidden until a run ends)."""
    progress = gr.HTML("Ready: press Run to train the arms side by side.", elem_id="run-progress")
    with gr.Row():
        smoothing = gr.Slider(
            0, 0.99, value=0.6, step=0.01, label="Smoothing (EMA weight; the raw line stays faint behind)"
        )
        log_scale = gr.Checkbox(value=False, label="Log-scale grad norm")
    # Each figure carries its own title: a label above it would only repeat it (and push the title down).
    loss = gr.Plot(label="Loss", elem_id="loss-plot", show_label=False)
    grad = gr.Plot(label="Gradient norm", elem_id="grad-plot", show_label=False)
    delta = gr.Plot(label="Loss difference", elem_id="delta-plot", show_label=False)
    attribution = gr.Markdown(visible=False, elem_id="attribution", elem_classes=["crma-tables"])
    return Charts(progress, smoothing, log_scale, loss, grad, delta, attribution)


def attribution_update(summary: dict) -> dict:
    """The attribution box under the charts for a run's summary: the effects table and one sentence per metric (or
    why nothing can be credited), and where the published study is."""
    text = attribution_markdown(summary, level=3)
    if text:
        text += "\nCompare with [what a well-powered run found](#study), below: the same effects over several seeds."
    return gr.update(value=text, visible=bool(text))


@dataclass
class Results:
    """What a finished (or stopped) run leaves: tables, receipt, mixing chart, downloads, embed, push, reproduce."""

    panel: gr.Column
    notes: gr.Markdown
    summary: gr.Markdown
    receipt: gr.Markdown
    mixing: gr.Plot
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
        with gr.Accordion("CRMA mixing diagnostics", open=True):
            gr.Markdown(
                "**σ₂**: the mixing matrix's second singular value (1 = the streams do not mix, 0 = full averaging). "
                "**‖M − I‖_F**: how far the mixing moved from the identity (0 = no mixing). **Composite gain**: the "
                "largest row or column sum of the product of every block's mixing matrix; at most 1, so the mixing "
                "cannot amplify over depth. More under [How CRMA works](#method)."
            )
            mixing = gr.Plot(elem_id="mixing-plot", show_label=False)
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
        panel, notes, summary, receipt, mixing, archive, report, embed, repo_name, private, push_btn, push_msg, repro
    )


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
        r, c = self.results, self.charts
        outputs = [
            self.run_state, c.progress, r.panel, self.form.run_btn, self.form.stop_btn, r.repro, c.loss, c.grad,
            c.delta, r.summary, r.receipt, r.mixing, r.notes, r.archive, r.report, r.embed, c.attribution,
            self.form.cancel_btn,
        ]  # fmt: skip
        return outputs + ([self.browser_run] if self.browser_run is not None else [])

    def run(
        self, upload: str | None, smoothing: float, log_scale: bool, app_url: str | None, *values: Any
    ) -> Iterator[dict]:
        """Run the ablation from the form and stream charts and progress; the last update shows the results."""
        cfg = form.config_from_form(dict(zip(FORM_KEYS, values, strict=True)), upload=upload)
        charts, results = self.charts, self.results
        # A run whose page went away may still hold the slot. Wait in short steps with a yield between them: were
        # this page to go away too, gradio stops resuming the generator, and no run starts for nobody.
        while not RUN_SLOT.acquire(timeout=1.0):
            yield {charts.progress: WAITING_FOR_SLOT, self.form.cancel_btn: gr.update(visible=False)}
        folder, pump = _start(cfg, _data_name(cfg, upload))
        view = LiveView(cfg, device=estimates.device_label(cfg), smoothing=smoothing, log_scale=log_scale)
        VIEWS.add(folder.run_id, view)
        if ZERO_GPU:
            gr.Info(f"This run asks ZeroGPU for {estimates.estimate_gpu_seconds(cfg)} s of GPU time.")
        started = {
            self.run_state: folder.run_id,
            charts.progress: view.progress_html(),
            results.panel: gr.update(visible=False),
            charts.attribution: gr.update(visible=False),
            self.form.run_btn: gr.update(interactive=False),
            self.form.stop_btn: gr.update(interactive=True),
            self.form.cancel_btn: gr.update(visible=False),
            results.repro: _reproduce(cfg, app_url),
        }
        yield {**started, self.browser_run: folder.run_id} if self.browser_run is not None else started
        yield from self._follow(pump, folder, view)

    def _follow(self, pump: RunPump, folder: runs.RunFolder, view: LiveView) -> Iterator[dict]:
        """Stream a run's progress and charts from its pump into `view`; the last update shows the results. The run
        does not depend on this generator: were the page to go away, the pump reads on."""
        charts, result, warned = self.charts, None, len(view.diverged)
        for batch in pump.follow():
            redraw = not batch  # a tick without news: the clock moves on
            for event in batch:
                if isinstance(event, RunResult):
                    result = event
                redraw = view.update(event) or redraw
            if len(view.diverged) > warned:
                gr.Warning(f"{'; '.join(view.diverged[warned:])}. The other arms continue.")
                warned = len(view.diverged)
            if redraw and result is None:
                yield {charts.progress: view.progress_html(), **self._charts(view)}
        if result is None:  # pragma: no cover - the engine always ends with a RunResult
            raise gr.Error(GENERIC_ERROR)
        final = {
            self.run_state: folder.run_id,
            charts.progress: view.progress_html(),
            **self._charts(view),
            self.form.stop_btn: gr.update(interactive=False),
            self.form.run_btn: gr.update(interactive=True),
        }
        if result.status == "failed" and not result.records:
            yield final
            raise gr.Error(result.error or GENERIC_ERROR)
        if result.status == "failed":
            gr.Warning(f"The run failed: {result.error}. The partial results are below.")
        yield {**final, **self._results(result, folder, view)}

    def _charts(self, view: LiveView) -> dict:
        loss, grad, delta = view.figures()
        return {self.charts.loss: loss, self.charts.grad: grad, self.charts.delta: delta}

    def _results(self, result: RunResult, folder: runs.RunFolder, view: LiveView) -> dict:
        out, r = folder.out_dir, self.results
        summary_file, report = out / "summary.md", out / "report.html"
        notes = [f"Status: **{result.status}**" + (f" ({result.error})" if result.error else "")]
        notes += [f"- {note}" for note in result.notes]
        return {
            r.panel: gr.update(visible=True),
            r.summary: summary_file.read_text() if summary_file.is_file() else "No summary was written.",
            r.receipt: receipt_markdown(result.summary),
            r.mixing: view.mixing_figure(),
            r.notes: "\n".join(notes),
            r.archive: str(runs.make_archive(out)) if out.is_dir() else None,
            r.report: str(report) if report.is_file() else None,
            r.embed: snippets.embed_snippet(os.environ.get("SPACE_ID")),
            self.charts.attribution: attribution_update(result.summary),
        }

    def reattach(
        self, run_id: str | None, smoothing: float, log_scale: bool, request: gr.Request | None = None
    ) -> Iterator[dict]:
        """On page load: follow the visitor's run from before a reload while it runs, then show its results (or
        those of a run that ended while the page was away); nothing when the browser holds no live run id."""
        app_url = _page_url(request)
        folder = runs.get_run(run_id)
        if folder is None:
            yield {self.run_state: None}  # a generator that ends without yielding would blank every output
            return
        pump, live = PUMPS.get(run_id), VIEWS.get(run_id)
        if pump is not None and live is not None and not pump.done:
            # The clocks count from the run's start, not from the reload.
            view = LiveView(
                live.cfg, device=live.device, smoothing=smoothing, log_scale=log_scale, started=live.started
            )
            VIEWS.add(run_id, view)  # smoothing and log scale of this page redraw this page's view
            yield {
                self.run_state: run_id,
                self.form.run_btn: gr.update(interactive=False),
                self.form.stop_btn: gr.update(interactive=True),
                self.results.panel: gr.update(visible=False),
                self.results.repro: _reproduce(live.cfg, app_url),
                self.charts.progress: view.progress_html(),
            }
            yield from self._follow(pump, folder, view)
            return
        result = runs.load_result(folder) or (pump.result if pump is not None else None)
        view = VIEWS.view_for(run_id)
        if result is None or view is None:
            yield {self.run_state: None}
            return
        if view.result is None:  # a live view whose page went away before the run ended
            view.update(result)
        yield {
            self.run_state: run_id,
            self.charts.progress: view.progress_html(),
            **dict(zip((self.charts.loss, self.charts.grad, self.charts.delta),
                       view.figures(smoothing=smoothing, log_scale=log_scale), strict=True)),
            self.form.run_btn: gr.update(interactive=True),
            self.form.stop_btn: gr.update(interactive=False),
            self.results.repro: _reproduce(result.config, app_url),
            **self._results(result, folder, view),
        }  # fmt: skip

    @staticmethod
    def stop_button(run_id: str | None) -> Any:
        """The Stop button: the visitor's own run (the id lives in their session state)."""
        if runs.request_stop(run_id):
            gr.Info("Stopping after the current step; the results so far will be kept.", duration=3)
        return gr.update(interactive=False)

    @staticmethod
    def rerender(run_id: str | None, smoothing: float, log_scale: bool) -> tuple:
        """Redraw the charts of the visitor's run with new settings, without re-running (also while it runs)."""
        view = VIEWS.view_for(run_id)
        if view is None:
            return gr.skip(), gr.skip(), gr.skip()
        return view.figures(smoothing=smoothing, log_scale=log_scale)


@_guard
def preview(dataset: str, upload: str | None, start: float, rows: float) -> tuple[list[list[str]], str]:
    """The first rows of the selected slice, or the reason it cannot be used."""
    try:
        source = form.resolve_dataset(dataset, upload)
        table = form.preview_rows(source, start, rows)
    except ValueError as exc:
        return [], f"⚠️ {exc}"
    return table, f"The slice reads fine; its first {len(table)} rows:"


@_guard
def ablate(config: dict | str | None, data_file: str | None) -> Iterator[tuple[dict, str | None]]:
    """API: run one ablation from a JSON object of settings (the CLI's fields) and stream events.

    Yields `(event, archive)`: first `{"type": "started", "run_id", "config", "gpu_seconds"}`, then one
    `{"type": "phase" | "record", ...}` per engine event, last `{"type": "result", "status", "summary", "files",
    ...}` with the path of the zip archive. Stop a run with `/stop` and its `run_id`. `data_file` is an uploaded
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
    while not RUN_SLOT.acquire(timeout=1.0):  # as in `Page.run`: a client that went away starts nothing
        yield {"type": "phase", "run_id": None, "message": WAITING_FOR_SLOT, "seed": None}, None
    folder, pump = _start(cfg, data_name)
    shown = dataclasses.replace(cfg, dataset=data_name) if data_name else cfg  # the file's name, not its server path
    yield (
        {
            "type": "started",
            "run_id": folder.run_id,
            "config": shown.to_dict(),
            "gpu_seconds": estimates.estimate_gpu_seconds(cfg),
        },
        None,
    )
    try:
        for batch in pump.follow():
            for event in batch:
                if not isinstance(event, RunResult):
                    yield snippets.event_json(event, run_id=folder.run_id), None
    finally:
        if not pump.done:  # this stream was closed early (cancelled, or collected): end the run at its next step
            runs.request_stop(folder.run_id)
    result = pump.result
    if result is None:  # pragma: no cover - the engine always ends with a RunResult
        raise gr.Error(GENERIC_ERROR)
    if result.status == "failed" and not result.records:
        raise gr.Error(result.error or GENERIC_ERROR)
    archive = runs.make_archive(folder.out_dir) if folder.out_dir.is_dir() else None
    yield snippets.event_json(result, run_id=folder.run_id), str(archive) if archive else None


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


def _wire(page: Page) -> None:
    f, c, r = page.form, page.charts, page.results
    # At once, before the queue: Run cannot be pressed twice, and a run that has to wait can leave the queue.
    f.run_btn.click(
        lambda: (gr.update(interactive=False), gr.update(visible=True)),
        None,
        [f.run_btn, f.cancel_btn],
        queue=False,
        api_visibility="private",
    )
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
        None,
        [f.run_btn, f.stop_btn, f.cancel_btn],
        queue=False,
        api_visibility="private",
    )
    # A run still waiting in gradio's queue is removed from it. A started run hides this button first; were that one
    # cancelled anyway, only its page stops following: the pump trains on, and a reload shows the run.
    f.cancel_btn.click(
        lambda: (
            gr.update(interactive=True), gr.update(interactive=False), gr.update(visible=False),
            "Left the queue: nothing ran. Press Run to queue again.",
        ),
        None,
        [f.run_btn, f.stop_btn, f.cancel_btn, c.progress],
        cancels=[run_event],
        queue=False,
        api_visibility="private",
    )  # fmt: skip
    f.stop_btn.click(
        page.stop_button,
        page.run_state,
        f.stop_btn,
        concurrency_id="control",
        concurrency_limit=None,
        api_visibility="private",
    )
    # In the browser, no round trip; a JS function's returned array is spread over the outputs, hence [[...]].
    f.grid_btn.click(None, None, f.arms, js=f"() => [{json.dumps(list(GRID_ARMS))}]")
    f.recipe_btn.click(None, None, f.arms, js=f"() => [{json.dumps(list(AUTHOR_ARMS))}]")
    page.demo.load(None, None, None, js=PAGE_JS)  # live clocks, and zoom / hidden traces kept through updates
    page.demo.load(_page_url, None, page.app_url, queue=False, api_visibility="private")
    page.demo.load(
        _guard(page.reattach),
        [page.browser_run, c.smoothing, c.log_scale],
        page.run_outputs(),
        api_visibility="private",
        concurrency_id="reattach",
        concurrency_limit=None,
    )
    f.dataset.change(
        lambda d: gr.update(visible=d == "upload"), f.dataset, f.upload, queue=False, api_visibility="private"
    )
    preview_io = ([f.dataset, f.upload, f.start, f.rows], [f.preview_table, f.preview_msg])
    api_preview = gr.Button("preview", visible=False)
    api_preview.click(preview, *preview_io, api_name="preview", concurrency_id="light", concurrency_limit=4)
    for trigger in (f.dataset.change, f.upload.change, f.start.submit, f.rows.submit, f.start.blur, f.rows.blur):
        trigger(
            preview,
            *preview_io,
            api_visibility="private",
            concurrency_id="light",
            concurrency_limit=4,
            trigger_mode="always_last",
        )
    page.demo.load(preview, *preview_io, api_visibility="private", concurrency_id="light", concurrency_limit=4)
    # Smoothing and log scale redraw from the stored records; no re-run.
    for trigger in (c.smoothing.release, c.log_scale.change):
        trigger(
            _guard(page.rerender),
            [page.run_state, c.smoothing, c.log_scale],
            [c.loss, c.grad, c.delta],
            api_visibility="private",
            concurrency_id="light",
            trigger_mode="always_last",
        )
    r.push_btn.click(
        push, [page.run_state, r.repo_name, r.private], r.push_msg, api_name="push", concurrency_id="push",
        concurrency_limit=2,
    )  # fmt: skip
    # API-only endpoints (gradio_client).
    with gr.Group(visible=False):
        api_config = gr.JSON(label="config")
        api_data = gr.File(label="data_file", type="filepath")
        api_event = gr.JSON(label="event")
        api_archive = gr.File(label="archive")
        api_run = gr.Button("ablate")
        api_stop_id = gr.Textbox(label="run_id")
        api_stop_msg = gr.Textbox(label="message")
        api_stop = gr.Button("stop")
    api_run.click(
        ablate, [api_config, api_data], [api_event, api_archive], api_name="ablate", concurrency_limit=1,
        concurrency_id="gpu",
    )  # fmt: skip
    # Stop must never wait behind the run it stops: its own, unlimited concurrency group.
    api_stop.click(stop, api_stop_id, api_stop_msg, api_name="stop", concurrency_id="control", concurrency_limit=None)


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
            "side: same seed, same batches, same LoRA init, one chart. Stop any time; the results so far are kept."
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
                lambda: f"ℹ️ {estimates.default_note(cfg, has_gpu=False)}",
                None,
                default_note,
                api_visibility="private",
                show_progress="hidden",
                concurrency_id="light",
                concurrency_limit=4,
            )
    return page


def build_demo() -> gr.Blocks:
    """The page's `gr.Blocks` (what `demo.launch()` serves)."""
    return build_page().demo


demo = build_demo()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1, max_size=20).launch(**LAUNCH_OPTIONS)
