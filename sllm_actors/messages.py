"""Every message of the sllm-actors protocol, and its wire form.

A message is an immutable, typed record with a type tag. On the wire it is one msgpack body
``[tag, {field: value}]`` inside an envelope of three frames (see :mod:`sllm_actors.runtime.wire`):
``[b"SLLM/<version>", address, body]``. Fields are append-only: a new field goes at the end
with a default, so an older peer's message still decodes.

Decoding checks the tag and every field's type against the record's annotations, so a garbage
frame becomes a :class:`ProtocolError` naming the problem, never an exception inside an actor.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack

__all__ = [
    "KV_CHUNK_BYTES",
    "MAX_BODY_BYTES",
    "PROTOCOL_VERSION",
    "AbortMigration",
    "Ack",
    "AdoptInstances",
    "AdoptRequests",
    "CancelInference",
    "CancelRequest",
    "ClientGone",
    "ClusterEvent",
    "ClusterSnapshot",
    "DeployModel",
    "ErrorReply",
    "Fetch",
    "FromClient",
    "FromNode",
    "GenerateDone",
    "GenerateRequest",
    "Heartbeat",
    "Hello",
    "InferenceDone",
    "InferenceFailed",
    "InstanceGone",
    "InstanceReady",
    "InstancesLost",
    "KillNode",
    "KvCopyBegin",
    "KvCopyChunk",
    "LoadFailed",
    "LoadModel",
    "Message",
    "MigrateCommand",
    "MigrateOut",
    "Migrated",
    "MigrationEnded",
    "MigrationStarted",
    "NodeCommand",
    "NodeConfig",
    "NodeHello",
    "NodeLost",
    "NodeProcessExited",
    "NodeStatus",
    "NotLeader",
    "NodeUp",
    "Place",
    "Placed",
    "PlacementFailed",
    "Preempt",
    "PromptAccepted",
    "ProtocolError",
    "Query",
    "RequestFinished",
    "RequestTokens",
    "ResumeDone",
    "ResumeFailed",
    "ResumeRequest",
    "StartInference",
    "StatusReply",
    "StatusRequest",
    "Tick",
    "TierDrop",
    "TierLoaded",
    "TierLookup",
    "TierRelease",
    "TierStore",
    "TokenBatch",
    "TokenChunk",
    "UnloadModel",
    "Welcome",
    "decode",
    "encode",
    "message_types",
]

PROTOCOL_VERSION = 1
MAX_BODY_BYTES = 16 * 1024 * 1024
"""Bodies above this are refused before unpacking; tokens and status fit in far less."""


class ProtocolError(ValueError):
    """A frame or body that does not follow the protocol. The message names the problem."""

    def __init__(self, problem: str, request_id: str = "") -> None:
        super().__init__(problem)
        self.request_id = request_id


@dataclass(frozen=True, slots=True)
class Message:
    tag: ClassVar[str] = ""


_REGISTRY: dict[str, type[Message]] = {}
_FIELD_TYPES: dict[type[Message], dict[str, Any]] = {}


def _register(cls: type[Message]) -> type[Message]:
    if not cls.tag or cls.tag in _REGISTRY:
        raise RuntimeError(f"message {cls.__name__} needs a unique tag, got {cls.tag!r}")
    _REGISTRY[cls.tag] = cls
    return cls


def message_types() -> dict[str, type[Message]]:
    """Every wire message type by its tag (a copy: callers cannot change what the decoder accepts)."""
    return dict(_REGISTRY)


# ----------------------------------------------------------------------------- handshake, liveness


@_register
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """First message of any peer; the controller answers Welcome or ErrorReply (version mismatch)."""

    tag: ClassVar[str] = "hello"
    protocol_version: int
    role: str  # "client", "node" or "tui"
    name: str = ""


@_register
@dataclass(frozen=True, slots=True)
class Welcome(Message):
    tag: ClassVar[str] = "welcome"
    protocol_version: int
    cluster: str
    state_endpoint: str = ""
    http_endpoint: str = ""
    """The OpenAI-compatible HTTP front end (``http://HOST:PORT``), empty when it is off."""
    epoch: int = 0
    """The controller's generation, one more per start: a client that sees it change knows the controller
    restarted and resumes its open streams (``GenerateRequest.resume``)."""


@_register
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Sent both ways every heartbeat interval; any message also counts as a beat."""

    tag: ClassVar[str] = "heartbeat"
    sender: str
    seq: int


@_register
@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """A failed request returned as data. ``code`` is machine-readable, ``message`` is for people."""

    tag: ClassVar[str] = "error"
    request_id: str
    code: str
    message: str


@_register
@dataclass(frozen=True, slots=True)
class Ack(Message):
    tag: ClassVar[str] = "ack"
    request_id: str
    detail: str = ""


@_register
@dataclass(frozen=True, slots=True)
class NotLeader(Message):
    """A standby controller's answer to anything a client sends it (it never serves): who leads, and where."""

    tag: ClassVar[str] = "not_leader"
    request_id: str
    controller: str
    """The standby that answers."""
    leader: str = ""
    """The controller that leads, "" while none does (a standby is taking over)."""
    leader_endpoint: str = ""
    """The leader's client endpoint: where to send it again."""
    epoch: int = 0
    """The leader's epoch (the etcd revision that made it leader)."""


# ----------------------------------------------------------------------------- sampling parameters


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How a request's tokens are chosen and when it stops: the part of a request that travels with it from the
    client through the router to an instance, and on to a migration's destination.

    On the wire it is flattened: each message that carries it (a :class:`SamplingFields`) has these fields as
    its own, so the codec checks each one like any other field and the protocol is the same as before the
    record existed. In code, ``message.sampling`` gives the record and ``**params.fields()`` spreads one into
    a message.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    """0: greedy."""
    top_p: float = 1.0
    seed: int | None = None
    """The random choice at step ``k`` is a function of ``(seed, k)`` alone, so a request resumed anywhere samples
    what it would have. None only in a client's request: the router draws one before the request goes on, and
    every message past the router carries an int (their ``seed`` fields say so)."""
    stop: tuple[str, ...] = ()
    """Strings that end the request when they appear in its text (the text stops before them)."""

    def fields(self) -> dict[str, Any]:
        """The record as a message's flattened fields (``stop`` a list, as msgpack carries it)."""
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "stop": list(self.stop)}


