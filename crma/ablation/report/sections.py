"""What a run's document says, built from `summary.json`: the status, the metric table with signed deltas, the
attribution, the LR choice, seed statistics, the answers, footnotes and the fairness receipt, as blocks of
`blocks.py`.

Numbers come from `analysis/`; nothing here computes a metric.
"""

from __future__ import annotations

import json
from typing import Any

from ..analysis.summary import FINAL_LOSS_EMA_WEIGHT, as_number
from .blocks import Block, Bullets, Heading, Para, Table, to_markdown

_DASH = "–"


# ---------------------------------------------------------------------------------------------------------------------
# The metric tables and their footnotes


def _fmt_int(x: float) -> str:
    return f"{x:,.0f}" if float(x).is_integer() else f"{x:,.1f}"


_DP4, _DP2 = "{:.4f}".format, "{:.2f}".format  # 4 or 2 decimal places
# (row label, summary key, formatter, delta as a percentage). A percentage only where a ratio means something: counts
# (often 0 or 1 in the baseline), the post-clip peak (the fixed clip caps the baseline at `max_grad_norm`, so its
# percentage measures the cap, not the arm) and the mixing figures (which the baseline has none of) differ in absolute
# terms.
_ROWS = (
    ("Held-out loss (final)", "final_test_loss", _DP4, True),
    ("Held-out loss (best)", "best_test_loss", _DP4, True),
    ("Validation loss (final)", "final_val_loss", _DP4, True),
    ("Final training loss", "final_loss", _DP4, True),
    (f"Final training loss (EMA {FINAL_LOSS_EMA_WEIGHT:g})", "final_loss_ema", _DP4, True),
    ("Peak grad norm (pre-clip)", "grad_norm_pre_peak", _DP2, True),
    ("Peak grad norm (post-clip)", "grad_norm_post_peak", _DP2, False),
    ("Mean grad norm", "grad_norm_pre_mean", _DP2, True),
    ("Peak LoRA-only grad norm", "grad_norm_lora_peak", _DP2, True),
    ("Mean LoRA-only grad norm", "grad_norm_lora_mean", _DP2, True),
    ("Steps clipped", "steps_clipped", _fmt_int, False),
    ("Gradient spikes", "spike_count", _fmt_int, False),
    ("Spectral norm ‖M‖₂", "spectral_norm", "{:.6f}".format, False),
    ("Max row/col error", "max_rowcol_err", "{:.1e}".format, False),
    ("σ₂", "sigma2", _DP4, False),
    ("‖M − I‖_F", "dist_from_identity", _DP4, False),
    ("Composite gain", "composite_gain", _DP4, False),
    ("Trainable params", "trainable_params", _fmt_int, True),
    ("Wall time", "wall_s", "{:.1f} s".format, True),
    ("Tokens/s", "tokens_per_s", "{:,.1f}".format, True),
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


# ---------------------------------------------------------------------------------------------------------------------
# The attribution and the LR choice


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
_PRIMARY_NAMES = {"final_test_loss": "the final held-out (test) loss", "final_loss_ema": "the final training loss"}


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


def _why_no_attribution(block: dict[str, Any], labels: set[str]) -> list[str]:
    out = []
    if {"lora", "lora+crma"} <= labels:
        out.append(
            "lora vs lora+crma changes two things at once (the mixing and the clipper: a fixed norm clip vs "
            "ZClip): a difference cannot be credited to either; run the 2×2 grid to separate them."
        )
    if block.get("reason") and labels != {"lora", "lora+crma"}:
        out.append(block["reason"])
    return out


def _lr_sentence(sets: dict[str, Any]) -> str:
    """Whether the learning rates were tuned: the first thing a reader of an effect between adapters asks."""
    if "best_lr" in sets:
        return (
            "LRs tuned: the answer is each arm at its own best LR (chosen on the validation slice, reported on the "
            "test slice); the shared-LR figures are there for comparison."
        )
    if sets.get("as_run", {}).get("lr") == "shared LR":
        return (
            "LRs not tuned: every arm trained at one shared LR (CRMA's own parameters at their own, faster LRs), so "
            "an effect may be one of learning speed; tune the LR per arm (`--lr-grid`) to judge each at its best."
        )
    return "LRs set by hand per arm (`name@xK`), not tuned on a validation slice."


def attribution_sentences(summary: dict[str, Any]) -> list[str]:
    """Plain sentences the numbers support: what the run's primary figure is (held-out or training, tuned LRs or
    not), every contrast's effect on it, and the other effects whose interval excludes zero; or why there is no
    attribution."""
    block = summary.get("attribution") or {}
    if not block.get("available"):
        return _why_no_attribution(block, set(summary.get("arms", {})))
    primary = block["primary"]
    if block["primary_kind"] == "held-out":
        kind = "a held-out figure (the test slice)"
    else:
        kind = "a training figure: no held-out slice was evaluated"
    out = [f"Primary outcome: {_PRIMARY_NAMES.get(primary, primary)}, {kind}.", _lr_sentence(block["sets"])]
    for name, chosen in block["sets"].items():
        prefix = f"{_SET_TITLES.get(name, name)}: " if len(block["sets"]) > 1 else ""
        for contrast in chosen["contrasts"].values():
            for metric, stats in contrast["metrics"].items():
                excludes_zero = stats["ci95"] is not None and not stats["ci95"][0] <= 0 <= stats["ci95"][1]
                if metric == primary or excludes_zero:
                    out.append(prefix + stats["sentence"])
    return out


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


def _lr_cell(point: dict[str, Any] | None, chosen: bool) -> str:
    """Mean ± sd of the final validation loss at one multiplier, bold where it is the arm's chosen one."""
    if point is None:
        return _DASH
    text = _DASH if point["mean"] is None else f"{point['mean']:.4f}"
    if point["sd"] is not None:
        text += f" ± {point['sd']:.4f}"
    return f"**{text}**" if chosen else text


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
        rows.append([arm, *(_lr_cell(cells.get(scale), scale == info.get("chosen")) for scale in scales)])
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


# ---------------------------------------------------------------------------------------------------------------------
# The run's document


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
        rows = [["reference", _one_line(prompt.get("reference") or _DASH)]]
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
    return "✅ yes" if value is True else ("❌ no" if value is False else _DASH)


def _setting_cell(value: Any) -> str:
    return _DASH if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
