"""RouterActor: the clients' side of the cluster.

It keeps each request's token log (in the controller-owned RequestTable), forwards tokens to the
client as they arrive, and when an instance is lost resumes the request from that log on another
instance, so the client sees one stream with no token lost or repeated.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from typing import Any

import pykka

from sllm_actors.actors.controller import scheduler
from sllm_actors.actors.controller.context import ClusterContext, RequestRecord
from sllm_actors.messages import (
    AdoptRequests,
    CancelInference,
    CancelRequest,
    ClientGone,
    ClusterSnapshot,
    ErrorReply,
    FromClient,
    FromNode,
    GenerateDone,
    GenerateRequest,
    InferenceDone,
    InferenceFailed,
    InstancesLost,
    Message,
    Migrated,
    MigrationEnded,
    MigrationStarted,
    Placed,
    PlacementFailed,
    Preempt,
    PromptAccepted,
    Query,
    SamplingParams,
    StartInference,
    StatusReply,
    StatusRequest,
    Tick,
    TokenBatch,
    TokenChunk,
)
from sllm_actors.runtime import trace
from sllm_actors.runtime.security import redact_for_client
from sllm_actors.runtime.supervisor import Directory, SupervisedActor

__all__ = [
    "AWAIT_NODE_S",
    "CLAIM_S",
    "RouterActor",
    "adopt_requests",
    "client_gone",
    "cluster_status",
    "deliver_from_client",
    "deliver_from_node",
    "instances_lost",
    "migration_ended",
    "migration_started",
    "placement_failed",
    "preempt_requests",
    "publish_snapshot",
    "request_placed",
    "tick",
]

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 1_000_000
MAX_TOKENS_LIMIT = 1 << 20
CLAIM_S = 60.0
"""A request a node handed over on re-registration waits this long for its client to reconnect, then is
cancelled (its client is gone too)."""
AWAIT_NODE_S = 5.0
"""A reconnecting client's stream that no node has reported waits this long for its node to re-register (nodes
re-register within a second or two of a controller restart), then resumes from the client's own tokens."""


# ------------------------------------------------------------------ client functions
# What the controller's other actors and its IO thread tell the router; each returns False when the router is
# not there (restarting), as ``Directory.tell`` does.

ROUTER = "router"
"""The router's name in the controller's directory."""


def deliver_from_client(directory: Directory, peer: bytes, message: Message, role: str) -> bool:
    """A client's ``GenerateRequest``, ``CancelRequest`` or ``StatusRequest``, answered to ``peer``."""
    return directory.tell(ROUTER, FromClient(peer, message, role))


def deliver_from_node(directory: Directory, node: str, message: Message) -> bool:
    """A node's word about a request it hosts (tokens, done, failed, migrated), with the node its key
    names."""
    return directory.tell(ROUTER, FromNode(node, message))


def client_gone(directory: Directory, peer: bytes) -> bool:
    """``peer`` cannot be reached any more: cancel its requests."""
    return directory.tell(ROUTER, ClientGone(peer))


def adopt_requests(directory: Directory, node: str, running: list[dict[str, Any]]) -> bool:
    """``node`` re-registered after a controller restart with these requests' token logs (``NodeHello.running``):
    they join the table and stream on to their clients when those reconnect."""
    return directory.tell(ROUTER, AdoptRequests(node, running))


def tick(directory: Directory, now: float) -> bool:
    """The periodic wake-up: requests left unclaimed or unreported after a controller restart."""
    return directory.tell(ROUTER, Tick(now))


def publish_snapshot(directory: Directory) -> bool:
    """Build and publish the cluster's state snapshot on the router's thread (the IO thread must not wait)."""
    return directory.tell(ROUTER, Query("publish"))


def request_placed(directory: Directory, request_id: str, node: str, instance_id: str,
                   cold_start: dict[str, Any] | None = None) -> bool:
    """The scheduler found ``instance_id`` on ``node`` for the request (``cold_start``: what starting it
    took)."""
    return directory.tell(ROUTER, Placed(request_id, node, instance_id, cold_start))


