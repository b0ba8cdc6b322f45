"""Renderers of a run: one document of blocks (headings, paragraphs, tables, lists, charts) built once from
`summary.json`, written as Markdown (`summary.md`, the page, the model card) or as one self-contained HTML page
(`report.html`), and the PNG export of the charts (`charts.CHARTS`).

Numbers come from `analysis/`, figures from `charts.py`; nothing here computes a metric.
"""

from __future__ import annotations

import html
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..analysis.summary import FINAL_LOSS_EMA_WEIGHT, as_number
from .charts import CHARTS, ChartData, draw_charts

_DASH = "–"
_CHROMIUM = "/usr/bin/chromium"


# ---------------------------------------------------------------------------------------------------------------------
# The document model: what both renderers draw


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Para:
    """A paragraph; `code` and **bold** are the only markup."""

    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    wrap: bool = False  # long text cells wrap (at spaces) instead of scrolling


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Figure:
    """A chart of `charts.CHARTS`, by key (drawn in HTML only)."""

    key: str


@dataclass
class Code:
    text: str


Block = Heading | Para | Table | Bullets | Figure | Code


def md_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (pipes inside cells escaped)."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def to_markdown(blocks: Sequence[Block]) -> str:
    """The document as Markdown (charts are left out: Markdown readers get the PNGs)."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"{'#' * block.level} {block.text}")
        elif isinstance(block, Para):
            parts.append(block.text)
        elif isinstance(block, Table):
            parts.append(md_table(block.header, block.rows))
        elif isinstance(block, Bullets):
            parts.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Code):
            parts.append(f"```\n{block.text}\n```")
    return "\n\n".join(p for p in parts if p) + "\n"


_CODE = re.compile(r"`([^`]*)`")
_BOLD = re.compile(r"\*\*(.+?)\*\*")


def _inline_html(text: str) -> str:
    """Escape `text` and render the two bits of Markdown the documents use: `code` and **bold**."""
    out = html.escape(text, quote=False)
    return _BOLD.sub(r"<strong>\1</strong>", _CODE.sub(r"<code>\1</code>", out))


def _html_table(table: Table) -> str:
    """A table in a horizontally scrolling box: on a narrow screen the table scrolls, its cells never break a word or
    a number (`wrap` lets long text cells wrap at spaces)."""
    head = "".join(f"<th>{_inline_html(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    cls = ' class="wrap"' if table.wrap else ""
    return f'<div class="table-wrap"><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def to_html(blocks: Sequence[Block], figures: dict[str, Any], *, title: str) -> str:
    """The document as one self-contained page (plotly.js inlined once, with the first chart; no network)."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
    ]
    first_chart = True
    for block in blocks:
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            cls = ' class="status"' if block.text.startswith("**This run") else ""
            out.append(f"<p{cls}>{_inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            out.append(_html_table(block))
        elif isinstance(block, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Code):
            out.append(f"<pre>{html.escape(block.text, quote=False)}</pre>")
        elif isinstance(block, Figure) and figures.get(block.key) is not None:
            fig = figures[block.key]
            div = fig.to_html(
                full_html=False,
                include_plotlyjs=first_chart,
                include_mathjax=False,
                default_width="100%",
                default_height=f"{int(fig.layout.height or 480)}px",
                config={"displaylogo": False, "responsive": True},
            )
            first_chart = False
            out.append(f'<div class="figure" id="chart-{block.key}">{div}</div>')
    out.append("</body></html>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------------------------
# A run's document


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


# (row label, summary key, formatter, delta as a percentage). A percentage only where a ratio means something: counts
# (often 0 or 1 in the baseline), the post-clip peak (the fixed clip caps the baseline at `max_grad_norm`, so its
# percentage measures the cap, not the arm) and the mixing figures (which the baseline has none of) differ in absolute
# terms.
_ROWS = (
    ("Held-out loss (final)", "final_test_loss", lambda x: f"{x:.4f}", True),
    ("Held-out loss (best)", "best_test_loss", lambda x: f"{x:.4f}", True),
    ("Validation loss (final)", "final_val_loss", lambda x: f"{x:.4f}", True),
    ("Final training loss", "final_loss", lambda x: f"{x:.4f}", True),
    (f"Final training loss (EMA {FINAL_LOSS_EMA_WEIGHT:g})", "final_loss_ema", lambda x: f"{x:.4f}", True),
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
        if all(as_number(summary["arms"][a].get(key)) is None for a in arms):
            continue  # a figure no arm has (no validation slice, no CRMA arm): no row of dashes
        row = [label] + [_metric_cell(summary["arms"][a], key, fmt) for a in arms]
        row += [_delta_cell(summary["deltas"].get(a, {}).get(key), fmt, relative) for a in others]
        rows.append(row)
    return header, rows


def _seed_table(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    arms, n_seeds = list(summary["arms"]), len(summary["seed_list"])
    rows = []
    for label, key, fmt, _ in _ROWS:
        if all(summary["across_seeds"][arm].get(key) is None for arm in arms):
            continue
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
        out.append((_SET_TITLES.get(name) or f"At the {chosen['lr']}", header, rows))
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


def attribution_blocks(summary: dict[str, Any], *, level: int = 3) -> list[Block]:
    """The attribution: per comparison set a table of effects, then the sentences, or why there is no attribution
    (e.g. the author's two-arm recipe changes two things at once); [] when there is nothing to say."""
    tables, sentences = attribution_tables(summary), attribution_sentences(summary)
    if not tables and not sentences:
        return []
    blocks: list[Block] = [Heading("What can be credited to what", level)] if level else []
    n = (summary.get("attribution") or {}).get("n_seeds", 0)
    how = "on one seed (an interval needs two or more)" if n == 1 else f"mean and 95 % CI over {n} seeds"
    for title, header, rows in tables:
        blocks += [Para(f"**{title}**: effects, paired by seed, {how}:"), Table(header, rows)]
    if sentences:
        blocks.append(Bullets(sentences))
    return blocks


def attribution_markdown(summary: dict[str, Any], *, level: int = 3) -> str:
    """`attribution_blocks` as Markdown; "" when there is nothing to say."""
    blocks = attribution_blocks(summary, level=level)
    return to_markdown(blocks) if blocks else ""


def lr_selection_blocks(summary: dict[str, Any]) -> list[Block]:
    """How each arm's LR was chosen: the mean final validation loss at each multiplier (± sd over seeds), the
    chosen one in bold, a warning where it sits at the edge of the grid; [] for a run that tuned nothing."""
    selection = summary.get("lr_selection") or {}
    if not selection.get("tuned"):
        return []
    scales = sorted({p["lr_scale"] for info in selection["arms"].values() for p in info["grid"]})
    rows, edges = [], []
    for arm, info in selection["arms"].items():
        cells = {p["lr_scale"]: p for p in info["grid"]}
        row = [arm]
        for scale in scales:
            point = cells.get(scale)
            if point is None:
                row.append(_DASH)
                continue
            text = _DASH if point["mean"] is None else f"{point['mean']:.4f}"
            if point["sd"] is not None:
                text += f" ± {point['sd']:.4f}"
            row.append(f"**{text}**" if scale == info.get("chosen") else text)
        rows.append(row)
        if info.get("at_edge"):
            edges.append(f"{arm} (×{info['chosen']:g})")
    blocks: list[Block] = [
        Heading("Each arm's learning rate", 3),
        Para(
            "Every arm trained at each LR multiplier (all of its optimizer groups scaled together) on the same "
            "batches; the **bold** one has the lowest mean final *validation* loss and is the one the held-out "
            "comparison uses. The test slice played no part in the choice."
        ),
        Table(["Arm", *(f"×{s:g}" for s in scales)], rows),
    ]
    if edges:
        blocks.append(
            Para(
                f"At the edge of the grid: {', '.join(edges)}: a multiplier beyond it might be better still, so "
                "these arms' tuned figures are a bound, not an optimum."
            )
        )
    return blocks


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


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def answers_blocks(summary: dict[str, Any], *, arms: list[str] | None = None) -> list[Block]:
    """What every arm and the base model answered to the run's held-out rows (greedy, from the saved adapters),
    one table per row with its reference answer; `arms` narrows the columns (a model card: the base and its own
    arm); [] for a run without answers."""
    block = summary.get("answers") or {}
    if not block.get("prompts"):
        return []
    decoding = block.get("decoding") or {}
    how = "greedy" if not decoding.get("temperature") else f"temperature {decoding['temperature']:g}"
    blocks: list[Block] = [
        Heading("What the arms answer", 3),
        Para(
            f"Held-out rows no arm trained on, answered by every arm and by the base model (every adapter off), "
            f"{how}, at most {decoding.get('max_new_tokens')} new tokens, with the training prompt template. The "
            "same answers come from `python -m crma generate` on this run folder."
        ),
    ]
    shown = ["base", *(arms if arms is not None else [a for a in block["by_arm"] if a != "base"])]
    for i, prompt in enumerate(block["prompts"]):
        question = prompt["instruction"] + (f" — {prompt['input']}" if prompt.get("input") else "")
        rows = [["reference", _one_line(prompt.get("reference") or "–")]]
        for arm in shown:
            answer = (block["by_arm"].get(arm) or [None] * (i + 1))[i]
            if answer is not None:
                rows.append([arm, f"{_one_line(answer['text']) or '(nothing)'} ({answer['tokens']} tokens)"])
        blocks += [Para(f"**Row {prompt.get('row')}:** {_one_line(question, 300)}"), Table(["", "answer"], rows, True)]
    return blocks


def run_document(summary: dict[str, Any], *, title: str) -> list[Block]:
    """The blocks of a run's report: status, the metric table with signed deltas, the attribution, the LR choice,
    seed statistics, footnotes and the fairness receipt."""
    if "arms" not in summary or "baseline" not in summary:
        raise ValueError("`summary` must be the dict returned by summarize_run (keys 'arms', 'baseline')")
    blocks: list[Block] = [Heading(title, 2)]
    status = status_note(summary)
    if status:
        blocks.append(Para(f"**{status}**"))
    n_seeds = len(summary.get("seed_list", []))
    if "seeds" in summary:
        seeds = ", ".join(map(str, summary["seed_list"]))
        blocks.append(Para(f"Mean over {n_seeds} seeds ({seeds}); deltas vs {summary['baseline']}."))
    elif n_seeds == 1:
        blocks.append(Para(f"Seed {summary['seed_list'][0]}; deltas vs {summary['baseline']}."))
    if summary["arms"]:
        blocks.append(Table(*_main_table(summary)))
    blocks += attribution_blocks(summary)
    blocks += lr_selection_blocks(summary)
    if "seeds" in summary:
        blocks += [Heading(f"Mean ± sample std (n − 1) over {n_seeds} seeds", 3), Table(*_seed_table(summary))]
    blocks += answers_blocks(summary)
    blocks.append(Bullets(_notes(summary)) if summary["arms"] else Para("No step finished."))
    blocks += [Heading("Fairness receipt: what is identical between the arms", 3), *receipt_blocks(summary)]
    return blocks


def summary_markdown(summary: dict[str, Any], *, title: str = "LoRA vs LoRA+CRMA") -> str:
    """`summary.md`: the run's document as Markdown ("–" marks values that do not apply, e.g. mixing figures of an
    arm without CRMA)."""
    return to_markdown(run_document(summary, title=title))


def report_html(
    records: Sequence[Any],
    summary: dict[str, Any],
    *,
    evals: Sequence[Any] = (),
    title: str = "LoRA vs LoRA+CRMA",
    config: dict[str, Any] | None = None,
    smoothing: float = 0.6,
) -> str:
    """`report.html`: the run's document and every chart of `CHARTS`, self-contained (it opens offline).

    Args:
        records (`Sequence[StepRecord]`), evals (`Sequence[EvalRecord]`): the run's records.
        summary (`dict`): `summary.json`.
        title (`str`): page title and heading.
        config (`dict | None`): the run config, shown as JSON at the end.
        smoothing (`float`): EMA weight of the charts.
    """
    figures = draw_charts(ChartData(records, evals, summary, smoothing=smoothing, baseline=summary.get("baseline")))
    blocks = run_document(summary, title=title)
    blocks[0] = Heading(title, 1)
    blocks += [Heading("Charts", 2), *(Figure(chart.key) for chart in CHARTS)]
    if config is not None:
        blocks += [Heading("Config", 2), Code(json.dumps(config, indent=2, sort_keys=True, default=str))]
    return to_html(blocks, figures, title=title)


def run_title(cfg: Any) -> str:
    """`lora vs lora+crma on smollm2-135m`: what a run's files are headed with."""
    return f"{' vs '.join(cfg.arm_labels)} on {cfg.model}"


def write_reports(folder: Path, result: Any, cfg: Any, *, charts: bool = True) -> None:
    """Write `metrics.csv`, `summary.md`, `report.html` and (with `charts`) the PNG charts of a finished run into
    its folder; a missing browser for the PNGs becomes a note of the run, not a failure."""
    from ..engine.records import write_metrics_csv
    from ..jsonio import atomic_write_text

    title = run_title(cfg)
    summary = {**result.summary, "status": result.status, "error": result.error, "notes": list(result.notes)}
    if not result.records:
        (folder / "summary.md").write_text(f"# {title}\n\nNo step finished: {result.error}\n", encoding="utf-8")
        return
    write_metrics_csv([*result.records, *result.evals], folder / "metrics.csv")
    atomic_write_text(folder / "summary.md", summary_markdown(summary, title=title))
    page = report_html(result.records, summary, evals=result.evals, title=title, config=cfg.to_dict())
    atomic_write_text(folder / "report.html", page)
    if charts:
        figures = draw_charts(ChartData(result.records, result.evals, summary, baseline=summary.get("baseline")))
        try:
            write_png_charts(figures, folder)
        except RuntimeError as exc:  # no Chrome for static export: the HTML report still has every chart
            result.notes.append(f"PNG charts not written: {exc}")


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:1.5em auto;
padding:0 1em;color:#222;line-height:1.45}h1{font-size:1.6em;overflow-wrap:anywhere}
.table-wrap{overflow-x:auto;max-width:100%;margin:1em 0}table{border-collapse:collapse}
th,td{border:1px solid #ccc;padding:4px 10px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}thead{background:#f3f3f3}
table.wrap td{white-space:normal;min-width:10em;text-align:left}
.status{background:#fff4e5;border-left:4px solid #d55e00;padding:.5em 1em}
code{background:#f6f8fa;padding:0 .2em;overflow-wrap:anywhere}
pre{background:#f6f8fa;padding:1em;overflow:auto}.figure{margin:1.5em 0}"""


def write_png_charts(
    figures: dict[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    width: int = 1100,
    height: int = 520,
    scale: float = 2.0,
    prefix: str = "",
) -> list[Path]:
    """Export every chart of `figures` (`charts.draw_charts`; None entries are skipped) as `<prefix><key>.png` with
    kaleido.

    kaleido renders through a Chrome/Chromium. When `BROWSER_PATH` is unset and `/usr/bin/chromium` exists, it is
    used (and `BROWSER_PATH` is set for the process). All figures go through one `plotly.io.write_images` call: one
    browser session instead of one per figure, which is most of the export's time.

    Args:
        figures (`dict[str, Figure | None]`): the charts by key.
        out_dir (`str | PathLike`): folder to write into (created).
        width, height (`int`): layout size in pixels (a figure with its own height keeps it); `scale` multiplies the
            output resolution.
        prefix (`str`): put before each file name (the published study's `plain_loss.png`).

    Returns:
        `list[Path]` of the written files.

    Raises:
        `RuntimeError`: static export is impossible (no Chrome/Chromium found, or kaleido failed to drive it).
    """
    chosen = {key: fig for key, fig in figures.items() if fig is not None}
    if not chosen:
        raise ValueError("no chart to export")
    import plotly.io as pio

    if not os.environ.get("BROWSER_PATH") and os.path.exists(_CHROMIUM):
        os.environ["BROWSER_PATH"] = _CHROMIUM
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{prefix}{key}.png" for key in chosen]
    heights = [int(fig.layout.height or height) for fig in chosen.values()]
    try:
        for fig, h in zip(chosen.values(), heights, strict=True):
            fig.update_layout(height=h)
        pio.write_images(list(chosen.values()), paths, format="png", width=width, height=heights, scale=scale)
    except Exception as err:  # kaleido/choreographer raise RuntimeError, ChromeNotFoundError, OSError, timeouts...
        raise RuntimeError(
            "PNG export failed: kaleido needs a Chrome or Chromium browser (install Debian's `chromium`, on a Space "
            f"via packages.txt, or point BROWSER_PATH at one). BROWSER_PATH={os.environ.get('BROWSER_PATH')!r}. "
            f"Cause: {type(err).__name__}: {str(err).strip()}"
        ) from err
    return paths


# ---------------------------------------------------------------------------------------------------------------------
# The fairness receipt


def receipt_blocks(summary: dict[str, Any]) -> list[Block]:
    """The fairness receipt of `summary.json`: same LoRA init, same batches, how the LRs were chosen, what differs."""
    receipt = summary.get("receipt") or {}
    per_seed = receipt.get("per_seed") or ([receipt] if receipt.get("seed") is not None else [])
    if not per_seed:
        return [Para("No fairness receipt: no seed finished its set-up.")]
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
    blocks: list[Block] = [Table(header, rows)]
    choice = receipt.get("lr_choice")
    problems = list(dict.fromkeys(p for r in per_seed for p in r.get("problems") or []))
    problems += (choice or {}).get("problems") or []
    if problems:
        blocks.append(Para("**Problems found:** " + "; ".join(problems)))
    if choice:
        verdict = "✅" if choice.get("fair") else "❌"
        blocks.append(Para(f"{verdict} How each arm's LR was chosen: {choice['how']}."))
    first = per_seed[0]
    matched = first.get("matched_rank")
    if matched:
        blocks.append(
            Para(
                f"lora-matched: LoRA rank {matched['lora_r']} → **{matched['rank']}** ({matched['params']:,} "
                f"trainable parameters, ≥ lora+crma's {matched['lora_crma_params']:,})."
            )
        )
    inits = first.get("lora_init_sha256") or {}
    if inits:
        blocks.append(Para("LoRA init sha256 per arm: " + ", ".join(f"{a} `{h[:12]}…`" for a, h in inits.items())))
    diff = first.get("config_diff") or {}
    if diff:
        arms = list(next(iter(diff.values())))
        rows = [[key, *(_setting_cell(values.get(a)) for a in arms)] for key, values in diff.items()]
        blocks += [
            Para("What differs between the arms (everything else is identical):"),
            Table(["Setting", *arms], rows, True),
        ]
    return blocks


def receipt_markdown(summary: dict[str, Any]) -> str:
    """The fairness receipt of `summary.json` as Markdown."""
    return to_markdown(receipt_blocks(summary))


def _tick(value: Any) -> str:
    return "✅ yes" if value is True else ("❌ no" if value is False else "–")


def _setting_cell(value: Any) -> str:
    return "–" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
