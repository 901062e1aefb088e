"""The Python client of a running cluster (what ``sllm generate`` and ``sllm status`` use).

    client = Client("tcp://127.0.0.1:7700")
    for event in client.generate("smollm2-135m", "What is the capital of France?", chat=True):
        if isinstance(event, TokenEvent):
            print(event.text, end="", flush=True)
        else:
            print(event.ttft_s, event.total_s)

One ``Client`` is one ZeroMQ DEALER socket: use it from one thread; open one per thread. The endpoint may list every
controller of a cluster with a standby (``tcp://A:7700,tcp://B:7700``): the client follows the leader, taking a
standby's redirect (``NotLeader``) to it, and when the leader goes silent mid-stream it tries the next one and
resumes its streams there as after a controller restart. It presents a
CURVE key: ``key=`` (a ``.key_secret`` file from ``sllm keys``), else ``$SLLM_KEY``, else the operator's or
the client's key under ``$SLLM_HOME/keys`` (see :mod:`sllm_actors.runtime.security`).
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import zmq

from sllm_actors.runtime import wire
from sllm_actors.runtime.topology import is_url
from sllm_actors.messages import (
    PROTOCOL_VERSION,
    Ack,
    CancelRequest,
    DeployModel,
    ErrorReply,
    GenerateDone,
    GenerateRequest,
    Hello,
    KillNode,
    NodeCommand,
    Message,
    MigrateCommand,
    NotLeader,
    ProtocolError,
    StatusReply,
    StatusRequest,
    TokenChunk,
    Welcome,
)

__all__ = [
    "PROBE_S",
    "Client",
    "ClusterUnavailable",
    "Completion",
    "RequestError",
    "TokenEvent",
    "resolve_endpoint",
    "resume_request",
    "router_socket",
    "take_new",
]


_Socket = TypeVar("_Socket", bound="zmq.Socket[Any]")
"""A plain socket from a plain context, an asyncio one from an asyncio context (the HTTP bridge's)."""


def router_socket(context: zmq.Context[_Socket], endpoint: str, kind: str, credentials: Any,
                  identity: bytes = b"") -> _Socket:
    """A DEALER connected to the router, as each client holds one (this module's ``Client``, the HTTP front end's
    bridge, on an asyncio context or not): an identity of its own (``KIND-`` and random, or ``identity``: a client
    that moves to another controller keeps its own, which the router knows its requests' owner by), no linger, and
    CURVE with ``credentials`` where the cluster has keys."""
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity or f"{kind}-{uuid.uuid4().hex[:12]}".encode())
    if credentials is not None:
        credentials.apply_client(sock)
    sock.connect(endpoint)
    return sock

PROBE_S = 1.0
"""A stream silent this long sends a ``Hello``: the ``Welcome`` says whether the controller is the one that took the
request (same epoch) or a restarted one, to which the stream is resumed from the tokens the client has."""
FAILOVER_S = 1.5
"""With several controllers: a Hello unanswered this long means the leader is gone; the client tries the next one."""
SILENT_MEMO_S = 10.0
"""A controller found silent is not followed on a standby's word for this long (its lease may not have expired yet:
the standby still names it)."""
REDIRECT_RETRY_S = 0.2


def resume_request(request: GenerateRequest, token_ids: list[int], text: str) -> GenerateRequest:
    """``request`` again, to a restarted controller: go on after ``token_ids`` (the client has them)."""
    return dataclasses.replace(request, resume=True, resume_ids=list(token_ids), resume_text=text)


def take_new(chunk: TokenChunk, have: list[int]) -> TokenChunk | None:
    """The part of ``chunk`` past the ``have`` tokens a stream already has (None: nothing new). A restarted
    controller resends from the client's offset, and a late copy may overlap; a stream never repeats a token."""
    n = len(have)
    if chunk.index + len(chunk.token_ids) <= n or chunk.index > n:
        return None  # repeated, or (never seen) past a gap
    new = list(chunk.token_ids[n - chunk.index:])
    return TokenChunk(chunk.request_id, n, new, chunk.text if chunk.index == n else "")


