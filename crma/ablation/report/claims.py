"""The CRMA author's claims, each held against what a study's paired contrasts support: one table that `study.md`,
the page's study panel and the README's "What we found" all show.

Each claim is read from the contrast `lora+crma − lora+zclip` (CRMA, the clipper the same) with each arm at its own
best LR, from the Sinkhorn mixing's own share (`lora+crma − lora+crma-nomix`), and from the untuned comparison at
the shared LR, so a reader sees at once what survives tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .blocks import Block, Heading, Para, Table


@dataclass(frozen=True)
class Claim:
    """One claim of the author's post: what it says, the study condition and the metric that test it."""

    text: str
    condition: str
    metric: str


CLAIMS = (
    Claim("equal loss at the end (TinyLlama, Mistral-7B)", "plain", "final_test_loss"),
    Claim("a lower peak gradient norm (TinyLlama: 12.15 → 5.75)", "plain", "grad_norm_lora_peak"),
    Claim("a lower mean gradient norm (TinyLlama: 2.34 → 2.07)", "plain", "grad_norm_lora_mean"),
    Claim("a gradient spike held down (Mistral-7B: ~263 held at ~3.0)", "spike", "grad_norm_lora_peak"),
)
# (comparison set, contrast, column title); a spike condition runs each arm at its chosen LR only (set `as_run`).
COLUMNS = (
    ("best_lr", "crma_with_zclip", "lora+crma − lora+zclip, each at its best LR"),
    ("best_lr", "sinkhorn", "of which the Sinkhorn mixing (lora+crma − lora+crma-nomix)"),
    ("shared_lr", "crma_with_zclip", "lora+crma − lora+zclip at the shared LR (untuned)"),
)


def _stats(condition: dict[str, Any], set_name: str, contrast: str, metric: str) -> dict[str, Any] | None:
    sets = (condition.get("attribution") or {}).get("sets") or {}
    chosen = sets.get(set_name) or (sets.get("as_run") if set_name == "best_lr" else None)
    return (((chosen or {}).get("contrasts") or {}).get(contrast) or {}).get("metrics", {}).get(metric)


def verdict_cell(stats: dict[str, Any] | None) -> str:
    """`+0.071 (+0.024 – +0.117): higher`, `… : no detectable difference`, or `–` where the study has no figure."""
    if not stats or stats.get("mean") is None:
        return "–"
    mean, ci = stats["mean"], stats.get("ci95")
    digits = 3 if abs(mean) < 10 else 1
    if ci is None:
        return f"{mean:+.{digits}f} (one seed: no interval)"
    word = "lower" if ci[1] < 0 else "higher" if ci[0] > 0 else "no detectable difference"
    return f"{mean:+.{digits}f} ({ci[0]:+.{digits}f} – {ci[1]:+.{digits}f}): {word}"


def claims_table(study: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """`(header, rows)`: per claim, the metric it is tested on and the effect with its 95 % interval per column."""
    header = ["The author reported", "tested on", *(title for _, _, title in COLUMNS)]
    rows = []
    for claim in CLAIMS:
        condition = study["conditions"].get(claim.condition) or {}
        label = next(
            (
                stats["label"]
                for set_name, contrast, _ in COLUMNS
                if (stats := _stats(condition, set_name, contrast, claim.metric))
            ),
            claim.metric,
        )
        where = f"{label}, {claim.condition}" if claim.condition != "plain" else label
        cells = [verdict_cell(_stats(condition, s, c, claim.metric)) for s, c, _ in COLUMNS]
        rows.append([claim.text, where, *cells])
    return header, rows


def claims_blocks(study: dict[str, Any], *, level: int = 2) -> list[Block]:
    """The claims table under its heading, with what its figures are and are not."""
    n = len(study["protocol"]["seeds"])
    header, rows = claims_table(study)
    return [
        Heading("The author's claims, against this study", level),
        Para(
            f"Mean effect and 95 % Student-t interval over {n} seeds, paired by seed; an interval that contains 0 is "
            "no detectable difference. Losses are held-out (test slice); gradient norms are training figures of the "
            "LoRA parameters (the same set in every arm), before clipping — the author's ~3.0 is a norm after "
            "clipping, which any clipper bounds."
        ),
        Table(header, rows),
    ]
