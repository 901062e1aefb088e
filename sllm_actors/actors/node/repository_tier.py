"""RepositoryTierActor: where models come from (the default model's package, model directories, GGUF).

The slowest tier: fetching may download and convert. It answers ``Fetch`` with a local directory,
which the SSD tier then copies in. An optional ``repository.bandwidth`` in the topology slows
fetches to that rate, to make tier differences visible on one machine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pykka

from sllm_actors.actors.node.tier_common import Bandwidth
from sllm_actors.messages import Fetch, TierLoaded
from sllm_actors.models import directory_bytes, resolve_source
from sllm_actors.actors.node.context import NodeContext
from sllm_actors.runtime.supervisor import SupervisedActor

__all__ = ["RepositoryTierActor"]

log = logging.getLogger(__name__)


class RepositoryTierActor(SupervisedActor):
    tier = "repository"

    def __init__(self, supervisor: pykka.ActorRef[Any], name: str, *, node: NodeContext,
                 limit: float | None = None) -> None:
        super().__init__(supervisor, name)
        self.node = node
        self.limit = limit
        self.known: dict[str, int] = {}
        self.bandwidth = Bandwidth(limit or 0.0)

    def started(self) -> None:
        self._publish()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Fetch):
            started = time.perf_counter()
            path = resolve_source(message.source)
            size = directory_bytes(Path(path))
            if self.limit:
                time.sleep(max(0.0, size / self.limit - (time.perf_counter() - started)))
            self.known[message.model] = size
            self._publish()
            return path
        if isinstance(message, TierLoaded):
            # Timed by the storage client over fetch + store into the SSD tier: what a start from
            # this tier really costs (a local directory "fetches" instantly; its copy does not).
            self.bandwidth.observe(message.nbytes, message.seconds)
            self._publish()
            return None
        raise TypeError(f"{self.name}: unexpected message {message!r}")

    def _publish(self) -> None:
        self.node.board.update_tier(
            self.tier,
            models=sorted(self.known),
            used_bytes=sum(self.known.values()),
            capacity_bytes=0,
            bandwidth=self.bandwidth.value,
        )
