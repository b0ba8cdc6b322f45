"""The page's sections besides the form: the live charts with the run's attribution, the results panel (with trying
the adapters, downloads, embed, push and reproduce), and the published study. Each builder returns its components."""

from __future__ import annotations

import os
from dataclasses import dataclass

import gradio as gr

from crma.ablation.report.charts import CHARTS
from crma.ablation.report.render import attribution_markdown
from crma.lab import published, tryout
from crma.ui import space


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
            if space.ON_SPACE:
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
