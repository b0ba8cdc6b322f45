"""Attribution over the 2x2 grid: effects and Student-t intervals against hand-computed values; 1, 2 and 5 seeds."""

from __future__ import annotations

import math

import pytest

from crma.ablation.analysis.attribution import (
    HEADLINE_METRICS,
    attribution,
    grid_effects,
    interval,
    sentence,
    t_quantile,
)
from crma.ablation.report.render import attribution_sentences, summary_markdown

# Student's t at 0.975 from the printed table (e.g. Fisher & Yates), for the degrees of freedom seeds give.
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize(("df", "expected"), sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df, expected) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-4)


def test_main_effects_and_interaction_by_hand() -> None:
    effects = grid_effects({"lora": 10.0, "lora+zclip": 6.0, "lora+mix": 9.0, "lora+crma": 4.0})
    assert effects["zclip"] == pytest.approx(((6 - 10) + (4 - 9)) / 2)  # -4.5
    assert effects["mixing"] == pytest.approx(((9 - 10) + (4 - 6)) / 2)  # -1.5
    assert effects["interaction"] == pytest.approx((4 - 9) - (6 - 10))  # -1.0
    additive = grid_effects({"lora": 1.0, "lora+zclip": 3.0, "lora+mix": 6.0, "lora+crma": 8.0})
    assert additive == {"zclip": 2.0, "mixing": 5.0, "interaction": 0.0}


def test_interval_with_five_two_and_one_seed() -> None:
    five = interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert five["mean"] == 3.0 and five["sd"] == pytest.approx(math.sqrt(2.5))
    assert five["ci95"] == pytest.approx([3.0 - half, 3.0 + half], abs=1e-6)
    two = interval([1.0, 3.0])
    assert two["ci95"] == pytest.approx([2.0 - 12.7062047, 2.0 + 12.7062047], abs=1e-5)  # sd = sqrt(2), n = 2
    one = interval([0.7])
    assert one == {"mean": 0.7, "sd": None, "ci95": None, "n": 1}


def test_sentences_say_what_the_numbers_support() -> None:
    label = "peak LoRA-only grad norm"
    clear = sentence("mixing", label, {"mean": -2.1, "ci95": [-3.8, -0.4], "n": 5})
    assert clear == "The mixing lowered the peak LoRA-only grad norm by 2.1 (95 % CI -3.8 – -0.4, 5 seeds)."
    unclear = sentence("mixing", label, {"mean": 0.15, "ci95": [-0.8, 1.1], "n": 3})
    assert unclear.startswith("No effect of the mixing on the peak LoRA-only grad norm is detectable at 3 seeds")
    single = sentence("zclip", label, {"mean": 0.31, "ci95": None, "n": 1})
    assert (
        single
        == "On one seed, ZClip raised the peak LoRA-only grad norm by 0.31; no interval can be given with one seed."
    )


def _summary(values_by_seed: dict[int, dict[str, float]]) -> dict:
    seeds = {
        seed: {"arms": {arm: {key: value for key, _ in HEADLINE_METRICS} for arm, value in arms.items()}}
        for seed, arms in values_by_seed.items()
    }
    return {"seeds": seeds, "seed_list": sorted(values_by_seed), "arms": {arm: {} for arm in values_by_seed[1]}}


def test_attribution_pairs_effects_by_seed() -> None:
    grid = {1: (10, 6, 9, 4), 2: (11, 7, 9, 4), 3: (9, 5, 9, 3), 4: (10, 6, 8, 4), 5: (12, 8, 10, 5)}
    arms = ("lora", "lora+zclip", "lora+mix", "lora+crma")
    block = attribution(_summary({s: dict(zip(arms, v, strict=True)) for s, v in grid.items()}))
    assert block["available"] and block["n_seeds"] == 5
    mixing = block["metrics"]["grad_norm_lora_peak"]["mixing"]
    expected = [((x - b) + (zx - z)) / 2 for b, z, x, zx in grid.values()]
    assert mixing["per_seed"] == pytest.approx(expected) and mixing["n"] == 5
    assert mixing["mean"] == pytest.approx(sum(expected) / 5)
    assert mixing["ci95"][1] < 0 and mixing["sentence"].startswith("The mixing lowered")


def test_attribution_needs_the_grid_and_says_so() -> None:
    two_arms = {"seed_list": [42], "arms": {"lora": {"final_loss_ema": 1.0}, "lora+crma": {"final_loss_ema": 0.9}}}
    block = attribution(two_arms)
    assert block["available"] is False and "lora+zclip" in block["reason"]
    assert "two things at once" in attribution_sentences({**two_arms, "attribution": block})[0]


def test_a_seed_missing_a_figure_is_left_out_of_that_metric() -> None:
    arms = ("lora", "lora+zclip", "lora+mix", "lora+crma")
    summary = _summary({1: dict(zip(arms, (1, 2, 3, 4), strict=True)), 2: dict(zip(arms, (1, 2, 3, 5), strict=True))})
    summary["seeds"][2]["arms"]["lora+mix"]["spike_count"] = None
    block = attribution(summary)
    assert block["metrics"]["spike_count"]["seeds"] == [1] and block["metrics"]["spike_count"]["mixing"]["n"] == 1
    assert block["metrics"]["final_loss_ema"]["mixing"]["n"] == 2


def test_an_engine_run_of_the_grid_carries_attribution() -> None:
    from crma.ablation.engine.loop import run_ablation
    from crma.ablation.spec.schema import parse_config

    arms = ["lora", "lora+zclip", "lora+mix", "lora+crma"]
    cfg = parse_config(dict(model="tiny-random", rows=8, steps=2, batch_size=2, seq_len=160, arms=arms, seeds=[1, 2]))
    *_, result = run_ablation(cfg)
    block = result.summary["attribution"]
    assert block["available"] and block["n_seeds"] == 2
    assert set(block["metrics"]) == {key for key, _ in HEADLINE_METRICS}
    markdown = summary_markdown(result.summary)
    assert "### What the 2×2 grid attributes" in markdown and "95 % CI" in markdown
