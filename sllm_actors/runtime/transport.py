"""One IO thread per process owns every ZeroMQ socket of that process.

ZeroMQ sockets are not thread-safe and actors each run in their own thread, so actors never touch a
socket: :meth:`Transport.send` encodes in the caller's thread, queues the frames and wakes the IO
thread through a pipe. Incoming frames are decoded in the IO thread and handed to a callback that
must only ``tell`` actors (never block). Frames that break the protocol are answered with an
``ErrorReply`` naming the problem; no actor ever sees them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
import zmq.utils.monitor

from sllm_actors.runtime import wire
from sllm_actors.messages import MAX_BODY_BYTES, ErrorReply, Message, ProtocolError

__all__ = ["Transport", "connect_each"]

log = logging.getLogger(__name__)

OnMessage = Callable[[bytes, str, Message, str], None]
"""(peer identity or b"" on a DEALER, address, message, sender) called in the IO thread; ``sender`` is the
``role:name`` ZAP bound to the peer's CURVE key ("" on a socket without CURVE)."""
Authenticate = Callable[[str, bytes, bytes], tuple[str, str]]
"""ZAP: (socket name, claimed socket identity, peer's public key) -> (user id, '') or ('', why refused)."""
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
OnUnreachable = Callable[[bytes], None]
Relay = Callable[[bytes, str, str], tuple[bytes, bytes] | None]
"""(sender identity, address, sender's user id) -> (the identity to pass the frame on to unread, what the
target reads in its address frame: the sender's node), or None to decode it here."""


@dataclass
class _Endpoint:
    socket: zmq.Socket
    kind: int
    on_message: OnMessage | None
    on_unreachable: OnUnreachable | None = None
    relay: Relay | None = None
    bad_frames: int = 0
    monitor: zmq.Socket | None = None
    refused: int = 0
    dropped: int = 0


@dataclass(order=True)
class _Timer:
    due: float
    interval: float = field(compare=False)
    fn: Callable[[], object] = field(compare=False)