class SamplingFields:
    """A message that carries a request's :class:`SamplingParams`, flattened into fields of its own (which each
    such message declares, with the types it accepts on the wire)."""

    __slots__ = ()
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.max_tokens, self.temperature, self.top_p, self.seed, tuple(self.stop))


# ----------------------------------------------------------------------------- client <-> router


@_register
@dataclass(frozen=True, slots=True)
class GenerateRequest(Message, SamplingFields):
    """A client's request. Its sampling fields default to :class:`SamplingParams`'s; ``seed`` may be left out
    (null), and the router draws one."""

    tag: ClassVar[str] = "generate"
    request_id: str
    model: str
    prompt: str
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    chat: bool = False
    stop: list[str] = field(default_factory=list)
    cache_salt: str = ""
    """Requests share cached KV prefix blocks only under equal salts (vLLM's ``cache_salt``): a tenant's own, so
    one tenant cannot learn from timing what another's prompts held. Empty: the shared namespace."""
    resume: bool = False
    """A reconnecting client (the controller restarted): continue ``request_id``'s stream after the tokens it
    has (``resume_ids``). The router sends what its log holds past them; a request it no longer knows is
    resumed from the client's tokens."""
    resume_ids: list[int] = field(default_factory=list)
    """The generated token ids the client already has (``resume``)."""
    resume_text: str = ""
    """Their text (``resume``)."""


@_register
@dataclass(frozen=True, slots=True)
class CancelRequest(Message):
    tag: ClassVar[str] = "cancel"
    request_id: str


