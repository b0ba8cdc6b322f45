"""`crma.lab.live`: the live view's redraw throttle, progress line and charts, and following a run folder."""

from __future__ import annotations

import math

import pytest

from crma.ablation.engine.records import EvalRecord, Phase, StepRecord, write_metrics_jsonl
from crma.ablation.report import plots
from crma.ablation.spec.arms import ARM_SPECS
from crma.ablation.spec.config import AblationConfig
from crma.lab.live import LiveView, follow, watch


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _record(
    arm: str, step: int, *, seed: int = 42, loss: float = 2.0, diverged: bool = False, tokens_per_step: int = 100
) -> StepRecord:
    return StepRecord(
        arm=arm,
        seed=seed,
        step=step,
        loss=loss,
        grad_norm_pre=1.0 + 0.01 * step,
        grad_norm_post=1.0,
        clipped=step % 7 == 0,
        lr=2e-4,
        tokens=tokens_per_step * step,
        step_time_s=0.5,
        memory_mb=1536.0,
        diverged=diverged,
    )


def _end(status: str = "finished", error: str | None = None) -> dict:
    return {"status": status, "error": error, "wall_s": 12.0}


def test_liveview_throttles_redraws_and_always_draws_phases_and_the_end():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=10, arms=["lora", "lora+crma"])
    view = LiveView(cfg, clock=clock, min_interval_s=0.35)
    assert view.update(Phase("loading model tiny-random")) is True
    clock.now += 0.01
    assert view.update(_record("lora", 1)) is True  # first step: draw at once
    draws = []
    for (step, arm), wait in zip([(1, "lora+crma"), (2, "lora"), (2, "lora+crma")], (0.1, 0.1, 0.2), strict=True):
        clock.now += wait
        draws.append(view.update(_record(arm, step)))
    assert draws == [False, False, True]  # 0.1 and 0.2 s after the last draw: no; 0.4 s: yes
    clock.now += 0.05
    assert view.update(Phase("seed 42: saving adapters")) is True
    assert view.finish(_end()) is True  # the end is always drawn, even right after a draw


def test_liveview_redraw_rate_is_bounded_and_updates_build_no_figures(monkeypatch):
    def no_figures(*args, **kwargs):
        raise AssertionError("update() must not build a figure: only the redraw does")

    for name in ("make_loss_figure", "make_grad_norm_figure", "make_delta_figure", "make_mixing_figure"):
        monkeypatch.setattr(plots, name, no_figures)
    clock = FakeClock()
    arms = list(ARM_SPECS)
    cfg = AblationConfig(model="tiny-random", steps=1000, arms=arms)
    view = LiveView(cfg, clock=clock, min_interval_s=0.35)
    for step in range(1, 1001):
        for arm in arms:
            clock.now += 0.02 / len(arms)  # 20 ms per lockstep step of every arm: 20 s of run
            view.update(_record(arm, step))
    assert len(view.records) == 1000 * len(arms) and view.done == 1000
    assert view.redraws <= 20 / 0.35 + 2  # at most ~3 per second
    # Counters, not re-summing the records: tokens are the newest cumulative count per arm, summed over arms.
    assert view.tokens == len(arms) * 100 * 1000 and math.isclose(view.compute_s, 1000 * len(arms) * 0.5)


def test_liveview_backs_off_when_drawing_is_slow():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=50, arms=["lora", "lora+crma"])
    view = LiveView(cfg, clock=clock, min_interval_s=0.35)
    view.update(_record("lora", 1))

    class SlowClock(FakeClock):  # each reading advances 0.5 s: figures() measures a 0.5 s drawing cost
        def __call__(self) -> float:
            self.now += 0.5
            return self.now

    slow = SlowClock()
    view.clock = slow
    view.figures()
    view.clock = clock
    clock.now = slow.now
    view._last_draw = clock.now
    clock.now += 1.0
    assert view.update(_record("lora+crma", 1)) is False  # 1 s < 3 x 0.5 s drawing cost
    clock.now += 0.6
    assert view.update(_record("lora", 2)) is True


