"""The HTTP front end's link to the cluster: one ZeroMQ DEALER to the router's client port, shared by every
HTTP request of this process, and a SUB on the state port for snapshots and events (health and metrics).

The router sees one client; requests are told apart by their ids, so one socket and one reader task serve
any number of concurrent HTTP streams without a thread or a socket per request.

With a standby controller (``endpoint`` lists every controller's, this host's first) the link follows the leader as
the Python client does: a standby's ``NotLeader`` moves the socket to the leader it names, and a leader silent past
``FAILOVER_S`` moves it to the next controller; the socket (and so its identity, by which the router knows the
streams' owner) stays, only its connection moves, and the next Welcome resumes every open stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from sllm_actors.runtime import wire
from sllm_actors.client import FAILOVER_S, PROBE_S, SILENT_MEMO_S, resume_request, router_socket, take_new
from sllm_actors.messages import (
    PROTOCOL_VERSION,
    CancelRequest,
    ClusterEvent,
    ClusterSnapshot,
    ErrorReply,
    GenerateDone,
    GenerateRequest,
    Hello,
    Message,
    NotLeader,
    ProtocolError,
    StatusReply,
    StatusRequest,
    TokenChunk,
    Welcome,
)

log = logging.getLogger(__name__)

SNAPSHOT_FRESH_S = 3.0
"""The controller publishes a snapshot every 0.5 s; one older than this means the controller is stuck."""


WATCHDOG_S = 1.0


def _credentials() -> Any:
    """The front end's CURVE identity: the cluster's operator key (it is part of the cluster `sllm up` starts,
    needs the state feed, and enforces the API keys' roles itself); any key ``sllm_actors.runtime.security`` finds
    otherwise; None for a cluster without keys."""
    from sllm_actors.runtime.security import find_credentials, keys_dir, load_credentials

    operator = keys_dir() / "operator.key_secret"
    return load_credentials(operator) if operator.is_file() else find_credentials(None)


class RouterUnavailable(ConnectionError):
    """The router did not answer the handshake or a request in time."""


class RouterLink:
    def __init__(self, endpoint: str, *, connect_timeout: float = 5.0,
                 on_event: Callable[[ClusterEvent], None] | None = None) -> None:
        self.endpoints = [e.strip() for e in endpoint.split(",") if e.strip()] or [endpoint]
        self.endpoint = self.endpoints[0]
        """The controller the socket is connected to now (the leader, once it welcomed us)."""
        self._silent: dict[str, float] = {}
        self._moved = False
        self.connect_timeout = connect_timeout
        self.on_event = on_event
        self.state_endpoint = ""
        self.snapshot: dict[str, Any] | None = None
        self.snapshot_at = 0.0
        self._context = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._sub: zmq.asyncio.Socket | None = None
        self._sync_sock: zmq.Socket[bytes] | None = None
        self._welcome: asyncio.Future[Welcome] | None = None
        self._streams: dict[str, asyncio.Queue[Message]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._groups: set[Group] = set()
        self.epoch = 0
        """The controller's epoch (``Welcome.epoch``): a new one means it restarted, and every open stream resumes."""
        self._open: dict[str, tuple[GenerateRequest, list[int], list[str]]] = {}
        """request id -> (its request, the token ids and texts its stream has): what a resume sends."""
        self._heard_at = time.monotonic()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect and handshake; retries until the router answers, so the HTTP port can open first."""
        credentials = _credentials()
        sock = router_socket(self._context, self.endpoint, "http", credentials)
        self._sock = sock
        # A blocking view of the same socket, for a cancel sent while the caller's task is being cancelled
        # (an await there would be cancelled too). A DEALER under its high-water mark never blocks.
        self._sync_sock = zmq.Socket.shadow(sock.underlying)
        self._welcome = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(self._read(), name="router-reader"))
        self._tasks.append(asyncio.create_task(self._watchdog(), name="idle-watchdog"))
        while True:
            await sock.send_multipart(wire.pack(Hello(PROTOCOL_VERSION, "http")))
            try:
                welcome = await asyncio.wait_for(asyncio.shield(self._welcome), self.connect_timeout)
                break
            except TimeoutError:
                log.warning("http: no answer from the router at %s yet; retrying", self.endpoint)
        self.state_endpoint = welcome.state_endpoint
        self.epoch = welcome.epoch
        self._tasks.append(asyncio.create_task(self._probe(), name="epoch-probe"))
        if self.state_endpoint:
            from sllm_actors.feed import reachable_state_endpoint

            sub = self._context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            if credentials is not None:
                credentials.apply_client(sub)
            sub.connect(reachable_state_endpoint(self.state_endpoint, self.endpoint))
            self._sub = sub
            self._tasks.append(asyncio.create_task(self._read_state(), name="state-reader"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in (self._sock, self._sub):
            if sock is not None:
                sock.close(linger=0)
        self._context.term()

    # ------------------------------------------------------------------ readers

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            self._deliver(await self._sock.recv_multipart())
            # Whatever else is already queued is read without a future per message: at many streams the
            # router's chunks arrive in bursts, and the asyncio wrapper's cost per recv is most of ours.
            assert self._sync_sock is not None
            while True:
                try:
                    frames = self._sync_sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._deliver(frames)

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(WATCHDOG_S)
            now = time.monotonic()
            for group in list(self._groups):
                if group.waiting_since and now - group.waiting_since > group.idle_timeout:
                    group.waiting_since = 0.0
                    group.queue.put_nowait(_Silence())  # type: ignore[arg-type]

    async def _probe(self) -> None:
        """After ``PROBE_S`` of silence, a Hello: its Welcome tells a restarted controller (a new epoch) apart."""
        assert self._sock is not None
        following = len(self.endpoints) > 1
        while True:
            await asyncio.sleep(PROBE_S)
            silent = time.monotonic() - self._heard_at
            if following and silent >= PROBE_S + FAILOVER_S:
                # The leader is gone (or was never there): the next controller answers, or names who leads.
                self._silent[self.endpoint] = time.monotonic()
                order = self.endpoints
                self._move(order[(order.index(self.endpoint) + 1) % len(order)] if self.endpoint in order else order[0])
            elif (self._open or following) and silent >= PROBE_S:
                await self._sock.send_multipart(wire.pack(Hello(PROTOCOL_VERSION, "http")))

    def _move(self, endpoint: str) -> None:
        """Connect the socket to ``endpoint`` instead (same socket, same identity) and say Hello there."""
        assert self._sock is not None and self._sync_sock is not None
        if endpoint != self.endpoint:
            log.warning("http: moving from controller %s to %s", self.endpoint, endpoint)
            try:
                self._sock.disconnect(self.endpoint)
            except zmq.ZMQError:
                pass  # not connected there (it never answered)
            self._sock.connect(endpoint)
            self.endpoint = endpoint
            self._moved = True
        self._heard_at = time.monotonic()  # the new one gets its own FAILOVER_S
        self._sync_sock.send_multipart(wire.pack(Hello(PROTOCOL_VERSION, "http")))

    def _resume_all(self) -> None:
        """The controller restarted: every open stream goes on from the tokens it has (the router's log wins)."""
        assert self._sync_sock is not None
        log.warning("http: the controller restarted (epoch %d); resuming %d open stream(s)", self.epoch,
                    len(self._open))
        for request, ids, texts in self._open.values():
            self._sync_sock.send_multipart(wire.pack(resume_request(request, ids, "".join(texts))))

    def _deliver(self, frames: list[bytes]) -> None:
        self._heard_at = time.monotonic()
        try:
            _, msg = wire.unpack(frames)
        except ProtocolError as exc:
            log.error("http: the router sent a frame we cannot read: %s", exc)
            return
        if isinstance(msg, NotLeader):
            # A standby: go to the leader it names, unless that one was just found silent (its lease is not yet
            # expired); the probe asks again in a second.
            target = msg.leader_endpoint
            if target and target != self.endpoint and time.monotonic() - self._silent.get(target, -SILENT_MEMO_S) \
                    >= SILENT_MEMO_S:
                self._move(target)
            return
        if isinstance(msg, Welcome):
            self._silent.pop(self.endpoint, None)
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(msg)
            elif msg.epoch != self.epoch or self._moved:
                self.epoch = msg.epoch
                self._moved = False
                self._follow_state(msg.state_endpoint)
                self._resume_all()
            return
        if isinstance(msg, TokenChunk) and msg.request_id in self._open:
            _, ids, texts = self._open[msg.request_id]
            chunk = take_new(msg, ids)
            if chunk is None:
                return  # a token the stream has (a resume's overlap)
            ids += chunk.token_ids
            texts.append(chunk.text)
            msg = chunk
        queue = self._streams.get(getattr(msg, "request_id", ""))
        if queue is not None:
            queue.put_nowait(msg)
        elif isinstance(msg, ErrorReply) and not msg.request_id:
            log.error("http: the router refused us: %s [%s]", msg.message, msg.code)

    def _follow_state(self, state_endpoint: str) -> None:
        """Subscribe to the new leader's snapshots instead of the old one's."""
        if self._sub is None or not state_endpoint or state_endpoint == self.state_endpoint:
            return
        from sllm_actors.feed import reachable_state_endpoint

        try:
            self._sub.disconnect(reachable_state_endpoint(self.state_endpoint, self.endpoint))
        except zmq.ZMQError:
            pass
        self.state_endpoint = state_endpoint
        self._sub.connect(reachable_state_endpoint(state_endpoint, self.endpoint))

    async def _read_state(self) -> None:
        assert self._sub is not None
        while True:
            frames = await self._sub.recv_multipart()
            try:
                _, msg = wire.unpack(frames)
            except ProtocolError:
                continue
            if isinstance(msg, ClusterSnapshot):
                self.snapshot = msg.status
                self.snapshot_at = time.monotonic()
            elif isinstance(msg, ClusterEvent) and self.on_event is not None:
                self.on_event(msg)

    # ------------------------------------------------------------------ requests

    def fresh_snapshot(self) -> dict[str, Any] | None:
        if self.snapshot is not None and time.monotonic() - self.snapshot_at < SNAPSHOT_FRESH_S:
            return self.snapshot
        return None

    async def _send(self, msg: Message) -> None:
        assert self._sock is not None
        await self._sock.send_multipart(wire.pack(msg))

    async def status(self, timeout: float = 5.0) -> dict[str, Any]:
        request_id = f"status-{uuid.uuid4().hex[:8]}"
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._streams[request_id] = queue
        try:
            await self._send(StatusRequest(request_id))
            try:
                reply = await asyncio.wait_for(queue.get(), timeout)
            except TimeoutError:
                raise RouterUnavailable(f"the router at {self.endpoint} did not answer within {timeout:.0f}s") from None
        finally:
            self._streams.pop(request_id, None)
        if isinstance(reply, ErrorReply):
            raise RouterUnavailable(f"{reply.message} [{reply.code}]")
        assert isinstance(reply, StatusReply)
        return reply.status

    def open(self, requests: list[GenerateRequest]) -> Group:
        """Register the requests' mailbox before sending, so no reply can arrive unrouted."""
        group = Group(self, requests)
        for request in requests:
            self._streams[request.request_id] = group.queue
            self._open[request.request_id] = (request, [], [])
        return group

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self._open.pop(request_id, None)


class _Silence:
    """Posted into a group's mailbox by the watchdog: the cluster said nothing for the idle timeout."""


class Group:
    """The requests of one HTTP call (its ``n`` choices), sharing one mailbox: messages arrive in the order
    the router sent them, each tagged with its choice's index, with no task or hop per choice."""

    def __init__(self, link: RouterLink, requests: list[GenerateRequest]) -> None:
        self.link = link
        self.requests = requests
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.index = {r.request_id: i for i, r in enumerate(requests)}
        self.pending = set(self.index)
        self.idle_timeout = 0.0
        self.waiting_since = 0.0
        link._groups.add(self)

    async def send(self) -> None:
        for request in self.requests:
            await self.link._send(request)

    @property
    def finished(self) -> bool:
        return not self.pending

    async def next(self, idle_timeout: float) -> tuple[int, Message]:
        """The next message of any choice; a GenerateDone or an ErrorReply ends that choice."""
        self.idle_timeout = idle_timeout
        self.waiting_since = time.monotonic()
        # No wait_for here: a timer per token per stream was a sizeable part of the front end's cost at many
        # streams; the link's watchdog posts _Silence instead when a group waits too long.
        msg = await self.queue.get()
        self.waiting_since = 0.0
        if isinstance(msg, _Silence):
            raise RouterUnavailable(f"no word from the cluster for {idle_timeout:.0f}s")
        return self._take(msg)

    def _take(self, msg: Message) -> tuple[int, Message]:
        """(choice index, message); a request's last message settles it, and the group's last settles the group."""
        request_id = getattr(msg, "request_id", "")
        if isinstance(msg, (GenerateDone, ErrorReply)):
            self.pending.discard(request_id)
            self.link._forget(request_id)
            if not self.pending:
                self.link._groups.discard(self)
        return self.index[request_id], msg

    async def next_batch(self, idle_timeout: float) -> list[tuple[int, Message]]:
        """The next message and every one already queued behind it, so a stream that fell behind catches
        up in one write instead of one per token."""
        batch = [await self.next(idle_timeout)]
        while not self.queue.empty():
            msg = self.queue.get_nowait()
            if isinstance(msg, _Silence):
                continue  # a message just came: not silent
            batch.append(self._take(msg))
        return batch

    def cancel(self) -> None:
        """Cancel every choice still running: the HTTP client went away, or one choice failed. Synchronous,
        so it also works from a task that is being cancelled."""
        assert self.link._sync_sock is not None
        for request_id in sorted(self.pending):
            self.link._forget(request_id)
            self.link._sync_sock.send_multipart(wire.pack(CancelRequest(request_id)))
        self.pending.clear()
        self.link._groups.discard(self)


__all__ = ["ErrorReply", "GenerateDone", "Group", "RouterLink", "RouterUnavailable", "TokenChunk"]
