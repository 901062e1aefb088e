"""Live migration by tokens: the source and destination sides of the protocol, as state machines.

Each side (:mod:`.source`, :mod:`.destination`) takes a protocol message and the engine and returns an
:class:`Outbox` (:mod:`.outbox`) of what to send, publish, arm and run; the instance actor
(:mod:`sllm_actors.actors.node.instance`) feeds the messages in and carries the outbox out. The timeouts
(``source.ROUND_TIMEOUT_S``, ``destination.PARKED_TTL_S``) stay in their side's module, where they are read.
"""

from sllm_actors.migration.destination import MigrationDestination, decode_cache, sequence_of
from sllm_actors.migration.outbox import (
    Action,
    ArmTimer,
    Event,
    MigrationEngine,
    MigrationTimeout,
    Outbox,
    PrefillTimed,
    Publish,
    RunNow,
    Send,
)
from sllm_actors.migration.source import (
    COPY_SEND_MIN_S,
    COPY_SEND_SHARE,
    FAULT_ENV,
    CacheChunks,
    MigrationSource,
)

__all__ = [
    "COPY_SEND_MIN_S",
    "COPY_SEND_SHARE",
    "FAULT_ENV",
    "Action",
    "ArmTimer",
    "CacheChunks",
    "Event",
    "MigrationDestination",
    "MigrationEngine",
    "MigrationSource",
    "MigrationTimeout",
    "Outbox",
    "PrefillTimed",
    "Publish",
    "RunNow",
    "Send",
    "decode_cache",
    "sequence_of",
]
