"""Gradient clipping: ZClip (z-score adaptive, arXiv:2504.02507) and the fixed-norm clip HF Trainer uses.

Both clip on the *global* L2 norm of the gradients, which is the same on every rank of a distributed run:
- DDP (and accelerate's multi-process default): gradients are all-reduced in backward, so every rank already holds
  the full gradient and its local norm is the global norm; nothing is reduced here.
- DTensor gradients (FSDP2 `fully_shard`, tensor parallel): torch reduces each mesh's norm (`full_tensor()`).
- Plain sharded gradients (FSDP1 flat shards, or parameters split by hand so each rank holds a disjoint part):
  pass `sharded=True`, and the squared norms are summed over `process_group` before any statistic is updated.
With the same norm on every rank, every rank takes the same clipping decision and scales by the same factor.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import nn

from .config import ZClipConfig


class ClipResult(NamedTuple):
    """What one clipping call did: the global L2 norm before and after, and whether it scaled the gradients."""

    pre_norm: float
    post_norm: float
    clipped: bool


def _grads(model_or_params: nn.Module | Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    params = model_or_params.parameters() if isinstance(model_or_params, nn.Module) else model_or_params
    with_grad = [p for p in params if p.grad is not None]
    return with_grad, [p.grad for p in with_grad]


def _mesh_of(grad: torch.Tensor) -> Any:
    # A DTensor can only exist once its module is imported; looking it up there keeps the import out of the core.
    dtensor = sys.modules.get("torch.distributed.tensor")
    return grad.device_mesh if dtensor is not None and isinstance(grad, dtensor.DTensor) else None


def _by_mesh(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    # One group per DTensor mesh plus one of plain tensors: a foreach kernel cannot mix them.
    groups: dict[Any, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(_mesh_of(p.grad), []).append(p)
    return list(groups.values())


def _group_norm(params: list[torch.Tensor], sharded: bool, process_group: Any) -> torch.Tensor:
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    if _mesh_of(params[0].grad) is not None:
        return norm.full_tensor()  # torch reduces over the mesh; the result is replicated
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        squared = norm.float().square()
        torch.distributed.all_reduce(squared, group=process_group)  # SUM of the ranks' disjoint parts
        return squared.sqrt()
    return norm


def global_grad_norm(
    model_or_params: nn.Module | Iterable[torch.Tensor], *, sharded: bool = False, process_group: Any = None
) -> torch.Tensor:
    """The L2 norm of all gradients taken as one vector, equal on every rank of a distributed run.

    Args:
        model_or_params (`nn.Module | Iterable[Tensor]`): parameters whose `.grad` is set (others are skipped).
        sharded (`bool`): plain-tensor gradients are disjoint shards per rank (FSDP1, a hand-split model): their
            squared norms are summed over `process_group`. Leave False under DDP, whose gradients are already
            all-reduced (a sum there would count every gradient once per rank). Without an initialised process
            group the run has one rank and nothing is reduced. DTensor gradients are always reduced by torch.
        process_group (`ProcessGroup | None`): the group the shards are spread over (default: the world).

    Returns:
        `Tensor`: a 0-dim tensor (0.0 when no parameter has a gradient).
    """
    params, _ = _grads(model_or_params)
    if not params:
        return torch.zeros(())
    norms = [_group_norm(group, sharded, process_group) for group in _by_mesh(params)]
    if len(norms) == 1:
        return norms[0]
    return torch.linalg.vector_norm(torch.stack([n.to(norms[0].device, torch.float32) for n in norms]))


def _scale_to(params: list[torch.Tensor], target: float, norm: torch.Tensor) -> None:
    # Same coefficient as torch.nn.utils.clip_grad_norm_: target / (norm + 1e-6), capped at 1.
    for group in _by_mesh(params):
        torch.nn.utils.clip_grads_with_norm_(group, target, norm)


def clip_by_norm(
    model_or_params: nn.Module | Iterable[torch.Tensor],
    max_norm: float,
    *,
    sharded: bool = False,
    process_group: Any = None,
) -> ClipResult:
    """Clip the global gradient norm to `max_norm` (as `clip_grad_norm_` / HF Trainer) and report both norms.

    `sharded` and `process_group` are as in `global_grad_norm`.
    """
    params, _ = _grads(model_or_params)
    if not params:
        return ClipResult(0.0, 0.0, False)
    norm = global_grad_norm(params, sharded=sharded, process_group=process_group)
    pre = norm.item()  # one host sync per step: the figure is logged anyway
    if not math.isfinite(pre):
        return ClipResult(pre, pre, False)
    clipped = pre > max_norm
    if clipped:
        _scale_to(params, max_norm, norm)
    return ClipResult(pre, max_norm * pre / (pre + 1e-6) if clipped else pre, clipped)


class ZClip:
    """Z-score adaptive gradient clipping with EMA statistics of the global gradient norm.

    Warm-up: the first `warmup_steps` norms are only collected (a hard `max_grad_norm` cap, if set, still applies);
    then mu = their mean, sigma^2 = their population variance. Each later step computes z = (g - mu) / (sigma + eps)
    from the *previous* statistics; if z > z_thresh the gradients are scaled so their norm becomes g* (see
    `ZClipConfig.clip_option`), and the statistics are updated with the clipped value:
    mu <- alpha*mu + (1-alpha)*g*, sigma^2 <- alpha*sigma^2 + (1-alpha)*(g* - mu)^2 (with the new mu).
    Non-finite norms leave the statistics untouched and the gradients unscaled (the caller decides what to do).

    In a distributed run every rank calls `step` at the same optimizer step; the norm is the global one (see
    `global_grad_norm`), so the statistics and every clipping decision are identical on all ranks.

    Args:
        config (`ZClipConfig | None`): settings; keyword overrides are applied on top.
        sharded (`bool`): the gradients are disjoint shards per rank (FSDP1, a hand-split model); their squared
            norms are summed over `process_group`. Not for DDP (already all-reduced). DTensor gradients need nothing.
        process_group (`ProcessGroup | None`): the group the shards are spread over (default: the world).
    """

    def __init__(
        self,
        config: ZClipConfig | None = None,
        *,
        sharded: bool = False,
        process_group: Any = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(sharded, bool):
            raise ValueError(f"`sharded` must be a bool; got {sharded!r}")
        base = (config or ZClipConfig()).to_dict()
        base.update(overrides)
        self.config = ZClipConfig(**base)
        self.sharded = sharded
        self.process_group = process_group
        self.mean: float | None = None
        self.var: float | None = None
        self.step_count = 0
        self._warmup: list[float] = []

    def threshold(self, grad_norm: float) -> float | None:
        """The norm g* a gradient of norm `grad_norm` would be clipped to now, or None if it would pass."""
        cfg = self.config
        if self.mean is None or self.var is None:
            return None
        std = math.sqrt(self.var)
        z = (grad_norm - self.mean) / (std + cfg.eps)
        if z <= cfg.z_thresh:
            return None
        if cfg.clip_option == "adaptive_scaling":
            return self.mean + cfg.z_thresh**2 * std / z
        if cfg.clip_option == "mean":
            return self.mean
        return self.mean + cfg.z_thresh * std

    def step(self, model_or_params: nn.Module | Iterable[torch.Tensor]) -> ClipResult:
        """Clip the gradients of a module or of an iterable of parameters in place; return the norms."""
        cfg = self.config
        params, _ = _grads(model_or_params)
        if not params:
            return ClipResult(0.0, 0.0, False)
        norm = global_grad_norm(params, sharded=self.sharded, process_group=self.process_group)
        pre = norm.item()
        if not math.isfinite(pre):
            return ClipResult(pre, pre, False)
        self.step_count += 1
        in_warmup = self.mean is None
        adaptive = self.threshold(pre)
        # As upstream ZClip: warm-up collects the raw norm; later the statistics see the adaptive clip value
        # (before the optional hard cap), so one capped spike does not drag the mean down.
        self._update_statistics(pre if in_warmup or adaptive is None else adaptive)
        target = adaptive
        if cfg.max_grad_norm is not None and pre > cfg.max_grad_norm:
            target = cfg.max_grad_norm if target is None else min(target, cfg.max_grad_norm)
        if target is None:
            return ClipResult(pre, pre, False)
        _scale_to(params, target, norm)
        return ClipResult(pre, target * pre / (pre + 1e-6), True)

    def _update_statistics(self, value: float) -> None:
        cfg = self.config
        if self.mean is None:
            self._warmup.append(value)
            if len(self._warmup) >= cfg.warmup_steps:
                n = len(self._warmup)
                self.mean = sum(self._warmup) / n
                self.var = sum((x - self.mean) ** 2 for x in self._warmup) / n
                self._warmup = []
            return
        self.mean = cfg.alpha * self.mean + (1 - cfg.alpha) * value
        self.var = cfg.alpha * self.var + (1 - cfg.alpha) * (value - self.mean) ** 2

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: config, statistics, step count and the pending warm-up norms."""
        return {
            "config": self.config.to_dict(),
            "mean": self.mean,
            "var": self.var,
            "step_count": self.step_count,
            "warmup": list(self._warmup),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict()` returned."""
        self.config = ZClipConfig.from_dict(state["config"])
        self.mean, self.var = state["mean"], state["var"]
        self.step_count = int(state["step_count"])
        self._warmup = list(state["warmup"])
