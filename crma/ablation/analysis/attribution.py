"""Attribution: what each part of CRMA did, measured by contrasts between arms, paired by seed, with intervals.

Every contrast is a weighted difference of arms that share everything but what the contrast names (the receipt holds
that). The 2x2 grid gives main effects and an interaction; the controls give single differences:

    zclip        = ((lora+zclip - lora) + (lora+crma - lora+mix)) / 2        ZClip, averaged over CRMA off / on
    crma         = ((lora+mix - lora) + (lora+crma - lora+zclip)) / 2         CRMA's side channel, over ZClip off / on
    interaction  = (lora+crma - lora+mix) - (lora+zclip - lora)               how much more ZClip does with CRMA on
    crma_with_zclip = lora+crma - lora+zclip                                  the whole adapter, the clipper the same
    sinkhorn     = lora+crma - lora+crma-nomix                                the doubly stochastic mixing itself
    side_channel = lora+crma-nomix - lora+zclip                               the side channel with M = I
    capacity     = lora-matched - lora+zclip                                  more LoRA rank, as many parameters
    crma_vs_capacity = lora+crma - lora-matched                               CRMA against an equally big LoRA

For each metric y and seed the contrast is computed from that seed's arms (they share its batches and initial
weights); over n >= 2 seeds it is reported as its mean and a 95 % Student-t interval (mean ± t(0.975, n-1) · sd /
sqrt(n), sd the sample standard deviation); with one seed no interval can be given, and the sentences say so.

A run whose arms trained at several LR multipliers is attributed twice: with each arm at its chosen LR
(`lr_selection`, chosen on the validation slice) and with every arm at multiplier 1 (the shared LR). The primary
outcome is the final held-out (test) loss when the run evaluated one, else the training loss (EMA), and every block
says which.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from .selection import lr_variants, per_seed_arms

# (summary key, how a sentence names it, train / held-out)
HEADLINE_METRICS = (
    ("final_test_loss", "final held-out (test) loss", "held-out"),
    ("final_loss_ema", "final training loss (EMA 0.9)", "training"),
    ("grad_norm_lora_peak", "peak LoRA-only grad norm", "training"),
    ("grad_norm_lora_mean", "mean LoRA-only grad norm", "training"),
    ("grad_norm_pre_peak", "peak global pre-clip grad norm (CRMA's own parameters included)", "training"),
    ("steps_clipped", "number of clipped steps", "training"),
    ("spike_count", "number of grad-norm spikes", "training"),
)


@dataclass(frozen=True)
class Contrast:
    """One comparison between arms: `sum(weight * y[arm])` per seed.

    Args:
        key (`str`): its key in `summary.json`.
        name (`str`): how a sentence names what it measures.
        weights (`dict[str, float]`): arm name -> weight (they sum to 0).
    """

    key: str
    name: str
    weights: dict[str, float]

    @property
    def definition(self) -> str:
        """The contrast as a formula of arm names."""
        terms = [f"{'+' if w > 0 else '-'} {abs(w):g}·{arm}" for arm, w in self.weights.items()]
        return " ".join(terms).removeprefix("+ ")


CONTRASTS = (
    Contrast("zclip", "ZClip", {"lora+zclip": 0.5, "lora": -0.5, "lora+crma": 0.5, "lora+mix": -0.5}),
    Contrast("crma", "CRMA's side channel", {"lora+mix": 0.5, "lora": -0.5, "lora+crma": 0.5, "lora+zclip": -0.5}),
    Contrast(
        "interaction",
        "the ZClip × CRMA interaction",
        {"lora+crma": 1.0, "lora+mix": -1.0, "lora+zclip": -1.0, "lora": 1.0},
    ),
    Contrast("crma_with_zclip", "CRMA (lora+crma vs ZClip LoRA)", {"lora+crma": 1.0, "lora+zclip": -1.0}),
    Contrast("sinkhorn", "the Sinkhorn mixing (lora+crma vs M = I)", {"lora+crma": 1.0, "lora+crma-nomix": -1.0}),
    Contrast(
        "side_channel", "the side channel with M = I (vs ZClip LoRA)", {"lora+crma-nomix": 1.0, "lora+zclip": -1.0}
    ),
    Contrast("capacity", "LoRA's extra rank (lora-matched vs ZClip LoRA)", {"lora-matched": 1.0, "lora+zclip": -1.0}),
    Contrast("crma_vs_capacity", "CRMA against the capacity control", {"lora+crma": 1.0, "lora-matched": -1.0}),
)


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom (scipy's)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"need 0 < p < 1 and df >= 1; got p={p}, df={df}")
    from scipy.stats import t as student_t  # imported when an interval is drawn: scipy takes a while to import

    return float(student_t.ppf(p, df))


# ---------------------------------------------------------------------------------------------------------------------
# Effects


def contrast_value(contrast: Contrast, values: dict[str, float]) -> float:
    """The contrast of one seed's values (`{arm name: y}`)."""
    return sum(weight * values[arm] for arm, weight in contrast.weights.items())


