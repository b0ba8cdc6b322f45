"""CRMA Lab: the Gradio Space. Only UI lives here; the logic is in `crma.ablation.service` and the engine.

Endpoints (gradio_client): `/ablate` streams a run from one JSON object of `AblationConfig` fields, `/stop` ends a
run (by its run id) at the next step, `/push` uploads the session's results with the visitor's own Hub sign-in,
`/preview` shows a data slice.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # ZeroGPU: must be imported before anything initialises CUDA; a no-op wrapper everywhere else
    import spaces
except ImportError:  # pragma: no cover - spaces is in requirements.txt
    spaces = None

import gradio as gr

from crma.ablation import service
from crma.ablation.config import ARM_SPECS, AblationConfig, RunResult
from crma.ablation.models import describe_presets
from crma.hub import PushError, push_results

logger = logging.getLogger("crma.app")

# Form fields, in the order the run handler receives them after (upload, smoothing, log_scale).
FORM_FIELDS = (
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
    "crma_streams",
    "crma_rank",
    "spike_at",
)
GENERIC_ERROR = "Something went wrong on our side (the details are in the server log). Your results so far are kept."
ZERO_GPU = service.on_zero_gpu()
# Hub sign-in is real only on a Space; elsewhere gradio would mock it with the host's own token, which is not a
# visitor's sign-in (and needs the Hub), so off a Space the page says how to push instead.
ON_SPACE = os.environ.get("SYSTEM") == "spaces"
# Gradio 6.31 ships a truncated SourceSansPro-SemiBold.woff2 (5 KB): weight-600 text such as the title falls back
# glyph by glyph ("CRMᴀ Lab"). Serve the Bold face for weight 600 instead.
CSS = (
    '@font-face { font-family: "Source Sans Pro"; font-weight: 600; font-style: normal; '
    'src: url("static/fonts/SourceSansPro/SourceSansPro-Bold.woff2") format("woff2"); }'
)
VIEWS = service.ViewRegistry()  # live views by unguessable run id: each visitor only ever holds their own ids


def _gpu_duration(cfg: AblationConfig, out_dir: str, stop_file: str) -> int:
    return service.estimate_gpu_seconds(cfg)


# The only function that needs the GPU; on ZeroGPU it runs in a worker for the estimated duration.
train_on_gpu = spaces.GPU(duration=_gpu_duration)(service.train_events) if spaces is not None else service.train_events


def _guard(fn):
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


def _start(cfg: AblationConfig) -> tuple[service.RunSpace, object]:
    """A private run folder and the engine's event stream (inside the GPU lease on ZeroGPU)."""
    service.check_data(cfg)  # a bad file or slice fails here, before a GPU is requested
    # An unknown or gated id too; on ZeroGPU this process has no GPU before the lease, so no device checks here.
    service.check_model(cfg, device_checks=not ZERO_GPU)
    space = service.new_run()
    if ZERO_GPU:
        cfg = service.fit_wall_cap(cfg, service.estimate_gpu_seconds(cfg))
    return space, train_on_gpu(cfg, str(space.out_dir), str(space.stop_file))


def _close(events, space: service.RunSpace, ended: bool) -> None:
    if not ended:  # the visitor left or the handler was cancelled: stop the engine and let it clean up
        service.StopSignal(space.stop_file).set()
    close = getattr(events, "close", None)
    if close is not None:
        close()


# --------------------------------------------------------------------------------------------------------------------
# Handlers


@_guard
def preview(dataset: str, upload: str | None, start: float, rows: float) -> tuple[list[list[str]], str]:
    """The first rows of the selected slice, or the reason it cannot be used."""
    try:
        source = service.resolve_dataset(dataset, upload)
        table = service.preview_rows(source, start, rows)
    except ValueError as exc:
        return [], f"⚠️ {exc}"
    return table, f"The slice reads fine; its first {len(table)} rows:"


# Outputs of the run handler, in order; a handler names the ones it changes and the rest are left as they are.
RUN_OUTPUTS = (
    "run_state",
    "progress",
    "results",
    "run_btn",
    "stop_btn",
    "repro",
    "loss_plot",
    "grad_plot",
    "delta_plot",
    "summary_md",
    "receipt_md",
    "mixing_plot",
    "notes_md",
    "archive_file",
    "report_file",
    "embed_code",
)