def test_liveview_progress_text_and_figures():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=10, arms=["lora+crma", "lora"])  # baseline arm yields second
    view = LiveView(cfg, clock=clock, device="CPU (2 cores)")
    assert "waiting" in view.progress_text()
    view.update(_record("lora+crma", 1))
    figures = view.figures()  # no baseline record yet: the delta chart is empty, not an error
    loss, delta = figures["loss"], figures["loss_delta"]
    assert {t.name for t in loss.data} >= {"lora+crma"}
    assert not [t for t in delta.data if t.name == "lora+crma"]
    for step in range(1, 5):
        clock.now += 1.0
        if step > 1:
            view.update(_record("lora+crma", step))
        view.update(_record("lora", step, loss=2.5))
    text = view.progress_text()
    assert "Step 4/10" in text and "elapsed 0:04" in text and "ETA 0:08" in text and "CPU (2 cores)" in text
    assert "RSS 1.50 GiB" in text and "200 tokens/s" in text
    assert view.fraction() == pytest.approx(0.4)
    figures = view.figures(smoothing=0.0, log_scale=True)
    loss, grad, delta = figures["loss"], figures["grad_norm"], figures["loss_delta"]
    assert {t.name for t in loss.data} >= {"lora", "lora+crma"}
    assert grad.layout.yaxis.type == "log"
    assert [t.name for t in delta.data if t.name == "lora+crma"]
    view.update(_record("lora+crma", 5, loss=float("nan"), diverged=True))
    assert "lora+crma diverged at step 5" in view.progress_text() and "other arms continue" in view.progress_text()
    assert 'role="progressbar"' in view.progress_html()
    view.finish(_end(status="stopped", error="stopped by request"))
    assert view.progress_text().startswith("Stopped at step 5/10")
    view.finish(_end(status="failed", error="out of memory: <lower batch_size>"))
    assert "Failed at step 5/10: out of memory" in view.progress_text()
    assert "&lt;lower batch_size&gt;" in view.progress_html()  # error text is escaped in the HTML
    view.finish(_end())
    assert view.fraction() == 1.0 and view.progress_text().startswith("Finished 10 steps x 2 arms in 0:12")


def test_liveview_multi_seed_progress_counts_all_seeds():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=5, seeds=[1, 2], arms=["lora", "lora+crma"])
    view = LiveView(cfg, clock=clock)
    for seed in (1, 2):
        for step in range(1, 6 if seed == 1 else 3):
            for arm in ("lora", "lora+crma"):
                clock.now += 0.5
                view.update(_record(arm, step, seed=seed))
    assert view.done == 7 and view.total_steps == 10
    assert "Step 7/10 · seed 2 (2/2)" in view.progress_text()
    loss = view.figures()["loss"]  # live: the current seed only
    assert "seed 2" in (loss.layout.title.text or "")


def test_follow_feeds_the_view_from_the_run_folder_as_it_grows(tmp_path):
    cfg = AblationConfig(model="tiny-random", steps=3, arms=["lora", "lora+crma"], eval_rows=4)
    staging = tmp_path / ".run.partial-1234"
    staging.mkdir()
    (staging / "config.json").write_text(cfg.to_json())
    (staging / "progress.json").write_text('{"phase": "seed 42: setting up 2 arms", "seed": 42, "started_at": 50.0}')
    written = [_record(arm, s, loss=math.nan if s == 2 else 2.0) for s in (1, 2) for arm in ("lora", "lora+crma")]
    held_out = EvalRecord(arm="lora", seed=42, step=0, split="test", loss=2.2, tokens=10, eval_s=0.1)
    write_metrics_jsonl([held_out, *written], staging / "metrics.jsonl")
    with (staging / "metrics.jsonl").open("a") as fh:
        fh.write('{"arm": "lora", "seed": 42, "st')  # a line the run is still writing: not read yet
    view = LiveView(cfg, clock=FakeClock())
    looks = follow(tmp_path / "run", view, interval_s=0.0)
    assert next(looks) is True  # the phase and the first records: draw
    assert view.started == 50.0 and view.phase.startswith("seed 42") and len(view.records) == 4
    assert view.evals == [held_out] and math.isnan(view.records[2].loss) and view.done == 2
    assert next(looks) is False  # a look without news
    # The run ends: its staging folder moves into place with summary.json; the follower reads the rest and stops.
    with (staging / "metrics.jsonl").open("a") as fh:
        fh.write(
            'ep": 3, "loss": 1.0, "grad_norm_pre": 1.0, "grad_norm_post": 1.0, "clipped": false, "lr": 0.0002, '
            '"tokens": 300, "step_time_s": 0.5, "memory_mb": 10.0}\n'
        )
    (staging / "summary.json").write_text('{"status": "stopped", "error": "stopped by request", "wall_s": 3.0}')
    staging.rename(tmp_path / "run")
    assert list(looks) == [True]
    assert view.records[-1].step == 3 and view.result["status"] == "stopped"
    assert "Stopped at step 3/3" in view.progress_text()
    assert [look.summary for look in watch(tmp_path / "run", interval_s=0.0)] == [view.result]


