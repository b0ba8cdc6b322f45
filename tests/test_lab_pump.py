"""The run pump: a run's events are read to the end whether or not anyone follows them, and any number of pages
follow the same run."""

from __future__ import annotations

import contextvars
import threading
import time

import pytest

from crma.lab.pump import PumpRegistry, RunPump

WHO = contextvars.ContextVar("who", default="nobody")


def _events(n: int, gate: threading.Event | None = None, fail: bool = False):
    for i in range(n):
        if gate is not None and i == 1:
            gate.wait(5)
        yield i
    if fail:
        raise RuntimeError("the engine broke")
    yield f"done by {WHO.get()}"


def _all(pump: RunPump, start: int = 0) -> list:
    return [event for batch in pump.follow(start, tick_s=0.05) for event in batch]


def test_the_run_goes_on_with_nobody_following_and_every_follower_sees_every_event():
    slot = threading.BoundedSemaphore(1)
    slot.acquire()

    def start_in_a_request() -> RunPump:
        WHO.set("the page that pressed Run")  # as gradio keeps its request in a context variable
        return RunPump(_events(5), slot=slot).start()

    pump = contextvars.Context().run(start_in_a_request)
    assert pump.join(5) and pump.done  # nobody read a single event
    assert slot.acquire(blocking=False)  # given back at the end
    assert _all(pump) == [0, 1, 2, 3, 4, "done by the page that pressed Run"]  # the caller's context went along
    assert _all(pump, start=4) == [4, "done by the page that pressed Run"]


def test_a_follower_gets_ticks_while_nothing_happens():
    gate = threading.Event()
    pump = RunPump(_events(3, gate)).start()
    follow = pump.follow(tick_s=0.05)
    seen, empty = [], 0
    started = time.monotonic()
    for batch in follow:
        seen += batch
        empty += not batch
        if empty >= 3:
            gate.set()
    assert seen == [0, 1, 2, "done by nobody"] and empty >= 3 and time.monotonic() - started < 5


def test_a_broken_source_ends_the_pump_and_reaches_the_followers():
    slot = threading.BoundedSemaphore(1)
    slot.acquire()
    pump = RunPump(_events(2, fail=True), slot=slot).start()
    with pytest.raises(RuntimeError, match="the engine broke"):
        _all(pump)
    assert pump.done and slot.acquire(blocking=False)


def test_the_registry_drops_only_ended_pumps():
    registry = PumpRegistry(max_pumps=2)
    gate = threading.Event()
    running = RunPump(_events(3, gate)).start()
    registry.add("a" * 32, running)
    for key in ("b", "c", "d"):
        ended = RunPump(_events(1)).start()
        ended.join(5)
        registry.add(key * 32, ended)
    assert registry.get("a" * 32) is running and registry.get("b" * 32) is None
    assert registry.get(None) is None
    gate.set()
    running.join(5)
