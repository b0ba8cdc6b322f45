"""The numbers of an ablation run: per-arm figures, deltas vs a baseline, statistics over seeds, spikes.

All numbers come from `StepRecord`s. Non-finite values never reach a summary: a metric that has no finite value is
`None` (so the summaries are strict JSON), and divergence is reported through `diverged` / `diverged_at`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from ..engine.records import EvalRecord, StepRecord
from ..spec.arms import baseline_arm
from .attribution import attribution
from .selection import select_lrs

METRIC_KEYS = (
    "final_test_loss",
    "best_test_loss",
    "final_val_loss",
    "final_loss",
    "final_loss_ema",
    "grad_norm_pre_peak",
    "grad_norm_pre_mean",
    "grad_norm_post_peak",
    "grad_norm_lora_peak",
    "grad_norm_lora_mean",
    "steps_clipped",
    "spike_count",
    "steps",
    "tokens",
    "wall_s",
    "tokens_per_s",
    "memory_mb_peak",
    "trainable_params",
    "spectral_norm",
    "max_rowcol_err",
    "sigma2",
    "dist_from_identity",
    "composite_gain",
    "alpha",
)
# summary key -> key in StepRecord.crma (the runner's mixing diagnostics)
_CRMA_KEYS = {
    "spectral_norm": "sigma1_mean",
    "max_rowcol_err": "max_rowcol_err",
    "sigma2": "sigma2_mean",
    "dist_from_identity": "dist_from_identity_mean",
    "composite_gain": "composite_gain",
    "alpha": "alpha_mean",
}
FINAL_LOSS_EMA_WEIGHT = 0.9


def as_number(v: object) -> float | None:
    """Finite float or None."""
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _finite(values: Iterable[object]) -> list[float]:
    return [x for x in (as_number(v) for v in values) if x is not None]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def check_weight(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
        raise ValueError(f"`{name}` must be a number in [0, 1); got {value!r}")


def smooth(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard-style debiased exponential moving average.

    `s_t = weight · s_{t-1} + (1 − weight) · x_t`, divided by `1 − weight^n` (n = finite values seen so far) so the
    first points are not pulled toward 0. Non-finite inputs give NaN at their position and leave the state unchanged,
    so one NaN does not poison the rest of the curve.

    Args:
        values (`Sequence[float]`): the raw series (NaN/inf/None allowed).
        weight (`float`): smoothing weight in [0, 1); 0 returns the values unchanged (non-finite ones as NaN).

    Returns:
        `list[float]` of the same length.
    """
    check_weight("weight", weight)
    out: list[float] = []
    last, n = 0.0, 0
    for v in values:
        x = as_number(v)
        if x is None:
            out.append(math.nan)
            continue
        last = last * weight + (1.0 - weight) * x
        n += 1
        out.append(last / (1.0 - weight**n))
    return out


def spike_steps(values: Sequence[float], *, window: int = 20, k: float = 6.0) -> list[int]:
    """Indices of upward spikes in a series (e.g. pre-clip gradient norms).

    Our definition (the CRMA author gives none): index `i` is a spike when

        values[i] > m + k · max(MAD, 0.02 · |m|, 1e-12)

    where `m` is the median and `MAD = median(|x − m|)` (unscaled) of the finite values among the previous `window`
    values `values[i - window : i]`. At least `min(window, 5)` finite previous values are required, so the first
    steps are never flagged. The floor `0.02 · |m|` keeps a flat, almost noise-free series from flagging wiggles:
    with k = 6 a value must exceed the local median by at least 12 %. Only upward excursions count; non-finite values
    are never spikes (that is divergence, reported separately) and are left out of the history.

    Args:
        values (`Sequence[float]`): the series, in step order.
        window (`int`): how many previous values form the reference.
        k (`float`): threshold in MADs above the rolling median.

    Returns:
        `list[int]`: 0-based indices into `values`.
    """
    if not (isinstance(window, int) and window >= 1):
        raise ValueError(f"`window` must be an integer >= 1; got {window!r}")
    if not (isinstance(k, (int, float)) and k > 0):
        raise ValueError(f"`k` must be a number > 0; got {k!r}")
    xs = [as_number(v) for v in values]
    need = min(window, 5)
    out = []
    for i, x in enumerate(xs):
        if x is None:
            continue
        prev = [p for p in xs[max(0, i - window) : i] if p is not None]
        if len(prev) < need:
            continue
        m = statistics.median(prev)
        mad = statistics.median(abs(p - m) for p in prev)
        if x > m + k * max(mad, 0.02 * abs(m), 1e-12):
            out.append(i)
    return out