def interval(samples: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean, sample sd and a two-sided Student-t interval over paired per-seed effects (None below two samples)."""
    n = len(samples)
    mean = statistics.fmean(samples) if samples else None
    if n < 2:
        return {"mean": mean, "sd": None, "ci95": None, "n": n}
    sd = statistics.stdev(samples)
    half = t_quantile(0.5 + level / 2.0, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "ci95": [mean - half, mean + half], "n": n}


def _number(value: float) -> str:
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def sentence(name: str, label: str, stats: dict[str, Any]) -> str:
    """One plain sentence the numbers support about what `name` did to the metric `label`."""
    mean, n = stats["mean"], stats["n"]
    if mean is None:
        return f"No value of the {label} in every arm: the effect of {name} cannot be estimated."
    if stats["ci95"] is None:
        change = "did not change" if mean == 0 else f"{'raised' if mean > 0 else 'lowered'}"
        by = "" if mean == 0 else f" by {_number(abs(mean))}"
        return f"On one seed, {name} {change} the {label}{by}; no interval can be given with one seed."
    lo, hi = stats["ci95"]
    ci = f"95 % CI {_number(lo)} – {_number(hi)}, {n} seeds"
    if lo <= 0 <= hi:
        return f"No effect of {name} on the {label} is detectable at {n} seeds (mean {_number(mean)}; {ci})."
    verb = "raised" if mean > 0 else "lowered"
    return f"{name[0].upper() + name[1:]} {verb} the {label} by {_number(abs(mean))} ({ci})."


def comparison_sets(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Which label stands for each arm in each comparison: `best_lr` (each arm at its chosen multiplier) and
    `shared_lr` (every arm at multiplier 1) for a tuned run, else one set `as_run`."""
    per_seed = per_seed_arms(summary)
    labels = list(dict.fromkeys(label for arms in per_seed.values() for label in arms))
    variants = lr_variants(labels)
    selection = summary.get("lr_selection") or {}
    if not selection.get("tuned"):
        scales = {next(iter(v)) for v in variants.values()}
        how = "shared LR" if scales <= {1.0} else "each arm at the LR multiplier it was given"
        return {"as_run": {"labels": {name: next(iter(v.values())) for name, v in variants.items()}, "lr": how}}
    chosen = {name: info["label"] for name, info in selection["arms"].items() if info.get("label")}
    # An arm without a choice (no finite validation loss at any multiplier) takes part in no best-LR contrast.
    best = {name: chosen[name] for name in variants if name in chosen}
    out = {"best_lr": {"labels": best, "lr": "each arm at its own best LR (chosen on the validation slice)"}}
    if all(1.0 in v for v in variants.values()):
        out["shared_lr"] = {"labels": {name: v[1.0] for name, v in variants.items()}, "lr": "shared LR (×1)"}
    return out


def _contrasts(per_seed: dict[int, dict[str, dict[str, Any]]], labels: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for contrast in CONTRASTS:
        if not all(arm in labels for arm in contrast.weights):
            continue
        metrics: dict[str, Any] = {}
        for key, label, kind in HEADLINE_METRICS:
            samples, seeds = [], []
            for seed, arms in per_seed.items():
                values = {arm: (arms.get(labels[arm]) or {}).get(key) for arm in contrast.weights}
                if any(v is None or not math.isfinite(v) for v in values.values()):
                    continue  # an arm without this figure (diverged, or not evaluated): the seed cannot be paired
                seeds.append(seed)
                samples.append(contrast_value(contrast, values))
            if not seeds:
                continue
            stats = interval(samples)
            metrics[key] = {
                "label": label,
                "kind": kind,
                "seeds": seeds,
                "per_seed": samples,
                **stats,
                "sentence": sentence(contrast.name, label, stats),
            }
        out[contrast.key] = {
            "name": contrast.name,
            "definition": contrast.definition,
            "arms": {arm: labels[arm] for arm in contrast.weights},
            "metrics": metrics,
        }
    return out


def attribution(summary: dict[str, Any]) -> dict[str, Any]:
    """The `attribution` block of `summary.json`: every contrast the run's arms allow, per comparison set, per
    headline metric: per seed, and as mean with a 95 % interval over seeds.

    Args:
        summary (`dict`): `summarize_run(...)` of a run, with its `lr_selection`.

    Returns:
        `dict` with `available` (False, with `reason`, when no contrast can be formed), `primary` (the primary
        metric's key: the final test loss when evaluated, else the training loss), `primary_kind` (`held-out` /
        `training`), `n_seeds`, `sets` (`{set: {"labels", "lr", "contrasts": {key: {"name", "definition", "arms",
        "metrics": {metric: {"label", "kind", "per_seed", "mean", "sd", "ci95", "n", "sentence"}}}}}}`).
    """
    per_seed = per_seed_arms(summary)
    sets = {}
    for name, chosen in comparison_sets(summary).items():
        contrasts = _contrasts(per_seed, chosen["labels"])
        if contrasts:
            sets[name] = {**chosen, "contrasts": contrasts}
    if not sets:
        present = sorted({label for arms in per_seed.values() for label in arms})
        return {
            "available": False,
            "reason": (
                f"no contrast can be formed from the arms {present}: the 2×2 grid (lora, lora+zclip, lora+mix, "
                "lora+crma) or a pair of lora+zclip, lora+crma, lora+crma-nomix and lora-matched that differ in one "
                "thing is needed"
            ),
        }
    heldout = any("final_test_loss" in c["metrics"] for block in sets.values() for c in block["contrasts"].values())
    return {
        "available": True,
        "primary": "final_test_loss" if heldout else "final_loss_ema",
        "primary_kind": "held-out" if heldout else "training",
        "n_seeds": len(per_seed),
        "sets": sets,
    }
