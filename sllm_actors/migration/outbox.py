"""What a migration side hands back to its host, and the narrow part of the engine it drives.

Both sides of the protocol (:mod:`.source`, :mod:`.destination`) are state machines: each call takes a message
(with the engine passed in) and returns an :class:`Outbox`, the things to do in the order the protocol needs
them: messages to send, node events, a board refresh, timers to arm, requests to run now. The host (the instance
actor) carries them out; the sides never hold a reference to it, so they can be driven without actors or
sockets, and the import graph has no circle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from sllm_actors.gpu.sequence import Sequence
from sllm_actors.messages import Message


@dataclass(frozen=True)
class MigrationTimeout:
    """In-process: a migration round got no answer in time."""

    migration_id: str
    request_id: str
    round: int


@dataclass(frozen=True)
class Send:
    """A protocol message, to the controller (``address`` empty) or through it to the node named ``address``."""

    message: Message
    address: str = ""


@dataclass(frozen=True)
class Event:
    """A line for the cluster's event feed."""

    kind: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Publish:
    """The instance's state changed (a migration began or ended): refresh its line on the board."""


@dataclass(frozen=True)
class ArmTimer:
    """Deliver ``timeout`` back to this side after ``seconds``, unless the instance is gone by then."""

    seconds: float
    timeout: MigrationTimeout


@dataclass(frozen=True)
class RunNow:
    """A request whose cache is complete here: emit its next token at once and join the batch."""

    seq: Sequence


@dataclass(frozen=True)
class PrefillTimed:
    """A prefill of ``tokens`` took ``seconds`` on this instance: what recomputing a cache costs here, which the
    source side's copy-or-recompute choice wants to know."""

    tokens: int
    seconds: float


Action = Send | Event | Publish | ArmTimer | RunNow | PrefillTimed
"""One thing a migration side asks its host to do."""


@dataclass
class Outbox:
    """The actions one call of a migration side asks for, in order (the wire order of ``Send`` is the protocol's)."""

    actions: list[Action] = field(default_factory=list)

    def send(self, message: Message, address: str = "") -> None:
        self.actions.append(Send(message, address))

    def event(self, kind: str, text: str, data: dict[str, Any]) -> None:
        self.actions.append(Event(kind, text, data))

    def publish(self) -> None:
        self.actions.append(Publish())

    def arm_timer(self, seconds: float, timeout: MigrationTimeout) -> None:
        self.actions.append(ArmTimer(seconds, timeout))

    def run_now(self, seq: Sequence) -> None:
        self.actions.append(RunNow(seq))

    def prefill_timed(self, tokens: int, seconds: float) -> None:
        self.actions.append(PrefillTimed(tokens, seconds))

    @property
    def sends(self) -> list[Send]:
        return [a for a in self.actions if isinstance(a, Send)]

    @property
    def messages(self) -> list[Message]:
        """Just the messages sent, in order."""
        return [a.message for a in self.sends]

    @property
    def events(self) -> list[Event]:
        return [a for a in self.actions if isinstance(a, Event)]

    @property
    def timers(self) -> list[ArmTimer]:
        return [a for a in self.actions if isinstance(a, ArmTimer)]


class MigrationEngine(Protocol):
    """What the migration sides use of an instance's engine (:class:`sllm_actors.gpu.engine.Engine` is one)."""

    kv_bytes_per_token: int

    def get(self, request_id: str) -> Sequence | None: ...

    def remove(self, request_id: str) -> Sequence | None: ...

    def release(self, seq: Sequence) -> None: ...

    def prefill(self, seq: Sequence) -> float: ...

    def extend(self, seq: Sequence, new_ids: list[int]) -> float: ...

    def export_cache(self, seq: Sequence) -> tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]: ...

    def import_cache(self, seq: Sequence, n_cached: int,
                     layers: list[tuple[torch.Tensor, torch.Tensor]]) -> float: ...


__all__ = ["Action", "ArmTimer", "Event", "MigrationEngine", "MigrationTimeout", "Outbox", "PrefillTimed", "Publish",
           "RunNow", "Send"]