def _heldout(evals: Sequence[EvalRecord], split: str) -> dict[str, Any]:
    """The last and the lowest loss on one split (and their steps) of one arm and seed."""
    points = sorted((e.step, e.loss) for e in evals if e.split == split)
    finite = [(step, loss) for step, loss in points if math.isfinite(loss)]
    if not points:
        return {}
    last_step, last = points[-1]
    best = min(finite, key=lambda p: p[1]) if finite else (None, None)
    return {
        f"final_{split}_loss": last if math.isfinite(last) else None,
        f"final_{split}_step": last_step,
        f"best_{split}_loss": best[1],
        f"best_{split}_step": best[0],
        f"start_{split}_loss": points[0][1] if points[0][0] == 0 and math.isfinite(points[0][1]) else None,
    }


def _gradient_figures(recs: list[StepRecord]) -> dict[str, Any]:
    """Gradient norms of one arm's steps (in step order): pre-clip, post-clip and LoRA's; clipped steps; spikes."""
    pre = [r.grad_norm_pre for r in recs]
    finite_pre = _finite(pre)
    finite_lora = _finite(r.grad_norm_lora for r in recs if r.grad_norm_lora is not None)
    spikes = spike_steps(pre)
    return {
        "grad_norm_pre_peak": max(finite_pre, default=None),
        "grad_norm_pre_mean": _mean(finite_pre),
        "grad_norm_post_peak": max(_finite(r.grad_norm_post for r in recs), default=None),
        "grad_norm_lora_peak": max(finite_lora, default=None),
        "grad_norm_lora_mean": _mean(finite_lora),
        "steps_clipped": sum(bool(r.clipped) for r in recs),
        "spike_count": len(spikes),
        "spike_at": [recs[i].step for i in spikes],
    }


def summarize_arm(
    records: Sequence[StepRecord],
    *,
    trainable_params: int | None = None,
    wall_s: float | None = None,
    evals: Sequence[EvalRecord] = (),
) -> dict[str, Any]:
    """Numbers of one arm of one seed.

    Args:
        records (`Sequence[StepRecord]`): the arm's records (one arm, one seed, any order).
        trainable_params (`int | None`): trainable parameter count of the arm, if known.
        wall_s (`float | None`): the arm's wall time; default the sum of `step_time_s`.
        evals (`Sequence[EvalRecord]`): the arm's held-out evaluations of this seed.

    Returns:
        `dict` with `arm`, `seed`, the held-out figures of each split evaluated (`final_test_loss` at the last
        evaluation, `best_test_loss` the lowest, their steps, `start_test_loss` at step 0; `..._val_...` likewise),
        `final_loss` (last finite training loss), `final_loss_ema` (debiased EMA 0.9 of the loss,
        its last finite value), `grad_norm_pre_peak`, `grad_norm_pre_mean`, `grad_norm_post_peak`, `steps_clipped`,
        `spike_count` and `spike_at` (steps, see `spike_steps`), `steps`, `diverged`, `diverged_at` (first step with
        `diverged` set or a non-finite loss or grad norm), `tokens`, `wall_s`, `tokens_per_s`, `memory_mb_peak`,
        `trainable_params`, and the latest CRMA mixing figures `spectral_norm` (σ₁), `max_rowcol_err`, `sigma2`,
        `dist_from_identity`, `composite_gain`, `alpha` (None for arms without CRMA diagnostics). Metrics with no
        finite value are None.
    """
    if not records:
        raise ValueError("`records` is empty: nothing to summarize")
    arms, seeds = sorted({r.arm for r in records}), sorted({r.seed for r in records})
    if len(arms) > 1 or len(seeds) > 1:
        raise ValueError(f"summarize_arm expects the records of one arm and one seed; got arms {arms}, seeds {seeds}")
    recs = sorted(records, key=lambda r: r.step)
    losses = [r.loss for r in recs]
    finite_loss, ema = _finite(losses), _finite(smooth(losses, FINAL_LOSS_EMA_WEIGHT))
    diverged_at = next(
        (r.step for r in recs if r.diverged or as_number(r.loss) is None or as_number(r.grad_norm_pre) is None), None
    )
    total_s = as_number(wall_s) if wall_s is not None else sum(_finite(r.step_time_s for r in recs))
    tokens = max(int(r.tokens) for r in recs)
    latest = next((r.crma for r in reversed(recs) if r.crma), None) or {}
    out: dict[str, Any] = {
        "arm": arms[0],
        "seed": seeds[0],
        "final_loss": finite_loss[-1] if finite_loss else None,
        "final_loss_ema": ema[-1] if ema else None,
        **_gradient_figures(recs),
        "steps": len(recs),
        "diverged": diverged_at is not None,
        "diverged_at": diverged_at,
        "tokens": tokens,
        "wall_s": total_s,
        "tokens_per_s": tokens / total_s if total_s else None,
        "memory_mb_peak": max(_finite(r.memory_mb for r in recs), default=None),
        "trainable_params": int(trainable_params) if trainable_params is not None else None,
    }
    out.update({key: as_number(latest.get(src)) for key, src in _CRMA_KEYS.items()})
    for split in ("val", "test"):
        out.update(_heldout(evals, split))
    return out


