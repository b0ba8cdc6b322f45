"""`LiveView`: what the page shows of a run — progress line, clocks, ETA, charts — fed from the run's folder as it
grows (`follow`), and when the page should redraw. Any page follows any run this way: the one that pressed Run, the
same page after a reload, an `/ablate` client; none of them is needed for the run to go on."""

from __future__ import annotations

import html
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crma.ablation.engine.records import EvalRecord, Phase, StepRecord
from crma.ablation.output.run_folder import FolderTail
from crma.ablation.spec.arms import baseline_arm
from crma.ablation.spec.config import AblationConfig


class LiveView:
    """Turns a run's records and phases into what the page shows, and decides when the page should redraw.

    `update(event)` is O(1) per event (counters only); figures are built from the records only when a redraw is due:
    at most one per `min_interval_s` (and never more often than three times the last drawing cost, so drawing cannot
    eat more than a quarter of a fast run's time), always on a `Phase` and at the end (`finish`).

    The ETA is the smoothed wall time of one lockstep step (a debiased EMA with weight `ETA_WEIGHT` over the gaps
    between steps; a gap that spans a phase such as a seed's set-up is left out) times the steps left, plus the
    measured set-up time of each seed still to come: one slow or fast step moves it only a little.

    Args:
        cfg (`AblationConfig`): the run's config.
        device (`str`): device label for the progress line.
        min_interval_s (`float`): the throttle.
        clock (`Callable[[], float]`): the clock, in seconds since the epoch like `progress.json`'s `started_at`
            (injected in tests).
        smoothing (`float`): EMA weight for the charts (the raw line stays faint behind).
        log_scale (`bool`): logarithmic grad-norm axis.
        started (`float | None`): when the run started, on `clock` (`progress.json`'s `started_at`, for a page that
            re-attaches); None: now.
    """

    ETA_WEIGHT = 0.8

    def __init__(
        self,
        cfg: AblationConfig,
        *,
        device: str = "CPU",
        min_interval_s: float = 0.35,
        clock: Callable[[], float] = time.time,
        smoothing: float = 0.6,
        log_scale: bool = False,
        started: float | None = None,
    ):
        self.cfg, self.device, self.min_interval_s, self.clock = cfg, device, min_interval_s, clock
        self.smoothing, self.log_scale = smoothing, log_scale
        self.labels = cfg.arm_labels
        self.baseline = baseline_arm(self.labels)
        self.seeds = cfg.seed_list
        self.total_steps = cfg.steps * len(self.seeds)
        self.records: list[StepRecord] = []
        self.evals: list[EvalRecord] = []
        self.phase = "waiting for the GPU queue"
        self.result: dict[str, Any] | None = None  # summary.json once the run ended
        self.done = 0  # global step index (seed i, step s -> i * steps + s) of the newest record
        self.seed: int | None = None
        self.memory_mb: float | None = None
        self.tokens = 0  # summed over arms and seeds
        self.compute_s = 0.0  # summed step_time_s: throughput is tokens per second of training compute
        self.diverged: list[str] = []
        self.redraws = 0
        self._arms_seen: set[str] = set()
        self._tokens_at: dict[tuple[str, int], int] = {}
        self.started = clock() if started is None else started  # on `clock`
        self._step_at: float | None = None  # when `done` last grew (None right after a phase: no gap to measure)
        self._step_ema, self._step_n = 0.0, 0  # EMA state of the seconds per lockstep step, and gaps seen
        self._setup_began: float | None = None  # when the current seed's set-up phase began
        self.setup_s: float | None = None  # the last seed's measured set-up time
        self._last_draw: float | None = None
        self._draw_cost = 0.0
        # The charts' uirevision: the page keeps a visitor's zoom and hidden traces while it is unchanged, i.e. for
        # this run (live updates and redraws), and starts afresh with the next run.
        self.revision = uuid.uuid4().hex[:12]

    # -- events ------------------------------------------------------------------------------------------------
    def finish(self, summary: dict[str, Any]) -> bool:
        """The run ended (its `summary.json`): always redraw."""
        self.result = summary
        self.phase = summary.get("status") or "finished"
        return self._mark()

    def update(self, event: Phase | StepRecord | EvalRecord) -> bool:
        """Take one record or phase; return True when the page should redraw now."""
        if isinstance(event, EvalRecord):
            self.evals.append(event)
            return False
        if isinstance(event, Phase):
            self.phase = event.message
            self._step_at = None  # the next gap includes this phase's work: not a step time
            self._setup_began = self.clock() if "setting up" in event.message else None
            return self._mark()
        record = event
        self.records.append(record)
        self._arms_seen.add(record.arm)
        self.seed = record.seed
        seed_index = self.seeds.index(record.seed) if record.seed in self.seeds else 0
        self._time_step(seed_index * self.cfg.steps + record.step)
        key = (record.arm, record.seed)
        self.tokens += record.tokens - self._tokens_at.get(key, 0)
        self._tokens_at[key] = record.tokens
        self.compute_s += record.step_time_s
        self.memory_mb = record.memory_mb
        if record.diverged:
            seed_note = f" (seed {record.seed})" if len(self.seeds) > 1 else ""
            self.diverged.append(f"{record.arm} diverged at step {record.step}{seed_note}")
        now = self.clock()
        due = now - (self._last_draw or -math.inf) >= max(self.min_interval_s, 3 * self._draw_cost)
        if due or len(self.records) == 1:  # the first point shows at once
            return self._mark()
        return False

    def _time_step(self, done: int) -> None:
        """Advance `done` to the global step `done`, timing the gap since the last advance."""
        if done <= self.done:
            return
        now = self.clock()
        if self._setup_began is not None:  # the first step of a seed ends its set-up
            self.setup_s, self._setup_began = now - self._setup_began, None
        if self._step_at is not None:
            per_step = (now - self._step_at) / (done - self.done)
            self._step_ema = self.ETA_WEIGHT * self._step_ema + (1 - self.ETA_WEIGHT) * per_step
            self._step_n += 1
        self._step_at, self.done = now, done

    def step_seconds(self) -> float | None:
        """The smoothed wall time of one lockstep step (all arms), None before two steps."""
        if not self._step_n:
            return None
        return self._step_ema / (1 - self.ETA_WEIGHT**self._step_n)  # debiased: early values are not pulled to 0

    def _mark(self) -> bool:
        self._last_draw = self.clock()
        self.redraws += 1
        return True

    # -- charts ------------------------------------------------------------------------------------------------
    def figures(self, smoothing: float | None = None, log_scale: bool | None = None) -> dict[str, Any]:
        """`{chart key: figure or None}` of every chart (`charts.CHARTS`) from the records so far. While a
        multi-seed run goes on, the charts show the current seed; once it ended, the mean over seeds with a band."""
        from crma.ablation.report.charts import ChartData, draw_charts

        if smoothing is not None:
            self.smoothing = smoothing
        if log_scale is not None:
            self.log_scale = log_scale
        started = self.clock()
        records = self.records[:]  # a snapshot: a slider may redraw from another thread
        seed = self.seed if self.result is None and len(self.seeds) > 1 else None
        data = ChartData(
            records,
            self.evals[:],
            self.result,
            smoothing=self.smoothing,
            log_scale=self.log_scale,
            seed=seed,
            baseline=self.baseline,
        )
        figures = draw_charts(data)
        for fig in figures.values():
            if fig is not None:
                fig.layout.uirevision = f"{fig.layout.uirevision}:{self.revision}"
        self._draw_cost = self.clock() - started
        return figures

    # -- progress ----------------------------------------------------------------------------------------------
    def fraction(self) -> float:
        """Share of the run's steps done, in [0, 1]."""
        if self.result is not None and self.result.get("status") == "finished":
            return 1.0
        return min(1.0, self.done / self.total_steps) if self.total_steps else 0.0

    def eta_s(self) -> float | None:
        """Seconds left: the smoothed step time times the steps left, plus the set-up of each seed still to come; None
        before two steps and once the run ended."""
        per_step = self.step_seconds()
        if per_step is None or self.result is not None:
            return None
        seed_index = self.seeds.index(self.seed) if self.seed in self.seeds else 0
        seeds_left = len(self.seeds) - 1 - seed_index
        return per_step * (self.total_steps - self.done) + seeds_left * (self.setup_s or 0.0)

    def _progress_parts(self) -> list[str | _Tick]:
        """The progress line as text and clocks (a clock keeps ticking in the browser between two updates)."""
        elapsed = self.clock() - self.started
        head: list[str | _Tick]
        if self.result is not None:
            status, error = self.result.get("status"), self.result.get("error")
            where = f"step {self.done}/{self.total_steps}"
            if status == "finished":
                took = _clock(self.result.get("wall_s") or elapsed)
                head = [f"Finished {self.total_steps} steps x {len(self.labels)} arms in {took}"]
            elif status == "stopped":
                head = [f"Stopped at {where} ({error or 'stopped by request'}); partial results kept"]
            else:
                head = [f"Failed at {where}: {error}"]
        elif not self.records:
            head = [f"{self.phase} (", _Tick(elapsed, up=True), ")"]
        else:
            head = [f"Step {self.done}/{self.total_steps}"]
            if len(self.seeds) > 1 and self.seed is not None:
                head.append(f" · seed {self.seed} ({self.seeds.index(self.seed) + 1}/{len(self.seeds)})")
            eta = self.eta_s()
            head += [
                " · elapsed ",
                _Tick(elapsed, up=True),
                " · ETA ",
                _Tick(eta, up=False) if eta is not None else "…",
            ]
            if not self.phase.startswith(("loading", "reading", "seed", "waiting")):
                head.append(f" · {self.phase}")
        parts: list[str | _Tick] = [*head, f" · {self.device}"]
        if self.memory_mb is not None:
            kind = "GPU peak" if self.device.startswith(("GPU", "ZeroGPU")) else "RSS"
            parts.append(f" · {kind} {self.memory_mb / 1024:.2f} GiB")
        if self.compute_s > 0:
            parts.append(f" · {self.tokens / self.compute_s:,.0f} tokens/s")
        if self.diverged:
            parts.append(" · ⚠ " + "; ".join(self.diverged) + " (the other arms continue)")
        return parts

    def progress_text(self) -> str:
        """One line: step k/N, seed, elapsed, ETA, device, memory, tokens/s (and what happened, at the end)."""
        return "".join(_clock(p.seconds) if isinstance(p, _Tick) else p for p in self._progress_parts())

    def progress_html(self) -> str:
        """A progress bar with `progress_text()` under it (inline styles: no page CSS needed). Its clocks are
        `<span class="crma-tick" data-s=... data-dir="up|down">` that the page's script advances every second, so
        the elapsed time keeps moving through a long set-up or step."""
        pct = 100 * self.fraction()
        failed = self.result is not None and self.result.get("status") == "failed"
        colour = "#d55e00" if failed or self.diverged else "#0072b2"
        text = "".join(
            f'<span class="crma-tick" data-s="{p.seconds:.1f}" data-dir="{"up" if p.up else "down"}">'
            f"{_clock(p.seconds)}</span>"
            if isinstance(p, _Tick)
            else html.escape(p)
            for p in self._progress_parts()
        )
        return (
            f'<div class="crma-progress" role="progressbar" aria-valuemin="0" aria-valuemax="100" '
            f'aria-valuenow="{pct:.0f}"><div style="height:10px;border-radius:5px;background:#e5e7eb;overflow:hidden">'
            f'<div style="height:100%;width:{pct:.1f}%;background:{colour};transition:width .3s"></div></div>'
            f'<div style="margin-top:4px;font-size:0.9em">{text}</div></div>'
        )