@_register
@dataclass(frozen=True, slots=True)
class TokenChunk(Message):
    """Tokens of one request, from the instance to the router and on to the client.

    ``index`` is the position of the first token in the request's generated sequence, so a
    receiver recognises a chunk it already has (after a resume) and drops it.
    """

    tag: ClassVar[str] = "tokens"
    request_id: str
    index: int
    token_ids: list[int]
    text: str


@_register
@dataclass(frozen=True, slots=True)
class TokenBatch(Message):
    """One engine step's new tokens for every request it advanced, from the instance to the router, which
    fans them out to each request's client as :class:`TokenChunk`. One message per step per instance rather
    than one per request per token: at 256 streams that is 256 times fewer frames through the controller.

    The lists are parallel: request ``request_ids[i]`` got ``token_ids[i]`` starting at position
    ``indexes[i]`` of its generated sequence, with text ``texts[i]``.
    """

    tag: ClassVar[str] = "token_batch"
    instance_id: str
    request_ids: list[str]
    indexes: list[int]
    token_ids: list[list[int]]
    texts: list[str]


@_register
@dataclass(frozen=True, slots=True)
class GenerateDone(Message):
    """The router's last message of a request to its client."""

    tag: ClassVar[str] = "generate_done"
    request_id: str
    model: str
    token_ids: list[int]
    text: str
    finish_reason: str
    ttft_s: float
    total_s: float
    prompt_tokens: int
    migrations: list[dict[str, Any]] = field(default_factory=list)
    cold_start: dict[str, Any] = field(default_factory=dict)
    """When this request waited for its model to load: ``tier``, ``load_s``, ``wait_s`` (request to
    placement) and ``parts`` (the load's parts, seconds); empty when it found the model loaded."""


@_register
@dataclass(frozen=True, slots=True)
class StatusRequest(Message):
    tag: ClassVar[str] = "status"
    request_id: str


@_register
@dataclass(frozen=True, slots=True)
class StatusReply(Message):
    tag: ClassVar[str] = "status_reply"
    request_id: str
    status: dict[str, Any]


@_register
@dataclass(frozen=True, slots=True)
class DeployModel(Message):
    tag: ClassVar[str] = "deploy"
    request_id: str
    name: str
    source: str


@_register
@dataclass(frozen=True, slots=True)
class MigrateCommand(Message):
    """An operator's order to move running request ``subject`` to ``target`` (``node`` or ``node/gpu-N``).

    ``request_id`` identifies the command itself, for its Ack or ErrorReply.
    """

    tag: ClassVar[str] = "migrate_command"
    request_id: str
    subject: str
    target: str


@_register
@dataclass(frozen=True, slots=True)
class KillNode(Message):
    """An operator's order to SIGKILL a local node process (demos, recovery drills)."""

    tag: ClassVar[str] = "kill_node"
    request_id: str
    node: str


@_register
@dataclass(frozen=True, slots=True)
class NodeCommand(Message):
    """An operator's order about a node's health (``sllm cordon|uncordon|drain NODE``, ``sllm breaker reset
    NODE[/gpu-N]``), answered with an Ack saying what changed or an ErrorReply (``unknown_node``, ``bad_target``).
    """

    tag: ClassVar[str] = "node_command"
    request_id: str
    action: str
    """``cordon`` (no new requests nor instances there), ``uncordon``, ``drain`` (cordon, move or finish what
    runs there, then unload it) or ``breaker_reset`` (close its GPUs' load breakers, clear unhealthy marks)."""
    target: str
    """A node's name, or ``node/gpu-N`` for one GPU (``breaker_reset`` only)."""


# ----------------------------------------------------------------------------- controller <-> node