def _deltas(arms: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, dict[str, float | None]]]:
    base = arms[baseline]
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for arm, summ in arms.items():
        if arm == baseline:
            continue
        out[arm] = {}
        for key in METRIC_KEYS:
            a, b = as_number(summ.get(key)), as_number(base.get(key))
            if a is None or b is None:
                continue
            out[arm][key] = {"abs": a - b, "rel_pct": 100.0 * (a - b) / abs(b) if b != 0 else None}
    return out


def _across(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, float | int | None]]:
    """mean, sample std (n − 1; None when n < 2) and n of every numeric metric over seeds."""
    out: dict[str, dict[str, float | int | None]] = {}
    for key in METRIC_KEYS:
        vals = _finite(s.get(key) for s in per_seed)
        if not vals:
            continue
        out[key] = {
            "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "n": len(vals),
        }
    return out


def _by_arm_and_seed(items: Iterable[Any]) -> dict[tuple[str, int], list[Any]]:
    out: dict[tuple[str, int], list[Any]] = {}
    for item in items:
        out.setdefault((item.arm, item.seed), []).append(item)
    return out


def _per_seed(
    records: Sequence[StepRecord], evals: Sequence[EvalRecord], arms: list[str], info: dict[str, dict[str, Any]]
) -> dict[int, dict[str, dict[str, Any]]]:
    """`{seed: {arm: summarize_arm(...)}}` of each arm that has records at each seed. `info`'s `wall_s` is used
    only when there is one seed."""
    by_key, evals_by_key = _by_arm_and_seed(records), _by_arm_and_seed(evals)
    seeds = sorted({seed for _, seed in by_key})
    out: dict[int, dict[str, dict[str, Any]]] = {seed: {} for seed in seeds}
    for seed in seeds:
        for arm in (a for a in arms if (a, seed) in by_key):
            extra = info.get(arm, {})
            out[seed][arm] = summarize_arm(
                by_key[(arm, seed)],
                trainable_params=extra.get("trainable_params"),
                wall_s=extra.get("wall_s") if len(seeds) == 1 else None,
                evals=evals_by_key.get((arm, seed), ()),
            )
    return out


