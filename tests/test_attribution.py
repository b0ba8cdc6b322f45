"""Attribution: every contrast the arms allow (the 2x2 grid's effects, the controls' differences), paired by seed, with
Student-t intervals against hand-computed values on 1, 2 and 5 seeds; at each arm's best LR and at the shared LR."""

from __future__ import annotations

import math

import pytest

from crma.ablation.analysis.attribution import (
    CONTRASTS,
    HEADLINE_METRICS,
    attribution,
    contrast_value,
    interval,
    sentence,
    t_quantile,
)
from crma.ablation.analysis.selection import select_lrs
from crma.ablation.report.render import attribution_sentences, summary_markdown

# Student's t at 0.975 from the printed table (e.g. Fisher & Yates), for the degrees of freedom seeds give.
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 9: 2.262, 29: 2.045}


@pytest.mark.parametrize(("df", "expected"), sorted(T_TABLE.items()))
def test_t_quantile_matches_the_table(df, expected) -> None:
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)
    assert t_quantile(0.025, df) == pytest.approx(-expected, abs=5e-4)


def _effects(values: dict[str, float]) -> dict[str, float]:
    return {c.key: contrast_value(c, values) for c in CONTRASTS if all(a in values for a in c.weights)}


def test_main_effects_and_interaction_by_hand() -> None:
    effects = _effects({"lora": 10.0, "lora+zclip": 6.0, "lora+mix": 9.0, "lora+crma": 4.0})
    assert effects["zclip"] == pytest.approx(((6 - 10) + (4 - 9)) / 2)  # -4.5
    assert effects["crma"] == pytest.approx(((9 - 10) + (4 - 6)) / 2)  # -1.5
    assert effects["interaction"] == pytest.approx((4 - 9) - (6 - 10))  # -1.0
    additive = _effects({"lora": 1.0, "lora+zclip": 3.0, "lora+mix": 6.0, "lora+crma": 8.0})
    assert additive == {"zclip": 2.0, "crma": 5.0, "interaction": 0.0, "crma_with_zclip": 8.0 - 3.0}


def test_the_controls_differences_by_hand() -> None:
    effects = _effects({"lora+zclip": 2.0, "lora-matched": 1.9, "lora+crma-nomix": 1.5, "lora+crma": 1.4})
    assert effects == pytest.approx(
        {
            "crma_with_zclip": 1.4 - 2.0,
            "sinkhorn": 1.4 - 1.5,
            "side_channel": 1.5 - 2.0,
            "capacity": 1.9 - 2.0,
            "crma_vs_capacity": 1.4 - 1.9,
        }
    )


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
    clear = sentence("the mixing", label, {"mean": -2.1, "ci95": [-3.8, -0.4], "n": 5})
    assert clear == "The mixing lowered the peak LoRA-only grad norm by 2.1 (95 % CI -3.8 – -0.4, 5 seeds)."
    unclear = sentence("the mixing", label, {"mean": 0.15, "ci95": [-0.8, 1.1], "n": 3})
    assert unclear.startswith("No effect of the mixing on the peak LoRA-only grad norm is detectable at 3 seeds")
    single = sentence("ZClip", label, {"mean": 0.31, "ci95": None, "n": 1})
    assert (
        single
        == "On one seed, ZClip raised the peak LoRA-only grad norm by 0.31; no interval can be given with one seed."
    )


def _summary(values_by_seed: dict[int, dict[str, float]]) -> dict:
    seeds = {
        seed: {"arms": {arm: {key: value for key, _, _ in HEADLINE_METRICS} for arm, value in arms.items()}}
        for seed, arms in values_by_seed.items()
    }
    summary = {"seeds": seeds, "seed_list": sorted(values_by_seed), "arms": {arm: {} for arm in values_by_seed[1]}}
    summary["lr_selection"] = select_lrs(summary)
    return summary


def test_attribution_pairs_effects_by_seed() -> None:
    grid = {1: (10, 6, 9, 4), 2: (11, 7, 9, 4), 3: (9, 5, 9, 3), 4: (10, 6, 8, 4), 5: (12, 8, 10, 5)}
    arms = ("lora", "lora+zclip", "lora+mix", "lora+crma")
    block = attribution(_summary({s: dict(zip(arms, v, strict=True)) for s, v in grid.items()}))
    assert block["available"] and block["n_seeds"] == 5 and list(block["sets"]) == ["as_run"]
    assert block["primary"] == "final_test_loss" and block["primary_kind"] == "held-out"
    effect = block["sets"]["as_run"]["contrasts"]["crma"]["metrics"]["grad_norm_lora_peak"]
    expected = [((x - b) + (zx - z)) / 2 for b, z, x, zx in grid.values()]
    assert effect["per_seed"] == pytest.approx(expected) and effect["n"] == 5
    assert effect["mean"] == pytest.approx(sum(expected) / 5)
    assert effect["ci95"][1] < 0 and effect["sentence"].startswith("CRMA's side channel lowered")


