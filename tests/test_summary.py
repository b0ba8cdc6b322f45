"""Run summaries on synthetic records with hand-computed numbers: smoothing, spikes, per-arm figures, seeds."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from synthetic import DIVERGE_STEP, SPIKE_STEP, STEPS

from crma.ablation.analysis.summary import smooth, spike_steps, summarize_arm, summarize_run


def test_smooth_debiased_ema_and_nan_safe():
    assert smooth([3.0, 1.0, 2.0], 0.0) == [3.0, 1.0, 2.0]
    assert smooth([5.0] * 4, 0.9) == pytest.approx([5.0] * 4)  # debiasing: a constant stays constant
    # w = 0.5: 1/(0.5)=1; (0.25+1)/0.75; (0.625+1.5)/0.875
    assert smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875])
    out = smooth([1.0, math.nan, 2.0, None, 3.0], 0.5)
    assert math.isnan(out[1]) and math.isnan(out[3])
    assert [out[0], out[2], out[4]] == pytest.approx(smooth([1.0, 2.0, 3.0], 0.5))
    with pytest.raises(ValueError, match="`weight`"):
        smooth([1.0], 1.0)


def test_spike_steps_finds_injected_spike_not_noise():
    import random

    rnd = random.Random(0)
    noisy = [1.0 + 0.05 * rnd.gauss(0, 1) for _ in range(300)]
    assert spike_steps(noisy) == []
    assert spike_steps([2.0] * 100) == []  # flat: the floor keeps MAD = 0 from flagging anything
    assert spike_steps([2.0] * 50 + [2.1] + [2.0] * 10) == []  # +5 % is not a spike
    spiky = list(noisy)
    spiky[150] = 5.0
    assert spike_steps(spiky) == [150]
    assert spike_steps([1.0] * 3 + [50.0]) == []  # too little history
    assert spike_steps([1.0, math.nan] * 10 + [9.0]) == [20]  # NaNs are left out of the history
    with pytest.raises(ValueError, match="`window`"):
        spike_steps([1.0], window=0)
    with pytest.raises(ValueError, match="`k`"):
        spike_steps([1.0], k=0)


def test_summarize_arm_hand_computed(records):
    lora = summarize_arm([r for r in records if r.arm == "lora"], trainable_params=4096)
    assert lora["final_loss"] == pytest.approx(1.2)
    losses = [2.0 - 0.02 * s for s in range(1, STEPS + 1)]
    assert lora["final_loss_ema"] == pytest.approx(smooth(losses, 0.9)[-1])
    assert lora["grad_norm_pre_peak"] == 30.0
    assert lora["grad_norm_pre_mean"] == pytest.approx(69.39 / 40)  # 40.4 − 1.01 + 30 over 40 steps
    assert lora["grad_norm_post_peak"] == 1.5
    assert lora["steps_clipped"] == 1 and lora["spike_count"] == 1 and lora["spike_at"] == [SPIKE_STEP]
    assert lora["steps"] == STEPS and lora["diverged"] is False and lora["diverged_at"] is None
    assert lora["tokens"] == 64 * STEPS and lora["wall_s"] == pytest.approx(20.0)
    assert lora["tokens_per_s"] == pytest.approx(128.0) and lora["memory_mb_peak"] == 140.0
    assert lora["trainable_params"] == 4096
    assert lora["spectral_norm"] is None and lora["sigma2"] is None

    crma = summarize_arm([r for r in records if r.arm == "lora+crma"], wall_s=40.0)
    assert crma["steps_clipped"] == 2 and crma["spike_count"] == 0
    assert crma["grad_norm_post_peak"] == pytest.approx(1.02)
    assert crma["wall_s"] == 40.0 and crma["tokens_per_s"] == pytest.approx(64.0)
    assert crma["spectral_norm"] == 1.0 and crma["max_rowcol_err"] == 1e-7
    assert crma["sigma2"] == pytest.approx(0.6) and crma["dist_from_identity"] == pytest.approx(0.2)
    assert crma["composite_gain"] == 1.0 and crma["alpha"] == pytest.approx(1.04)

    zclip = summarize_arm([r for r in records if r.arm == "lora+zclip"])
    assert zclip["diverged"] is True and zclip["diverged_at"] == DIVERGE_STEP and zclip["steps"] == DIVERGE_STEP
    assert zclip["final_loss"] == pytest.approx(2.0 - 0.02 * 14 + 0.05)  # last finite loss
    assert zclip["grad_norm_pre_peak"] == pytest.approx(1.02)  # inf is not a peak
    json.dumps(zclip, allow_nan=False)  # strict JSON: no NaN leaks into a summary

    with pytest.raises(ValueError, match="one arm and one seed"):
        summarize_arm(records)
    with pytest.raises(ValueError, match="empty"):
        summarize_arm([])


def test_summarize_run_single_seed_deltas(records):
    info = {"lora": {"trainable_params": 4096}, "lora+crma": {"trainable_params": 5000, "wall_s": 30.0}}
    summary = summarize_run(records, baseline="lora", arm_info=info)
    assert list(summary["arms"]) == ["lora", "lora+crma", "lora+zclip", "lora#2"]
    assert "seeds" not in summary and "across_seeds" not in summary and summary["seed_list"] == [1]
    assert summary["arms"]["lora+crma"]["wall_s"] == 30.0
    d = summary["deltas"]["lora+crma"]
    assert "lora" not in summary["deltas"]
    assert d["final_loss"]["abs"] == pytest.approx(0.01) and d["final_loss"]["rel_pct"] == pytest.approx(100 / 120)
    assert d["grad_norm_pre_peak"]["abs"] == pytest.approx(1.02 - 30.0)
    assert d["grad_norm_pre_peak"]["rel_pct"] == pytest.approx(100 * (1.02 - 30.0) / 30.0)
    assert d["steps_clipped"] == {"abs": 1.0, "rel_pct": 100.0}
    assert d["trainable_params"]["rel_pct"] == pytest.approx(100 * 904 / 4096)
    assert "sigma2" not in d  # the baseline has no mixing figures
    assert summary["deltas"]["lora#2"]["final_loss"] == {"abs": 0.0, "rel_pct": 0.0}
    json.dumps(summary, allow_nan=False)
    with pytest.raises(ValueError, match=r"`baseline` 'lora\+mix' is not an arm"):
        summarize_run(records, baseline="lora+mix")
    with pytest.raises(ValueError, match="`arm_info` names arm"):
        summarize_run(records, arm_info={"lora+mix": {}})


def test_summarize_run_across_seeds(records2):
    summary = summarize_run(records2)
    assert sorted(summary["seeds"]) == [1, 2] and summary["seed_list"] == [1, 2]
    assert summary["seeds"][2]["arms"]["lora"]["final_loss"] == pytest.approx(1.3)
    stat = summary["across_seeds"]["lora"]["final_loss"]
    assert stat["mean"] == pytest.approx(1.25) and stat["n"] == 2
    assert stat["std"] == pytest.approx(statistics.stdev([1.2, 1.3]))  # sample std: 0.0707, not 0.05
    assert summary["across_seeds"]["lora"]["grad_norm_pre_peak"] == {"mean": 30.0, "std": 0.0, "n": 2}
    assert summary["arms"]["lora"]["final_loss"] == pytest.approx(1.25)
    assert summary["arms"]["lora+zclip"]["diverged"] is True and summary["arms"]["lora+zclip"]["n_seeds"] == 2
    assert summary["deltas"]["lora+crma"]["final_loss"]["abs"] == pytest.approx(0.01)
    assert summary["seeds"][1]["deltas"]["lora+crma"]["final_loss"]["abs"] == pytest.approx(0.01)
    json.dumps(summary, allow_nan=False)
