"""Configuration dataclasses of the CRMA adapter and of ZClip; both round-trip through JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

_T = TypeVar("_T")


def _from_dict(cls: type[_T], data: dict[str, Any]) -> _T:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**data)


class JSONConfig:
    """Mixin for config dataclasses: `to_dict`/`to_json` and strict `from_dict`/`from_json`."""

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field."""
        return asdict(self)

    def to_json(self) -> str:
        """JSON text of `to_dict()`."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Build from a dict; unknown keys are an error naming them."""
        return _from_dict(cls, data)

    @classmethod
    def from_json(cls, text: str):
        """Inverse of `to_json()`."""
        return cls.from_dict(json.loads(text))


@dataclass
class CRMAConfig(JSONConfig):
    """Settings of the CRMA side channel installed beside every decoder block.

    Args:
        n_streams (`int`): number of side streams n mixed by the doubly stochastic matrix M (n x n).
        rank (`int`): rank r of each stream (the down projection A is d x r, the up projection B is r x d).
        sinkhorn_iters (`int`): Sinkhorn-Knopp iterations (column then row normalisation) per forward.
        mix_init_diag (`float`): p, the diagonal of M at init; `log_mix` starts at c*I with c = ln(p(n-1)/(1-p)).
        gate_init (`float`): the gate alpha at init (`log_alpha = ln(gate_init)`).
        read_init (`float`): read logits start at +read_init on stream (l mod n), -read_init elsewhere.
        write_init (`float`): write logits start at +write_init on stream (l mod n), -write_init elsewhere.
        init_A (`"principal" | "orthonormal"`): A = top-r left singular vectors of the block's writing weights
            `[W_o | W_down]` (dequantised when 4-bit), or a seeded random orthonormal basis.
        init_seed (`int`): seed of the `orthonormal` init (kept separate from the global RNG).
        log_alpha_min, log_alpha_max (`float`): clamp of the gate's log.
        eps (`float`): epsilon of the RMS normalisation of the block update.
    """

    n_streams: int = 3
    rank: int = 4
    sinkhorn_iters: int = 20
    mix_init_diag: float = 0.9
    gate_init: float = 1.0
    read_init: float = 1.0
    write_init: float = 2.0
    init_A: Literal["principal", "orthonormal"] = "principal"
    init_seed: int = 0
    log_alpha_min: float = -10.0
    log_alpha_max: float = 2.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not (isinstance(self.n_streams, int) and self.n_streams >= 2):
            raise ValueError(f"`n_streams` must be an integer >= 2; got {self.n_streams!r}")
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ValueError(f"`rank` must be a positive integer; got {self.rank!r}")
        if not (isinstance(self.sinkhorn_iters, int) and self.sinkhorn_iters > 0):
            raise ValueError(f"`sinkhorn_iters` must be a positive integer; got {self.sinkhorn_iters!r}")
        if not (1.0 / self.n_streams < self.mix_init_diag < 1.0):
            raise ValueError(f"`mix_init_diag` must be in (1/n_streams, 1); got {self.mix_init_diag!r}")
        if not (self.gate_init > 0 and self.log_alpha_min <= math.log(self.gate_init) <= self.log_alpha_max):
            raise ValueError(
                f"`gate_init` must be > 0 with ln(gate_init) in [{self.log_alpha_min}, {self.log_alpha_max}]; "
                f"got {self.gate_init!r}"
            )
        if self.init_A not in ("principal", "orthonormal"):
            raise ValueError(f"`init_A` must be 'principal' or 'orthonormal'; got {self.init_A!r}")
        if self.eps <= 0:
            raise ValueError(f"`eps` must be > 0; got {self.eps!r}")

    @property
    def mix_init_logit(self) -> float:
        """c such that sinkhorn(c*I) has diagonal `mix_init_diag` (c = ln(p(n-1)/(1-p)))."""
        p, n = self.mix_init_diag, self.n_streams
        return math.log(p * (n - 1) / (1 - p))


@dataclass
class ZClipConfig(JSONConfig):
    """Settings of ZClip adaptive gradient clipping (arXiv:2504.02507; defaults are the published ones).

    Args:
        alpha (`float`): EMA decay of the mean and variance of the gradient norm.
        z_thresh (`float`): z-score above which a step is clipped.
        warmup_steps (`int`): steps that only collect norms before the statistics are set (no clipping).
        clip_option (`"adaptive_scaling" | "mean" | "fixed"`): where a spike is clipped to:
            mu + z_thresh^2 * sigma / z (reciprocal, continuous at the threshold), mu, or mu + z_thresh * sigma.
        max_grad_norm (`float | None`): optional hard cap applied on top (off by default).
        eps (`float`): added to sigma in the z-score.
    """

    alpha: float = 0.97
    z_thresh: float = 2.5
    warmup_steps: int = 25
    clip_option: Literal["adaptive_scaling", "mean", "fixed"] = "adaptive_scaling"
    max_grad_norm: float | None = None
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"`alpha` must be in (0, 1); got {self.alpha!r}")
        if not self.z_thresh > 0:
            raise ValueError(f"`z_thresh` must be > 0; got {self.z_thresh!r}")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 1):
            raise ValueError(f"`warmup_steps` must be an integer >= 1; got {self.warmup_steps!r}")
        if self.clip_option not in ("adaptive_scaling", "mean", "fixed"):
            raise ValueError(f"`clip_option` must be 'adaptive_scaling', 'mean' or 'fixed'; got {self.clip_option!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"`max_grad_norm` must be None or > 0; got {self.max_grad_norm!r}")