class ClusterUnavailable(ConnectionError):
    """No cluster answered at the endpoint in time."""


class _Redirect(Exception):
    """A standby answered: ``msg`` names the leader."""

    def __init__(self, msg: NotLeader) -> None:
        super().__init__(msg.leader)
        self.msg = msg


class RequestError(RuntimeError):
    """The cluster refused or failed a request; ``code`` is machine-readable."""

    def __init__(self, request_id: str, code: str, message: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.request_id = request_id
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    index: int
    token_ids: list[int]
    text: str


@dataclass(frozen=True)
class Completion:
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

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id, "model": self.model, "token_ids": self.token_ids, "text": self.text,
            "finish_reason": self.finish_reason, "ttft_s": self.ttft_s, "total_s": self.total_s,
            "prompt_tokens": self.prompt_tokens, "migrations": self.migrations, "cold_start": self.cold_start,
        }


def resolve_endpoint(cluster: str | None = None, cwd: Path | None = None) -> str:
    """``--cluster``, else ``$SLLM_CLUSTER``, else the controller of ``./topology.yaml``."""
    if cluster:
        return cluster
    env = os.environ.get("SLLM_CLUSTER")
    if env:
        return env
    path = (cwd or Path.cwd()) / "topology.yaml"
    if path.is_file():
        from sllm_actors.runtime.topology import load_topology

        return load_topology(path).client_endpoints  # every controller's, with a standby
    raise ClusterUnavailable(
        "no cluster endpoint: pass --cluster tcp://HOST:PORT, set SLLM_CLUSTER, or run where topology.yaml is"
    )


