"""Summaries and report files of an ablation run: per-arm numbers, deltas vs a baseline, seed statistics,
the Markdown table, a self-contained HTML report, PNG charts and `metrics.jsonl`.

All numbers come from `StepRecord`s. Non-finite values never reach a summary: a metric that has no finite value is
`None` (so the summaries are strict JSON), and divergence is reported through `diverged` / `diverged_at`.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from crma.ablation.config import StepRecord
from crma.ablation.plots import (
    make_delta_figure,
    make_grad_norm_figure,
    make_loss_figure,
    make_mixing_figure,
    smooth,
)

# Numeric metrics of `summarize_arm` that get deltas vs the baseline and across-seed statistics, in table order.
METRIC_KEYS = (
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
_DASH = "–"
_CHROMIUM = "/usr/bin/chromium"


def _num(v: object) -> float | None:
    """Finite float or None."""
    try:
        x = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _finite(values: Iterable[object]) -> list[float]:
    return [x for x in (_num(v) for v in values) if x is not None]


# ----------------------------------------------------------------------------------------------------------------
# numbers


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
    xs = [_num(v) for v in values]
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


def summarize_arm(
    records: Sequence[StepRecord], *, trainable_params: int | None = None, wall_s: float | None = None
) -> dict[str, Any]:
    """Numbers of one arm of one seed.

    Args:
        records (`Sequence[StepRecord]`): the arm's records (one arm, one seed, any order).
        trainable_params (`int | None`): trainable parameter count of the arm, if known.
        wall_s (`float | None`): the arm's wall time; default the sum of `step_time_s`.

    Returns:
        `dict` with `arm`, `seed`, `final_loss` (last finite loss), `final_loss_ema` (debiased EMA 0.9 of the loss,
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
    pre = [r.grad_norm_pre for r in recs]
    finite_loss, finite_pre = _finite(losses), _finite(pre)
    finite_post = _finite(r.grad_norm_post for r in recs)
    finite_lora = _finite(r.grad_norm_lora for r in recs if r.grad_norm_lora is not None)
    ema = _finite(smooth(losses, FINAL_LOSS_EMA_WEIGHT))
    diverged_at = next(
        (r.step for r in recs if r.diverged or _num(r.loss) is None or _num(r.grad_norm_pre) is None), None
    )
    spikes = spike_steps(pre)
    total_s = _num(wall_s) if wall_s is not None else sum(_finite(r.step_time_s for r in recs))
    tokens = max(int(r.tokens) for r in recs)
    latest = next((r.crma for r in reversed(recs) if r.crma), None) or {}
    out: dict[str, Any] = {
        "arm": arms[0],
        "seed": seeds[0],
        "final_loss": finite_loss[-1] if finite_loss else None,
        "final_loss_ema": ema[-1] if ema else None,
        "grad_norm_pre_peak": max(finite_pre) if finite_pre else None,
        "grad_norm_pre_mean": sum(finite_pre) / len(finite_pre) if finite_pre else None,
        "grad_norm_post_peak": max(finite_post) if finite_post else None,
        "grad_norm_lora_peak": max(finite_lora) if finite_lora else None,
        "grad_norm_lora_mean": sum(finite_lora) / len(finite_lora) if finite_lora else None,
        "steps_clipped": sum(bool(r.clipped) for r in recs),
        "spike_count": len(spikes),
        "spike_at": [recs[i].step for i in spikes],
        "steps": len(recs),
        "diverged": diverged_at is not None,
        "diverged_at": diverged_at,
        "tokens": tokens,
        "wall_s": total_s,
        "tokens_per_s": tokens / total_s if total_s else None,
        "memory_mb_peak": max(_finite(r.memory_mb for r in recs), default=None),
        "trainable_params": int(trainable_params) if trainable_params is not None else None,
    }
    out.update({key: _num(latest.get(src)) for key, src in _CRMA_KEYS.items()})
    return out


def _deltas(arms: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, dict[str, float | None]]]:
    base = arms[baseline]
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for arm, summ in arms.items():
        if arm == baseline:
            continue
        out[arm] = {}
        for key in METRIC_KEYS:
            a, b = _num(summ.get(key)), _num(base.get(key))
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