def test_eta_is_the_smoothed_step_time_and_counts_the_seeds_set_up():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=10, seeds=[1, 2], arms=["lora", "lora+crma"])
    view = LiveView(cfg, clock=clock)
    view.update(Phase("seed 1: setting up 2 arms", seed=1))
    clock.now += 30.0  # a 30 s set-up (PiSSA, optimizer) before the first step
    view.update(_record("lora", 1, seed=1))
    assert view.setup_s == pytest.approx(30.0) and view.eta_s() is None  # one step: no pace yet
    gaps = [2.0, 2.0, 2.0, 8.0, 2.0]  # one slow step (another process took the cores) among steady ones
    etas = []
    for step, gap in enumerate(gaps, start=2):
        clock.now += gap
        view.update(_record("lora", step, seed=1))
        clock.now += 0.01
        view.update(_record("lora+crma", step, seed=1))  # the second arm of a step does not advance the pace
        etas.append(view.eta_s())
    per_step = view.step_seconds()
    ema, weight = 0.0, LiveView.ETA_WEIGHT
    for i, gap in enumerate(gaps):
        ema = weight * ema + (1 - weight) * (gap + (0.01 if i else 0.0))  # lora to lora, across the other arm
    assert per_step == pytest.approx(ema / (1 - weight ** len(gaps)))  # debiased EMA of the gaps
    # Steps left in seed 1 and all of seed 2, plus seed 2's set-up as long as seed 1's.
    assert etas[-1] == pytest.approx(per_step * (20 - 6) + 30.0)
    assert etas[0] == pytest.approx(2.0 * 18 + 30.0)
    # Waiting inside a step does not move the ETA (it used to grow with the wall clock until the step ended, then
    # drop: a sawtooth); the browser counts it down between updates.
    clock.now += 1.5
    assert view.eta_s() == etas[-1]
    # A phase between two steps (seed 2's set-up) is not a step time.
    for step in range(7, 11):
        clock.now += 2.0
        view.update(_record("lora", step, seed=1))
    before = view.step_seconds()
    view.update(Phase("seed 2: setting up 2 arms", seed=2))
    clock.now += 40.0
    view.update(_record("lora", 1, seed=2))
    assert view.step_seconds() == pytest.approx(before) and view.setup_s == pytest.approx(40.0)
    assert view.eta_s() == pytest.approx(before * 9)  # the last seed: no set-up left


def test_progress_html_clocks_tick_in_the_browser_during_set_up():
    clock = FakeClock()
    cfg = AblationConfig(model="tiny-random", steps=10, arms=["lora", "lora+crma"])
    view = LiveView(cfg, clock=clock)
    view.update(Phase("seed 42: setting up 2 arms", seed=42))
    clock.now += 75.0
    html = view.progress_html()  # no step yet: the elapsed clock must still move between two server updates
    assert '<span class="crma-tick" data-s="75.0" data-dir="up">1:15</span>' in html
    assert view.progress_text() == "seed 42: setting up 2 arms (1:15) · CPU"
    for step in (1, 2, 3):
        clock.now += 2.0
        view.update(_record("lora", step))
    html = view.progress_html()
    assert (
        'data-dir="up">1:21</span>' in html
        and '<span class="crma-tick" data-s="14.0" data-dir="down">0:14</span>' in (html)
    )
    assert "elapsed 1:21 · ETA 0:14" in view.progress_text()
    view.finish(_end(status="stopped", error="stopped by request"))
    assert "crma-tick" not in view.progress_html()  # an ended run's line is still


def test_charts_keep_one_uirevision_per_run():
    cfg = AblationConfig(model="tiny-random", steps=3, arms=["lora", "lora+crma"])
    first, second = LiveView(cfg), LiveView(cfg)
    for view in (first, second):
        view.update(_record("lora", 1))
        view.update(_record("lora+crma", 1))

    def revisions(view, **kwargs):
        return {key: fig.layout.uirevision for key, fig in view.figures(**kwargs).items() if fig is not None}

    drawn = revisions(first)
    assert drawn == {name: f"{name}:{first.revision}" for name in ("loss", "grad_norm", "loss_delta")}
    # The same run redrawn (a live update, a smoothing change) keeps them: the page keeps the visitor's zoom.
    assert revisions(first, smoothing=0.0, log_scale=True) == drawn
    # Another run starts afresh.
    assert not set(drawn.values()) & set(revisions(second).values())


def test_a_view_that_re_attaches_counts_from_the_runs_start():
    now = [100.0]
    first = LiveView(AblationConfig(model="tiny-random"), clock=lambda: now[0])
    now[0] = 175.0
    again = LiveView(first.cfg, clock=lambda: now[0], started=first.started)
    assert again.started == first.started == 100.0
    assert "1:15" in again.progress_html()  # elapsed since the run started, not since the reload