@_register
@dataclass(frozen=True, slots=True)
class NodeHello(Message):
    tag: ClassVar[str] = "node_hello"
    protocol_version: int
    node: str
    pid: int
    incarnation: str
    """A fresh id per process start, so a restarted node is told apart from a reconnect."""
    epoch: int = 0
    """The controller epoch this process last served under (0: none yet). A hello with an older epoch than the
    controller's is a re-registration after a controller restart; a newer one means this controller is stale."""
    running: list[dict[str, Any]] = field(default_factory=list)
    """Re-registration: each request its instances run or finished unseen, with its token log (request_id,
    instance_id, model, prompt_ids, generated_ids, text, chat, owner, cache_salt, sampling fields, finish_reason).
    The node's log wins over what a client holds: the node made the tokens."""
    instances: list[dict[str, Any]] = field(default_factory=list)
    """Re-registration: the instances it holds (its status board's entries), for the scheduler to adopt."""


@_register
@dataclass(frozen=True, slots=True)
class NodeConfig(Message):
    """Controller -> node after NodeHello: the node's part of the topology (GPUs, tiers)."""

    tag: ClassVar[str] = "node_config"
    node: str
    spec: dict[str, Any]
    epoch: int = 0
    """The controller's epoch: the node serves under it, and refuses a config from an older one (fencing)."""


@_register
@dataclass(frozen=True, slots=True)
class NodeStatus(Message):
    """A node's view of itself: GPUs, instances, storage tiers. Sent on change."""

    tag: ClassVar[str] = "node_status"
    node: str
    status: dict[str, Any]


@_register
@dataclass(frozen=True, slots=True)
class LoadModel(Message):
    tag: ClassVar[str] = "load_model"
    instance_id: str
    model: str
    source: str
    gpu: int
    max_concurrency: int = 4
    dtype: str = ""
    """Serving dtype (``bfloat16``, ``float16``, ``float32``); empty: bf16 on CUDA, the stored one on a CPU."""
    kv_cache_bytes: int = 0
    """The KV pool; 0: sized from what the GPU has free (see the instance actor)."""
    deterministic: bool = False
    max_batch: int = 0
    """Most requests decoded together (0: the engine's default)."""
    prefix_caching: bool = True
    """Share KV blocks of equal prompt prefixes between requests (off with ``deterministic``)."""


@_register
@dataclass(frozen=True, slots=True)
class InstanceReady(Message):
    tag: ClassVar[str] = "instance_ready"
    instance_id: str
    node: str
    gpu: int
    model: str
    load_s: float
    tier: str
    memory_bytes: int
    parts: dict[str, Any] = field(default_factory=dict)
    """Where the load's time went, seconds (floats) per part (``storage_client.LOAD_PARTS``)."""


@_register
@dataclass(frozen=True, slots=True)
class LoadFailed(Message):
    tag: ClassVar[str] = "load_failed"
    instance_id: str
    node: str
    model: str
    error: str
    checkpoint_fault: bool = False
    """The checkpoint itself is at fault (corrupt, truncated, missing, refused by its repository, not a model):
    every GPU would fail it alike, so it fails its requests at once and says nothing about this GPU's health."""


@_register
@dataclass(frozen=True, slots=True)
class UnloadModel(Message):
    tag: ClassVar[str] = "unload_model"
    instance_id: str


@_register
@dataclass(frozen=True, slots=True)
class InstanceGone(Message):
    """An instance stopped: unloaded on purpose, or crashed (``reason`` says which)."""

    tag: ClassVar[str] = "instance_gone"
    instance_id: str
    node: str
    reason: str


@_register
@dataclass(frozen=True, slots=True)
class StartInference(Message, SamplingFields):
    """Run (or resume) a request on an instance.

    A fresh request carries ``prompt``; a resumed one carries the token log: ``prompt_ids`` and
    the ``generated_ids`` so far. Sampling is a function of (seed, step), so a resumed seeded
    request continues exactly as it would have.
    """

    tag: ClassVar[str] = "start_inference"
    request_id: str
    instance_id: str
    prompt: str
    chat: bool
    prompt_ids: list[int]
    generated_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    text_so_far: str = ""
    cache_salt: str = ""
    """The request's prefix-cache salt (``GenerateRequest.cache_salt``)."""
    owner: str = ""
    """The client socket that owns the request (hex of its identity): the node keeps it and reports it when it
    re-registers with a restarted controller, so only that client may resume the stream."""


