"""The settings column: Run and Stop, the model and data slice, arms and seeds, and the hyperparameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from crma.ablation.data import MAX_UPLOAD_BYTES
from crma.ablation.models import describe_presets
from crma.ablation.spec.arms import ARM_SPECS
from crma.ablation.spec.config import MIN_SEQ_LEN, AblationConfig
from crma.ablation.spec.schema import label

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


def _whole(key: str, value: int, minimum: int, **kwargs: Any) -> gr.Number:
    """A whole-number box for the setting `key`, labelled as the schema names it (unless `label` is given)."""
    return gr.Number(value=value, precision=0, minimum=minimum, **{"label": label(key), **kwargs})


def _short_description(description: str) -> str:
    # "SmolLM2-135M-Instruct: real pretrained chat model, ..." -> "SmolLM2-135M-Instruct": the box stays one line.
    return description.split(":")[0].split("(")[0].strip()


def _model_and_data(cfg: AblationConfig) -> dict[str, Any]:
    """The model box, the data source (with its upload), the slice and its preview."""
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
        start, rows = _whole("start", cfg.start, 0), _whole("rows", cfg.rows, 1)
    with gr.Accordion("Preview of the slice", open=False):
        preview_msg = gr.Markdown()
        preview_table = gr.Dataframe(
            headers=["row", "instruction", "input", "output"], interactive=False, wrap=True, max_height=320
        )
    return dict(
        model=model, dataset=dataset, upload=upload, start=start, rows=rows, preview_msg=preview_msg,
        preview_table=preview_table,
    )  # fmt: skip


def _arms_and_seeds(cfg: AblationConfig) -> dict[str, Any]:
    """The arms (with their preset buttons), seeds, steps, LR tuning and the held-out rows."""
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
        steps = _whole("steps", cfg.steps, 1)
    with gr.Row():
        tune_lr = gr.Checkbox(
            value=len(cfg.lr_grid) > 1,
            label="Tune the LR per arm (×0.3, ×1, ×3; about 3× the time)",
            info="each arm is judged at its own best LR, chosen on a validation slice; without it every arm shares "
            "one LR, and CRMA's own parameters train 25× faster than LoRA's",
        )
        eval_rows = _whole(
            "eval_rows", cfg.eval_rows, 0,
            info="rows after the training slice, never trained on (0 = training loss only)",
        )  # fmt: skip
    return dict(arms=arms, presets=presets, seeds=seeds, steps=steps, tune_lr=tune_lr, eval_rows=eval_rows)


def _hyperparameters(cfg: AblationConfig) -> dict[str, Any]:
    """The closed accordion of learning rates, batch shape, LoRA and CRMA sizes, and the injected spike."""
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
            batch_size, seq_len = _whole("batch_size", cfg.batch_size, 1), _whole("seq_len", cfg.seq_len, MIN_SEQ_LEN)
        with gr.Row():
            lora_r = _whole("lora_r", cfg.lora_r, 1)
            lora_targets = gr.Textbox(value=",".join(cfg.lora_targets), label=label("lora_targets"))
        with gr.Row():
            crma_streams = _whole(
                "crma.n_streams", cfg.crma.n_streams, 2,
                info="n parallel streams, mixed by an n × n doubly stochastic matrix",
            )  # fmt: skip
            crma_rank = _whole(
                "crma.rank", cfg.crma.rank, 1, info="r: each block's update is projected to r dimensions"
            )
        spike_at = _whole(
            "spike_at", 0, 0,
            label=f"{label('spike_at')} (0 = off)",
            info=f"every arm gets the same corrupted batch at this step (loss ×{cfg.spike_scale:g} for the backward "
            "pass): how does each arm's clipping contain the spike?",
        )  # fmt: skip
    return dict(
        lr=lr, structural_lr=structural_lr, gate_lr=gate_lr, batch_size=batch_size, seq_len=seq_len, lora_r=lora_r,
        lora_targets=lora_targets, crma_streams=crma_streams, crma_rank=crma_rank, spike_at=spike_at,
    )  # fmt: skip


def build_form(cfg: AblationConfig) -> Form:
    """The settings column, filled with `cfg`; Run and Stop on top, where the first screen shows them."""
    with gr.Row():
        run_btn = gr.Button("Run", variant="primary", elem_id="run-btn")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", interactive=False)
    # Shown while a run waits in the queue behind another visitor's run: leaving the queue costs nothing.
    cancel_btn = gr.Button("Leave the queue", size="sm", visible=False, elem_id="cancel-btn")
    return Form(
        run_btn=run_btn,
        stop_btn=stop_btn,
        cancel_btn=cancel_btn,
        **_model_and_data(cfg),
        **_arms_and_seeds(cfg),
        **_hyperparameters(cfg),
    )
