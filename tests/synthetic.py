"""Synthetic step records with hand-known numbers, shared by the summary, render and plot tests."""

from __future__ import annotations

import math

from crma.ablation.engine.records import StepRecord

STEPS = 40
SPIKE_STEP = 25
DIVERGE_STEP = 15
CRMA_CLIPPED = (10, 20)


def _pre(step: int) -> float:
    """A flat grad norm with a small wiggle: 1.00, 1.01, 1.02, ..."""
    return 1.0 + 0.01 * (step % 3)


def _diag(step: int) -> dict[str, float]:
    return {
        "sigma1_mean": 1.0,
        "sigma2_mean": 1.0 - 0.01 * step,
        "max_rowcol_err": 1e-7,
        "dist_from_identity_mean": 0.005 * step,
        "composite_gain": 1.0,
        "alpha_mean": 1.0 + 0.001 * step,
    }


def _rec(
    arm: str,
    seed: int,
    step: int,
    loss: float,
    pre: float,
    post: float | None = None,
    clipped: bool = False,
    diverged: bool = False,
    crma: dict | None = None,
) -> StepRecord:
    return StepRecord(
        arm=arm,
        seed=seed,
        step=step,
        loss=loss,
        grad_norm_pre=pre,
        grad_norm_post=pre if post is None else post,
        clipped=clipped,
        lr=1e-4,
        tokens=64 * step,
        step_time_s=0.5,
        memory_mb=100.0 + step,
        diverged=diverged,
        crma=crma,
    )


def make_records(seeds: tuple[int, ...] = (1,)) -> list[StepRecord]:
    """Four arms in lockstep, interleaved per step like the runner yields them.

    lora: loss 2 − 0.02·step (+0.1 per extra seed), flat grad norm with a spike of 30 at step 25, clipped at 1.5.
    lora+crma: loss 0.01 lower on steps 1–30 and 0.01 higher on 31–40; ZClip clips steps 10 and 20 (post = 0.9·pre);
      mixing diagnostics every 10 steps.
    lora+zclip: loss +0.05; diverges (NaN loss, inf grad) at step 15 and stops.
    lora#2: an A/A copy of lora.
    """
    recs = []
    for seed in seeds:
        offset = 0.1 * (seed - seeds[0])
        for step in range(1, STEPS + 1):
            base = 2.0 - 0.02 * step + offset
            pre = 30.0 if step == SPIKE_STEP else _pre(step)
            recs.append(_rec("lora", seed, step, base, pre, post=min(pre, 1.5), clipped=pre > 1.5))
            clipped = step in CRMA_CLIPPED
            recs.append(
                _rec(
                    "lora+crma",
                    seed,
                    step,
                    base - 0.01 if step <= 30 else base + 0.01,
                    _pre(step),
                    post=0.9 * _pre(step) if clipped else None,
                    clipped=clipped,
                    crma=_diag(step) if step % 10 == 0 else None,
                )
            )
            if step < DIVERGE_STEP:
                recs.append(_rec("lora+zclip", seed, step, base + 0.05, _pre(step)))
            elif step == DIVERGE_STEP:
                recs.append(_rec("lora+zclip", seed, step, math.nan, math.inf, post=math.inf, diverged=True))
            recs.append(_rec("lora#2", seed, step, base, pre, post=min(pre, 1.5), clipped=pre > 1.5))
    return recs