@_register
@dataclass(frozen=True, slots=True)
class PromptAccepted(Message):
    """The instance's tokenization of a fresh prompt, so the router's token log starts complete."""

    tag: ClassVar[str] = "prompt_accepted"
    request_id: str
    instance_id: str
    prompt_ids: list[int]


@_register
@dataclass(frozen=True, slots=True)
class InferenceDone(Message):
    tag: ClassVar[str] = "inference_done"
    request_id: str
    instance_id: str
    finish_reason: str
    n_generated: int


@_register
@dataclass(frozen=True, slots=True)
class InferenceFailed(Message):
    tag: ClassVar[str] = "inference_failed"
    request_id: str
    instance_id: str
    code: str
    message: str


@_register
@dataclass(frozen=True, slots=True)
class CancelInference(Message):
    tag: ClassVar[str] = "cancel_inference"
    request_id: str
    instance_id: str


# ----------------------------------------------------------------------------- live migration


@_register
@dataclass(frozen=True, slots=True)
class MigrateOut(Message):
    """Scheduler -> source instance: move ``request_ids`` to ``dest_instance`` on ``dest_node``."""

    tag: ClassVar[str] = "migrate_out"
    migration_id: str
    instance_id: str
    dest_node: str
    dest_instance: str
    request_ids: list[str]
    delta_tokens: int = 8
    max_rounds: int = 3
    transfer: str = "recompute"
    """``recompute`` (send tokens), ``copy`` (send the KV cache) or ``auto`` (the source weighs the two per
    request with the cost figures below: its cache's bytes are known only there)."""
    recompute_a: float = 0.0005
    """Fitted recompute cost of this model: ``recompute_a * tokens + recompute_b`` seconds."""
    recompute_b: float = 0.05
    link_bytes_per_s: float = 1e9
    """Measured (or default) bandwidth of a KV copy from the source's node to the destination's."""
    copy_fixed_s: float = 0.02


@_register
@dataclass(frozen=True, slots=True)
class ResumeRequest(Message, SamplingFields):
    """Source -> destination instance: recompute the KV cache for these tokens (round ``round``).

    Round 0 carries the whole token log; later rounds carry in ``generated_ids`` only the tokens
    produced since the previous round.
    """

    tag: ClassVar[str] = "resume"
    migration_id: str
    round: int
    request_id: str
    instance_id: str
    source_node: str
    source_instance: str
    prompt_ids: list[int]
    generated_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    text_so_far: str
    final: bool = False
    """The hand-over: the source has stopped after these tokens; the destination feeds them and starts
    decoding at once, without waiting for the router's StartInference (which follows as a safety net and
    is then a duplicate)."""
    cache_salt: str = ""
    """The request's prefix-cache salt, so its cache on the destination stays in its tenant's namespace."""


@_register
@dataclass(frozen=True, slots=True)
class KvCopyBegin(Message, SamplingFields):
    """Source -> destination instance: round ``round`` sends the request's KV cache instead of its tokens.

    ``n_chunks`` ``KvCopyChunk`` messages follow, whose ``data`` concatenated is every layer's keys then
    values, C-contiguous, in ``dtype`` (a torch dtype name) with ``shapes[layer] = [keys shape, values
    shape]``; ``crc32`` covers all of it. The cache holds the first ``n_cached`` tokens of the log
    ``prompt_ids + generated_ids``. The destination answers ResumeDone, or ResumeFailed with
    ``copy_failed`` set, after which the source recomputes from the tokens instead.
    """

    tag: ClassVar[str] = "kv_copy_begin"
    migration_id: str
    round: int
    request_id: str
    instance_id: str
    source_node: str
    source_instance: str
    prompt_ids: list[int]
    generated_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    text_so_far: str
    n_cached: int
    dtype: str
    shapes: list[list[list[int]]]
    total_bytes: int
    crc32: int
    n_chunks: int
    cache_salt: str = ""
    """The request's prefix-cache salt, so its cache on the destination stays in its tenant's namespace."""