def _outputs(**values) -> tuple:
    unknown = set(values) - set(RUN_OUTPUTS)
    if unknown:  # pragma: no cover - a programming error, caught by the tests
        raise KeyError(f"not a run output: {sorted(unknown)}")
    return tuple(values.get(name, gr.skip()) for name in RUN_OUTPUTS)


@_guard
def run_ui(upload: str | None, smoothing: float, log_scale: bool, *values):
    """Run the ablation from the form and stream charts and progress; the last update shows the results."""
    cfg = service.config_from_form(upload=upload, **dict(zip(FORM_FIELDS, values, strict=True)))
    space, events = _start(cfg)
    view = service.LiveView(cfg, device=service.device_label(cfg), smoothing=smoothing, log_scale=log_scale)
    VIEWS.add(space.run_id, view)
    if ZERO_GPU:
        gr.Info(f"This run asks ZeroGPU for {service.estimate_gpu_seconds(cfg)} s of GPU time.")
    space_id = os.environ.get("SPACE_ID")
    repro = service.cli_command(cfg) + "\n\n# or from Python:\n" + service.client_snippet(cfg, space_id)
    yield _outputs(
        run_state=space.run_id,
        progress=view.progress_html(),
        results=gr.update(visible=False),
        run_btn=gr.update(interactive=False),
        stop_btn=gr.update(interactive=True),
        repro=repro,
    )
    result, warned = None, 0
    try:
        for event in events:
            if isinstance(event, RunResult):
                result = event
            if not view.update(event):
                continue
            if len(view.diverged) > warned:
                gr.Warning(f"{'; '.join(view.diverged[warned:])}. The other arms continue.")
                warned = len(view.diverged)
            if result is None:
                loss, grad, delta = view.figures()
                yield _outputs(progress=view.progress_html(), loss_plot=loss, grad_plot=grad, delta_plot=delta)
    finally:
        _close(events, space, ended=result is not None)
    if result is None:  # pragma: no cover - the engine always ends with a RunResult
        raise gr.Error(GENERIC_ERROR)
    loss, grad, delta = view.figures()
    final = dict(
        progress=view.progress_html(),
        loss_plot=loss,
        grad_plot=grad,
        delta_plot=delta,
        stop_btn=gr.update(interactive=False),
        run_btn=gr.update(interactive=True),
    )
    if result.status == "failed" and not result.records:
        yield _outputs(**final)
        raise gr.Error(result.error or GENERIC_ERROR)
    if result.status == "failed":
        gr.Warning(f"The run failed: {result.error}. The partial results are below.")
    yield _outputs(**final, **_results(result, space, view))


def _results(result: RunResult, space: service.RunSpace, view: service.LiveView) -> dict:
    out = space.out_dir
    summary_file, report = out / "summary.md", out / "report.html"
    notes = [f"Status: **{result.status}**" + (f" ({result.error})" if result.error else "")]
    notes += [f"- {note}" for note in result.notes]
    return dict(
        results=gr.update(visible=True),
        summary_md=summary_file.read_text() if summary_file.is_file() else "No summary was written.",
        receipt_md=service.receipt_markdown(result.summary),
        mixing_plot=view.mixing_figure(),
        notes_md="\n".join(notes),
        archive_file=str(service.make_archive(out)),
        report_file=str(report) if report.is_file() else None,
        embed_code=service.embed_snippet(os.environ.get("SPACE_ID")),
    )


