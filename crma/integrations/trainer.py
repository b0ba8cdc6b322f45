"""`prepare_trainer`: a built `transformers.Trainer` (or any subclass, e.g. TRL's `SFTTrainer`) trains with CRMA.

Each change goes through an extension point the Trainer documents:
- optimizer: `create_optimizer` (Trainer: "subclass and override") builds the optimizer the trainer would
  (`args.optim`, `optimizer_cls_and_kwargs`, `args.learning_rate`, betas, eps) over `crma.param_groups`: proj at
  `args.learning_rate` with `args.weight_decay` (bias and norm weights without, as Trainer does), structural and gate
  at their own learning rates without decay. The trainer's LR schedule scales every group alike.
- clipping: `args.max_grad_norm` is set to 0 and a callback runs ZClip in `on_pre_optimizer_step`: after gradient
  accumulation, after DDP's all-reduce, and after the Trainer's own `grad_norm` computation (which unscales AMP
  gradients), right before `optimizer.step()`.
- logs: `log` ("subclass and override") adds ZClip's and the mixing diagnostics' keys to every training log, so
  `log_history`, the console and every `report_to` tracker (trackio, W&B, TensorBoard, ...) get them.
- files: `save_model`, which every checkpoint save calls too, writes `crma_config.json`, `crma.safetensors` and
  `zclip_state.json` beside the model files (main process only); `train` writes them into `output_dir` at the end
  and, when resuming from a checkpoint, loads them before training starts.

The trainer's class is swapped for a subclass that puts `CRMATrainerMixin` first, so a subclass's own overrides
(TRL's `log` adds its metrics) still run, after ours.

Tested on CPU: Trainer and SFTTrainer in one process, and the Trainer under `torchrun` / `accelerate launch` with 2
gloo processes (DDP), against one process. ZClip's FSDP1 / FSDP2 norms are tested on ZClip itself; FSDP through the
Trainer is not (accelerate runs multi-process CPU training as DDP), nor is AMP fp16 (GPU only).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_optimizer import is_optimizer_factory
from transformers.trainer_utils import get_last_checkpoint

import crma
from crma import ClipResult, CRMAConfig, ZClip, ZClipConfig

logger = logging.getLogger(__name__)

ZCLIP_STATE_NAME = "zclip_state.json"
# Keys of `mixing_report(...).summary()` -> the log keys they are reported under.
MIXING_LOG_KEYS = {
    "sigma2_mean": "crma_sigma2",
    "dist_from_identity_mean": "crma_dist_from_identity",
    "composite_gain": "crma_composite_gain",
    "alpha_mean": "crma_alpha",
    "max_rowcol_err": "crma_sinkhorn_err",
}


@dataclass
class CRMATrainerConfig:
    """What `prepare_trainer` adds to a trainer. The base LR and weight decay stay the trainer's own arguments.

    Args:
        structural_lr (`float`): learning rate of `log_mix` and the read/write logits (no weight decay).
        gate_lr (`float`): learning rate of the gate `log_alpha` (no weight decay).
        zclip (`ZClipConfig | None`): ZClip settings; it replaces the trainer's fixed `max_grad_norm` clip (set
            `ZClipConfig.max_grad_norm` for a hard cap on top). None keeps the trainer's own clipping and logs no
            ZClip keys.
        crma (`CRMAConfig | None`): attach CRMA with these settings when the model has none yet (defaults when
            None). Must be None when CRMA is already attached.
        log_mixing (`bool`): add the mixing diagnostics (sigma2, ||M - I||_F, composite gain, gate alpha, Sinkhorn
            error; means over layers) to every training log. One small SVD per layer per log, on the CPU.
    """

    structural_lr: float = 5e-3
    gate_lr: float = 1e-3
    zclip: ZClipConfig | None = field(default_factory=ZClipConfig)
    crma: CRMAConfig | None = None
    log_mixing: bool = True

    def __post_init__(self) -> None:
        for name in ("structural_lr", "gate_lr"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"`{name}` must be > 0; got {value!r}")
        if self.zclip is not None and not isinstance(self.zclip, ZClipConfig):
            raise ValueError(f"`zclip` must be a ZClipConfig or None; got {type(self.zclip).__name__}")
        if self.crma is not None and not isinstance(self.crma, CRMAConfig):
            raise ValueError(f"`crma` must be a CRMAConfig or None; got {type(self.crma).__name__}")


@dataclass
class _ClipWindow:
    """ZClip results since the last training log."""

    last: ClipResult | None = None
    clipped: int = 0
    max_pre: float = -math.inf

    def add(self, result: ClipResult) -> None:
        self.last = result
        self.clipped += int(result.clipped)
        self.max_pre = max(self.max_pre, result.pre_norm)

    def pop(self) -> dict[str, float]:
        if self.last is None:
            return {}
        logs = {
            "grad_norm_pre": self.last.pre_norm,
            "grad_norm_post": self.last.post_norm,
            "zclip_clipped": self.clipped,
            "grad_norm_pre_max": self.max_pre,
        }
        self.last, self.clipped, self.max_pre = None, 0, -math.inf
        return logs


@dataclass
class _CRMARun:
    """Per-trainer CRMA state: the settings, the ZClip instance and its results since the last log."""

    config: CRMATrainerConfig
    adapter_name: str
    zclip: ZClip | None
    window: _ClipWindow = field(default_factory=_ClipWindow)
    warned: set[str] = field(default_factory=set)


class _ZClipCallback(TrainerCallback):
    """Runs ZClip once per optimizer step, on every rank, right before `optimizer.step()`."""

    def __init__(self, run: _CRMARun) -> None:
        self.run = run

    def on_pre_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs) -> None:
        # `model` is the trainer's model; under DDP its parameters are the DDP module's, gradients all-reduced.
        self.run.window.add(self.run.zclip.step(model))


def _has_dtensor_params(model: nn.Module) -> bool:
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor can exist before this module is imported
    return dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters())


class CRMATrainerMixin:
    """The Trainer overrides `prepare_trainer` installs (it is put first in the trainer's class); see module doc."""

    _crma: _CRMARun

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the trainer's optimizer class and kwargs over `crma.param_groups` (once, as Trainer does)."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            if self.optimizer_cls_and_kwargs is not None:
                optimizer_cls, kwargs = self.optimizer_cls_and_kwargs
            else:
                optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            kwargs = dict(kwargs)
            if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(kwargs):
                raise ValueError(
                    f"`optim`={self.args.optim!r} builds its own parameter groups, so CRMA's structural and gate "
                    "learning rates cannot be applied; use a per-parameter-group optimizer such as 'adamw_torch'"
                )
            self.optimizer = optimizer_cls(self._crma_param_groups(opt_model), **kwargs)
        return self.optimizer

    def _crma_param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        cfg = self._crma.config
        groups = crma.param_groups(
            model,
            lr=self.args.learning_rate,
            structural_lr=cfg.structural_lr,
            gate_lr=cfg.gate_lr,
            weight_decay=self.args.weight_decay,
        )
        # Keep the Trainer's decay rule inside the proj group: biases and norm weights get no weight decay.
        decay = set(self.get_decay_parameter_names(model))
        name_of = {id(p): n for n, p in model.named_parameters()}
        out = []
        for group in groups:
            if group["name"] != "proj":
                out.append(group)
                continue
            with_decay = [p for p in group["params"] if name_of[id(p)] in decay]
            without = [p for p in group["params"] if name_of[id(p)] not in decay]
            if with_decay:
                out.append({**group, "params": with_decay})
            if without:
                out.append({**group, "name": "proj_no_decay", "params": without, "weight_decay": 0.0})
        return out

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add ZClip's norms and the mixing diagnostics to training logs (those with "loss"), then log as usual."""
        if "loss" in logs:
            logs.update(self._crma.window.pop())
            if self._crma.config.log_mixing:
                logs.update(self._crma_mixing_logs())
        super().log(logs, start_time)

    def _crma_mixing_logs(self) -> dict[str, float]:
        if self._crma_sharded("mixing diagnostics"):
            return {}
        summary = crma.mixing_report(self.model, self._crma.adapter_name).summary()
        return {key: summary[name] for name, key in MIXING_LOG_KEYS.items()}

    def _crma_sharded(self, what: str) -> bool:
        # Under FSDP the CRMA parameters are shards (flat or DTensor): reading them needs collectives the
        # diagnostics and crma.save do not make. Skipped, said once, rather than written wrong.
        if not (self.is_fsdp_enabled or _has_dtensor_params(self.model)):
            return False
        if what not in self._crma.warned:
            self._crma.warned.add(what)
            logger.warning("CRMA %s are skipped: the CRMA parameters are sharded (FSDP)", what)
        return True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the trainer does, then write the CRMA (and ZClip) files beside the model files."""
        super().save_model(output_dir, _internal_call)
        self._crma_write(output_dir or self.args.output_dir)

    def _crma_write(self, output_dir: str | os.PathLike) -> None:
        if not self.args.should_save or self._crma_sharded("files"):
            return  # only the main process writes; DDP replicas hold the same values
        crma.save(self.model, output_dir, self._crma.adapter_name)
        if self._crma.zclip is not None:
            state = json.dumps(self._crma.zclip.state_dict(), indent=2, sort_keys=True)
            (Path(output_dir) / ZCLIP_STATE_NAME).write_text(state)

    def _crma_restore(self, checkpoint: str | os.PathLike) -> None:
        # Before super().train(): the values are in place before DDP broadcasts or FSDP shards them, and
        # crma.load copies into the existing parameters, so the optimizer built later owns them.
        crma.load(self.model, checkpoint, self._crma.adapter_name)
        if self._crma.zclip is not None:
            path = Path(checkpoint) / ZCLIP_STATE_NAME
            if not path.is_file():
                raise FileNotFoundError(f"{checkpoint} has no {ZCLIP_STATE_NAME}: it was not written with ZClip on")
            self._crma.zclip.load_state_dict(json.loads(path.read_text()))
        self._crma.window = _ClipWindow()

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """Train as the trainer does; resuming restores CRMA and ZClip first; the end writes their files."""
        checkpoint = resume_from_checkpoint
        if checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)  # None: Trainer raises its own error below
        if isinstance(checkpoint, (str, os.PathLike)):
            self._crma_restore(checkpoint)
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        self._crma_write(self.args.output_dir)
        return output


_CLASSES: dict[type, type] = {}


def _crma_class(base: type) -> type:
    if base not in _CLASSES:
        _CLASSES[base] = type(f"CRMA{base.__name__}", (CRMATrainerMixin, base), {"__module__": base.__module__})
    return _CLASSES[base]


def _ensure_crma(model: nn.Module, config: CRMAConfig | None) -> str:
    # Every CRMA tensor is named `crma_*`: any such parameter means an adapter is attached.
    if not any(name.rsplit(".", 1)[-1].startswith("crma_") for name, _ in model.named_parameters()):
        crma.attach(model, config or CRMAConfig())
        return crma.active_adapter(model)
    if config is not None:
        raise ValueError("CRMA is already attached to this model; pass `crma=None` to train it as it is")
    name = crma.active_adapter(model)
    if name is None:
        raise ValueError("CRMA is attached but switched off (crma.disable); call crma.enable(model) first")
    # peft's get_peft_model (e.g. inside SFTTrainer) freezes everything but LoRA; make the active CRMA trainable.
    crma.set_active(model, name)
    return name


def prepare_trainer(trainer: Trainer, config: CRMATrainerConfig | None = None, **overrides: Any) -> Trainer:
    """Make a built `transformers.Trainer` (or subclass, e.g. TRL's `SFTTrainer`) train with CRMA and ZClip.

    Call it after constructing the trainer and before `train()`. It attaches CRMA to `trainer.model` unless
    attached already (so it works after `SFTTrainer(..., peft_config=...)` has wrapped the model with LoRA), makes
    the optimizer from `crma.param_groups`, replaces the fixed `max_grad_norm` clip with ZClip (`args.max_grad_norm`
    is set to 0), adds `grad_norm_pre`, `grad_norm_post`, `zclip_clipped` (steps clipped since the last log),
    `grad_norm_pre_max` and the mixing diagnostics (`crma_sigma2`, `crma_dist_from_identity`, `crma_composite_gain`,
    `crma_alpha`, `crma_sinkhorn_err`) to every training log, writes the CRMA and ZClip files beside every
    checkpoint and into `output_dir` at the end, and restores them when training resumes from a checkpoint.

    Under `accelerate launch` / `torchrun` every rank runs ZClip on the global gradient norm (DDP: already
    all-reduced; FSDP1: summed over ranks; FSDP2: reduced by torch), so all ranks clip alike; only the main
    process writes files. Not supported: DeepSpeed with ZClip (its engine clips inside backward), optimizers that
    build their own parameter groups (GaLore, LOMO, ...), FSDP1 hybrid sharding. Under FSDP the CRMA files and
    the mixing diagnostics are skipped with a warning.

    Args:
        trainer (`transformers.Trainer`): a trainer built without `optimizers=` (its optimizer is made here).
        config (`CRMATrainerConfig | None`): settings; keyword overrides (`structural_lr=`, `gate_lr=`, `zclip=`,
            `crma=`, `log_mixing=`) are applied on top.

    Returns:
        `transformers.Trainer`: the same trainer, now an instance of a subclass named `CRMA<its class>`.
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"`trainer` must be a transformers.Trainer; got {type(trainer).__name__}")
    if isinstance(trainer, CRMATrainerMixin):
        raise ValueError("this trainer was already prepared for CRMA")
    known = {f.name for f in fields(CRMATrainerConfig)}
    if set(overrides) - known:
        unknown = sorted(set(overrides) - known)
        raise ValueError(f"unknown CRMATrainerConfig field(s) {unknown}; known fields are {sorted(known)}")
    cfg = replace(config or CRMATrainerConfig(), **overrides)
    if trainer.optimizer is not None:
        raise ValueError(
            "the trainer already has an optimizer (`optimizers=`); prepare_trainer builds it from crma.param_groups"
        )
    if cfg.zclip is not None and trainer.is_deepspeed_enabled:
        raise ValueError("ZClip cannot run under DeepSpeed, whose engine clips inside backward; pass `zclip=None`")
    sharded = False
    if cfg.zclip is not None and trainer.is_fsdp_enabled:
        plugin = trainer.accelerator.state.fsdp_plugin
        if getattr(plugin, "fsdp_version", 1) == 1:
            if "HYBRID" in str(getattr(plugin, "sharding_strategy", "")):
                raise ValueError("ZClip under FSDP1 hybrid sharding is not supported: use FSDP2 or full sharding")
            sharded = True  # FSDP1 flat shards: sum the squared norms over ranks (FSDP2 grads are DTensors)
    adapter_name = _ensure_crma(trainer.model, cfg.crma)
    zclip = None
    if cfg.zclip is not None:
        zclip = ZClip(cfg.zclip, sharded=sharded)
        trainer.args.max_grad_norm = 0.0  # the Trainer then only measures its `grad_norm`; ZClip clips
    run = _CRMARun(config=cfg, adapter_name=adapter_name, zclip=zclip)
    trainer.__class__ = _crma_class(type(trainer))
    trainer._crma = run
    if zclip is not None:
        trainer.add_callback(_ZClipCallback(run))
    return trainer