@_register
@dataclass(frozen=True, slots=True)
class KvCopyChunk(Message):
    """One piece of a KV copy (at most ``KV_CHUNK_BYTES``, so every frame stays under the body limit and
    token traffic interleaves with a large copy)."""

    tag: ClassVar[str] = "kv_copy_chunk"
    migration_id: str
    round: int
    request_id: str
    instance_id: str
    index: int
    data: bytes


KV_CHUNK_BYTES = 4 * 1024 * 1024


@_register
@dataclass(frozen=True, slots=True)
class ResumeDone(Message):
    """Destination -> source instance (``instance_id``): round ``round`` is recomputed."""

    tag: ClassVar[str] = "resume_done"
    migration_id: str
    round: int
    request_id: str
    instance_id: str
    n_tokens: int
    recompute_s: float


@_register
@dataclass(frozen=True, slots=True)
class ResumeFailed(Message):
    tag: ClassVar[str] = "resume_failed"
    migration_id: str
    round: int
    request_id: str
    instance_id: str
    message: str
    copy_failed: bool = False
    """A KV copy was refused (checksum, size, shape): the source falls back to recompute, no abort."""


@_register
@dataclass(frozen=True, slots=True)
class AbortMigration(Message):
    """Scheduler -> source instance: give up ``migration_id`` (its destination died); keep generating."""

    tag: ClassVar[str] = "abort_migration"
    migration_id: str
    instance_id: str
    reason: str


@_register
@dataclass(frozen=True, slots=True)
class Migrated(Message):
    """Source -> router: the source stopped ``request_id`` after ``n_generated`` tokens; the destination
    holds its KV cache and continues once the router re-routes (a StartInference with the whole log)."""

    tag: ClassVar[str] = "migrated"
    migration_id: str
    request_id: str
    source_instance: str
    dest_node: str
    dest_instance: str
    n_generated: int
    rounds: int
    tokens_recomputed: int
    total_s: float
    transfer: str = "recompute"
    """How the cache reached the destination: ``recompute`` or ``copy``."""
    kv_bytes: int = 0
    copy_s: float = 0.0
    """A copy's time from the source's first byte to the destination's ResumeDone (refines the link)."""
    note: str = ""
    """Why the transfer is not the one chosen (a copy refused and recomputed instead), or the choice's
    estimates."""
    copy_rebuild_s: float = 0.0
    """Of ``copy_s``, the destination's part: checks, rebuilding the cache, the last token's forward."""


@_register
@dataclass(frozen=True, slots=True)
class MigrationEnded(Message):
    """Source -> scheduler: a migration order finished; ``outcome`` is ``done`` or ``aborted``."""

    tag: ClassVar[str] = "migration_ended"
    migration_id: str
    instance_id: str
    outcome: str
    detail: str = ""


# ----------------------------------------------------------------------------- state for observers


@_register
@dataclass(frozen=True, slots=True)
class ClusterEvent(Message):
    """One line of the cluster's event log: loads, migrations, crashes, restarts, scale-downs."""

    tag: ClassVar[str] = "event"
    time: float
    kind: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)


@_register
@dataclass(frozen=True, slots=True)
class ClusterSnapshot(Message):
    tag: ClassVar[str] = "snapshot"
    time: float
    status: dict[str, Any]


# ----------------------------------------------------------------------------- encoding


def _field_types(cls: type[Message]) -> dict[str, Any]:
    cached = _FIELD_TYPES.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = {f.name: hints[f.name] for f in dataclasses.fields(cls)}
        _FIELD_TYPES[cls] = cached
    return cached