def _mean_arm(arm: str, per_seed: list[dict[str, Any]], stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One arm over seeds: the mean of each metric, `diverged` if any seed did, `diverged_at` the earliest."""
    diverged = [s["diverged_at"] for s in per_seed if s["diverged"]]
    return {
        "arm": arm,
        **{key: stats[key]["mean"] if key in stats else None for key in METRIC_KEYS},
        "diverged": bool(diverged),
        "diverged_at": min(diverged) if diverged else None,
        "n_seeds": len(per_seed),
    }


def summarize_run(
    records: Sequence[StepRecord],
    *,
    baseline: str | None = "lora",
    arm_info: dict[str, dict[str, Any]] | None = None,
    evals: Sequence[EvalRecord] = (),
) -> dict[str, Any]:
    """Summary of a whole run: per-arm numbers, deltas vs the baseline and, with several seeds, seed statistics.

    Args:
        records (`Sequence[StepRecord]`): all records of the run (any arms, any seeds).
        baseline (`str | None`): the arm deltas are taken against; None takes the first arm.
        arm_info (`dict[str, dict] | None`): per arm, optional `trainable_params` and `wall_s`. `wall_s` is used only
            for a single-seed run (per-seed wall time is always the sum of `step_time_s`).
        evals (`Sequence[EvalRecord]`): the held-out evaluations of the run.

    Returns:
        `dict` with `baseline`, `seed_list`, `arms` (`{arm: summarize_arm(...)}`), `deltas`
        (`{arm: {metric: {"abs": x, "rel_pct": y}}}`, arm − baseline, `rel_pct` None when the baseline is 0).
        With several seeds also `seeds` (`{seed: {"arms": ..., "deltas": ...}}`) and `across_seeds`
        (`{arm: {metric: {"mean", "std", "n"}}}`, std is the *sample* std, n − 1), and then `arms` holds the mean
        over seeds of each metric (`diverged` True if any seed diverged, `diverged_at` the earliest, `n_seeds`).
    """
    if not records:
        raise ValueError("`records` is empty: nothing to summarize")
    arms = list(dict.fromkeys(r.arm for r in records))
    if baseline is None:
        baseline = arms[0]
    if baseline not in arms:
        raise ValueError(f"`baseline` {baseline!r} is not an arm of the records; arms present: {arms}")
    info = arm_info or {}
    unknown = sorted(set(info) - set(arms))
    if unknown:
        raise ValueError(f"`arm_info` names arm(s) {unknown} that are not in the records; arms present: {arms}")
    per_seed = _per_seed(records, evals, arms, info)
    summary: dict[str, Any] = {"baseline": baseline, "seed_list": list(per_seed)}
    if len(per_seed) == 1:
        summary["arms"] = next(iter(per_seed.values()))
        summary["deltas"] = _deltas(summary["arms"], baseline)
        return summary
    summary["seeds"] = {
        seed: {"arms": per, "deltas": _deltas(per, baseline) if baseline in per else {}}
        for seed, per in per_seed.items()
    }
    summary["across_seeds"], summary["arms"] = {}, {}
    for arm in arms:
        of_arm = [per[arm] for per in per_seed.values() if arm in per]
        summary["across_seeds"][arm] = stats = _across(of_arm)
        summary["arms"][arm] = _mean_arm(arm, of_arm, stats)
    summary["deltas"] = _deltas(summary["arms"], baseline)
    return summary


def build_summary(
    records: Sequence[StepRecord],
    *,
    labels: list[str],
    receipts: list[dict[str, Any]],
    arm_info: dict[str, dict[str, Any]],
    evals: Sequence[EvalRecord] = (),
) -> dict[str, Any]:
    """`summary.json` of a run: `summarize_run` of its records and evaluations, the baseline, each arm's chosen LR
    (`lr_selection`, on the validation slice), the attribution and the fairness receipt(s).

    Args:
        records (`Sequence[StepRecord]`): every record of the run (may be empty when nothing trained).
        labels (`list[str]`): the run's arm labels (the baseline is chosen from them).
        receipts (`list[dict]`): one fairness receipt per seed that finished its set-up.
        arm_info (`dict[str, dict]`): per arm, `trainable_params` and `wall_s`.
        evals (`Sequence[EvalRecord]`): every held-out evaluation of the run.
    """
    baseline = baseline_arm(labels)
    present = {r.arm for r in records}
    if records:
        info = {arm: v for arm, v in arm_info.items() if arm in present}
        summary = summarize_run(
            records, baseline=baseline if baseline in present else None, arm_info=info, evals=evals
        )
    else:
        summary = {"arms": {}, "deltas": {}, "seed_list": []}
    summary["baseline"] = summary.get("baseline") or baseline
    summary["lr_selection"] = select_lrs(summary)
    summary["attribution"] = attribution(summary)
    summary["receipt"] = receipts[0] if len(receipts) == 1 else {"per_seed": receipts}
    return summary
