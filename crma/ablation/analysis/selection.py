"""Each arm's learning rate, chosen as the field does: every arm trains at every multiplier of a small grid, and the
multiplier with the lowest mean final *validation* loss over the seeds is the arm's. The test slice never takes part:
it reports the chosen LRs (`receipt.check_selection` recomputes the choice from the raw evaluations)."""

from __future__ import annotations

import math
import statistics
from typing import Any

from ..spec.arms import parse_arm

SELECTION_SPLIT = "val"
SELECTION_METRIC = "final_val_loss"


def per_seed_arms(summary: dict[str, Any]) -> dict[int, dict[str, dict[str, Any]]]:
    """`{seed: {arm label: per-arm figures}}` of a summary, one seed or several."""
    if "seeds" in summary:
        return {int(seed): block["arms"] for seed, block in summary["seeds"].items()}
    seeds = summary.get("seed_list") or [None]
    return {seeds[0]: summary.get("arms", {})}


def lr_variants(labels: list[str]) -> dict[str, dict[float, str]]:
    """`{arm name: {LR multiplier: label}}` of the first copy of each arm (A/A copies are controls, not variants)."""
    out: dict[str, dict[float, str]] = {}
    for label in labels:
        parsed = parse_arm(label)
        if parsed.copy == 1:
            out.setdefault(parsed.name, {})[parsed.lr_scale] = label
    return out


def _grid_point(label: str, scale: float, per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, Any]:
    values = [(arms.get(label) or {}).get(SELECTION_METRIC) for arms in per_seed.values()]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    # A seed without a finite validation loss (the arm diverged) rules the multiplier out: it is not a candidate.
    complete = len(finite) == len(values) and bool(values)
    return {
        "lr_scale": scale,
        "label": label,
        "per_seed": values,
        "mean": statistics.fmean(finite) if complete else None,
        "sd": statistics.stdev(finite) if complete and len(finite) > 1 else None,
        "n": len(finite),
    }


def select_lrs(summary: dict[str, Any]) -> dict[str, Any]:
    """The `lr_selection` block of `summary.json`: for each arm trained at several LR multipliers, the mean final
    validation loss at each and the chosen one (the lowest mean; a tie goes to the multiplier nearest 1).

    Returns:
        `dict` with `tuned` (False when no arm has several multipliers), `split` (`val`), `metric`, and `arms`:
        `{name: {"chosen": multiplier | None, "label", "at_edge", "grid": [{"lr_scale", "label", "mean", "sd",
        "per_seed", "n"}], "reason"?}}`.
    """
    per_seed = per_seed_arms(summary)
    labels = list(dict.fromkeys(label for arms in per_seed.values() for label in arms))
    variants = {name: scales for name, scales in lr_variants(labels).items() if len(scales) > 1}
    if not variants:
        return {"tuned": False}
    arms: dict[str, Any] = {}
    for name, scales in variants.items():
        grid = [_grid_point(label, scale, per_seed) for scale, label in sorted(scales.items())]
        candidates = [p for p in grid if p["mean"] is not None]
        if not candidates:
            arms[name] = {
                "chosen": None,
                "label": None,
                "at_edge": False,
                "grid": grid,
                "reason": "no multiplier has a finite validation loss in every seed",
            }
            continue
        best = min(candidates, key=lambda p: (p["mean"], abs(math.log(p["lr_scale"]))))
        edge = best["lr_scale"] in (grid[0]["lr_scale"], grid[-1]["lr_scale"])
        arms[name] = {"chosen": best["lr_scale"], "label": best["label"], "at_edge": edge, "grid": grid}
    return {"tuned": True, "split": SELECTION_SPLIT, "metric": SELECTION_METRIC, "arms": arms}