def encode(msg: Message) -> bytes:
    fields = {f.name: getattr(msg, f.name) for f in dataclasses.fields(msg)}
    return msgpack.packb([msg.tag, fields], use_bin_type=True)


def decode(body: bytes) -> Message:
    """Bytes to a message, or ProtocolError naming what is wrong."""
    if len(body) > MAX_BODY_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds the limit of {MAX_BODY_BYTES} bytes")
    try:
        raw = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage input
        raise ProtocolError(f"body is not valid msgpack: {exc.__class__.__name__}: {exc}") from None
    if not (isinstance(raw, list) and len(raw) == 2 and isinstance(raw[0], str) and isinstance(raw[1], dict)):
        raise ProtocolError("body must be a msgpack array [tag, {fields}]")
    tag, fields = raw
    request_id = fields.get("request_id", "") if isinstance(fields.get("request_id"), str) else ""
    cls = _REGISTRY.get(tag)
    if cls is None:
        raise ProtocolError(f"unknown message tag {tag!r}", request_id)
    types_by_name = _field_types(cls)
    kwargs: dict[str, Any] = {}
    for name, value in fields.items():
        expected = types_by_name.get(name)
        if expected is None:
            continue  # a newer peer's appended field: ignore, per the append-only rule
        problem = _type_problem(value, expected)
        if problem:
            raise ProtocolError(f"{tag}.{name}: {problem}", request_id)
        kwargs[name] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ProtocolError(f"{tag}: missing field(s) {', '.join(missing)}", request_id)
    return cls(**kwargs)


def _type_problem(value: Any, expected: Any) -> str:
    """'' if value fits the annotation, else a short description of the mismatch."""
    origin = typing.get_origin(expected)
    if expected is Any:
        return ""
    if origin in (Union, types.UnionType):
        options = typing.get_args(expected)
        if all(_type_problem(value, opt) for opt in options):
            return f"expected {_type_name(expected)}, got {type(value).__name__}"
        return ""
    if expected is type(None):
        return "" if value is None else f"expected null, got {type(value).__name__}"
    if expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return "" if ok else f"expected float, got {type(value).__name__}"
    if expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return "" if ok else f"expected int, got {type(value).__name__}"
    if expected in (str, bool, bytes):
        return "" if isinstance(value, expected) else f"expected {expected.__name__}, got {type(value).__name__}"
    if origin is list:
        if not isinstance(value, list):
            return f"expected {_type_name(expected)}, got {type(value).__name__}"
        (item_type,) = typing.get_args(expected)
        for i, item in enumerate(value):
            problem = _type_problem(item, item_type)
            if problem:
                return f"item {i}: {problem}"
        return ""
    if origin is dict:
        if not isinstance(value, dict):
            return f"expected {_type_name(expected)}, got {type(value).__name__}"
        key_type, value_type = typing.get_args(expected)
        for k, v in value.items():
            problem = _type_problem(k, key_type) or _type_problem(v, value_type)
            if problem:
                return f"entry {k!r}: {problem}"
        return ""
    raise TypeError(f"unsupported annotation {expected!r} in a message")


def _type_name(annotation: Any) -> str:
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


# ----------------------------------------------------------------------------- in-process only
# Messages between actors of one process. They are typed like the rest but never registered for
# the wire, so a peer cannot send them.


@dataclass(frozen=True, slots=True)
class Place:
    """Router -> scheduler: find (or start) an instance of ``model`` for a request."""

    request_id: str
    model: str
    resume: bool = False
    exclude_instance: str = ""


