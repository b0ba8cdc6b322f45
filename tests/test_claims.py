"""The author's claims table: each claim read from the right condition, contrast and comparison set, with a verdict
that follows the interval (hand-made study summaries)."""

from __future__ import annotations

from crma.ablation.report.claims import CLAIMS, claims_blocks, claims_table, verdict_cell
from crma.ablation.report.render import to_markdown


def _stats(label: str, mean: float, ci: list[float] | None) -> dict:
    return {"label": label, "mean": mean, "ci95": ci, "n": 3}


def _study() -> dict:
    test_loss = "final held-out (test) loss"
    peak, mean = "peak LoRA-only grad norm", "mean LoRA-only grad norm"
    best = {
        "crma_with_zclip": {
            "metrics": {
                "final_test_loss": _stats(test_loss, -0.071, [-0.117, -0.024]),
                "grad_norm_lora_peak": _stats(peak, 4.2, [-4.7, 13.2]),
                "grad_norm_lora_mean": _stats(mean, -0.33, [-0.69, 0.02]),
            }
        },
        "sinkhorn": {"metrics": {"final_test_loss": _stats(test_loss, 0.008, [0.002, 0.014])}},
    }
    shared = {"crma_with_zclip": {"metrics": {"final_test_loss": _stats(test_loss, -0.155, [-0.182, -0.127])}}}
    spike = {"crma_with_zclip": {"metrics": {"grad_norm_lora_peak": _stats(peak, -12.0, [-20.0, -4.0])}}}
    return {
        "protocol": {"seeds": [1, 2, 3]},
        "conditions": {
            "plain": {"attribution": {"sets": {"best_lr": {"contrasts": best}, "shared_lr": {"contrasts": shared}}}},
            "spike": {"attribution": {"sets": {"as_run": {"contrasts": spike}}}},
        },
    }


def test_verdicts_follow_the_interval() -> None:
    assert verdict_cell(_stats("x", -0.071, [-0.117, -0.024])) == "-0.071 (-0.117 – -0.024): lower"
    assert verdict_cell(_stats("x", 0.008, [0.002, 0.014])) == "+0.008 (+0.002 – +0.014): higher"
    assert verdict_cell(_stats("x", 4.2, [-4.7, 13.2])) == "+4.200 (-4.700 – +13.200): no detectable difference"
    assert verdict_cell(_stats("x", -12.0, [-20.0, -4.0])) == "-12.0 (-20.0 – -4.0): lower"
    assert verdict_cell(_stats("x", 0.3, None)) == "+0.300 (one seed: no interval)"
    assert verdict_cell(None) == "–"


def test_each_claim_reads_its_condition_contrast_and_set() -> None:
    header, rows = claims_table(_study())
    assert header[2:] == [
        "lora+crma − lora+zclip, each at its best LR",
        "of which the Sinkhorn mixing (lora+crma − lora+crma-nomix)",
        "lora+crma − lora+zclip at the shared LR (untuned)",
    ]
    assert [row[0] for row in rows] == [claim.text for claim in CLAIMS]
    loss, peak, mean, spike = rows
    assert loss[1:] == [
        "final held-out (test) loss",
        "-0.071 (-0.117 – -0.024): lower",
        "+0.008 (+0.002 – +0.014): higher",
        "-0.155 (-0.182 – -0.127): lower",
    ]
    assert peak[1:] == ["peak LoRA-only grad norm", "+4.200 (-4.700 – +13.200): no detectable difference", "–", "–"]
    assert mean[2] == "-0.330 (-0.690 – +0.020): no detectable difference"
    # The spike condition trains each arm at its chosen LR only: its one set stands in for "each at its best LR".
    assert spike[1:] == ["peak LoRA-only grad norm, spike", "-12.0 (-20.0 – -4.0): lower", "–", "–"]


def test_the_blocks_say_what_the_figures_are() -> None:
    text = to_markdown(claims_blocks(_study(), level=3))
    assert text.startswith("### The author's claims, against this study")
    assert "over 3 seeds" in text and "Losses are held-out (test slice)" in text and "before clipping" in text