def summarize_run(
    records: Sequence[StepRecord], *, baseline: str | None = "lora", arm_info: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Summary of a whole run: per-arm numbers, deltas vs the baseline and, with several seeds, seed statistics.

    Args:
        records (`Sequence[StepRecord]`): all records of the run (any arms, any seeds).
        baseline (`str | None`): the arm deltas are taken against; None takes the first arm.
        arm_info (`dict[str, dict] | None`): per arm, optional `trainable_params` and `wall_s`. `wall_s` is used only
            for a single-seed run (per-seed wall time is always the sum of `step_time_s`).

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
    seeds = sorted({r.seed for r in records})
    by_key: dict[tuple[str, int], list[StepRecord]] = {}
    for r in records:
        by_key.setdefault((r.arm, r.seed), []).append(r)

    def seed_arms(seed: int, with_wall: bool) -> dict[str, dict[str, Any]]:
        out = {}
        for arm in arms:
            if (arm, seed) not in by_key:
                continue
            extra = info.get(arm, {})
            out[arm] = summarize_arm(
                by_key[(arm, seed)],
                trainable_params=extra.get("trainable_params"),
                wall_s=extra.get("wall_s") if with_wall else None,
            )
        return out

    summary: dict[str, Any] = {"baseline": baseline, "seed_list": seeds}
    if len(seeds) == 1:
        summary["arms"] = seed_arms(seeds[0], with_wall=True)
        summary["deltas"] = _deltas(summary["arms"], baseline)
        return summary

    summary["seeds"] = {}
    for seed in seeds:
        per = seed_arms(seed, with_wall=False)
        summary["seeds"][seed] = {"arms": per, "deltas": _deltas(per, baseline) if baseline in per else {}}
    summary["across_seeds"], summary["arms"] = {}, {}
    for arm in arms:
        per_seed = [s["arms"][arm] for s in summary["seeds"].values() if arm in s["arms"]]
        stats = _across(per_seed)
        summary["across_seeds"][arm] = stats
        diverged = [s["diverged_at"] for s in per_seed if s["diverged"]]
        mean = {key: stats[key]["mean"] if key in stats else None for key in METRIC_KEYS}
        summary["arms"][arm] = {
            "arm": arm,
            **mean,
            "diverged": bool(diverged),
            "diverged_at": min(diverged) if diverged else None,
            "n_seeds": len(per_seed),
        }
    summary["deltas"] = _deltas(summary["arms"], baseline)
    return summary


# ----------------------------------------------------------------------------------------------------------------
# Markdown / HTML tables


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


# (row label, summary key, formatter)
_ROWS = (
    ("Final loss", "final_loss", lambda x: f"{x:.4f}"),
    ("Final loss (EMA)", "final_loss_ema", lambda x: f"{x:.4f}"),
    ("Peak grad norm (pre-clip)", "grad_norm_pre_peak", lambda x: f"{x:.2f}"),
    ("Peak grad norm (post-clip)", "grad_norm_post_peak", lambda x: f"{x:.2f}"),
    ("Mean grad norm", "grad_norm_pre_mean", lambda x: f"{x:.2f}"),
    ("Peak LoRA-only grad norm", "grad_norm_lora_peak", lambda x: f"{x:.2f}"),
    ("Mean LoRA-only grad norm", "grad_norm_lora_mean", lambda x: f"{x:.2f}"),
    ("Steps clipped", "steps_clipped", _fmt_int),
    ("Gradient spikes", "spike_count", _fmt_int),
    ("Spectral norm ‖M‖₂", "spectral_norm", lambda x: f"{x:.6f}"),
    ("Max row/col error", "max_rowcol_err", lambda x: f"{x:.1e}"),
    ("σ₂", "sigma2", lambda x: f"{x:.4f}"),
    ("‖M − I‖_F", "dist_from_identity", lambda x: f"{x:.4f}"),
    ("Composite gain", "composite_gain", lambda x: f"{x:.4f}"),
    ("Trainable params", "trainable_params", _fmt_int),
    ("Wall time", "wall_s", lambda x: f"{x:.1f} s"),
    ("Tokens/s", "tokens_per_s", lambda x: f"{x:,.1f}"),
)


def _cell(summ: dict[str, Any], key: str, fmt: Any) -> str:
    value = _num(summ.get(key))
    if value is None:
        return _DASH
    text = fmt(value)
    if key == "final_loss" and summ.get("diverged"):
        text += f" (diverged @ {summ['diverged_at']})"
    return text


def _delta_cell(delta: dict[str, float | None] | None) -> str:
    if not delta:
        return _DASH
    if delta["rel_pct"] is not None:
        return f"{delta['rel_pct']:+.1f}%"
    return f"{delta['abs']:+.4g}"


def _main_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    arms, base = list(summary["arms"]), summary["baseline"]
    others = [a for a in arms if a != base]
    header = ["Metric", *arms] + (["Delta"] if len(others) == 1 else [f"Δ {a}" for a in others])
    rows = []
    for label, key, fmt in _ROWS:
        row = [label] + [_cell(summary["arms"][a], key, fmt) for a in arms]
        row += [_delta_cell(summary["deltas"].get(a, {}).get(key)) for a in others]
        rows.append(row)
    return header, rows


def _seed_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    arms, n_seeds = list(summary["arms"]), len(summary["seed_list"])
    rows = []
    for label, key, fmt in _ROWS:
        row = [label]
        for arm in arms:
            stat = summary["across_seeds"][arm].get(key)
            if stat is None:
                row.append(_DASH)
                continue
            std = _DASH if stat["std"] is None else fmt(stat["std"]).removesuffix(" s")
            # n is in the heading; a cell names it only when some seeds had no value (e.g. diverged before it).
            row.append(f"{fmt(stat['mean'])} ± {std}" + (f" (n={stat['n']})" if stat["n"] < n_seeds else ""))
        rows.append(row)
    return ["Metric", *arms], rows


def _notes(summary: dict[str, Any]) -> list[str]:
    base, arms = summary["baseline"], summary["arms"]
    notes = []
    if any(_num(s.get("spectral_norm")) is not None for s in arms.values()):
        notes.append(
            "‖M‖₂ = 1 holds for every doubly stochastic matrix (the identity and full averaging alike), "
            "so it only confirms that Sinkhorn converged; σ₂ (1 = no mixing, 0 = full averaging), "
            "‖M − I‖_F and the composite gain say how much the streams actually mix."
        )
    if "seeds" in summary:
        counts = []
        for arm in arms:
            if arm == base:
                continue
            pairs = [s["deltas"].get(arm, {}).get("final_loss") for s in summary["seeds"].values()]
            pairs = [p for p in pairs if p]
            counts.append(f"{arm} in {sum(p['abs'] < 0 for p in pairs)} of {len(pairs)} seeds")
        notes.append(
            f"Final loss lower than {base}: {'; '.join(counts)}. A loss delta is noise unless the seeds agree."
        )
    elif len(arms) > 1:
        notes.append("One seed only: a loss delta of a few tenths of a percent is noise unless several seeds agree.")
    notes.append(
        "Grad norms are before clipping. ZClip arms clip spikes directly, so compare with lora+zclip before "
        "crediting the mixing with a lower peak."
    )
    if any(arm_summary.get("grad_norm_lora_peak") is not None for arm_summary in arms.values()):
        notes.append(
            "The grad norm covers every trainable parameter of an arm, CRMA's own included; the LoRA-only rows "
            "measure the same parameter set in every arm."
        )
    # Remarks the engine attached to the run (fallbacks taken, caps hit) belong with the numbers they qualify.
    notes += [str(n) for n in summary.get("notes") or []]
    for arm, s in arms.items():
        if s.get("diverged"):
            notes.append(f"{arm} diverged at step {s['diverged_at']}; its final loss is its last finite value.")
    return notes


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def summary_markdown(summary: dict[str, Any], *, title: str = "LoRA vs LoRA+CRMA") -> str:
    """Markdown report of `summarize_run(...)`: the metric table with signed % deltas, seed statistics, footnotes.

    Args:
        summary (`dict`): the output of `summarize_run`.
        title (`str`): heading of the report.

    Returns:
        `str`: Markdown; "–" marks values that do not apply (e.g. mixing figures of an arm without CRMA).
    """
    if "arms" not in summary or "baseline" not in summary:
        raise ValueError("`summary` must be the dict returned by summarize_run (keys 'arms', 'baseline')")
    parts = [f"## {title}", ""]
    n_seeds = len(summary.get("seed_list", []))
    if "seeds" in summary:
        parts += [
            f"Mean over {n_seeds} seeds ({', '.join(map(str, summary['seed_list']))}); deltas vs "
            f"{summary['baseline']}.",
            "",
        ]
    elif n_seeds == 1:
        parts += [f"Seed {summary['seed_list'][0]}; deltas vs {summary['baseline']}.", ""]
    parts += [_md_table(*_main_table(summary)), ""]
    if "seeds" in summary:
        parts += [f"### Mean ± sample std (n − 1) over {n_seeds} seeds", "", _md_table(*_seed_table(summary)), ""]
    parts += [f"- {note}" for note in _notes(summary)]
    return "\n".join(parts) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# ----------------------------------------------------------------------------------------------------------------
# files

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:4px 10px;
text-align:right}th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}
pre{background:#f6f8fa;padding:1em;overflow:auto}.figure{margin:1.5em 0}"""


def _figures(records: Sequence[StepRecord], smoothing: float, baseline: str | None) -> list[tuple[str, Any]]:
    """(file stem, figure) of the standard charts; the delta chart needs two arms, the mixing chart CRMA records."""
    arms = list(dict.fromkeys(r.arm for r in records))
    figs = [
        ("loss", make_loss_figure(records, smoothing=smoothing)),
        ("grad_norm", make_grad_norm_figure(records, smoothing=0.0)),
    ]
    if len(arms) > 1:
        base = baseline if baseline in arms else ("lora" if "lora" in arms else arms[0])
        figs.append(("loss_delta", make_delta_figure(records, baseline=base, smoothing=smoothing)))
    return figs


def write_report_html(
    records: Sequence[StepRecord],
    summary: dict[str, Any],
    path: str | os.PathLike[str],
    *,
    title: str = "LoRA vs LoRA+CRMA",
    config: dict[str, Any] | None = None,
    smoothing: float = 0.6,
) -> Path:
    """Write one self-contained HTML report: charts (plotly.js inlined once), the summary table, the config.

    Args:
        records (`Sequence[StepRecord]`): the run's records.
        summary (`dict`): `summarize_run(records, ...)`.
        path (`str | PathLike`): the file to write; parent folders are created.
        title (`str`): page title and heading.
        config (`dict | None`): the run config (e.g. `AblationConfig.to_dict()`), shown as JSON in a `<pre>` block.
        smoothing (`float`): EMA weight of the loss and delta charts.

    Returns:
        `Path` of the written file. It opens offline: no script or style is loaded from the network.
    """
    figs = [fig for _, fig in _figures(records, smoothing, summary.get("baseline"))]
    if any(r.crma for r in records):
        figs.append(make_mixing_figure(records))
    divs = []
    for i, fig in enumerate(figs):
        # plotly.js (~4.8 MB) goes in once, with the first figure; the later ones reuse the global `Plotly`.
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=i == 0,
            include_mathjax=False,
            default_width="100%",
            default_height=f"{int(fig.layout.height or 480)}px",
            config={"displaylogo": False},
        )
        divs.append(f'<div class="figure">{div}</div>')
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _html_table(*_main_table(summary)),
    ]
    if "seeds" in summary:
        n = len(summary["seed_list"])
        parts += [f"<h2>Mean ± sample std (n − 1) over {n} seeds</h2>", _html_table(*_seed_table(summary))]
    parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in _notes(summary)) + "</ul>")
    parts += ["<h2>Charts</h2>", *divs]
    if config is not None:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        parts += ["<h2>Config</h2>", f"<pre>{html.escape(text, quote=False)}</pre>"]
    parts.append("</body></html>")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def write_png_charts(
    records: Sequence[StepRecord],
    out_dir: str | os.PathLike[str],
    *,
    smoothing: float = 0.6,
    baseline: str | None = "lora",
    width: int = 1100,
    height: int = 520,
    scale: float = 2.0,
) -> list[Path]:
    """Export `loss.png`, `grad_norm.png` and (with two or more arms) `loss_delta.png` with kaleido.

    kaleido renders through a Chrome/Chromium. When `BROWSER_PATH` is unset and `/usr/bin/chromium` exists, it is
    used (and `BROWSER_PATH` is set for the process). All figures go through one `plotly.io.write_images` call, one
    browser session: measured here, 3 figures in ~4 s against ~7.6 s with one `write_image` each.

    Args:
        records (`Sequence[StepRecord]`): the run's records.
        out_dir (`str | PathLike`): folder to write into (created).
        smoothing (`float`): EMA weight of the loss and delta charts.
        baseline (`str | None`): delta baseline; falls back to `lora`, then the first arm, when absent.
        width, height (`int`): layout size in pixels; `scale` multiplies the output resolution.

    Returns:
        `list[Path]` of the written files.

    Raises:
        `RuntimeError`: static export is impossible (no Chrome/Chromium found, or kaleido failed to drive it).
    """
    if not records:
        raise ValueError("`records` is empty: no chart to export")
    import plotly.io as pio

    if not os.environ.get("BROWSER_PATH") and os.path.exists(_CHROMIUM):
        os.environ["BROWSER_PATH"] = _CHROMIUM
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    figs = _figures(records, smoothing, baseline)
    paths = [folder / f"{stem}.png" for stem, _ in figs]
    try:
        pio.write_images([fig for _, fig in figs], paths, format="png", width=width, height=height, scale=scale)
    except Exception as err:  # kaleido/choreographer raise RuntimeError, ChromeNotFoundError, OSError, timeouts...
        raise RuntimeError(
            "PNG export failed: kaleido needs a Chrome or Chromium browser (install Debian's `chromium`, on a Space "
            f"via packages.txt, or point BROWSER_PATH at one). BROWSER_PATH={os.environ.get('BROWSER_PATH')!r}. "
            f"Cause: {type(err).__name__}: {str(err).strip()}"
        ) from err
    return paths


