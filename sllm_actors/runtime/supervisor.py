"""A small OTP-style supervisor on pykka.

pykka has no supervision: an actor whose ``tell`` handler raises just stops. Here every supervised
actor reports its exit to its supervisor, which restarts it by its child spec and strategy
(``one_for_one`` or ``rest_for_one``) within a restart intensity (``max_restarts`` in ``period_s``);
past that the supervisor gives up and escalates through ``on_give_up`` (the node process exits so
the controller restarts it, say).

A restarted actor is a new actor with a new ref, so callers look children up by name in a
:class:`Directory` that the supervisor keeps current.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import pykka

__all__ = ["ChildExited", "ChildSpec", "Directory", "RestartIntensity", "SupervisedActor", "Supervisor"]

log = logging.getLogger(__name__)

Strategy = Literal["one_for_one", "rest_for_one"]
Restart = Literal["permanent", "transient", "temporary"]


class RestartIntensity:
    """OTP's restart intensity: at most ``max_restarts`` restarts in any ``period_s``; one more means the child
    keeps dying of something a restart does not cure, and its supervisor gives up instead of looping."""

    def __init__(self, max_restarts: int, period_s: float) -> None:
        self.max_restarts = max_restarts
        self.period_s = period_s
        self._times: deque[float] = deque()

    def allows(self, now: float | None = None) -> bool:
        """Count a restart at ``now``; whether it is within the intensity."""
        now = time.monotonic() if now is None else now
        self._times.append(now)
        while self._times and now - self._times[0] > self.period_s:
            self._times.popleft()
        return len(self._times) <= self.max_restarts

    def __len__(self) -> int:
        return len(self._times)


@dataclass(frozen=True)
class ChildExited:
    """In-process notice from a supervised actor to its supervisor (never on the wire)."""

    name: str
    urn: str
    abnormal: bool
    reason: str


@dataclass(frozen=True)
class StartChild:
    spec: ChildSpec


@dataclass(frozen=True)
class StopChild:
    name: str


@dataclass(frozen=True)
class ChildSpec:
    name: str
    factory: Callable[[pykka.ActorRef[Any], str], pykka.ActorRef[Any]]
    """Starts the child given (supervisor ref, name) and returns its ref."""
    restart: Restart = "permanent"


class Directory:
    """Name -> current ActorRef, shared by the actors of one process."""

    def __init__(self) -> None:
        self._refs: dict[str, pykka.ActorRef[Any]] = {}
        self._lock = threading.Lock()

    def put(self, name: str, ref: pykka.ActorRef[Any]) -> None:
        with self._lock:
            self._refs[name] = ref

    def remove(self, name: str, ref: pykka.ActorRef[Any] | None = None) -> None:
        with self._lock:
            if ref is None or self._refs.get(name) is ref:
                self._refs.pop(name, None)

    def get(self, name: str) -> pykka.ActorRef[Any] | None:
        with self._lock:
            return self._refs.get(name)

    def tell(self, name: str, message: Any) -> bool:
        """Tell the named actor; False when it is not there (restarting or gone)."""
        ref = self.get(name)
        if ref is None:
            return False
        try:
            ref.tell(message)
        except pykka.ActorDeadError:
            return False
        return True

    def names(self) -> list[str]:
        with self._lock:
            return list(self._refs)


class SupervisedActor(pykka.ThreadingActor):
    """Base of every actor with a supervisor: reports its exit, normal or not."""

    def __init__(self, supervisor: pykka.ActorRef[Any] | None, name: str) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.name = name
        self._exit_reported = False

    def on_start(self) -> None:
        try:
            self.started()
        except Exception as exc:
            # pykka does not call on_failure for an on_start crash; the supervisor must still know.
            self._report_exit(abnormal=True, reason=f"crashed starting: {exc.__class__.__name__}: {exc}")
            raise

    def started(self) -> None:
        """Hook for setup; a raise here counts as a crash."""

    def stopping(self) -> None:
        """Hook for cleanup on any exit, normal or crash. Not called when the process dies."""

    def on_stop(self) -> None:
        self.stopping()
        self._report_exit(abnormal=False, reason="stopped")

    def on_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        try:
            self.stopping()
        finally:
            self._report_exit(
                abnormal=True, reason=f"crashed: {getattr(exception_type, '__name__', '?')}: {exception_value}"
            )

    def _report_exit(self, *, abnormal: bool, reason: str) -> None:
        if self._exit_reported or self.supervisor is None:
            return
        self._exit_reported = True
        try:
            self.supervisor.tell(ChildExited(self.name, self.actor_urn, abnormal, reason))
        except pykka.ActorDeadError:
            pass  # the supervisor is shutting down and no longer cares


class Supervisor(SupervisedActor):
    def __init__(
        self,
        supervisor: pykka.ActorRef[Any] | None,
        name: str,
        children: list[ChildSpec],
        directory: Directory,
        *,
        strategy: Strategy = "one_for_one",
        max_restarts: int = 3,
        period_s: float = 5.0,
        on_give_up: Callable[[str], None] | None = None,
        on_event: Callable[[str, str, dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(supervisor, name)
        self.specs = list(children)
        self.directory = directory
        self.strategy = strategy
        self.max_restarts = max_restarts
        self.period_s = period_s
        self.on_give_up = on_give_up
        self.on_event = on_event
        self.refs: dict[str, pykka.ActorRef[Any]] = {}
        self.restart_counts: dict[str, int] = {}
        self._intensity = RestartIntensity(max_restarts, period_s)
        self._given_up = False

    def started(self) -> None:
        for spec in self.specs:
            self._start(spec)

    def stopping(self) -> None:
        for spec in reversed(self.specs):
            self._stop_child(spec.name)

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, ChildExited):
            self._child_exited(message)
        elif isinstance(message, StartChild):
            self.specs = [s for s in self.specs if s.name != message.spec.name] + [message.spec]
            self._start(message.spec)
        elif isinstance(message, StopChild):
            self.specs = [s for s in self.specs if s.name != message.name]
            self._stop_child(message.name)
        elif message == "restart_counts":
            return dict(self.restart_counts)
        else:
            raise TypeError(f"{self.name}: unexpected message {message!r}")
        return None

    def _start(self, spec: ChildSpec) -> None:
        ref = spec.factory(self.actor_ref, spec.name)
        self.refs[spec.name] = ref
        self.directory.put(spec.name, ref)

    def _stop_child(self, name: str) -> None:
        ref = self.refs.pop(name, None)
        if ref is None:
            return
        self.directory.remove(name, ref)
        try:
            ref.stop(block=True, timeout=10)
        except (pykka.ActorDeadError, pykka.Timeout):
            pass

    def _child_exited(self, notice: ChildExited) -> None:
        ref = self.refs.get(notice.name)
        if ref is None or ref.actor_urn != notice.urn:
            return  # an exit we caused (stop or restart) or a stale one
        spec = next((s for s in self.specs if s.name == notice.name), None)
        self.refs.pop(notice.name, None)
        self.directory.remove(notice.name, ref)
        if spec is None or self._given_up:
            return
        restart = spec.restart == "permanent" or (spec.restart == "transient" and notice.abnormal)
        level = logging.WARNING if notice.abnormal else logging.INFO
        log.log(level, "%s: child %s %s", self.name, notice.name, notice.reason)
        if not restart:
            self.specs.remove(spec)
            return
        if not self._within_intensity():
            self._give_up(f"{notice.name} {notice.reason}; more than {self.max_restarts} restarts in {self.period_s}s")
            return
        to_restart = [spec]
        if self.strategy == "rest_for_one":
            later = self.specs[self.specs.index(spec) + 1 :]
            for other in reversed(later):
                self._stop_child(other.name)
            to_restart += later
        for s in to_restart:
            self.restart_counts[s.name] = self.restart_counts.get(s.name, 0) + 1
            log.warning("%s: restarting %s (restart #%d)", self.name, s.name, self.restart_counts[s.name])
            if self.on_event:
                self.on_event("restart", f"{self.name} restarted {s.name}", {"child": s.name, "reason": notice.reason})
            self._start(s)

    def _within_intensity(self) -> bool:
        return self._intensity.allows()

    def _give_up(self, why: str) -> None:
        self._given_up = True
        log.error("%s: giving up: %s", self.name, why)
        if self.on_give_up:
            self.on_give_up(why)
        self.actor_ref.stop(block=False)
        # Escalate: the parent supervisor sees this supervisor crash.
        self._report_exit(abnormal=True, reason=f"gave up: {why}")