def placement_failed(directory: Directory, request_id: str, code: str, message: str) -> bool:
    """The scheduler gave up on placing the request; the client gets ``code`` and ``message``."""
    return directory.tell(ROUTER, PlacementFailed(request_id, code, message))


def preempt_requests(directory: Directory, request_ids: list[str], reason: str) -> bool:
    """These requests lost their instance to another model: restart them from scratch elsewhere."""
    return directory.tell(ROUTER, Preempt(request_ids, reason))


def instances_lost(directory: Directory, instance_ids: list[str], reason: str) -> bool:
    """These instances are gone: resume their requests from their token logs elsewhere."""
    return directory.tell(ROUTER, InstancesLost(instance_ids, reason))


def migration_started(directory: Directory, request_id: str, migration_id: str, source: str,
                      dest: str) -> bool:
    """``request_id`` is being migrated from ``source`` to ``dest`` (``node/instance``); the router times
    it."""
    return directory.tell(ROUTER, MigrationStarted(request_id, migration_id, source, dest))


def cluster_status(directory: Directory, timeout: float = 5.0) -> dict[str, Any]:
    """What ``sllm status`` shows (nodes, instances, requests, queue); empty while the router restarts."""
    ref = directory.get(ROUTER)
    if ref is None:
        return {}
    status: dict[str, Any] = ref.ask(Query("status"), block=False).get(timeout=timeout)
    return status


def migration_ended(directory: Directory, migration_id: str, instance_id: str, outcome: str,
                    detail: str = "") -> bool:
    """A migration order ended without the switch (``aborted``): the request's record says it did not
    happen."""
    return directory.tell(ROUTER, MigrationEnded(migration_id, instance_id, outcome, detail))


