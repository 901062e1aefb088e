"""The TUI's only view of the cluster: the controller's state PUB socket, read on a thread of its own.

The controller publishes a ``ClusterSnapshot`` every half second and each ``ClusterEvent`` as it happens.
The receiving thread keeps only the latest snapshot and a queue of new events; the UI takes both at its own
pace (:meth:`ClusterFeed.take`), so a burst of messages never turns into a burst of redraws.

Each snapshot also carries the recent event history. Merging it (deduplicated) fills in what happened
before this TUI attached and anything the PUB socket dropped (a slow subscriber loses messages at the
high-water mark, and the first ones after connecting).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import zmq

from sllm_actors.runtime import wire
from sllm_actors.messages import ClusterEvent, ClusterSnapshot, ProtocolError

__all__ = ["ClusterFeed", "Event", "reachable_state_endpoint"]

log = logging.getLogger(__name__)

POLL_MS = 100
"""How long the receiving thread blocks at most, so stop() is noticed promptly."""

EventKey = tuple[float, str, str]


@dataclass(frozen=True)
class Event:
    """One line of the cluster's event log, as the TUI shows it."""

    time: float
    kind: str
    text: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> EventKey:
        return (round(self.time, 6), self.kind, self.text)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Event:
        data = raw.get("data")
        return cls(float(raw.get("time", 0.0)), str(raw.get("kind", "")), str(raw.get("text", "")),
                   data if isinstance(data, dict) else {})


@dataclass
class FeedUpdate:
    """What arrived since the previous take(): the newest status (None if no new one) and new events."""

    status: dict[str, Any] | None
    events: list[Event]
    since_last_message_s: float | None
    """Seconds since anything arrived; None before the first message."""
    dropped: int = 0
    """Frames that were not valid protocol messages (counted, never raised into the UI)."""


class ClusterFeed:
    def __init__(self, state_endpoint: str, *, context: zmq.Context | None = None,
                 remember: int = 2000, credentials: Any = None) -> None:
        """``credentials``: an operator's key (security.Credentials); by default the one the client finds."""
        self.state_endpoint = state_endpoint
        if credentials is None:
            from sllm_actors.runtime.security import KeyProblem, find_credentials

            try:
                credentials = find_credentials()
            except KeyProblem:
                credentials = None  # the client's connect says what is wrong with the key; the feed stays empty
        self._credentials = credentials
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._status: dict[str, Any] | None = None
        self._status_fresh = False
        self._events: deque[Event] = deque()
        # Keys of events already handed out; bounded so a long-running TUI does not grow without end.
        self._seen: OrderedDict[EventKey, None] = OrderedDict()
        self._remember = remember
        self._last_message: float | None = None
        self._dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sllm-tui-feed", daemon=True)

    # ------------------------------------------------------------------ UI side

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def offer_status(self, status: dict[str, Any]) -> None:
        """A status obtained another way (the client's reply at connect) counts as a snapshot."""
        with self._lock:
            self._set_status(status)

    def take(self) -> FeedUpdate:
        with self._lock:
            status = self._status if self._status_fresh else None
            self._status_fresh = False
            events = list(self._events)
            self._events.clear()
            since = None if self._last_message is None else time.monotonic() - self._last_message
            return FeedUpdate(status, events, since, self._dropped)

    # ------------------------------------------------------------------ receiving thread

    def _run(self) -> None:
        sock = self._context.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        if self._credentials is not None:
            self._credentials.apply_client(sock)
        sock.connect(self.state_endpoint)
        try:
            while not self._stop.is_set():
                if not sock.poll(POLL_MS):
                    continue
                # Drain everything queued before taking the lock once per message.
                while True:
                    try:
                        frames = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(frames)
        except zmq.ZMQError as exc:
            if not self._stop.is_set():
                log.error("tui feed: state socket failed: %s", exc)
        finally:
            sock.close(linger=0)

    def _handle(self, frames: list[bytes]) -> None:
        try:
            _, msg = wire.unpack(frames)
        except ProtocolError:
            with self._lock:
                self._dropped += 1
            return
        with self._lock:
            self._last_message = time.monotonic()
            if isinstance(msg, ClusterSnapshot):
                self._set_status(msg.status)
            elif isinstance(msg, ClusterEvent):
                self._add_events([Event(msg.time, msg.kind, msg.text, dict(msg.data))])

    # ------------------------------------------------------------------ under the lock

    def _set_status(self, status: dict[str, Any]) -> None:
        self._status = status
        self._status_fresh = True
        history = status.get("events")
        if isinstance(history, list):
            events = [Event.from_dict(e) for e in history if isinstance(e, dict)]
            self._add_events(sorted(events, key=lambda e: e.time))

    def _add_events(self, events: list[Event]) -> None:
        for event in events:
            key = event.key
            if key in self._seen:
                continue
            self._seen[key] = None
            if len(self._seen) > self._remember:
                self._seen.popitem(last=False)
            self._events.append(event)


def reachable_state_endpoint(state_endpoint: str, client_endpoint: str) -> str:
    """The controller reports the address it bound; a wildcard host means 'the host we reached it at'."""
    state = urlsplit(state_endpoint)
    if state.scheme != "tcp" or state.hostname not in ("0.0.0.0", "*", "::", None):
        return state_endpoint
    client_host = urlsplit(client_endpoint).hostname or "127.0.0.1"
    host = f"[{client_host}]" if ":" in client_host else client_host
    return f"tcp://{host}:{state.port}"
