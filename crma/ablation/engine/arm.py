"""The data of the paired engine's arms: `Batch`, what every arm trains on at one step, and `Arm`, one arm's live
training state (its adapter, optimizer, clipper, RNG stream and what the receipt reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import crma
from crma import ZClip, clip_by_norm

from ..spec.arms import ArmSpec
from .distributed import Shard


@dataclass
class Batch:
    """What every arm trains on at one step.

    Args:
        step (`int`): 1-based step.
        tensors (`dict[str, Tensor]`): `input_ids`, `attention_mask`, `labels` on the model's device.
        indices (`list[int]`): the examples it holds.
        loss_scale (`float`): multiplier of the loss for backward (the spike stress step; 1 otherwise).
        shard (`Shard | None`): this process's rows in a data-parallel run (None: it trains on the whole batch).
    """

    step: int
    tensors: dict[str, torch.Tensor]
    indices: list[int]
    loss_scale: float = 1.0
    shard: Shard | None = None

    @property
    def tokens(self) -> int:
        """Real (non-padding) tokens of the whole batch, prompt and response."""
        return int(self.tensors["attention_mask"].sum())

    @property
    def inputs(self) -> dict[str, torch.Tensor]:
        """What this process feeds the model: its shard's rows, or the whole batch."""
        return self.shard.tensors if self.shard is not None else self.tensors


@dataclass
class Arm:
    """One arm's live training state."""

    label: str
    spec: ArmSpec
    adapter: str  # internal peft / CRMA adapter name ("arm0", ...): module keys cannot hold '+' safely
    lr_scale: float = 1.0  # multiplies every optimizer group's LR (the label's `@x` part)
    params: list[torch.nn.Parameter] = field(default_factory=list)
    lora_params: list[torch.nn.Parameter] = field(default_factory=list)
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    clipper: ZClip | None = None
    rng: torch.Tensor | None = None
    cuda_rng: list[torch.Tensor] | None = None
    tokens: int = 0
    rows: int = 0  # batch rows this process fed this arm (a data-parallel process: its shards only)
    diverged: bool = False
    init_hash: str = ""
    trainable: int = 0
    wall_s: float = 0.0
    init_dir: Path | None = None  # the initial adapter a trained PiSSA one is converted against when saved
    batch_digests: list[str] = field(default_factory=list)
    hyperparameter_digests: list[str] = field(default_factory=list)
    crma_hyperparameter_digests: list[str] = field(default_factory=list)
    eval_digests: list[str] = field(default_factory=list)  # which held-out slice it was evaluated on, and when

    def clip(self, max_grad_norm: float) -> crma.ClipResult:
        """Clip this arm's gradients with its clipper: ZClip, or the fixed norm clip."""
        if self.clipper is not None:
            return self.clipper.step(self.params)
        return clip_by_norm(self.params, max_grad_norm)

    def clipper_facts(self, max_grad_norm: float) -> dict[str, Any]:
        """The clipper this arm really uses, as the receipt records it."""
        if self.clipper is not None:
            return {"kind": "zclip", **self.clipper.config.to_dict()}
        return {"kind": "clip_grad_norm", "max_norm": max_grad_norm}