@dataclass(frozen=True, slots=True)
class AdoptRequests:
    """Controller: a node re-registered with a restarted controller; the router takes its requests' token logs
    (``NodeHello.running``) into its table, to stream on when their clients reconnect."""

    node: str
    running: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class AdoptInstances:
    """Controller: a node re-registered with a restarted controller; the scheduler counts its instances
    (``NodeHello.instances``) as its own instead of unloading them."""

    node: str
    instances: list[dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Placed:
    request_id: str
    node: str
    instance_id: str
    cold_start: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class PlacementFailed:
    request_id: str
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class RequestFinished:
    """Router -> scheduler: the request no longer occupies ``instance_id``."""

    request_id: str
    instance_id: str


@dataclass(frozen=True, slots=True)
class InstancesLost:
    """Scheduler -> router: these instances are gone; resume their requests elsewhere."""

    instance_ids: list[str]
    reason: str


@dataclass(frozen=True, slots=True)
class NodeUp:
    node: str
    incarnation: str


@dataclass(frozen=True, slots=True)
class NodeLost:
    node: str
    reason: str


@dataclass(frozen=True, slots=True)
class NodeProcessExited:
    """A local node process ended (its sentinel fired): evidence that outruns missed heartbeats."""

    node: str
    returncode: int


@dataclass(frozen=True, slots=True)
class MigrationStarted:
    """Scheduler -> router: ``request_id`` is being migrated (the router times the pause)."""

    request_id: str
    migration_id: str
    source: str
    dest: str


@dataclass(frozen=True, slots=True)
class Preempt:
    """Scheduler -> router (the ``shepherd`` policy): these requests lost their instance and restart
    from scratch elsewhere; tokens already streamed are recomputed and not sent twice."""

    request_ids: list[str]
    reason: str


@dataclass(frozen=True, slots=True)
class RequestTokens:
    """Router -> scheduler, periodically: tokens so far (prompt + generated) of each running request."""

    tokens: dict[str, int]
    remaining: dict[str, int] = field(default_factory=dict)
    """Tokens each may still generate (max_tokens - generated): how long its instance stays busy."""


@dataclass(frozen=True, slots=True)
class ClientGone:
    """The client socket could not reach ``peer`` any more: its requests are cancelled."""

    peer: bytes


@dataclass(frozen=True, slots=True)
class Tick:
    """Periodic wake-up from the controller's IO thread (liveness checks, keep-alive, timeouts)."""

    now: float


@dataclass(frozen=True, slots=True)
class FromClient:
    """A client's wire message with the peer identity to answer."""

    peer: bytes
    message: Message
    role: str = "operator"
    """The role of the key the message came with (``client`` sees only its own requests)."""


@dataclass(frozen=True, slots=True)
class FromNode:
    """A node's wire message about a request, with the node its key names: the router takes it only
    from the node hosting the request (or the migration's source or destination)."""

    node: str
    message: Message


@dataclass(frozen=True, slots=True)
class Query:
    """An ``ask`` for an actor's view, for status and snapshots."""

    what: str


@dataclass(frozen=True, slots=True)
class Fetch:
    """Node, in-process ask to the repository tier: a local path holding ``model`` from ``source``."""

    model: str
    source: str


@dataclass(frozen=True, slots=True)
class TierLookup:
    """Ask a tier for its copy of ``model`` (a path on SSD, a HostCheckpoint in DRAM) or None.

    A hit is leased to the caller until ``TierRelease``, so it is never evicted mid-read.
    """

    model: str


@dataclass(frozen=True, slots=True)
class TierStore:
    """Ask (SSD) or tell (DRAM) a tier to take a copy of ``model`` from the checkpoint at ``path``.

    The SSD tier answers with its copy's path, leased to the caller as by ``TierLookup``. ``release``
    names a tier whose lease on ``path`` the DRAM tier hands back once it has read the copy.
    """

    model: str
    path: str
    release: str = ""


@dataclass(frozen=True, slots=True)
class TierRelease:
    model: str


@dataclass(frozen=True, slots=True)
class TierDrop:
    """A tier's copy of ``model`` failed its checksums: delete it."""

    model: str
    reason: str


@dataclass(frozen=True, slots=True)
class TierLoaded:
    """A real load from this tier: ``nbytes`` in ``seconds``, to refine the measured bandwidth."""

    model: str
    nbytes: int
    seconds: float