class Transport:
    def __init__(self, name: str) -> None:
        self.name = name
        self.context = zmq.Context()
        self._endpoints: dict[str, _Endpoint] = {}
        self._outbox: queue.SimpleQueue[tuple[str, list[bytes]]] = queue.SimpleQueue()
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._timers: list[_Timer] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"{name}-io", daemon=True)
        self._started = False
        self._server_pair: tuple[bytes, bytes] | None = None
        self._credentials: Any = None
        self._authenticate: Authenticate | None = None
        self._zap: zmq.Socket | None = None
        self.refused = 0
        self._refused_by_kind: dict[tuple[str, str], int] = {}

    # ------------------------------------------------------------------ CURVE (before binding)

    def serve_curve(self, public: bytes, secret: bytes, authenticate: Authenticate) -> None:
        """Every socket bound after this is a CURVE server; ``authenticate`` answers ZAP in the IO thread.
        ZAP must be bound before the first handshake, or libzmq admits peers unchecked."""
        self._server_pair = (public, secret)
        self._authenticate = authenticate
        self._zap = self.context.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)

    def use_credentials(self, credentials: Any) -> None:
        """Every socket connected after this presents ``credentials`` (a security.Credentials)."""
        self._credentials = credentials

    def _secure_server(self, sock: zmq.Socket, key: str) -> zmq.Socket | None:
        if self._server_pair is None:
            return None
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = self._server_pair
        sock.zap_domain = key.encode()
        # A peer with no key or a wrong one fails in the handshake, before ZAP sees it: a monitor is
        # the only place that says so.
        sock.monitor(f"inproc://monitor-{key}-{id(sock)}", _HANDSHAKE_FAILED)
        mon = self.context.socket(zmq.PAIR)
        mon.connect(f"inproc://monitor-{key}-{id(sock)}")
        return mon

    # ------------------------------------------------------------------ setup (before start)

    def bind_router(
        self,
        key: str,
        endpoint: str,
        on_message: OnMessage,
        on_unreachable: OnUnreachable | None = None,
        handover: bool = False,
        relay: Relay | None = None,
        heartbeat_s: float = 0.0,
    ) -> str:
        """``relay``: frames with an address it names a peer for are passed on to that peer as they came,
        without being decoded here (the receiver decodes and checks them): a migration's KV copy crosses
        the controller at the cost of ZeroMQ's copy alone."""
        sock = self.context.socket(zmq.ROUTER)
        if handover:
            sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if heartbeat_s:
            # ZeroMQ's own pings: a connection to a vanished host closes, freeing the name it held.
            sock.setsockopt(zmq.HEARTBEAT_IVL, int(heartbeat_s * 1000))
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(heartbeat_s * 3000))
        sock.setsockopt(zmq.LINGER, 0)
        # Above this ZeroMQ drops the peer; below it we answer oversized frames with an error.
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_BODY_BYTES)
        if on_unreachable is not None:
            # Without this ROUTER silently drops frames for a vanished peer; we want to know.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        monitor = self._secure_server(sock, key)
        bound = _bind(sock, endpoint)
        self._endpoints[key] = _Endpoint(sock, zmq.ROUTER, on_message, on_unreachable, relay, monitor=monitor)
        return bound

    def connect_dealer(self, key: str, endpoint: str, identity: str, on_message: OnMessage) -> None:
        """``endpoint``: one, or several comma-separated (the controllers of a cluster with a standby): then the
        socket connects to each and sends only on connections made (see ``connect_each``)."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity.encode())
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * MAX_BODY_BYTES)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        if self._credentials is not None:
            self._credentials.apply_client(sock)
        connect_each(sock, endpoint)
        self._endpoints[key] = _Endpoint(sock, zmq.DEALER, on_message)

    def bind_pub(self, key: str, endpoint: str) -> str:
        sock = self.context.socket(zmq.PUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 1000)
        monitor = self._secure_server(sock, key)
        bound = _bind(sock, endpoint)
        self._endpoints[key] = _Endpoint(sock, zmq.PUB, None, monitor=monitor)
        return bound

    def every(self, interval_s: float, fn: Callable[[], object]) -> None:
        """Run fn in the IO thread every interval (heartbeats, snapshots); fn must be quick, and what it returns is
        dropped."""
        self._timers.append(_Timer(time.monotonic() + interval_s, interval_s, fn))

    def start(self) -> None:
        self._started = True
        self._thread.start()

    # ------------------------------------------------------------------ any thread

    def send(self, key: str, msg: Message, *, peer: bytes = b"", address: str = "") -> None:
        frames = wire.pack(msg, address)
        if peer:
            frames.insert(0, peer)
        self._outbox.put((key, frames))
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already; the IO thread will drain the outbox

    def send_many(self, key: str, messages: list[tuple[bytes, Message]]) -> None:
        """``send`` of each (peer, message), waking the IO thread once."""
        if not messages:
            return
        for peer, msg in messages:
            self._outbox.put((key, [peer, *wire.pack(msg)]))
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass

    def stop(self) -> None:
        if self._stop.is_set():
            return  # already stopped: the pipe and sockets are closed
        self._stop.set()
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass
        if self._started and threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
        for ep in self._endpoints.values():
            if ep.monitor is not None:
                ep.monitor.close(linger=0)
            ep.socket.close(linger=0)
        if self._zap is not None:
            self._zap.close(linger=0)
        self.context.term()
        os.close(self._wake_read)
        os.close(self._wake_write)

    # ------------------------------------------------------------------ IO thread

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_read, zmq.POLLIN)
        by_socket: dict[zmq.Socket, tuple[str, _Endpoint]] = {}
        monitors: dict[zmq.Socket, tuple[str, _Endpoint]] = {}
        for key, ep in self._endpoints.items():
            if ep.kind != zmq.PUB:
                poller.register(ep.socket, zmq.POLLIN)
                by_socket[ep.socket] = (key, ep)
            if ep.monitor is not None:
                poller.register(ep.monitor, zmq.POLLIN)
                monitors[ep.monitor] = (key, ep)
        if self._zap is not None:
            poller.register(self._zap, zmq.POLLIN)
        while not self._stop.is_set():
            timeout_ms = self._run_due_timers()
            try:
                ready = dict(poller.poll(timeout_ms))
            except zmq.ZMQError as exc:
                if self._stop.is_set():
                    break
                log.error("%s: poll failed: %s", self.name, exc)
                continue
            if self._wake_read in ready:
                try:
                    while os.read(self._wake_read, 4096):
                        pass
                except BlockingIOError:
                    pass
            if self._zap is not None and self._zap in ready:
                self._answer_zap()
            self._flush_outbox()
            for sock, (key, ep) in by_socket.items():
                if sock in ready:
                    self._receive(key, ep)
            for mon, (key, ep) in monitors.items():
                if mon in ready:
                    self._handshake_failures(key, ep)

    def _answer_zap(self) -> None:
        assert self._zap is not None and self._authenticate is not None
        for _ in range(100):
            try:
                request = self._zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            version, request_id, domain, address, identity, mechanism = request[:6]
            user, why = "", "CURVE keys are required"
            if mechanism == b"CURVE" and len(request) == 7:
                try:
                    user, why = self._authenticate(domain.decode(errors="replace"), identity, request[6])
                except Exception as exc:  # a ring that cannot be read refuses; the peer will retry
                    log.exception("%s: authentication failed", self.name)
                    user, why = "", f"authentication error: {exc}"
            if user:
                self._zap.send_multipart([version, request_id, b"200", b"OK", user.encode(), b""])
            else:
                self._note_refused(domain.decode(errors="replace"),
                                   f"{address.decode(errors='replace')} ({identity[:40]!r}): {why}", why.split(":")[0])
                self._zap.send_multipart([version, request_id, b"400", why.encode(), b"", b""])

    def _handshake_failures(self, key: str, ep: _Endpoint) -> None:
        assert ep.monitor is not None
        while True:
            try:
                event = zmq.utils.monitor.parse_monitor_message(ep.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                continue  # ZAP refused it, and said why already
            self._note_refused(key, "a peer failed the CURVE handshake (no key, or not this cluster's "
                                    f"server key; zmq code {event['value']})", "handshake")

    def _note_refused(self, key: str, why: str, kind: str) -> None:
        self.refused += 1
        ep = self._endpoints.get(key)
        if ep is not None:
            ep.refused += 1
        # A flood of bad handshakes must not flood the log: the first few of each kind, then every thousandth.
        # Counted by kind, so that a flood of one (handshakes without keys) does not hide another (an unknown key).
        n = self._refused_by_kind[(key, kind)] = self._refused_by_kind.get((key, kind), 0) + 1
        if n <= 20 or n % 1000 == 0:
            log.warning("%s: refused a connection on %s (#%d of this kind): %s", self.name, key, n, why)

    def _run_due_timers(self) -> int:
        now = time.monotonic()
        next_due = now + 0.05
        for timer in self._timers:
            if timer.due <= now:
                timer.due = now + timer.interval
                try:
                    timer.fn()
                except Exception:
                    log.exception("%s: timer callback failed", self.name)
            next_due = min(next_due, timer.due)
        return max(0, int((next_due - time.monotonic()) * 1000))

    def _flush_outbox(self) -> None:
        while True:
            try:
                key, frames = self._outbox.get_nowait()
            except queue.Empty:
                return
            ep = self._endpoints.get(key)
            if ep is None:
                log.error("%s: no socket %r for an outgoing message", self.name, key)
                continue
            self._send_frames(key, ep, frames)

    def _send_frames(self, key: str, ep: _Endpoint, frames: list[Any]) -> None:
        try:
            # Never blocking: a peer that stops reading (its queue at the high-water mark) must not stall
            # the one IO thread every other peer depends on; what it does not read is dropped.
            ep.socket.send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            ep.dropped += 1
            if ep.dropped <= 20 or ep.dropped % 1000 == 0:
                log.warning("%s: a peer on %s is not reading (or, joined to several controllers, none leads yet); "
                            "dropped a frame for it (#%d)", self.name, key, ep.dropped)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH and ep.on_unreachable is not None:
                ep.on_unreachable(frames[0])
            elif exc.errno != zmq.EHOSTUNREACH:
                log.warning("%s: send on %s failed: %s", self.name, key, exc)

    def _receive(self, key: str, ep: _Endpoint) -> None:
        for _ in range(1000):  # bounded so one busy socket cannot starve the others
            try:
                raw = ep.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            sender = _user_id(raw[-1])
            peer = b""
            if ep.kind == zmq.ROUTER:
                peer, raw = raw[0].bytes, raw[1:]
            # Small frames as bytes; the body stays a view of ZeroMQ's buffer (a KV chunk is MiBs).
            frames: list[Any] = [f.bytes for f in raw[:-1]] + [raw[-1].buffer] if raw else []
            if ep.relay is not None and len(frames) == 3 and frames[0] == wire.HEADER and frames[1]:
                route = ep.relay(peer, frames[1].decode(errors="replace"), sender)
                if route is not None:
                    target, origin = route
                    self._send_frames(key, ep, [target, frames[0], origin, raw[2]])
                    continue
            try:
                address, msg = wire.unpack(frames)
            except ProtocolError as exc:
                ep.bad_frames += 1
                if ep.bad_frames <= 100 or ep.bad_frames % 1000 == 0:  # a flood must not flood the log
                    log.warning("%s: bad frame on %s from %r (#%d): %s", self.name, key, peer, ep.bad_frames, exc)
                reply = wire.pack(ErrorReply(exc.request_id, "bad_message", str(exc)))
                try:
                    ep.socket.send_multipart([peer, *reply] if peer else reply, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the sender of garbage is gone; nothing to tell
                continue
            assert ep.on_message is not None
            try:
                ep.on_message(peer, address, msg, sender)
            except Exception:
                # A dispatch bug must not take the whole process's IO down with it.
                log.exception("%s: handling %s from %r failed", self.name, msg.tag, peer)


def connect_each(sock: zmq.Socket, endpoints: str) -> None:
    """Connect ``sock`` to each of the comma-separated ``endpoints``. With several (every controller's cluster port),
    ``ZMQ_IMMEDIATE`` queues frames only on connections made: only the leading controller binds its cluster port,
    so what a node sends goes to the leader and to no one else, and when a standby takes over and binds, ZeroMQ's
    reconnect finds it within its interval. With one endpoint nothing changes: frames wait in the pipe for a
    restarted controller on the same port."""
    listed = [e.strip() for e in endpoints.split(",") if e.strip()]
    if len(listed) > 1:
        sock.setsockopt(zmq.IMMEDIATE, 1)
    for endpoint in listed:
        sock.connect(endpoint)


def _user_id(frame: zmq.Frame) -> str:
    try:
        return frame.get("User-Id") or ""
    except zmq.ZMQError:
        return ""  # no ZAP on this connection (a socket without CURVE)


def _bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind and return the concrete endpoint (port 0 means any free port)."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        host = endpoint[len("tcp://") : -len(":0")]
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)
