"""Supervision with real pykka actors: restarts by strategy, restart intensity, escalation."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pykka
import pytest

from sllm_actors.runtime.supervisor import ChildSpec, Directory, SupervisedActor, Supervisor


class Worker(SupervisedActor):
    def __init__(self, supervisor: Any, name: str, starts: dict[str, int], started_event: threading.Event) -> None:
        super().__init__(supervisor, name)
        self.starts = starts
        self.started_event = started_event

    def started(self) -> None:
        self.starts[self.name] = self.starts.get(self.name, 0) + 1
        self.started_event.set()

    def on_receive(self, message: Any) -> Any:
        if message == "crash":
            raise RuntimeError(f"{self.name} told to crash")
        return self.starts[self.name]


@pytest.fixture
def stop_all() -> Iterator[None]:
    yield
    pykka.ActorRegistry.stop_all(block=True, timeout=10)


def _tree(strategy: str, names: list[str], max_restarts: int = 3, on_give_up: Any = None) -> tuple[Any, Directory, dict[str, int], dict[str, threading.Event]]:
    directory = Directory()
    starts: dict[str, int] = {}
    events = {n: threading.Event() for n in names}
    specs = [
        ChildSpec(n, lambda sup, name: Worker.start(sup, name, starts, events[name])) for n in names
    ]
    sup = Supervisor.start(None, "root", specs, directory, strategy=strategy, max_restarts=max_restarts,
                           period_s=30, on_give_up=on_give_up)
    for e in events.values():
        assert e.wait(5)
    return sup, directory, starts, events


def _crash_and_wait(directory: Directory, name: str, events: dict[str, threading.Event], expect: list[str]) -> None:
    deadline = time.monotonic() + 5
    while directory.get(name) is None and time.monotonic() < deadline:
        time.sleep(0.01)  # the supervisor files a restarted child's ref right after it starts
    for n in expect:
        events[n].clear()
    old = directory.get(name)
    assert old is not None
    old.tell("crash")
    for n in expect:
        assert events[n].wait(5), f"{n} was not restarted"
    deadline = time.monotonic() + 5
    while directory.get(name) in (None, old) and time.monotonic() < deadline:
        time.sleep(0.01)  # the supervisor files the new ref right after the child started
    assert directory.get(name) not in (None, old)


def test_one_for_one_restarts_only_the_crashed_child(stop_all: None) -> None:
    sup, directory, starts, events = _tree("one_for_one", ["a", "b", "c"])
    old_b = directory.get("b")
    _crash_and_wait(directory, "b", events, ["b"])
    assert starts == {"a": 1, "b": 2, "c": 1}
    assert directory.get("b") is not old_b
    assert directory.get("b").ask("count", timeout=5) == 2  # the new ref answers
    assert sup.ask("restart_counts", timeout=5) == {"b": 1}


def test_rest_for_one_restarts_the_later_children_too(stop_all: None) -> None:
    sup, directory, starts, events = _tree("rest_for_one", ["a", "b", "c"])
    _crash_and_wait(directory, "b", events, ["b", "c"])
    assert starts == {"a": 1, "b": 2, "c": 2}


def test_a_crash_while_starting_is_seen_and_intensity_escalates(stop_all: None) -> None:
    gave_up = threading.Event()
    reasons: list[str] = []

    class Broken(SupervisedActor):
        def started(self) -> None:
            raise RuntimeError("cannot start")

    def give_up(why: str) -> None:
        reasons.append(why)
        gave_up.set()

    directory = Directory()
    Supervisor.start(None, "root", [ChildSpec("broken", lambda s, n: Broken.start(s, n))], directory,
                           max_restarts=2, period_s=30, on_give_up=give_up)
    assert gave_up.wait(10)
    assert "broken crashed starting: RuntimeError: cannot start" in reasons[0]
    assert "more than 2 restarts" in reasons[0]


def test_intensity_counts_crashes_of_a_running_child(stop_all: None) -> None:
    gave_up = threading.Event()
    sup, directory, starts, events = _tree("one_for_one", ["a"], max_restarts=2, on_give_up=lambda why: gave_up.set())
    _crash_and_wait(directory, "a", events, ["a"])
    _crash_and_wait(directory, "a", events, ["a"])
    directory.get("a").tell("crash")
    assert gave_up.wait(5)
    assert starts["a"] == 3
