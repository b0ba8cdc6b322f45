"""Renderers of a run's summary: the Markdown table, the self-contained HTML report, PNG charts, the receipt.

Numbers come from `summary.py`, figures from `plots.py`; nothing here computes a metric.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..analysis.summary import FINAL_LOSS_EMA_WEIGHT, as_number
from ..engine.records import StepRecord
from ..spec.arms import baseline_arm
from .plots import make_delta_figure, make_grad_norm_figure, make_loss_figure, make_mixing_figure

_DASH = "–"
_CHROMIUM = "/usr/bin/chromium"


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


# (row label, summary key, formatter, delta as a percentage). A percentage only where a ratio means something: counts
# (often 0 or 1 in the baseline), the post-clip peak (the fixed clip caps the baseline at `max_grad_norm`, so its
# percentage measures the cap, not the arm) and the mixing figures (which the baseline has none of) differ in absolute
# terms.
_ROWS = (
    ("Final loss", "final_loss", lambda x: f"{x:.4f}", True),
    (f"Final loss (EMA {FINAL_LOSS_EMA_WEIGHT:g})", "final_loss_ema", lambda x: f"{x:.4f}", True),
    ("Peak grad norm (pre-clip)", "grad_norm_pre_peak", lambda x: f"{x:.2f}", True),
    ("Peak grad norm (post-clip)", "grad_norm_post_peak", lambda x: f"{x:.2f}", False),
    ("Mean grad norm", "grad_norm_pre_mean", lambda x: f"{x:.2f}", True),
    ("Peak LoRA-only grad norm", "grad_norm_lora_peak", lambda x: f"{x:.2f}", True),
    ("Mean LoRA-only grad norm", "grad_norm_lora_mean", lambda x: f"{x:.2f}", True),
    ("Steps clipped", "steps_clipped", _fmt_int, False),
    ("Gradient spikes", "spike_count", _fmt_int, False),
    ("Spectral norm ‖M‖₂", "spectral_norm", lambda x: f"{x:.6f}", False),
    ("Max row/col error", "max_rowcol_err", lambda x: f"{x:.1e}", False),
    ("σ₂", "sigma2", lambda x: f"{x:.4f}", False),
    ("‖M − I‖_F", "dist_from_identity", lambda x: f"{x:.4f}", False),
    ("Composite gain", "composite_gain", lambda x: f"{x:.4f}", False),
    ("Trainable params", "trainable_params", _fmt_int, True),
    ("Wall time", "wall_s", lambda x: f"{x:.1f} s", True),
    ("Tokens/s", "tokens_per_s", lambda x: f"{x:,.1f}", True),
)


def _metric_cell(summ: dict[str, Any], key: str, fmt: Any) -> str:
    value = as_number(summ.get(key))
    if value is None:
        return _DASH
    text = fmt(value)
    if key == "final_loss" and summ.get("diverged"):
        text += f" (diverged @ {summ['diverged_at']})"
    return text


def _delta_cell(delta: dict[str, float | None] | None, fmt: Any, relative: bool) -> str:
    """The difference arm − baseline: a signed percentage where `relative` and the baseline is not 0, else the signed
    absolute difference in the row's own format."""
    if not delta:
        return _DASH
    if relative and delta["rel_pct"] is not None:
        return f"{delta['rel_pct']:+.1f}%"
    diff = delta["abs"]
    if diff == 0:
        return "0"
    return ("+" if diff > 0 else "-") + fmt(abs(diff))


def _main_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    arms, base = list(summary["arms"]), summary["baseline"]
    others = [a for a in arms if a != base]
    header = ["Metric", *arms] + (["Delta"] if len(others) == 1 else [f"Δ {a}" for a in others])
    rows = []
    for label, key, fmt, relative in _ROWS:
        row = [label] + [_metric_cell(summary["arms"][a], key, fmt) for a in arms]
        row += [_delta_cell(summary["deltas"].get(a, {}).get(key), fmt, relative) for a in others]
        rows.append(row)
    return header, rows