class Client:
    def __init__(self, endpoint: str, *, connect_timeout: float = 5.0, idle_timeout: float = 900.0,
                 key: str | os.PathLike[str] | None = None, insecure: bool = False) -> None:
        """``endpoint``: one controller's client endpoint, or every controller's, comma-separated. ``insecure``: no
        CURVE, for a controller started without keys (benchmarks of what CURVE costs)."""
        self.endpoints = [e.strip() for e in endpoint.split(",") if e.strip()] or [endpoint]
        self.endpoint = self.endpoints[0]
        """The controller this client talks to now (the leader, once connected)."""
        self.leader = ""
        """The leading controller's name, when a standby named it."""
        self._silent: dict[str, float] = {}
        self._identity = f"client-{uuid.uuid4().hex[:12]}".encode()
        """Kept across controllers: a stream resumed on a new leader is known as ours by it."""
        self._welcome: Welcome | None = None
        self._moved = False
        """A stream's socket moved to another controller (``_fail_over``): its next Welcome resumes it."""
        self.key = key
        self.insecure = insecure
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._context: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._socket: zmq.Socket[bytes] | None = None
        self.state_endpoint = ""
        self.http_endpoint = ""
        self.epoch = 0
        """The controller's epoch at the handshake (``Welcome.epoch``)."""

    # ------------------------------------------------------------------ connection

    def _connect(self) -> zmq.Socket[bytes]:
        if self._socket is not None:
            return self._socket
        if len(self.endpoints) == 1:
            return self._connect_to(self.endpoint)
        return self._follow_leader(time.monotonic() + self.connect_timeout)

    def _follow_leader(self, deadline: float) -> zmq.Socket[bytes]:
        """Connect to the leading controller: each in turn, a standby's redirect taken to the one it names (unless
        that one was just found silent), until one welcomes us or ``deadline``."""
        start = self.endpoints.index(self.endpoint) if self.endpoint in self.endpoints else 0
        order = self.endpoints[start:] + self.endpoints[:start]
        tried: list[str] = []
        while time.monotonic() < deadline:
            endpoint = order[0]
            wait = min(FAILOVER_S, max(0.05, deadline - time.monotonic()))
            try:
                sock = self._connect_to(endpoint, wait, quiet=True)
                self._silent.pop(endpoint, None)
                return sock
            except _Redirect as redirect:
                tried.append(f"{endpoint}: standby {redirect.msg.controller}, leader "
                             f"{redirect.msg.leader or 'none yet'}")
                target = redirect.msg.leader_endpoint
                recently_silent = time.monotonic() - self._silent.get(target, -SILENT_MEMO_S) < SILENT_MEMO_S
                if target and target != endpoint and not recently_silent:
                    self.leader = redirect.msg.leader
                    order = [target] + [e for e in order if e != target]
                else:
                    # No leader yet, or the one named was just silent (its lease not yet expired): ask again soon.
                    time.sleep(min(REDIRECT_RETRY_S, max(0.0, deadline - time.monotonic())))
            except ClusterUnavailable as exc:
                tried.append(str(exc))
                self._silent[endpoint] = time.monotonic()
                order = order[1:] + order[:1]
        raise ClusterUnavailable(f"no controller of {','.join(self.endpoints)} led within "
                                 f"{self.connect_timeout:.0f}s: " + "; ".join(tried[-len(self.endpoints):]))

    def _connect_to(self, endpoint: str, timeout: float | None = None, quiet: bool = False) -> zmq.Socket[bytes]:
        self.endpoint = endpoint
        credentials = None
        if not self.insecure:
            from sllm_actors.runtime.security import KeyProblem, find_credentials, no_key_message

            try:
                credentials = find_credentials(self.key)
            except KeyProblem as exc:
                raise ClusterUnavailable(str(exc)) from None
            if credentials is None:
                raise ClusterUnavailable(no_key_message(f"the cluster at {self.endpoint}"))
        # One identity across controllers (the new leader knows the stream's owner by it); with one controller a
        # socket of a new identity each time, as before (a ROUTER ignores a second connection under a name it holds).
        sock = router_socket(self._context, self.endpoint, "client", credentials,
                             self._identity if len(self.endpoints) > 1 else b"")
        self._socket = sock
        sock.send_multipart(wire.pack(Hello(PROTOCOL_VERSION, "client")))
        deadline = time.monotonic() + (self.connect_timeout if timeout is None else timeout)
        while True:
            msg = self._recv(deadline, connecting=True)
            if isinstance(msg, Welcome):
                self.state_endpoint = msg.state_endpoint
                self.http_endpoint = msg.http_endpoint
                self.epoch = msg.epoch
                self._welcome = msg
                return sock
            if isinstance(msg, NotLeader):
                self.close()
                raise _Redirect(msg)
            if isinstance(msg, ErrorReply):
                self.close()
                raise ClusterUnavailable(f"the cluster at {self.endpoint} refused us: {msg.message}")

    def _recv(self, deadline: float, connecting: bool = False) -> Message:
        assert self._socket is not None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._socket.poll(int(remaining * 1000)):
                self.close()
                if connecting:
                    raise ClusterUnavailable(
                        f"no sllm cluster answered at {self.endpoint} within {self.connect_timeout:.0f}s "
                        "(is `sllm up` running there, and is our key one of its keys?)"
                    )
                raise ClusterUnavailable(
                    f"the cluster at {self.endpoint} went silent for {self.idle_timeout:.0f}s; giving up"
                )
            frames = self._socket.recv_multipart()
            try:
                _, msg = wire.unpack(frames)
            except ProtocolError as exc:
                raise RequestError("", "bad_message", f"the cluster sent a frame we cannot read: {exc}") from None
            return msg

    def _send(self, msg: Message) -> None:
        self._connect().send_multipart(wire.pack(msg))

    def connect(self) -> None:
        """Connect now (CURVE handshake, Hello/Welcome) rather than at the first request: a benchmark's clients
        connect before their start line, so a request's time to first token does not include its connection."""
        self._connect()

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _await_reply(self, request_id: str, timeout: float) -> Message:
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(deadline)
            if getattr(msg, "request_id", None) != request_id:
                continue  # a stray reply of an earlier, abandoned request
            if isinstance(msg, ErrorReply):
                raise RequestError(request_id, msg.code, msg.message)
            return msg

    # ------------------------------------------------------------------ requests

    def generate(
        self,
        model: str,
        prompt: str,
        *,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = False,
        stop: list[str] | None = None,
        request_id: str | None = None,
        cache_salt: str = "",
    ) -> Iterator[TokenEvent | Completion]:
        """Token events as they arrive, then one Completion. Raises RequestError on refusal. Requests share cached
        prompt prefixes only under equal ``cache_salt`` (a tenant's own)."""
        request_id = request_id or f"req-{uuid.uuid4().hex[:12]}"
        request = GenerateRequest(
            request_id=request_id, model=model, prompt=prompt, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, seed=seed, chat=chat, stop=list(stop or []), cache_salt=cache_salt,
        )
        self._send(request)
        have: list[int] = []
        have_text = ""
        finished = False
        try:
            give_up = time.monotonic() + self.idle_timeout
            while True:
                msg = self._await_stream(request_id, give_up)
                if isinstance(msg, Welcome):
                    if msg.epoch != self.epoch or self._moved:
                        # The controller restarted, or we moved to another (the leader changed, or the one we left
                        # was only slow and cancelled our request when our socket went): go on from our tokens.
                        self.epoch = msg.epoch
                        self._moved = False
                        self._send(resume_request(request, have, have_text))
                    continue
                give_up = time.monotonic() + self.idle_timeout
                if isinstance(msg, TokenChunk):
                    chunk = take_new(msg, have)
                    if chunk is None:
                        continue
                    have += chunk.token_ids
                    have_text += chunk.text
                    yield TokenEvent(chunk.request_id, chunk.index, list(chunk.token_ids), chunk.text)
                elif isinstance(msg, GenerateDone):
                    finished = True
                    yield Completion(
                        request_id=msg.request_id, model=msg.model, token_ids=list(msg.token_ids), text=msg.text,
                        finish_reason=msg.finish_reason, ttft_s=msg.ttft_s, total_s=msg.total_s,
                        prompt_tokens=msg.prompt_tokens, migrations=list(msg.migrations),
                        cold_start=dict(msg.cold_start),
                    )
                    return
        except RequestError:
            finished = True
            raise
        finally:
            if not finished and self._socket is not None:
                # The caller stopped reading: free the GPU time instead of generating for nobody.
                self._socket.send_multipart(wire.pack(CancelRequest(request_id)))

    def _await_stream(self, request_id: str, give_up: float) -> Message:
        """The stream's next message, or a ``Welcome`` answering the ``Hello`` sent after ``PROBE_S`` of silence;
        ClusterUnavailable at ``give_up`` (``idle_timeout`` after the stream's last message). With several
        controllers, a Hello unanswered for ``FAILOVER_S`` moves the client to the leader (``_fail_over``)."""
        assert self._socket is not None
        probed_at: float | None = None
        while True:
            now = time.monotonic()
            if now >= give_up:
                self.close()
                raise ClusterUnavailable(
                    f"the cluster at {self.endpoint} went silent for {self.idle_timeout:.0f}s; giving up")
            if not self._socket.poll(int(min(PROBE_S, give_up - now) * 1000)):
                if len(self.endpoints) > 1 and probed_at is not None and now - probed_at >= FAILOVER_S:
                    return self._fail_over(give_up)
                if probed_at is None:
                    probed_at = now
                self._socket.send_multipart(wire.pack(Hello(PROTOCOL_VERSION, "client")))
                continue
            try:
                _, msg = wire.unpack(self._socket.recv_multipart())
            except ProtocolError as exc:
                raise RequestError("", "bad_message", f"the cluster sent a frame we cannot read: {exc}") from None
            probed_at = None
            if isinstance(msg, NotLeader) and len(self.endpoints) > 1:
                return self._fail_over(give_up)
            if isinstance(msg, Welcome):
                return msg
            if getattr(msg, "request_id", None) != request_id:
                continue  # a stray reply of an earlier, abandoned request
            if isinstance(msg, ErrorReply):
                raise RequestError(request_id, msg.code, msg.message)
            return msg

    def _fail_over(self, give_up: float) -> Welcome:
        """The controller went silent (or no longer leads): connect to the one that leads now. Its Welcome is
        returned with the epoch this stream knew left in place, so the caller sees a new epoch and resumes."""
        self._silent[self.endpoint] = time.monotonic()
        known = self.epoch
        self.close()
        order = self.endpoints
        self.endpoint = order[(order.index(self.endpoint) + 1) % len(order)] if self.endpoint in order else order[0]
        while True:
            try:
                self._follow_leader(min(give_up, time.monotonic() + self.connect_timeout))
                break
            except ClusterUnavailable:
                if time.monotonic() >= give_up:
                    raise
        welcome = self._welcome
        assert welcome is not None
        self.epoch = known
        self._moved = True
        return welcome

    def complete(self, model: str, prompt: str, **kwargs: Any) -> Completion:
        """generate() without streaming: the Completion alone."""
        for event in self.generate(model, prompt, **kwargs):
            if isinstance(event, Completion):
                return event
        raise RequestError("", "incomplete", "the stream ended without a completion")

    def status(self, timeout: float = 10.0) -> dict[str, Any]:
        request_id = f"status-{uuid.uuid4().hex[:8]}"
        self._send(StatusRequest(request_id))
        reply = self._await_reply(request_id, timeout)
        assert isinstance(reply, StatusReply)
        return reply.status

    def deploy(self, name: str, source: str, timeout: float = 30.0) -> str:
        request_id = f"deploy-{uuid.uuid4().hex[:8]}"
        # A path is this host's and is sent absolute; a URL is nobody's path and goes as written.
        self._send(DeployModel(request_id, name, source if is_url(source) else str(Path(source).expanduser().resolve())))
        reply = self._await_reply(request_id, timeout)
        assert isinstance(reply, Ack)
        return reply.detail

    def migrate(self, request_id: str, target: str, timeout: float = 300.0) -> str:
        cmd_id = f"migrate-{uuid.uuid4().hex[:8]}"
        self._send(MigrateCommand(cmd_id, request_id, target))
        reply = self._await_reply(cmd_id, timeout)
        assert isinstance(reply, Ack)
        return reply.detail

    def cordon(self, node: str, timeout: float = 10.0) -> str:
        """``node`` takes no new requests nor instances; what runs there goes on. What changed, in words."""
        return self._node_command("cordon", node, timeout)

    def uncordon(self, node: str, timeout: float = 10.0) -> str:
        """``node`` takes work again (after ``cordon`` or ``drain``)."""
        return self._node_command("uncordon", node, timeout)

    def drain(self, node: str, timeout: float = 10.0) -> str:
        """Cordon ``node``, move its running requests elsewhere (or let them finish there), then unload its
        instances. Returns once the drain has begun; ``status()`` shows the node ``draining``, then
        ``cordoned`` with no instances."""
        return self._node_command("drain", node, timeout)

    def breaker_reset(self, target: str, timeout: float = 10.0) -> str:
        """Close the load circuit breakers of ``target`` (``NODE`` or ``NODE/gpu-N``) and clear its unhealthy
        marks: its GPUs take loads again at once. ``target`` a model: one held off everywhere (its loads failed on
        several GPUs) may load again."""
        return self._node_command("breaker_reset", target, timeout)

    def _node_command(self, action: str, target: str, timeout: float) -> str:
        request_id = f"{action}-{uuid.uuid4().hex[:8]}"
        self._send(NodeCommand(request_id, action, target))
        reply = self._await_reply(request_id, timeout)
        assert isinstance(reply, Ack)
        return reply.detail

    def kill_node(self, node: str, timeout: float = 10.0) -> str:
        request_id = f"kill-{uuid.uuid4().hex[:8]}"
        self._send(KillNode(request_id, node))
        reply = self._await_reply(request_id, timeout)
        assert isinstance(reply, Ack)
        return reply.detail
