"""The arms an ablation can train, what each one declares, and how a run's arm list becomes labels.

An arm is plain LoRA plus what its name adds: `+zclip` (ZClip instead of the fixed norm clip), `+mix` (the CRMA side
channel with the fixed clip), `+crma` (both: the author's recipe), `+crma-nomix` (the author's recipe with the mixing
fixed to the identity: the control that isolates the Sinkhorn mixing), `-matched` (ZClip LoRA at `lora+crma`'s
parameter count: the capacity control). The 2x2 grid of the first four separates what ZClip does from what CRMA does.

An arm may carry a learning-rate multiplier, `lora+crma@x3`: every group of its optimizer (LoRA, CRMA's structural
and gate groups) trains at 3x the run's LRs, so the ratios between the groups stay. `AblationConfig.lr_grid` gives
every arm each multiplier of a grid; labels then always carry one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ArmSpec:
    """What one arm adds to the shared LoRA.

    Args:
        name (`str`): the arm's name, e.g. `lora+crma`.
        crma (`bool`): the CRMA side channel is attached and active.
        zclip (`bool`): ZClip adaptive clipping; otherwise `clip_grad_norm_(max_grad_norm)` as HF Trainer does.
        matched (`bool`): LoRA's rank is raised until its trainable parameters match `lora+crma`'s (capacity control).
        mixing (`str`): the CRMA arms' mixing, `sinkhorn` (the method) or `identity` (M = I: the control).
    """

    name: str
    crma: bool
    zclip: bool
    matched: bool = False
    mixing: str = "sinkhorn"

    def properties(self) -> dict[str, Any]:
        """What this arm declares, as values two arms can differ in (see `PROPERTY_FACETS`)."""
        return {
            "clipper": "zclip" if self.zclip else "fixed",
            "crma": self.crma,
            "mixing": self.mixing if self.crma else None,
            "capacity": "matched" if self.matched else "shared",
        }


# The receipt facets (see `receipt.FACETS`) two arms may differ in when they differ in one declared property.
PROPERTY_FACETS: dict[str, frozenset[str]] = {
    "clipper": frozenset({"clipper"}),
    "crma": frozenset(
        {
            "crma",
            "crma.mixing",
            "optimizer.crma_groups",
            "optimizer.crma_groups.lr",
            "optimizer.crma_groups.steps",
            "trainable.count",
        }
    ),
    "mixing": frozenset({"crma.mixing", "trainable.count"}),
    "capacity": frozenset({"lora.rank", "lora.init", "trainable.count"}),
    "lr_scale": frozenset(
        {"optimizer.lr", "optimizer.steps", "optimizer.crma_groups.lr", "optimizer.crma_groups.steps"}
    ),
}

ARM_SPECS: dict[str, ArmSpec] = {
    spec.name: spec
    for spec in (
        ArmSpec("lora", crma=False, zclip=False),
        ArmSpec("lora+zclip", crma=False, zclip=True),
        ArmSpec("lora+mix", crma=True, zclip=False),
        ArmSpec("lora+crma", crma=True, zclip=True),
        ArmSpec("lora+crma-nomix", crma=True, zclip=True, mixing="identity"),
        ArmSpec("lora-matched", crma=False, zclip=True, matched=True),
    )
}
ARM_NAMES = tuple(ARM_SPECS)
GRID_ARMS = ("lora", "lora+zclip", "lora+mix", "lora+crma")
AUTHOR_ARMS = ("lora", "lora+crma")
# The controls a tuned, held-out answer needs: ZClip LoRA, the capacity control, the identity-mixing control, CRMA.
STUDY_ARMS = ("lora+zclip", "lora-matched", "lora+crma-nomix", "lora+crma")

_ENTRY = re.compile(r"^(?P<name>[a-z+\-]+?)(?:@x(?P<scale>[0-9]*\.?[0-9]+(?:e-?[0-9]+)?))?(?:#(?P<copy>[0-9]+))?$")


@dataclass(frozen=True)
class ArmLabel:
    """A label parsed: `lora+crma@x3#2` is arm `lora+crma` at LR multiplier 3, its second copy (an A/A control).

    Args:
        name (`str`): the arm's name (a key of `ARM_SPECS`).
        lr_scale (`float`): the multiplier of every optimizer group's LR (1 when the label carries none).
        copy (`int`): 1 for the first arm of its kind, 2, 3, ... for A/A copies.
    """

    name: str
    lr_scale: float = 1.0
    copy: int = 1

    @property
    def spec(self) -> ArmSpec:
        """The arm's `ArmSpec`."""
        return ARM_SPECS[self.name]

    def properties(self) -> dict[str, Any]:
        """The declared properties of the arm and its LR multiplier."""
        return {**self.spec.properties(), "lr_scale": self.lr_scale}


def format_scale(scale: float) -> str:
    """`3.0` -> `3`, `0.3` -> `0.3`: the multiplier as labels write it."""
    return f"{scale:g}"


def parse_arm(entry: str) -> ArmLabel:
    """Read an arm entry or label (`lora+crma`, `lora+crma@x3`, `lora#2`); `ValueError` names what is wrong."""
    match = _ENTRY.match(entry) if isinstance(entry, str) else None
    if match is None or match["name"] not in ARM_SPECS:
        raise ValueError(
            f"unknown arm {entry!r}: use one of {list(ARM_SPECS)}, optionally with an LR multiplier such as "
            "'lora+crma@x3'"
        )
    scale = float(match["scale"]) if match["scale"] else 1.0
    if not 0 < scale <= 100:
        raise ValueError(f"the LR multiplier of arm {entry!r} must be in (0, 100]; got {scale:g}")
    return ArmLabel(match["name"], scale, int(match["copy"] or 1))


def arm_labels(arms: list[str], lr_grid: list[float] | None = None) -> list[str]:
    """Unique labels of a run's arms: each arm at each multiplier of `lr_grid` (`lora@x3`; none when the grid is
    just `[1]`), and a repeated arm as an A/A copy `name#2`, `name#3`, ..."""
    grid = list(lr_grid or [1.0])
    entries = []
    for arm in arms:
        if grid == [1.0]:
            entries.append(arm)
        else:
            entries += [f"{parse_arm(arm).name}@x{format_scale(scale)}" for scale in grid]
    seen: dict[str, int] = {}
    labels = []
    for entry in entries:
        seen[entry] = seen.get(entry, 0) + 1
        labels.append(entry if seen[entry] == 1 else f"{entry}#{seen[entry]}")
    return labels


def arm_name(label: str) -> str:
    """The arm a label stands for (`lora#2` -> `lora`, `lora+crma@x3` -> `lora+crma`)."""
    return parse_arm(label).name


def baseline_arm(labels: list[str]) -> str:
    """The arm every other arm is compared with: `lora` (at multiplier 1) when present, else `lora+zclip`, else the
    first arm."""
    if not labels:
        raise ValueError("`labels` is empty: a run has at least one arm")
    for name in ("lora", "lora+zclip"):
        for label in labels:
            parsed = parse_arm(label)
            if parsed.name == name and parsed.copy == 1 and parsed.lr_scale == 1.0:
                return label
    return labels[0]


def allowed_facets(a: str, b: str) -> frozenset[str]:
    """The receipt facets arms `a` and `b` may differ in: those of every property their labels declare differently."""
    pa, pb = parse_arm(a).properties(), parse_arm(b).properties()
    out: set[str] = set()
    for prop, value in pa.items():
        if pb[prop] != value:
            out |= PROPERTY_FACETS[prop]
    return frozenset(out)
