"""Configuration dataclasses of the CRMA adapter and of ZClip; both round-trip through JSON."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar

_T = TypeVar("_T")


class ConfigFieldError(ValueError):
    """One config field broke its rule. `str()` names the field in backticks; a caller that shows the field under
    another name (a form label, a CLI flag) builds its own message from `field`, `rule` and `value`.

    Args:
        field (`str`): the field's name in its dataclass.
        rule (`str`): what the value must be, as a phrase ("an integer ≥ 1").
        value (`Any`): the value that broke it.
    """

    def __init__(self, field: str, rule: str, value: Any):
        self.field, self.rule, self.value = field, rule, value
        super().__init__(self.message(f"`{field}`"))

    def message(self, name: str) -> str:
        """The error sentence with the field called `name`."""
        return f"{name} must be {self.rule}; got {self.value!r}"


def require(condition: bool, field: str, rule: str, value: Any) -> None:
    """Raise `ConfigFieldError(field, rule, value)` unless `condition` holds."""
    if not condition:
        raise ConfigFieldError(field, rule, value)


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON `true` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
        mixing (`"sinkhorn" | "identity"`): how the streams mix: the Sinkhorn-projected doubly stochastic M (the
            method), or M fixed to the identity (a control: the same side channel without any mixing; `log_mix` is
            then not a parameter at all).
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
    mixing: Literal["sinkhorn", "identity"] = "sinkhorn"
    init_A: Literal["principal", "orthonormal"] = "principal"
    init_seed: int = 0
    log_alpha_min: float = -10.0
    log_alpha_max: float = 2.0
    eps: float = 1e-6

    def __post_init__(self) -> None:
        require(is_int(self.n_streams) and self.n_streams >= 2, "n_streams", "an integer ≥ 2", self.n_streams)
        require(is_int(self.rank) and self.rank > 0, "rank", "a positive integer", self.rank)
        require(
            is_int(self.sinkhorn_iters) and self.sinkhorn_iters > 0,
            "sinkhorn_iters",
            "a positive integer",
            self.sinkhorn_iters,
        )
        require(
            is_number(self.mix_init_diag) and 1.0 / self.n_streams < self.mix_init_diag < 1.0,
            "mix_init_diag",
            f"a number in (1/n_streams, 1) = ({1 / self.n_streams:.3g}, 1)",
            self.mix_init_diag,
        )
        for name in ("read_init", "write_init", "log_alpha_min", "log_alpha_max"):
            require(is_number(getattr(self, name)), name, "a finite number", getattr(self, name))
        require(
            is_number(self.gate_init)
            and self.gate_init > 0
            and self.log_alpha_min <= math.log(self.gate_init) <= self.log_alpha_max,
            "gate_init",
            f"> 0 with ln(gate_init) in [{self.log_alpha_min}, {self.log_alpha_max}]",
            self.gate_init,
        )
        require(self.mixing in ("sinkhorn", "identity"), "mixing", "'sinkhorn' or 'identity'", self.mixing)
        require(self.init_A in ("principal", "orthonormal"), "init_A", "'principal' or 'orthonormal'", self.init_A)
        require(is_int(self.init_seed), "init_seed", "an integer", self.init_seed)
        require(is_number(self.eps) and self.eps > 0, "eps", "a number > 0", self.eps)

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
        require(is_number(self.alpha) and 0 < self.alpha < 1, "alpha", "a number in (0, 1)", self.alpha)
        require(is_number(self.z_thresh) and self.z_thresh > 0, "z_thresh", "a number > 0", self.z_thresh)
        require(
            is_int(self.warmup_steps) and self.warmup_steps >= 1, "warmup_steps", "an integer ≥ 1", self.warmup_steps
        )
        require(
            self.clip_option in ("adaptive_scaling", "mean", "fixed"),
            "clip_option",
            "'adaptive_scaling', 'mean' or 'fixed'",
            self.clip_option,
        )
        require(
            self.max_grad_norm is None or (is_number(self.max_grad_norm) and self.max_grad_norm > 0),
            "max_grad_norm",
            "None or a number > 0",
            self.max_grad_norm,
        )
        require(is_number(self.eps) and self.eps > 0, "eps", "a number > 0", self.eps)