def _seed_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    arms, n_seeds = list(summary["arms"]), len(summary["seed_list"])
    rows = []
    for label, key, fmt, _ in _ROWS:
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
    if len(arms) > 1:
        notes.append(
            f"Δ is arm − {base}: in % for losses, grad norms before clipping, parameters and speed; as a plain "
            "difference for counts and for the post-clip peak (the fixed clip caps it at `max_grad_norm`, so a "
            f"percentage would measure the cap). Final loss (EMA {FINAL_LOSS_EMA_WEIGHT:g}): the last value of the "
            f"loss smoothed with weight {FINAL_LOSS_EMA_WEIGHT:g} (debiased EMA), less noisy than the last step's."
        )
    if any(as_number(s.get("spectral_norm")) is not None for s in arms.values()):
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


def _effect_cell(stats: dict[str, Any]) -> str:
    if stats.get("mean") is None:
        return _DASH
    text = f"{stats['mean']:+.3g}"
    if stats.get("ci95") is not None:
        lo, hi = stats["ci95"]
        text += f" ({lo:+.3g} – {hi:+.3g})"
    return text


_SET_TITLES = {
    "best_lr": "At each arm's own best LR (chosen on the validation slice)",
    "shared_lr": "At the shared LR (every arm at ×1)",
    "as_run": "At the LRs the arms trained with",
}


