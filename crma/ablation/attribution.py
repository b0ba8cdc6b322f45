"""Attribution over the 2x2 grid: how much of a difference is ZClip's, how much the mixing's, and how sure we are.

The four arms form a factorial design with two factors, ZClip (Z) and the mixing (X):

    lora: Z=0 X=0    lora+zclip: Z=1 X=0    lora+mix: Z=0 X=1    lora+crma: Z=1 X=1

For each headline metric y and each seed (every arm of a seed shares its batches, so effects are paired by seed):

    ZClip main effect   = ((y[lora+zclip] - y[lora]) + (y[lora+crma] - y[lora+mix])) / 2
    mixing main effect  = ((y[lora+mix] - y[lora]) + (y[lora+crma] - y[lora+zclip])) / 2
    interaction         = (y[lora+crma] - y[lora+mix]) - (y[lora+zclip] - y[lora])

i.e. the interaction is how much more ZClip changes y when the mixing is on. Over n >= 2 seeds an effect is reported
as its mean and a 95 % Student-t interval (mean ± t(0.975, n-1) · sd / sqrt(n), sd the sample standard deviation);
with one seed no interval can be given, and the sentences say so.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

GRID = {"lora": (0, 0), "lora+zclip": (1, 0), "lora+mix": (0, 1), "lora+crma": (1, 1)}
# (summary key, how a sentence names it)
HEADLINE_METRICS = (
    ("final_loss_ema", "final loss (EMA 0.9)"),
    ("grad_norm_lora_peak", "peak LoRA-only grad norm"),
    ("grad_norm_lora_mean", "mean LoRA-only grad norm"),
    ("grad_norm_pre_peak", "peak global pre-clip grad norm (CRMA's own parameters included)"),
    ("steps_clipped", "number of clipped steps"),
    ("spike_count", "number of grad-norm spikes"),
)
EFFECTS = ("zclip", "mixing", "interaction")
_EFFECT_NAMES = {"zclip": "ZClip", "mixing": "the mixing", "interaction": "the ZClip × mixing interaction"}


# ---------------------------------------------------------------------------------------------------------------------
# Student's t quantile (no scipy needed): the regularized incomplete beta by Lentz's continued fraction, inverted by
# bisection. Exact to ~1e-10, which tests check against the printed table.


def _betacf(a: float, b: float, x: float) -> float:
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with `df` degrees of freedom."""
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The `p` quantile of Student's t with `df` degrees of freedom (bisection on `t_cdf`)."""
    if not 0.0 < p < 1.0 or df < 1:
        raise ValueError(f"need 0 < p < 1 and df >= 1; got p={p}, df={df}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


# ---------------------------------------------------------------------------------------------------------------------
# Effects


def grid_effects(values: dict[str, float]) -> dict[str, float]:
    """The ZClip and mixing main effects and their interaction from one seed's four grid arms."""
    base, z, x, zx = (values[arm] for arm in ("lora", "lora+zclip", "lora+mix", "lora+crma"))
    return {
        "zclip": ((z - base) + (zx - x)) / 2.0,
        "mixing": ((x - base) + (zx - z)) / 2.0,
        "interaction": (zx - x) - (z - base),
    }


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


def sentence(effect: str, label: str, stats: dict[str, Any]) -> str:
    """One plain sentence the numbers support."""
    name, mean, n = _EFFECT_NAMES[effect], stats["mean"], stats["n"]
    if mean is None:
        return f"No value of the {label} in every grid arm: {name} cannot be estimated."
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


def _per_seed_arms(summary: dict[str, Any]) -> dict[int, dict[str, dict[str, Any]]]:
    if "seeds" in summary:
        return {int(seed): block["arms"] for seed, block in summary["seeds"].items()}
    seeds = summary.get("seed_list") or [None]
    return {seeds[0]: summary.get("arms", {})}


def attribution(summary: dict[str, Any]) -> dict[str, Any]:
    """The `attribution` block of `summary.json`: per headline metric, the ZClip and mixing main effects and their
    interaction, per seed and as mean with a 95 % interval over seeds.

    Args:
        summary (`dict`): `summarize_run(...)` of a run.

    Returns:
        `dict` with `available` (False, with `reason`, unless all four grid arms ran), `n_seeds`, `definition`,
        `metrics` (`{metric: {"label", "zclip" | "mixing" | "interaction": {"per_seed", "mean", "sd", "ci95", "n",
        "sentence"}}}`).
    """
    per_seed = _per_seed_arms(summary)
    arms_present = set().union(*(set(arms) for arms in per_seed.values())) if per_seed else set()
    missing = [arm for arm in GRID if arm not in arms_present]
    if missing:
        return {
            "available": False,
            "reason": f"attribution needs the four grid arms {list(GRID)}; this run lacks {missing}",
        }
    metrics: dict[str, Any] = {}
    for key, label in HEADLINE_METRICS:
        samples: dict[str, list[float]] = {effect: [] for effect in EFFECTS}
        seeds_used = []
        for seed, arms in per_seed.items():
            values = {arm: (arms.get(arm) or {}).get(key) for arm in GRID}
            if any(v is None or not math.isfinite(v) for v in values.values()):
                continue  # an arm without this figure (e.g. diverged before it): the seed cannot be paired
            seeds_used.append(seed)
            for effect, value in grid_effects(values).items():
                samples[effect].append(value)
        entry: dict[str, Any] = {"label": label, "seeds": seeds_used}
        for effect in EFFECTS:
            stats = interval(samples[effect])
            entry[effect] = {"per_seed": samples[effect], **stats, "sentence": sentence(effect, label, stats)}
        metrics[key] = entry
    return {
        "available": True,
        "n_seeds": len(per_seed),
        "definition": (
            "paired by seed; ZClip effect = mean over mixing off/on of (with ZClip − without); mixing effect = "
            "mean over ZClip off/on of (with mixing − without); interaction = (lora+crma − lora+mix) − "
            "(lora+zclip − lora); 95 % Student-t interval over seeds"
        ),
        "metrics": metrics,
    }