class RouterActor(SupervisedActor):
    def __init__(self, supervisor: pykka.ActorRef[Any], name: str, *, cluster: ClusterContext) -> None:
        super().__init__(supervisor, name)
        self.cluster = cluster
        self.requests = cluster.table.requests

    def started(self) -> None:
        # A restarted router picks up the token logs its predecessor left and re-places each request.
        for rec in self.requests.values():
            self._resume(rec, "router restarted")

    # ------------------------------------------------------------------ messages

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, FromNode):
            if isinstance(message.message, TokenBatch):
                self._token_batch(message.message, message.node)
                return None
            rec = self.requests.get(getattr(message.message, "request_id", ""))
            if rec is not None and not _hosted_by(rec, message.node):
                log.warning("router: refused %s for %s from %s, which does not host it (%s does)",
                            message.message.tag, rec.request_id, message.node, rec.node or "no node yet")
                return None
            message = message.message
        if isinstance(message, FromClient):
            self._from_client(message.peer, message.message, message.role)
        elif isinstance(message, TokenBatch):
            self._token_batch(message, "")  # in-process: there is no sending node to check
        elif isinstance(message, TokenChunk):
            self._tokens(message)
        elif isinstance(message, PromptAccepted):
            rec = self.requests.get(message.request_id)
            if rec is not None and rec.prompt_ids is None:
                rec.prompt_ids = list(message.prompt_ids)
        elif isinstance(message, InferenceDone):
            self._done(message)
        elif isinstance(message, InferenceFailed):
            self._failed(message)
        elif isinstance(message, Placed):
            self._placed(message)
        elif isinstance(message, PlacementFailed):
            rec = self.requests.get(message.request_id)
            if rec is not None:
                self._finish_with_error(rec, message.code, message.message)
        elif isinstance(message, MigrationStarted):
            self._migration_started(message)
        elif isinstance(message, Migrated):
            self._migrated(message)
        elif isinstance(message, MigrationEnded):
            for rec in self.requests.values():
                mig = rec.active_migration
                if mig is not None and mig.get("migration_id") == message.migration_id and not mig.get("switched"):
                    mig["detail"] = message.detail
                    self._close_migration(rec, outcome=message.outcome)
                    rec.state = "running"
        elif isinstance(message, Preempt):
            for request_id in message.request_ids:
                rec = self.requests.get(request_id)
                if rec is not None:
                    self._resume(rec, message.reason, from_scratch=True)
        elif isinstance(message, InstancesLost):
            for rec in list(self.requests.values()):
                if rec.instance_id in message.instance_ids:
                    self._resume(rec, message.reason)
        elif isinstance(message, ClientGone):
            gone = [r for r in self.requests.values() if r.client == message.peer]
            for rec in gone:
                log.info("router: client of %s is gone; cancelling it", rec.request_id)
                self._cancel(rec)
            if gone:
                # Once per client (its later failed sends find nothing left): a killed HTTP front end's
                # streams show in `sllm status` and the TUI as one event, apart from failures.
                who = message.peer.decode(errors="replace")
                self.cluster.events.emit("client_gone", f"client {who} is gone: cancelled its {len(gone)} "
                                         "request(s)", {"client": who, "requests": len(gone)})
        elif isinstance(message, AdoptRequests):
            for entry in message.running:
                self._adopt(message.node, entry)
        elif isinstance(message, Tick):
            self._tick(time.monotonic())
        elif isinstance(message, Query):
            return self._query(message.what)
        else:
            raise TypeError(f"{self.name}: unexpected message {message!r}")
        return None

    # ------------------------------------------------------------------ after a controller restart

    def _adopt(self, node: str, entry: dict[str, Any]) -> None:
        """A re-registering node's request: its log wins (it made the tokens; a client has at most what was
        forwarded of them), and a client already waiting for it gets what it lacks."""
        request_id = str(entry["request_id"])
        generated = [int(t) for t in entry.get("generated_ids", [])]
        finish_reason = str(entry.get("finish_reason", ""))
        rec = self.requests.get(request_id)
        if rec is not None and rec.awaiting_since is None:
            # Known already: another node's report (a migration's two ends) or a late one after the client's own
            # resume placed it elsewhere. The longer log wins; the other copy is cancelled.
            if len(generated) > len(rec.generated) and not finish_reason:
                log.warning("router: %s reported by %s with a longer log than %s's; ignored", request_id, node,
                            rec.node)
            if not finish_reason and str(entry.get("instance_id", "")) != rec.instance_id:
                self.cluster.to_node(node, CancelInference(request_id, str(entry.get("instance_id", ""))))
            return
        sampling = SamplingParams(int(entry.get("max_tokens", 128)), float(entry.get("temperature", 0.0)),
                                  float(entry.get("top_p", 1.0)), entry.get("seed"), tuple(entry.get("stop", [])))
        owner = str(entry.get("owner", ""))
        waiting = rec
        rec = RequestRecord(
            request_id=request_id, client=b"", model=str(entry.get("model", "")), prompt=str(entry.get("prompt", "")),
            chat=bool(entry.get("chat", False)), sampling=sampling, prompt_ids=[int(t) for t in entry.get("prompt_ids", [])],
            generated=generated, text=str(entry.get("text", "")), node=node,
            instance_id=str(entry.get("instance_id", "")), state="done" if finish_reason else "running",
            cache_salt=str(entry.get("cache_salt", "")), owner=owner, finish_reason=finish_reason,
            adopted_at=time.monotonic(),
        )
        self.requests[request_id] = rec
        if waiting is not None:
            if owner and waiting.client.hex() != owner:
                log.warning("router: %s: refused the resume of a client that does not own it", request_id)
                self.cluster.to_client(waiting.client, ErrorReply(request_id, "forbidden",
                                                                  f"request {request_id} belongs to another client"))
            else:
                self._claim(rec, waiting.client, len(waiting.generated), waiting.text)

    def _resume_stream(self, peer: bytes, msg: GenerateRequest) -> None:
        """A client reconnected after a controller restart and goes on with ``msg.request_id`` from the tokens it
        has: the router's log if a node reported the request, else (after ``AWAIT_NODE_S``) the client's own."""
        rec = self.requests.get(msg.request_id)
        if rec is not None and rec.awaiting_since is None:
            if (rec.owner and rec.owner != peer.hex()) or (rec.client and rec.client != peer):
                log.warning("router: refused to resume %s for a client that does not own it", msg.request_id)
                self.cluster.to_client(peer, ErrorReply(msg.request_id, "forbidden",
                                                        f"request {msg.request_id} belongs to another client"))
                return
            self._claim(rec, peer, len(msg.resume_ids), msg.resume_text)
            return
        problem = _validate(msg)
        if problem:
            self.cluster.to_client(peer, ErrorReply(msg.request_id, "bad_request", problem))
            return
        rec = RequestRecord(
            request_id=msg.request_id, client=peer, model=msg.model, prompt=msg.prompt, chat=msg.chat,
            sampling=msg.sampling if msg.sampling.seed is not None else dataclasses.replace(
                msg.sampling, seed=secrets.randbits(63)),
            generated=list(msg.resume_ids), text=msg.resume_text, cache_salt=msg.cache_salt, owner=peer.hex(),
            state="awaiting_node", awaiting_since=time.monotonic(),
        )
        self.requests[msg.request_id] = rec

    def _claim(self, rec: RequestRecord, peer: bytes, have: int, have_text: str) -> None:
        """``peer`` owns ``rec`` again: send it the log past its ``have`` tokens, and the end if it came."""
        rec.client, rec.adopted_at = peer, None
        rec.owner = rec.owner or peer.hex()
        if len(rec.generated) > have:
            text = rec.text[len(have_text):] if rec.text.startswith(have_text) else ""
            self.cluster.to_client(peer, TokenChunk(rec.request_id, have, rec.generated[have:], text))
        if rec.finish_reason:
            self._send_done(rec, rec.finish_reason)

    def _tick(self, now: float) -> None:
        for rec in list(self.requests.values()):
            if rec.adopted_at is not None and not rec.client and now - rec.adopted_at > CLAIM_S:
                log.info("router: %s: no client reconnected for it in %.0fs; cancelling it", rec.request_id, CLAIM_S)
                self._cancel(rec)
            elif rec.awaiting_since is not None and now - rec.awaiting_since > AWAIT_NODE_S:
                rec.awaiting_since = None
                self._resume(rec, "the controller restarted and no node reported it")

    def _from_client(self, peer: bytes, msg: Any, role: str = "operator") -> None:
        if isinstance(msg, GenerateRequest):
            self._generate(peer, msg)
        elif isinstance(msg, CancelRequest):
            rec = self.requests.get(msg.request_id)
            if rec is not None and rec.client == peer:
                self._cancel(rec)
                self.cluster.to_client(peer, ErrorReply(msg.request_id, "cancelled", "cancelled by the client"))
        elif isinstance(msg, StatusRequest):
            status = self.status()
            if role != "operator":
                own = {r.request_id for r in self.requests.values() if r.client == peer}
                status = redact_for_client(status, own)
            self.cluster.to_client(peer, StatusReply(msg.request_id, status))
        else:
            self.cluster.to_client(peer, ErrorReply(getattr(msg, "request_id", ""), "unexpected",
                                                    f"the router does not take {msg.tag} messages"))

    # ------------------------------------------------------------------ request lifecycle

    def _generate(self, peer: bytes, msg: GenerateRequest) -> None:
        trace.mark(msg.request_id, "router_in")
        if msg.resume:
            self._resume_stream(peer, msg)
            return
        problem = _validate(msg)
        if not problem and msg.request_id in self.requests:
            problem = f"request id {msg.request_id!r} is already in flight"
        if problem:
            self.cluster.to_client(peer, ErrorReply(msg.request_id, "bad_request", problem))
            return
        sampling = msg.sampling
        if sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))
        rec = RequestRecord(
            request_id=msg.request_id, client=peer, model=msg.model, prompt=msg.prompt, chat=msg.chat, sampling=sampling,
            cache_salt=msg.cache_salt, owner=peer.hex(),
        )
        self.requests[msg.request_id] = rec
        scheduler.request_placement(self.cluster.directory, rec.request_id, rec.model)

    def _placed(self, msg: Placed) -> None:
        rec = self.requests.get(msg.request_id)
        if rec is None:
            # Finished or cancelled while placement was under way: give the slot back.
            scheduler.request_finished(self.cluster.directory, msg.request_id, msg.instance_id)
            return
        rec.node, rec.instance_id = msg.node, msg.instance_id
        if msg.cold_start and not rec.cold_start:
            rec.cold_start = {**msg.cold_start, "wait_s": time.monotonic() - rec.created}
        if rec.state == "resuming" and rec.active_migration is not None:
            rec.active_migration["to"] = f"{msg.node}/{msg.instance_id}"
            rec.active_migration["switched"] = True
        rec.state = "running"
        from_scratch = rec.from_scratch
        rec.from_scratch = False
        self.cluster.to_node(msg.node, self._start_message(rec, from_scratch))
        trace.mark(rec.request_id, "router_start")

    def _start_message(self, rec: RequestRecord, from_scratch: bool = False) -> StartInference:
        # From scratch (a preempted request): the instance regenerates every token; the ones the
        # client already has come back with indexes the log already holds and are dropped.
        generated, text = ([], "") if from_scratch else (list(rec.generated), rec.text)
        return StartInference(
            request_id=rec.request_id, instance_id=rec.instance_id, prompt=rec.prompt if rec.prompt_ids is None else "",
            chat=rec.chat, prompt_ids=rec.prompt_ids or [], generated_ids=generated, **rec.sampling.fields(),
            text_so_far=text, cache_salt=rec.cache_salt, owner=rec.owner,
        )

    def _token_batch(self, batch: TokenBatch, node: str) -> None:
        """An engine step's tokens: each request's are checked against the node that sent them, then added to its
        log; the clients' chunks leave with one wake-up of the IO thread."""
        out = []
        for request_id, index, token_ids, text in zip(batch.request_ids, batch.indexes, batch.token_ids, batch.texts):
            rec = self.requests.get(request_id)
            if node and rec is not None and not _hosted_by(rec, node):
                log.warning("router: refused tokens for %s from %s, which does not host it (%s does)", request_id,
                            node, rec.node or "no node yet")
                continue
            accepted = self._accept_tokens(TokenChunk(request_id, index, token_ids, text))
            if accepted is not None:
                out.append(accepted)
        self.cluster.to_clients(out)

    def _tokens(self, chunk: TokenChunk) -> None:
        out = self._accept_tokens(chunk)
        if out is not None:
            self.cluster.to_client(*out)

    def _accept_tokens(self, chunk: TokenChunk) -> tuple[bytes, TokenChunk] | None:
        """Add a chunk's new tokens to the request's log; the (client, chunk) to forward, if any is new."""
        rec = self.requests.get(chunk.request_id)
        if rec is None:
            return None
        have = len(rec.generated)
        if chunk.index + len(chunk.token_ids) <= have:
            return None  # a late or repeated chunk (from a source after a migration or a resume)
        if chunk.index > have:
            log.error("router: %s: chunk at %d but the log has %d tokens; dropped", rec.request_id, chunk.index, have)
            return None
        new_ids = chunk.token_ids[have - chunk.index :]
        if rec.finish_reason:
            return None  # an adopted request that finished: its log is whole
        now = time.monotonic()
        if rec.first_token_at is None:
            rec.first_token_at = now
            trace.mark(rec.request_id, "router_token")
        if rec.active_migration is not None and rec.last_token_at is not None:
            gap = now - rec.last_token_at
            rec.active_migration["pause_s"] = max(rec.active_migration.get("pause_s", 0.0), gap)
            # Duplicates returned above, so a restart's pause lasts until it passes the client's tokens.
            if rec.active_migration.get("switched"):
                self._close_migration(rec)
        rec.last_token_at = now
        rec.generated.extend(new_ids)
        # The text of a partial overlap is not split per token; only whole new chunks carry text.
        text = chunk.text if chunk.index == have else ""
        rec.text += text
        if not rec.client:
            return None  # adopted after a controller restart: its client has not reconnected yet
        return rec.client, TokenChunk(rec.request_id, have, new_ids, text)

    def _migration_started(self, msg: MigrationStarted) -> None:
        rec = self.requests.get(msg.request_id)
        if rec is None:
            return
        if rec.active_migration is not None:
            self._close_migration(rec, outcome="superseded")
        rec.state = "migrating"
        rec.active_migration = {
            "kind": "migration", "migration_id": msg.migration_id, "from": msg.source, "to": msg.dest,
            "rounds": 0, "tokens_recomputed": 0, "total_s": 0.0, "pause_s": 0.0, "started": time.time(),
            "switched": False,
        }

    def _migrated(self, msg: Migrated) -> None:
        """The source stopped; point the route at the destination and send it the whole log."""
        rec = self.requests.get(msg.request_id)
        if rec is None or rec.instance_id != msg.source_instance:
            return  # finished meanwhile, or a stale notice from an instance this request already left
        if msg.n_generated != len(rec.generated):
            log.error("router: %s migrated at %d tokens but the log has %d; the log wins", rec.request_id,
                      msg.n_generated, len(rec.generated))
        mig = rec.active_migration
        if mig is None or mig.get("migration_id") != msg.migration_id:
            mig = {"kind": "migration", "migration_id": msg.migration_id, "pause_s": 0.0, "started": time.time()}
            rec.active_migration = mig
        mig.update({
            "from": f"{rec.node}/{msg.source_instance}", "to": f"{msg.dest_node}/{msg.dest_instance}",
            "rounds": msg.rounds, "tokens_recomputed": msg.tokens_recomputed, "total_s": msg.total_s,
            "transfer": msg.transfer, "kv_bytes": msg.kv_bytes, "copy_s": msg.copy_s, "switched": True,
        })
        if msg.note:
            mig["transfer_note"] = msg.note
        rec.node, rec.instance_id, rec.state = msg.dest_node, msg.dest_instance, "running"
        # The source handed the last tokens to the destination itself, which is already decoding; this
        # StartInference is the safety net (a duplicate there unless the hand-over failed).
        self.cluster.to_node(rec.node, self._start_message(rec))

    def _close_migration(self, rec: RequestRecord, outcome: str = "done") -> None:
        mig = rec.active_migration
        rec.active_migration = None
        if mig is None:
            return
        mig.pop("switched", None)
        mig["outcome"] = outcome
        rec.migrations.append(mig)

    def _done(self, msg: InferenceDone) -> None:
        rec = self.requests.get(msg.request_id)
        if rec is None or msg.instance_id != rec.instance_id:
            return  # the instance this request left behind
        if msg.n_generated > len(rec.generated):
            log.error("router: %s done at %d tokens but the log has %d", rec.request_id, msg.n_generated,
                      len(rec.generated))
        scheduler.request_finished(self.cluster.directory, rec.request_id, rec.instance_id)
        if not rec.client:
            # Adopted, its client not back yet: the end waits for it with the log.
            rec.finish_reason, rec.state = msg.finish_reason, "done"
            return
        self._send_done(rec, msg.finish_reason)

    def _send_done(self, rec: RequestRecord, finish_reason: str) -> None:
        self.requests.pop(rec.request_id, None)
        now = time.monotonic()
        if rec.active_migration is not None:
            self._close_migration(rec, outcome="done" if rec.active_migration.get("switched") else "finished first")
        self.cluster.to_client(rec.client, GenerateDone(
            request_id=rec.request_id, model=rec.model, token_ids=list(rec.generated), text=rec.text,
            finish_reason=finish_reason,
            ttft_s=(rec.first_token_at or now) - rec.created, total_s=now - rec.created,
            prompt_tokens=len(rec.prompt_ids or []), migrations=rec.migrations, cold_start=rec.cold_start,
        ))

    def _failed(self, msg: InferenceFailed) -> None:
        rec = self.requests.get(msg.request_id)
        if rec is None or msg.instance_id != rec.instance_id:
            return
        if msg.code == "no_instance":
            self._resume(rec, msg.message)
            return
        self._finish_with_error(rec, msg.code, msg.message)

    def _finish_with_error(self, rec: RequestRecord, code: str, message: str) -> None:
        self.requests.pop(rec.request_id, None)
        if rec.instance_id:
            scheduler.request_finished(self.cluster.directory, rec.request_id, rec.instance_id)
        if rec.client:
            self.cluster.to_client(rec.client, ErrorReply(rec.request_id, code, message))

    def _cancel(self, rec: RequestRecord) -> None:
        self.requests.pop(rec.request_id, None)
        if rec.instance_id and not rec.finish_reason:
            self.cluster.to_node(rec.node, CancelInference(rec.request_id, rec.instance_id))
            scheduler.request_finished(self.cluster.directory, rec.request_id, rec.instance_id)

    def _resume(self, rec: RequestRecord, reason: str, from_scratch: bool = False) -> None:
        """Continue a request from its token log on whatever instance the scheduler finds."""
        lost = f"{rec.node}/{rec.instance_id}" if rec.instance_id else "(unplaced)"
        log.warning("router: resuming %s after %s: %s (%d tokens in the log)", rec.request_id, lost, reason,
                    len(rec.generated))
        self.cluster.events.emit(
            "resume", f"resume {rec.request_id} from its token log ({len(rec.generated)} tokens): {reason}",
            {"request_id": rec.request_id},
        )
        if rec.active_migration is not None and rec.active_migration.get("kind") not in ("resume", "restart"):
            self._close_migration(rec, outcome="interrupted")
        rec.from_scratch = from_scratch
        if rec.active_migration is None:
            rec.active_migration = {
                "kind": "restart" if from_scratch else "resume", "from": lost, "to": "", "reason": reason, "rounds": 1,
                "tokens_recomputed": len(rec.prompt_ids or []) + len(rec.generated), "transfer": "recompute",
                "kv_bytes": 0, "pause_s": 0.0,
                "started": time.time(), "switched": False,
            }
        old_instance = rec.instance_id
        rec.state, rec.node, rec.instance_id = "resuming", "", ""
        scheduler.request_placement(self.cluster.directory, rec.request_id, rec.model, resume=True,
                                      exclude_instance=old_instance)

    # ------------------------------------------------------------------ status

    def _query(self, what: str) -> Any:
        if what == "publish":
            self.cluster.publish(ClusterSnapshot(time.time(), self.status()))
            scheduler.report_request_tokens(
                self.cluster.directory,
                {r.request_id: len(r.prompt_ids or []) + len(r.generated) for r in self.requests.values()},
                {r.request_id: max(0, r.sampling.max_tokens - len(r.generated)) for r in self.requests.values()})
            return None
        if what == "requests":
            return self._requests_view()
        if what == "status":
            return self.status()
        raise ValueError(f"unknown query {what!r}")

    def _requests_view(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        out = []
        for rec in self.requests.values():
            if rec.finish_reason:
                continue  # finished before a controller restart, kept only for its client to reconnect to
            elapsed = now - (rec.first_token_at or now)
            out.append({
                "request_id": rec.request_id, "model": rec.model, "state": rec.state, "tokens": len(rec.generated),
                "node": rec.node, "instance_id": rec.instance_id,
                "tokens_per_s": round(len(rec.generated) / elapsed, 1) if elapsed > 0 else 0.0,
                "migrations": len(rec.migrations),
            })
        return out

    def status(self) -> dict[str, Any]:
        directory = self.cluster.directory
        nodes = _ask(directory.get("registry"), Query("nodes"), [])
        instances = _ask(directory.get("scheduler"), Query("instances"), [])
        models = _ask(directory.get("scheduler"), Query("models"), [])
        queue = _ask(directory.get("scheduler"), Query("queue"), [])
        migrations = _ask(directory.get("scheduler"), Query("migrations"), [])
        health = _ask(directory.get("scheduler"), Query("health"), {"gpus": [], "nodes": {}})
        gpu_health = {(g["node"], g["gpu"]): g for g in health["gpus"]}
        gpus, tiers = [], []
        for node in nodes:
            status = node.get("status") or {}
            spec = self.cluster.topology.node(node["name"])
            for index, gpu in enumerate(spec.gpus):
                on_gpu = [i for i in instances if i["node"] == node["name"] and i["gpu"] == index]
                gpus.append({
                    "node": node["name"], "index": index, "device": gpu.device,
                    "memory_total": gpu.memory_bytes, "memory_used": sum(i["memory_bytes"] for i in on_gpu),
                    "models": [i["model"] for i in on_gpu],
                    # What keeps work off it (policy/health.py): breaker, poisoned device, cordon.
                    "health": gpu_health.get((node["name"], index), {}).get("state", "healthy"),
                    "health_reason": gpu_health.get((node["name"], index), {}).get("reason", ""),
                    "breaker_failures": gpu_health.get((node["name"], index), {}).get("failures", 0),
                    # Decode steps captured as CUDA graphs there (each holds host memory: bench_soak follows it).
                    "cuda_graphs": sum(int(i.get("cuda_graphs", 0)) for i in status.get("instances", [])
                                       if i.get("gpu") == index),
                })
            for tier in status.get("tiers", []):
                tiers.append({"node": node["name"], **tier})
            node.pop("status", None)
            node["instances_reported"] = len(status.get("instances", []))
            node["cordoned"] = health["nodes"].get(node["name"], {}).get("state", "")
        return {
            "time": time.time(),
            "client_endpoint": self.cluster.client_endpoint,
            "epoch": self.cluster.epoch,
            # Which controller leads (this one: only the leader answers a status) and every controller, with etcd.
            "leader": self.cluster.controller_name,
            "controllers": self.cluster.controllers,
            "nodes": nodes,
            "gpus": gpus,
            "instances": instances,
            "models": models,
            "queue": queue,
            "migrations": migrations,
            "requests": self._requests_view(),
            "tiers": tiers,
            "events": self.cluster.events.recent(50),
        }


def _hosted_by(rec: RequestRecord, node: str) -> bool:
    if node == rec.node:
        return True
    mig = rec.active_migration or {}
    # A migration's destination streams before the source's Migrated notice may have arrived.
    return any(str(mig.get(end, "")).split("/", 1)[0] == node for end in ("from", "to"))


def _ask(ref: pykka.ActorRef[Any] | None, message: Any, default: Any) -> Any:
    if ref is None:
        return default
    try:
        return ref.ask(message, timeout=2.0)
    except (pykka.ActorDeadError, pykka.Timeout):
        return default


def _validate(msg: GenerateRequest) -> str:
    if not msg.request_id:
        return "request_id is empty"
    if not msg.model:
        return "model is empty"
    if not msg.prompt.strip():
        return "the prompt is empty"
    if len(msg.prompt) > MAX_PROMPT_CHARS:
        return f"the prompt has {len(msg.prompt)} characters; the limit is {MAX_PROMPT_CHARS}"
    if msg.max_tokens <= 0:
        return f"max_tokens must be positive, got {msg.max_tokens}"
    if msg.max_tokens > MAX_TOKENS_LIMIT:
        return f"max_tokens must be at most {MAX_TOKENS_LIMIT}, got {msg.max_tokens}"
    if msg.temperature < 0:
        return f"temperature must be >= 0, got {msg.temperature}"
    if not 0 < msg.top_p <= 1:
        return f"top_p must be in (0, 1], got {msg.top_p}"
    if msg.seed is not None and msg.seed < 0:
        return f"seed must be >= 0, got {msg.seed}"
    return ""