def attribution_tables(summary: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """`(title, header, rows)` per comparison set of the attribution: one row per headline metric, one column per
    contrast (mean and 95 % CI over seeds); empty without an attribution."""
    block = summary.get("attribution") or {}
    if not block.get("available"):
        return []
    out = []
    for name, chosen in block["sets"].items():
        contrasts = chosen["contrasts"]
        metrics = list(dict.fromkeys(m for c in contrasts.values() for m in c["metrics"]))
        header = ["Metric", *(c["name"] for c in contrasts.values())]
        rows = []
        for metric in metrics:
            label = next(c["metrics"][metric]["label"] for c in contrasts.values() if metric in c["metrics"])
            cells = [_effect_cell(c["metrics"].get(metric) or {}) for c in contrasts.values()]
            rows.append([label, *cells])
        out.append((_SET_TITLES.get(name, name), header, rows))
    return out


def attribution_sentences(summary: dict[str, Any]) -> list[str]:
    """Plain sentences the numbers support: what the run's primary figure is (held-out or training, tuned LRs or
    not), every contrast's effect on it, and the other effects whose interval excludes zero; or why there is no
    attribution."""
    block = summary.get("attribution") or {}
    labels = set(summary.get("arms", {}))
    if not block.get("available"):
        out = []
        if {"lora", "lora+crma"} <= labels:
            out.append(
                "lora vs lora+crma changes two things at once (the mixing and the clipper: a fixed norm clip vs "
                "ZClip): a difference cannot be credited to either; run the 2×2 grid to separate them."
            )
        if block.get("reason") and labels != {"lora", "lora+crma"}:
            out.append(block["reason"])
        return out
    primary = block["primary"]
    kind = (
        "a held-out figure (the test slice)"
        if block["primary_kind"] == "held-out"
        else ("a training figure: no held-out slice was evaluated")
    )
    out = [f"Primary outcome: {_PRIMARY_NAMES.get(primary, primary)}, {kind}."]
    for name, chosen in block["sets"].items():
        prefix = f"{_SET_TITLES.get(name, name)}: " if len(block["sets"]) > 1 else ""
        for contrast in chosen["contrasts"].values():
            for metric, stats in contrast["metrics"].items():
                excludes_zero = stats["ci95"] is not None and not stats["ci95"][0] <= 0 <= stats["ci95"][1]
                if metric == primary or excludes_zero:
                    out.append(prefix + stats["sentence"])
    return out


_PRIMARY_NAMES = {"final_test_loss": "the final held-out (test) loss", "final_loss_ema": "the final training loss"}


def attribution_markdown(summary: dict[str, Any], *, level: int = 3) -> str:
    """The attribution of `summary` as Markdown: per comparison set a table of effects, then the sentences, or why
    there is no attribution (e.g. the author's two-arm recipe changes two things at once); "" when there is nothing
    to say.

    Args:
        summary (`dict`): a run's `summary.json` (with its `attribution` block).
        level (`int`): Markdown level of the section's heading (0: no heading).

    Returns:
        `str`: Markdown.
    """
    tables, sentences = attribution_tables(summary), attribution_sentences(summary)
    if not tables and not sentences:
        return ""
    parts = [f"{'#' * level} What can be credited to what", ""] if level else []
    n = (summary.get("attribution") or {}).get("n_seeds", 0)
    for title, header, rows in tables:
        how = "on one seed (an interval needs two or more)" if n == 1 else f"mean and 95 % CI over {n} seeds"
        parts += [f"**{title}**: effects, paired by seed, {how}:", "", _md_table(header, rows), ""]
    parts += [f"- {line}" for line in sentences]
    return "\n".join(parts) + "\n"


def status_note(summary: dict[str, Any]) -> str | None:
    """One sentence saying that a run stopped or failed before it finished and that its numbers are partial; None
    for a finished run (or a summary without a status)."""
    status = summary.get("status")
    if status not in ("stopped", "failed"):
        return None
    blocks = [b["arms"] for b in summary["seeds"].values()] if "seeds" in summary else [summary.get("arms", {})]
    steps = [as_number(arm.get("steps")) for arms in blocks for arm in arms.values()]
    done = max((x for x in steps if x is not None), default=0)
    why = summary.get("error") or ("stopped by request" if status == "stopped" else "no reason recorded")
    return (
        f"This run {status} before it finished ({why}): the numbers are partial, from the {done:g} steps per arm it "
        "completed."
    )


def summary_markdown(summary: dict[str, Any], *, title: str = "LoRA vs LoRA+CRMA") -> str:
    """Markdown report of `summarize_run(...)`: the metric table with signed deltas, the attribution, seed statistics,
    footnotes; a stopped or failed run says so under the title.

    Args:
        summary (`dict`): the output of `summarize_run` (plus the engine's `status` / `error`, when known).
        title (`str`): heading of the report.

    Returns:
        `str`: Markdown; "–" marks values that do not apply (e.g. mixing figures of an arm without CRMA).
    """
    if "arms" not in summary or "baseline" not in summary:
        raise ValueError("`summary` must be the dict returned by summarize_run (keys 'arms', 'baseline')")
    parts = [f"## {title}", ""]
    status = status_note(summary)
    if status:
        parts += [f"**{status}**", ""]
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
    attributed = attribution_markdown(summary)
    if attributed:
        parts += [attributed]
    if "seeds" in summary:
        parts += [f"### Mean ± sample std (n − 1) over {n_seeds} seeds", "", _md_table(*_seed_table(summary)), ""]
    parts += [f"- {note}" for note in _notes(summary)]
    return "\n".join(parts) + "\n"


_CODE = re.compile(r"`([^`]*)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline_html(text: str) -> str:
    """Escape `text` and render the two bits of Markdown the receipt uses: `code` and **bold**."""
    out = html.escape(text, quote=False)
    return _BOLD.sub(r"<strong>\1</strong>", _CODE.sub(r"<code>\1</code>", out))


def _html_table(header: list[str], rows: list[list[str]], *, wrap: bool = False) -> str:
    """A table in a horizontally scrolling box: on a narrow screen the table scrolls, its cells never break a word or
    a number (`wrap` lets long text cells wrap at spaces)."""
    head = "".join(f"<th>{_inline_html(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in rows)
    cls = ' class="wrap"' if wrap else ""
    return f'<div class="table-wrap"><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


# ----------------------------------------------------------------------------------------------------------------
# files

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em;overflow-wrap:anywhere}
.table-wrap{overflow-x:auto;max-width:100%;margin:1em 0}table{border-collapse:collapse}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}
table.wrap td{white-space:normal;min-width:10em;text-align:left}
.status{background:#fff4e5;border-left:4px solid #d55e00;padding:.5em 1em}
code{background:#f6f8fa;padding:0 .2em;overflow-wrap:anywhere}
pre{background:#f6f8fa;padding:1em;overflow:auto}.figure{margin:1.5em 0}"""


def _figures(records: Sequence[StepRecord], smoothing: float, baseline: str | None) -> list[tuple[str, Any]]:
    """(file stem, figure) of the standard charts; the delta chart needs two arms."""
    arms = list(dict.fromkeys(r.arm for r in records))
    figs = [
        ("loss", make_loss_figure(records, smoothing=smoothing)),
        ("grad_norm", make_grad_norm_figure(records, smoothing=0.0)),
    ]
    if len(arms) > 1:
        base = baseline if baseline in arms else baseline_arm(arms)
        figs.append(("loss_delta", make_delta_figure(records, baseline=base, smoothing=smoothing)))
    return figs


def report_html(
    records: Sequence[StepRecord],
    summary: dict[str, Any],
    *,
    title: str = "LoRA vs LoRA+CRMA",
    config: dict[str, Any] | None = None,
    smoothing: float = 0.6,
) -> str:
    """One self-contained HTML page: charts (plotly.js inlined once), the summary table, the receipt, the config.

    Args:
        records (`Sequence[StepRecord]`): the run's records.
        summary (`dict`): `summarize_run(records, ...)` plus the engine's keys (receipt, status, notes).
        title (`str`): page title and heading.
        config (`dict | None`): the run config (e.g. `AblationConfig.to_dict()`), shown as JSON in a `<pre>` block.
        smoothing (`float`): EMA weight of the loss and delta charts.

    Returns:
        `str`: the page. It opens offline: no script or style is loaded from the network.
    """
    figs = _figures(records, smoothing, summary.get("baseline"))
    if any(r.crma for r in records):
        figs.append(("mixing", make_mixing_figure(records)))
    divs = []
    for i, (stem, fig) in enumerate(figs):
        # plotly.js (~4.8 MB) goes in once, with the first figure; the later ones reuse the global `Plotly`.
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=i == 0,
            include_mathjax=False,
            default_width="100%",
            default_height=f"{int(fig.layout.height or 480)}px",
            config={"displaylogo": False, "responsive": True},
        )
        divs.append(f'<div class="figure" id="chart-{stem}">{div}</div>')
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    status = status_note(summary)
    if status:
        parts.append(f'<p class="status"><strong>{html.escape(status)}</strong></p>')
    parts.append(_html_table(*_main_table(summary)))
    tables, sentences = attribution_tables(summary), attribution_sentences(summary)
    if tables or sentences:
        parts.append("<h2>What can be credited to what</h2>")
        for title, header, rows in tables:
            parts += [f"<p><strong>{html.escape(title)}</strong></p>", _html_table(header, rows)]
        parts.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in sentences) + "</ul>")
    if "seeds" in summary:
        n = len(summary["seed_list"])
        parts += [f"<h2>Mean ± sample std (n − 1) over {n} seeds</h2>", _html_table(*_seed_table(summary))]
    parts.append("<ul>" + "".join(f"<li>{_inline_html(n)}</li>" for n in _notes(summary)) + "</ul>")
    parts += ["<h2>Fairness receipt: what is identical between the arms</h2>", receipt_html(summary)]
    parts += ["<h2>Charts</h2>", *divs]
    if config is not None:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        parts += ["<h2>Config</h2>", f"<pre>{html.escape(text, quote=False)}</pre>"]
    parts.append("</body></html>")
    return "\n".join(parts)


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
    used (and `BROWSER_PATH` is set for the process). All figures go through one `plotly.io.write_images` call: one
    browser session instead of one per figure, which is most of the export's time.

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


# ---------------------------------------------------------------------------------------------------------------------
# The fairness receipt


def _receipt_parts(summary: dict[str, Any]) -> list[str | tuple[list[str], list[list[str]], bool]]:
    """The receipt as paragraphs (Markdown-lite strings) and tables `(header, rows, wrap)`, for both renderers."""
    receipt = summary.get("receipt") or {}
    per_seed = receipt.get("per_seed") or ([receipt] if receipt else [])
    if not per_seed:
        return ["No fairness receipt: no seed finished its set-up."]
    header = ["Seed", "Same LoRA init", "Same batches", "Only the adapter differs", "Batch order sha256"]
    rows = [
        [
            str(r.get("seed")),
            _tick(r.get("lora_init_equal")),
            _tick(r.get("batches_seen_equal")),
            _tick(r.get("differs_only_in_adapter")),
            f"`{str(r.get('batch_order_sha256', ''))[:16]}…`",
        ]
        for r in per_seed
    ]
    parts: list[str | tuple[list[str], list[list[str]], bool]] = [(header, rows, False)]
    problems = list(dict.fromkeys(p for r in per_seed for p in r.get("problems") or []))
    if problems:
        parts.append("**Problems found:** " + "; ".join(problems))
    first = per_seed[0]
    matched = first.get("matched_rank")
    if matched:
        parts.append(
            f"lora-matched: LoRA rank {matched['lora_r']} → **{matched['rank']}** ({matched['params']:,} trainable "
            f"parameters, ≥ lora+crma's {matched['lora_crma_params']:,})."
        )
    inits = first.get("lora_init_sha256") or {}
    if inits:
        parts.append("LoRA init sha256 per arm: " + ", ".join(f"{a} `{h[:12]}…`" for a, h in inits.items()))
    diff = first.get("config_diff") or {}
    if diff:
        arms = list(next(iter(diff.values())))
        parts.append("What differs between the arms (everything else is identical):")
        diff_rows = [[key, *(_setting_cell(values.get(a)) for a in arms)] for key, values in diff.items()]
        parts.append((["Setting", *arms], diff_rows, True))
    return parts


def receipt_markdown(summary: dict[str, Any]) -> str:
    """The fairness receipt of `summary.json` as Markdown: same LoRA init, same batches, config diff."""
    blocks = []
    for part in _receipt_parts(summary):
        if isinstance(part, str):
            blocks.append(part)
        else:
            header, rows, _ = part
            blocks.append(_md_table(header, [[c.replace("|", "\\|") for c in row] for row in rows]))
    return "\n\n".join(blocks)


def receipt_html(summary: dict[str, Any]) -> str:
    """The fairness receipt of `summary.json` as HTML (the same content as `receipt_markdown`)."""
    blocks = []
    for part in _receipt_parts(summary):
        if isinstance(part, str):
            blocks.append(f"<p>{_inline_html(part)}</p>")
        else:
            header, rows, wrap = part
            blocks.append(_html_table(header, rows, wrap=wrap))
    return "\n".join(blocks)


def _tick(value: Any) -> str:
    return "✅ yes" if value is True else ("❌ no" if value is False else "–")


def _setting_cell(value: Any) -> str:
    return "–" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


# ---------------------------------------------------------------------------------------------------------------------
# The published study


def study_markdown(study: dict[str, Any]) -> str:
    """`study.md`: the protocol, the time, and per condition the LR choice and the run summary."""
    p = study["protocol"]
    lines = ["# CRMA Lab study", "", "```json", json.dumps(p, indent=1), "```", ""]
    for name, summary in study["conditions"].items():
        lines += [summary_markdown(summary, title=name)]
    return "\n".join(lines)


def study_charts(study: dict[str, Any], conditions: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    """The study's PNG charts (none yet)."""
    return []