@_guard
def ablate(config: dict | str | None, data_file: str | None):
    """API: run one ablation from a JSON object of `AblationConfig` fields (the CLI's fields) and stream events.

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
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValueError(f"the config must be a JSON object of AblationConfig fields; got {type(config).__name__}")
    if data_file and config.get("dataset", "upload") != "upload":
        raise ValueError(
            f"a data_file was sent but `dataset` is {config['dataset']!r}: set it to 'upload' (or leave "
            "it out) to train on the file"
        )
    cfg = service.config_from_form(upload=data_file, **config)
    space, events = _start(cfg)
    yield (
        {
            "type": "started",
            "run_id": space.run_id,
            "config": cfg.to_dict(),
            "gpu_seconds": service.estimate_gpu_seconds(cfg),
        },
        None,
    )
    result = None
    try:
        for event in events:
            if isinstance(event, RunResult):
                result = event
                break
            yield service.event_json(event, run_id=space.run_id), None
    finally:
        _close(events, space, ended=result is not None)
    if result is None:  # pragma: no cover - the engine always ends with a RunResult
        raise gr.Error(GENERIC_ERROR)
    if result.status == "failed" and not result.records:
        raise gr.Error(result.error or GENERIC_ERROR)
    archive = service.make_archive(space.out_dir) if space.out_dir.is_dir() else None
    yield service.event_json(result, run_id=space.run_id), str(archive) if archive else None


def stop(run_id: str) -> str:
    """API: stop the run `run_id` (from `/ablate`'s first event) at its next step; its partial results are kept."""
    if service.request_stop(run_id):
        return f"stopping run {run_id} after the current step"
    return f"no running run with id {run_id!r} (it may have ended already)"


def stop_ui(run_id: str | None):
    """The Stop button: the visitor's own run (the id lives in their session state)."""
    if service.request_stop(run_id):
        gr.Info("Stopping after the current step; the results so far will be kept.", duration=3)
    return gr.update(interactive=False)


@_guard
def rerender(run_id: str | None, smoothing: float, log_scale: bool):
    """Redraw the charts of the visitor's run with new settings, without re-running (also while it runs)."""
    view = VIEWS.view_for(run_id)
    if view is None:
        return gr.skip(), gr.skip(), gr.skip()
    return view.figures(smoothing=smoothing, log_scale=log_scale)


def push(run_id: str | None, repo_id: str, private: bool, oauth_token: gr.OAuthToken | None) -> str:
    """Push the session's results to a Hub model repo with the visitor's own token (never logged or stored)."""
    if oauth_token is None or not getattr(oauth_token, "token", None):
        where = "the button above" if ON_SPACE else "available when the app runs as a Hugging Face Space"
        raise gr.Error(f"Sign in with Hugging Face first ({where}): the push uses your own account.")
    space = service.get_run(run_id)
    if space is None or not space.finished():
        raise gr.Error("There are no finished results to push yet: run (or stop) an ablation first.")
    try:
        url = push_results(space.out_dir, repo_id, token=oauth_token.token, private=bool(private))
    except PushError as exc:
        raise gr.Error(f"{exc} (your results are still available to download)") from None
    except Exception as exc:  # never log the traceback here: its frames hold the token
        logger.error("push failed unexpectedly: %s", type(exc).__name__)
        raise gr.Error(GENERIC_ERROR) from None
    return f"Pushed to [{url}]({url})."


# --------------------------------------------------------------------------------------------------------------------
# Layout


def build_demo() -> gr.Blocks:
    """The CRMA Lab page: settings on the left, live charts on the right, results, downloads and push below."""
    cfg, note = service.default_config(service.gpu_available())
    # Gradio keeps its own copy of every file it serves (archives, reports): clear copies older than 6 h, hourly.
    with gr.Blocks(title="CRMA Lab: LoRA vs LoRA+CRMA", delete_cache=(3600, 6 * 3600)) as demo:
        gr.Markdown(
            "# CRMA Lab\nTrain plain LoRA and LoRA + CRMA (a Sinkhorn-constrained residual mixing adapter) side by "
            "side: same seed, same batches, same LoRA init, one chart. Stop any time; the results so far are kept."
        )
        gr.Markdown(f"ℹ️ {note}", elem_id="default-note")
        run_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2, min_width=340):
                model = gr.Dropdown(
                    choices=[(f"{name}: {desc}", name) for name, desc in describe_presets()],
                    value=cfg.model,
                    allow_custom_value=True,
                    label="Model",
                    info="a preset, or type any Hub id such as org/name",
                )
                dataset = gr.Radio(
                    choices=[
                        ("Alpaca (tatsu-lab/alpaca, from the Hub)", "alpaca"),
                        ("Bundled (offline, in this repo)", "bundled"),
                        ("Upload a file", "upload"),
                    ],
                    value=cfg.dataset,
                    label="Data",
                )
                upload = gr.File(
                    label="JSON / JSONL / CSV with instruction, input, output",
                    type="filepath",
                    file_types=[".json", ".jsonl", ".csv"],
                    visible=cfg.dataset == "upload",
                )
                with gr.Row():
                    start = gr.Number(value=cfg.start, precision=0, label="Start row", minimum=0)
                    rows = gr.Number(value=cfg.rows, precision=0, label="Rows", minimum=1)
                with gr.Accordion("Preview of the slice", open=False):
                    preview_msg = gr.Markdown()
                    preview_table = gr.Dataframe(
                        headers=["row", "instruction", "input", "output"], interactive=False, wrap=True, max_height=320
                    )
                arms = gr.CheckboxGroup(
                    choices=list(ARM_SPECS),
                    value=cfg.arms,
                    label="Arms",
                    info="lora+zclip and lora+mix separate CRMA's mixing from its ZClip",
                )
                grid_btn = gr.Button("2×2 attribution grid", size="sm")
                with gr.Row():
                    seeds = gr.Textbox(value=str(cfg.seed), label="Seeds", info="one, or several: 1,2,3")
                    steps = gr.Number(value=cfg.steps, precision=0, label="Steps", minimum=1)
                with gr.Accordion("Hyperparameters", open=False):
                    with gr.Row():
                        lr = gr.Textbox(value=f"{cfg.lr:g}", label="LR (LoRA, CRMA projections)")
                        structural_lr = gr.Textbox(value=f"{cfg.structural_lr:g}", label="Structural LR")
                        gate_lr = gr.Textbox(value=f"{cfg.gate_lr:g}", label="Gate LR")
                    with gr.Row():
                        batch_size = gr.Number(value=cfg.batch_size, precision=0, label="Batch size", minimum=1)
                        seq_len = gr.Number(value=cfg.seq_len, precision=0, label="Seq len", minimum=8)
                    with gr.Row():
                        lora_r = gr.Number(value=cfg.lora_r, precision=0, label="LoRA rank", minimum=1)
                        lora_targets = gr.Textbox(value=",".join(cfg.lora_targets), label="LoRA targets")
                    with gr.Row():
                        crma_streams = gr.Number(value=cfg.crma_streams, precision=0, label="CRMA streams", minimum=2)
                        crma_rank = gr.Number(value=cfg.crma_rank, precision=0, label="CRMA rank", minimum=1)
                    spike_at = gr.Number(
                        value=0,
                        precision=0,
                        label="Spike stress at step (0 = off)",
                        minimum=0,
                        info="every arm gets the same corrupted batch at this step",
                    )
                with gr.Row():
                    run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", interactive=False)
            with gr.Column(scale=3):
                progress = gr.HTML("Ready: press Run to train the arms side by side.", elem_id="run-progress")
                with gr.Row():
                    smoothing = gr.Slider(0, 0.99, value=0.6, step=0.01, label="Smoothing (EMA; raw line faint)")
                    log_scale = gr.Checkbox(value=False, label="Log-scale grad norm")
                loss_plot = gr.Plot(label="Loss", elem_id="loss-plot")
                grad_plot = gr.Plot(label="Gradient norm before clipping", elem_id="grad-plot")
                delta_plot = gr.Plot(label="Loss difference", elem_id="delta-plot")
        with gr.Column(visible=False) as results:
            gr.Markdown("## Results")
            notes_md = gr.Markdown()
            summary_md = gr.Markdown(elem_id="summary")
            with gr.Accordion("Fairness receipt: what is identical between the arms", open=True):
                receipt_md = gr.Markdown()
            with gr.Accordion("CRMA mixing diagnostics", open=True):
                mixing_plot = gr.Plot(elem_id="mixing-plot")
            with gr.Row():
                archive_file = gr.File(label="Everything (.zip: adapters, metrics, summary, report, charts, config)")
                report_file = gr.File(label="report.html (self-contained, for blogs)")
            with gr.Accordion("Embed this Space", open=False):
                embed_code = gr.Code(language="html", label="Embed snippet")
            with gr.Accordion("Push to the Hugging Face Hub", open=False):
                if ON_SPACE:
                    gr.Markdown("Uses your own account after you sign in; the token is never stored.")
                    gr.LoginButton()
                else:
                    gr.Markdown(
                        "Sign-in with Hugging Face works when this app runs as a Space. Running it "
                        "yourself? Download the archive and upload it with `huggingface-cli upload`, or "
                        "call `crma.hub.push_results(folder, repo_id, token=...)`."
                    )
                with gr.Row():
                    repo_name = gr.Textbox(label="Repository", value="crma-ablation", info="name or namespace/name")
                    private = gr.Checkbox(value=True, label="Private")
                push_btn = gr.Button("Push results")
                push_msg = gr.Markdown()
        with gr.Accordion("Reproduce: CLI and Python client", open=False):
            repro = gr.Code(language="shell", label="Same run elsewhere")

        # -- events ---------------------------------------------------------------------------------------------
        form = [
            model,
            dataset,
            start,
            rows,
            arms,
            seeds,
            steps,
            lr,
            structural_lr,
            gate_lr,
            batch_size,
            seq_len,
            lora_r,
            lora_targets,
            crma_streams,
            crma_rank,
            spike_at,
        ]
        named = locals()
        run_outputs = [named[name] for name in RUN_OUTPUTS]
        run_event = run_btn.click(
            run_ui,
            [upload, smoothing, log_scale, *form],
            run_outputs,
            api_name="run",
            api_visibility="undocumented",
            concurrency_limit=1,
            concurrency_id="gpu",
            show_progress="full",
            show_progress_on=[progress],
        )
        # Whatever happened (error included), the buttons come back; `.then` runs after failures too.
        run_event.then(
            lambda: (gr.update(interactive=True), gr.update(interactive=False)),
            None,
            [run_btn, stop_btn],
            queue=False,
            api_visibility="private",
        )
        stop_btn.click(
            stop_ui, run_state, stop_btn, concurrency_id="control", concurrency_limit=None, api_visibility="private"
        )
        # In the browser, no round trip; a JS function's returned array is spread over the outputs, hence [[...]].
        grid_btn.click(None, None, arms, js=f"() => [{json.dumps(list(ARM_SPECS))}]")
        dataset.change(
            lambda d: gr.update(visible=d == "upload"), dataset, upload, queue=False, api_visibility="private"
        )
        preview_inputs = [dataset, upload, start, rows]
        api_preview = gr.Button("preview", visible=False)
        api_preview.click(
            preview,
            preview_inputs,
            [preview_table, preview_msg],
            api_name="preview",
            concurrency_id="light",
            concurrency_limit=4,
        )
        for trigger in (dataset.change, upload.change, start.submit, rows.submit, start.blur, rows.blur):
            trigger(
                preview,
                preview_inputs,
                [preview_table, preview_msg],
                api_visibility="private",
                concurrency_id="light",
                concurrency_limit=4,
                trigger_mode="always_last",
            )
        demo.load(
            preview,
            preview_inputs,
            [preview_table, preview_msg],
            api_visibility="private",
            concurrency_id="light",
            concurrency_limit=4,
        )
        # Smoothing and log scale redraw from the stored records; no re-run.
        for trigger in (smoothing.release, log_scale.change):
            trigger(
                rerender,
                [run_state, smoothing, log_scale],
                [loss_plot, grad_plot, delta_plot],
                api_visibility="private",
                concurrency_id="light",
                trigger_mode="always_last",
            )
        push_btn.click(
            push,
            [run_state, repo_name, private],
            push_msg,
            api_name="push",
            concurrency_id="push",
            concurrency_limit=2,
        )

        # -- API-only endpoints (gradio_client) ---------------------------------------------------------------
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
            ablate,
            [api_config, api_data],
            [api_event, api_archive],
            api_name="ablate",
            concurrency_limit=1,
            concurrency_id="gpu",
        )
        # Stop must never wait behind the run it stops: its own, unlimited concurrency group.
        api_stop.click(
            stop, api_stop_id, api_stop_msg, api_name="stop", concurrency_id="control", concurrency_limit=None
        )
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.queue(default_concurrency_limit=1, max_size=20).launch(css=CSS)