class _Tick:
    """A clock in the progress line: `seconds` now, counting up (elapsed) or down (ETA) in the browser."""

    def __init__(self, seconds: float, *, up: bool):
        self.seconds, self.up = seconds, up


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class Look:
    """What one look at a run folder found: a new phase (or None), the records added since, the summary once the run
    ended."""

    phase: Phase | None
    records: list[Any]
    summary: dict[str, Any] | None
    started_at: float | None


def watch(out: str | Path, *, interval_s: float = 0.5) -> Iterator[Look]:
    """Look at run folder `out` every `interval_s` as the run writes it; ends after the look that found its
    `summary.json`. Any follower — a page, a reloaded page, an API client — is a loop over this."""
    tail, phase, pause = FolderTail(out), None, threading.Event()
    while True:
        update = tail.poll()
        new_phase = None
        if update.progress.get("phase") and update.progress["phase"] != phase:
            phase = update.progress["phase"]
            new_phase = Phase(phase, seed=update.progress.get("seed"))
        yield Look(new_phase, update.records, update.summary, update.progress.get("started_at"))
        if update.summary is not None:
            return
        pause.wait(interval_s)


def follow(out: str | Path, view: LiveView, *, interval_s: float = 0.5) -> Iterator[bool]:
    """Feed `view` from run folder `out` (`watch`), yielding whether the page should redraw after each look (a look
    without news yields False: the page's clocks move anyway); the last look, with the summary, calls `finish`."""
    for look in watch(out, interval_s=interval_s):
        if look.started_at:
            view.started = float(look.started_at)
        redraw = view.update(look.phase) if look.phase is not None else False
        for record in look.records:
            redraw = view.update(record) or redraw
        if look.summary is not None:
            redraw = view.finish(look.summary)
        yield redraw