def test_attribution_needs_the_grid_and_says_so() -> None:
    two_arms = {"seed_list": [42], "arms": {"lora": {"final_loss_ema": 1.0}, "lora+crma": {"final_loss_ema": 0.9}}}
    block = attribution(two_arms)
    assert block["available"] is False and "lora+crma-nomix" in block["reason"]
    assert "two things at once" in attribution_sentences({**two_arms, "attribution": block})[0]


def test_a_seed_missing_a_figure_is_left_out_of_that_metric() -> None:
    arms = ("lora", "lora+zclip", "lora+mix", "lora+crma")
    summary = _summary({1: dict(zip(arms, (1, 2, 3, 4), strict=True)), 2: dict(zip(arms, (1, 2, 3, 5), strict=True))})
    summary["seeds"][2]["arms"]["lora+mix"]["spike_count"] = None
    metrics = attribution(summary)["sets"]["as_run"]["contrasts"]["crma"]["metrics"]
    assert metrics["spike_count"]["seeds"] == [1] and metrics["spike_count"]["n"] == 1
    assert metrics["final_loss_ema"]["n"] == 2


def test_a_tuned_run_is_attributed_at_each_arms_best_lr_and_at_the_shared_lr() -> None:
    # Validation and test losses at x1 and x3: ZClip LoRA is better at x3, the CRMA arms at x1.
    val = {"lora+zclip": (2.0, 1.6), "lora+crma-nomix": (1.5, 1.7), "lora+crma": (1.45, 1.8)}
    test = {"lora+zclip": (2.1, 1.7), "lora+crma-nomix": (1.6, 1.9), "lora+crma": (1.6, 2.0)}
    seeds = {}
    for seed, shift in ((1, 0.0), (2, 0.02), (3, -0.01)):
        arms = {}
        for arm in val:
            for i, m in enumerate((1, 3)):
                figures = {"final_val_loss": val[arm][i] + shift, "final_test_loss": test[arm][i] + shift}
                arms[f"{arm}@x{m}"] = figures
        seeds[seed] = {"arms": arms}
    summary = {"seeds": seeds, "seed_list": [1, 2, 3], "arms": {}}
    summary["lr_selection"] = select_lrs(summary)
    chosen = {arm: info["chosen"] for arm, info in summary["lr_selection"]["arms"].items()}
    assert chosen == {"lora+zclip": 3.0, "lora+crma-nomix": 1.0, "lora+crma": 1.0}
    assert all(info["at_edge"] for info in summary["lr_selection"]["arms"].values())  # a 2-point grid: every end
    block = attribution(summary)
    assert list(block["sets"]) == ["best_lr", "shared_lr"]
    best, shared = block["sets"]["best_lr"], block["sets"]["shared_lr"]
    assert best["labels"]["lora+zclip"] == "lora+zclip@x3" and shared["labels"]["lora+zclip"] == "lora+zclip@x1"
    # The side channel's gain over ZClip LoRA shrinks once ZClip LoRA has its own LR: 1.6 - 1.7 vs 1.6 - 2.1.
    at_best = best["contrasts"]["side_channel"]["metrics"]["final_test_loss"]
    at_shared = shared["contrasts"]["side_channel"]["metrics"]["final_test_loss"]
    assert at_best["mean"] == pytest.approx(-0.1) and at_shared["mean"] == pytest.approx(-0.5)
    assert best["contrasts"]["sinkhorn"]["metrics"]["final_test_loss"]["mean"] == pytest.approx(0.0)
    # The text says which answer it is: tuned LRs, judged on the held-out test slice.
    from crma.ablation.report.sections import attribution_sentences

    sentences = attribution_sentences({**summary, "attribution": block})
    assert sentences[0].startswith("Primary outcome: the final held-out (test) loss, a held-out figure")
    assert sentences[1].startswith("LRs tuned: the answer is each arm at its own best LR")


def test_an_engine_run_of_the_grid_carries_attribution() -> None:
    from crma.ablation.engine.loop import train
    from crma.ablation.spec.schema import parse_config

    arms = ["lora", "lora+zclip", "lora+mix", "lora+crma"]
    cfg = parse_config(
        dict(model="tiny-random", rows=8, steps=2, batch_size=2, seq_len=160, arms=arms, seeds=[1, 2], eval_rows=2)
    )
    block = train(cfg).summary["attribution"]
    assert block["available"] and block["n_seeds"] == 2 and block["primary_kind"] == "held-out"
    contrasts = block["sets"]["as_run"]["contrasts"]
    assert set(contrasts) == {"zclip", "crma", "interaction", "crma_with_zclip"}
    assert set(contrasts["crma"]["metrics"]) == {key for key, _, _ in HEADLINE_METRICS}
    markdown = summary_markdown(train(cfg).summary)
    assert "### What can be credited to what" in markdown and "95 % CI" in markdown
    assert "Primary outcome: the final held-out (test) loss" in markdown
