"""The arms an ablation can train, and how a run's arm list becomes labels.

An arm is plain LoRA plus what its name adds: `+zclip` (ZClip instead of the fixed norm clip), `+mix` (the CRMA side
channel with the fixed clip), `+crma` (both: the author's recipe). The 2x2 grid of these four separates what ZClip
does from what the mixing does.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArmSpec:
    """What one arm adds to the shared LoRA.

    Args:
        name (`str`): the arm's name, e.g. `lora+crma`.
        crma (`bool`): the CRMA side channel is attached and active.
        zclip (`bool`): ZClip adaptive clipping; otherwise `clip_grad_norm_(max_grad_norm)` as HF Trainer does.
        description (`str`): one line for the UI and the docs.
        matched (`bool`): LoRA's rank is raised until its trainable parameters match `lora+crma`'s (capacity control).
    """

    name: str
    crma: bool
    zclip: bool
    description: str
    matched: bool = False

    @property
    def declares(self) -> frozenset[str]:
        """The receipt facets this arm may differ in from plain `lora` (see `receipt.FACETS`)."""
        facets: set[str] = set()
        if self.zclip:
            facets.add("clipper")
        if self.crma:
            facets |= {"crma", "optimizer.crma_groups", "optimizer.crma_groups.steps", "trainable.count"}
        if self.matched:
            facets |= {"lora.rank", "lora.init", "trainable.count"}
        return frozenset(facets)


ARM_SPECS: dict[str, ArmSpec] = {
    spec.name: spec
    for spec in (
        ArmSpec("lora", crma=False, zclip=False, description="PiSSA LoRA with the fixed norm clip (HF Trainer's)"),
        ArmSpec("lora+zclip", crma=False, zclip=True, description="LoRA with ZClip instead of the fixed clip"),
        ArmSpec("lora+mix", crma=True, zclip=False, description="LoRA + CRMA's mixing, with the fixed clip"),
        ArmSpec("lora+crma", crma=True, zclip=True, description="LoRA + CRMA + ZClip: the author's recipe"),
        ArmSpec(
            "lora-matched",
            crma=False,
            zclip=True,
            matched=True,
            description="capacity control: ZClip LoRA with its rank raised to lora+crma's parameter count",
        ),
    )
}
ARM_NAMES = tuple(ARM_SPECS)
GRID_ARMS = ("lora", "lora+zclip", "lora+mix", "lora+crma")
AUTHOR_ARMS = ("lora", "lora+crma")
STUDY_ARMS = (*GRID_ARMS, "lora-matched")


def arm_labels(arms: list[str]) -> list[str]:
    """Unique labels for the requested arms: a repeated arm becomes an A/A copy `name#2`, `name#3`, ..."""
    seen: dict[str, int] = {}
    labels = []
    for arm in arms:
        seen[arm] = seen.get(arm, 0) + 1
        labels.append(arm if seen[arm] == 1 else f"{arm}#{seen[arm]}")
    return labels


def arm_name(label: str) -> str:
    """The arm a label stands for (`lora#2` -> `lora`)."""
    return label.partition("#")[0]


def baseline_arm(labels: list[str]) -> str:
    """The arm every other arm is compared with: `lora` when present, else the first arm."""
    if not labels:
        raise ValueError("`labels` is empty: a run has at least one arm")
    return "lora" if "lora" in labels else labels[0]
