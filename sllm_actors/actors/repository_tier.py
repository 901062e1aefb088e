"""RepositoryTierActor: where models come from (the default model's package, model directories, GGUF).

The slowest tier: fetching may download and convert. It answers ``Fetch`` with a local directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pykka

from sllm_actors.models import directory_bytes, resolve_source
from sllm_actors.node_context import NodeContext
from sllm_actors.supervisor import SupervisedActor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetch:
    """In-process ask: a local directory holding ``model`` from ``source``."""

    model: str
    source: str


class RepositoryTierActor(SupervisedActor):
    tier = "repository"

    def __init__(self, supervisor: pykka.ActorRef[Any], name: str, *, node: NodeContext) -> None:
        super().__init__(supervisor, name)
        self.node = node
        self.known: dict[str, int] = {}

    def started(self) -> None:
        self._publish()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Fetch):
            path = resolve_source(message.source)
            self.known[message.model] = directory_bytes(Path(path))
            self._publish()
            return path
        raise TypeError(f"{self.name}: unexpected message {message!r}")

    def _publish(self) -> None:
        self.node.board.update_tier(
            self.tier,
            models=sorted(self.known),
            used_bytes=sum(self.known.values()),
            capacity_bytes=0,
            bandwidth=0.0,
        )
