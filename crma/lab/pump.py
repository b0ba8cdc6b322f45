"""`RunPump`: a run's events drained by a thread of their own, so the run does not depend on the page that started it.

Gradio iterates a handler's generator only while its page is connected: after a reload or a closed tab it stops
asking for the next event, and an engine driven by that generator would freeze mid-run (or, in a child process,
train on with nobody reading its events). The pump reads every event as it comes and keeps them; any page of the
visitor (the one that pressed Run, or the same page after a reload) follows the run by reading from the pump.
The run slot is the pump's until its last event: a run whose page went away still ends (at its time cap at the
latest), and only then can the next run start.
"""

from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from crma.ablation.engine.records import Event, RunResult


class RunPump:
    """Read `events` to the end in a daemon thread and keep them for any number of followers.

    The thread runs in a copy of the caller's context (`contextvars`), so what the caller's framework keeps there (a
    Gradio request, ZeroGPU's quota) goes with it.

    Args:
        events (`Iterator[Event]`): the run's events; the last one is a `RunResult`.
        slot (`threading.Semaphore | None`): released when the events end (the caller acquired it).
    """

    def __init__(self, events: Iterator[Event], *, slot: threading.Semaphore | None = None):
        self._source, self._slot = events, slot
        self._events: list[Event] = []
        self._changed = threading.Condition()
        self._done = False
        self.error: BaseException | None = None
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._drain,), name="crma-run-pump", daemon=True)

    def start(self) -> RunPump:
        """Start reading; returns the pump."""
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        """The events ended (a `RunResult` came, or the source failed)."""
        return self._done

    @property
    def result(self) -> RunResult | None:
        """The run's `RunResult` once it came."""
        with self._changed:
            last = self._events[-1] if self._events else None
        return last if isinstance(last, RunResult) else None

    def follow(self, start: int = 0, *, tick_s: float = 1.0) -> Iterator[list[Event]]:
        """The events from index `start` on, in batches as they come; an empty batch every `tick_s` without news (so
        a follower can redraw its clock). Ends after the last event; raises what the source raised, if it did."""
        index = start
        while True:
            with self._changed:
                if index >= len(self._events) and not self._done:
                    self._changed.wait(timeout=tick_s)
                batch, done = self._events[index:], self._done
            index += len(batch)
            yield batch
            if done and index >= len(self._events):
                if self.error is not None:
                    raise self.error
                return

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the events to end; True when they did."""
        self._thread.join(timeout)
        return self._done

    def _drain(self) -> None:
        try:
            for event in self._source:
                with self._changed:
                    self._events.append(event)
                    self._changed.notify_all()
        except BaseException as exc:  # handed to the followers, who show it
            self.error = exc
        finally:
            close = getattr(self._source, "close", None)
            if close is not None:
                close()
            with self._changed:
                self._done = True
                self._changed.notify_all()
            if self._slot is not None:
                self._slot.release()


class PumpRegistry:
    """The pumps of this process by run id (bounded: the oldest ended pumps are dropped; their runs stay on disk)."""

    def __init__(self, max_pumps: int = 16):
        self.max_pumps = max_pumps
        self._pumps: OrderedDict[str, RunPump] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, run_id: str, pump: RunPump) -> None:
        with self._lock:
            self._pumps[run_id] = pump
            ended = [key for key, p in self._pumps.items() if p.done]
            while len(self._pumps) > self.max_pumps and ended:
                del self._pumps[ended.pop(0)]

    def get(self, run_id: Any) -> RunPump | None:
        with self._lock:
            return self._pumps.get(run_id) if isinstance(run_id, str) else None