def _json_safe(value: Any) -> Any:
    # Strict JSON has no NaN/Infinity: write them as the strings Python's float() reads back.
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


_NON_FINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _json_restore(value: Any) -> Any:
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    if isinstance(value, dict):
        return {k: _json_restore(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_restore(v) for v in value]
    return value


def write_metrics_jsonl(records: Iterable[StepRecord], path: str | os.PathLike[str], *, append: bool = False) -> Path:
    """Write records as JSON lines (`StepRecord.to_dict()`); NaN/±inf become the strings "NaN"/"Infinity"/"-Infinity".

    Args:
        records (`Iterable[StepRecord]`): records to write.
        path (`str | PathLike`): the file; parent folders are created.
        append (`bool`): append to an existing file (live logging) instead of replacing it.

    Returns:
        `Path` of the file.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a" if append else "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(_json_safe(r.to_dict()), allow_nan=False) + "\n")
    return out


def write_metrics_csv(records: Iterable[StepRecord], path: str | os.PathLike[str]) -> Path:
    """Write the records as CSV for spreadsheets: one row per arm and step, CRMA diagnostics as `crma_*` columns."""
    import csv

    rows = []
    for r in records:
        row = {k: v for k, v in r.to_dict().items() if k != "crma"}
        row.update({f"crma_{k}": v for k, v in (r.crma or {}).items()})
        rows.append(row)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    out = Path(path)
    with out.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return out


def read_metrics_jsonl(path: str | os.PathLike[str]) -> list[StepRecord]:
    """Read a `metrics.jsonl` written by `write_metrics_jsonl` (blank lines skipped).

    Raises:
        `ValueError`: a line is not JSON or not a `StepRecord`; the message names the file and line.
    """
    src = Path(path)
    out = []
    with src.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                out.append(StepRecord.from_dict(_json_restore(data)))
            except (json.JSONDecodeError, TypeError, AttributeError) as err:
                raise ValueError(f"{src}:{lineno}: not a StepRecord JSON line ({err})") from err
    return out
