"""A live fuzz of a running cluster's sockets: random and mutated frames, with and without valid keys.

Used by the bounded CI test (tests/test_fuzz_live.py) and the long run (benchmarks/fuzz_live.py). Loopback
clusters only: it floods the sockets it is pointed at.
"""

from __future__ import annotations

import dataclasses
import random
import time
import typing
from dataclasses import dataclass, field
from typing import Any

import zmq

from sllm_actors.runtime import wire
from sllm_actors.messages import Message, encode, message_types
from sllm_actors.runtime.security import Credentials

__all__ = ["rss_bytes", "run_campaign"]

# What a mutated frame starts from: every wire type but the three an operator key could use to change
# the cluster for real (those are refused for the client key the fuzz uses, and tested by role elsewhere).
_MESSAGE_TYPES = message_types()
_SEEDS = sorted(t for t in _MESSAGE_TYPES if t not in ("kill_node", "deploy", "migrate_command"))


@dataclass
class FuzzCounts:
    sent: int = 0
    would_block: int = 0
    replies: int = 0
    by_target: dict[str, int] = field(default_factory=dict)


def _sample(rng: random.Random, cls: type[Message]) -> Message:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        origin = typing.get_origin(t)
        if t is str:
            values[f.name] = rng.choice(["", "x", "node-1", "node-2", "req-1", "tiny", "../../etc", "\x00" * 3])
        elif t is int:
            values[f.name] = rng.choice([0, 1, -1, 2**31, 2**63 - 1])
        elif t is float:
            values[f.name] = rng.choice([0.0, 1.0, -1.0, 1e300, float("inf")])
        elif t is bool:
            values[f.name] = rng.random() < 0.5
        elif t is bytes:
            values[f.name] = rng.randbytes(rng.randint(0, 64))
        elif origin is list:
            values[f.name] = []
        elif origin is dict:
            values[f.name] = {}
        else:
            values[f.name] = None
    return cls(**values)


def random_frames(rng: random.Random, nodes: list[str]) -> list[bytes]:
    kind = rng.randrange(6)
    if kind == 0:  # raw garbage, any number of frames
        return [rng.randbytes(rng.randint(0, 64)) for _ in range(rng.randint(1, 5))]
    msg = _sample(rng, _MESSAGE_TYPES[rng.choice(_SEEDS)])
    address = rng.choice(["", "", *nodes, "nobody", "\xff"])
    frames = [wire.HEADER, address.encode(errors="replace"), encode(msg)]
    if kind == 1:  # a well-formed message of a random type, perhaps addressed to a node
        return frames
    if kind == 2:  # bytes of the body flipped
        body = bytearray(frames[2])
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        return [frames[0], frames[1], bytes(body)]
    if kind == 3:  # truncated or extended body
        body = frames[2]
        return [frames[0], frames[1], body[: rng.randrange(len(body))] if rng.random() < 0.5
                else body + rng.randbytes(rng.randint(1, 32))]
    if kind == 4:  # wrong header or version
        return [rng.choice([b"SLLM/0", b"SLLM/999", b"", rng.randbytes(6)]), frames[1], frames[2]]
    return frames[: rng.randint(0, 2)] + [rng.randbytes(8)] * rng.randint(1, 3)  # wrong frame count


def fuzz_socket(endpoint: str, n: int, *, seed: int, credentials: Credentials | None, kind: int = zmq.DEALER,
                identity: bytes = b"", nodes: list[str] | None = None, label: str = "") -> FuzzCounts:
    """Send ``n`` fuzzed frames to ``endpoint`` from one socket, reading whatever comes back as it goes."""
    rng = random.Random(seed)
    counts = FuzzCounts()
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 10_000)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    if credentials is not None:
        credentials.apply_client(sock)
    sock.connect(endpoint)
    try:
        for i in range(n):
            frames = random_frames(rng, nodes or [])
            if kind == zmq.XSUB and rng.random() < 0.5:
                frames = [bytes([rng.choice([0, 1])]) + rng.randbytes(rng.randint(0, 16))]  # (un)subscribe
            try:
                sock.send_multipart(frames, zmq.NOBLOCK)
                counts.sent += 1
            except zmq.Again:
                counts.would_block += 1
                sock.poll(10)
            if i % 64 == 0:
                while sock.poll(0):
                    sock.recv_multipart()
                    counts.replies += 1
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and sock.poll(100):
            sock.recv_multipart()
            counts.replies += 1
    finally:
        sock.close(linger=0)
    counts.by_target[label] = counts.sent
    return counts


_ZMTP_GREETING = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00"
"""The start of a ZMTP 3.0 greeting: what a peer without keys gets as far as before the mechanism differs."""


def fuzz_raw(endpoint: str, n: int, *, seed: int, label: str = "") -> FuzzCounts:
    """No key at all: ``n`` chunks of random bytes straight onto the TCP port, on fresh connections (a
    keyless ZeroMQ socket never gets past the handshake, so its frames would never leave it)."""
    import socket

    rng = random.Random(seed)
    counts = FuzzCounts()
    host, port = endpoint[len("tcp://"):].rsplit(":", 1)
    conn: socket.socket | None = None
    for i in range(n):
        if conn is None or i % 50 == 0:
            if conn is not None:
                conn.close()
            conn = socket.create_connection((host, int(port)), timeout=2)
            first = rng.random()
            if first < 0.4:  # a greeting, then NULL or CURVE as the mechanism, then garbage
                mech = rng.choice([b"NULL", b"CURVE", b"PLAIN", rng.randbytes(5)])
                try:
                    conn.sendall(_ZMTP_GREETING + mech.ljust(20, b"\x00") + b"\x00" + b"\x00" * 31)
                except OSError:
                    pass
        try:
            conn.sendall(rng.randbytes(rng.randint(1, 256)))
            counts.sent += 1
        except OSError:  # the server hung up on garbage, as it should: the next chunk opens another
            counts.would_block += 1
            conn.close()
            conn = None
    if conn is not None:
        conn.close()
    counts.by_target[label] = counts.sent
    return counts


def fuzz_foreign(endpoint: str, attempts: int, *, kind: int, credentials: Credentials, identity: bytes,
                 label: str = "") -> FuzzCounts:
    """A key the cluster does not know: ``attempts`` fresh connections, each trying to send; ZAP refuses
    every handshake, so nothing leaves (``sent`` counts frames that did, which must stay 0)."""
    counts = FuzzCounts()
    rng = random.Random(attempts)
    for _ in range(attempts):
        sock = zmq.Context.instance().socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        # Queue only to a connection past its handshake, so a frame counted as sent really left (XSUB drops
        # frames with no connection instead of refusing them: there only the server's log tells).
        sock.setsockopt(zmq.IMMEDIATE, 1)
        if identity:
            sock.setsockopt(zmq.IDENTITY, identity)
        credentials.apply_client(sock)
        sock.connect(endpoint)
        try:
            deadline = time.monotonic() + 0.05
            while time.monotonic() < deadline:
                try:
                    sock.send_multipart(random_frames(rng, []), zmq.NOBLOCK)
                    counts.sent += 1
                except zmq.Again:
                    counts.would_block += 1
                    time.sleep(0.005)  # pacing a refused socket's retries, bounded by the deadline
            if sock.poll(50):
                counts.replies += 1
        finally:
            sock.close(linger=0)
    counts.by_target[label] = counts.sent
    return counts


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run_campaign(endpoints: dict[str, str], per_target: int, seed: int, keys: dict[str, Credentials | None],
                 nodes: list[str]) -> list[dict[str, Any]]:
    """Every bound socket, each with no key, a foreign key and the valid key for it (``keys``: label ->
    credentials: 'none', 'foreign', 'client', 'node', 'operator')."""
    plans = [
        ("clients", zmq.DEALER, b"", ("none", "foreign", "client")),
        ("cluster", zmq.DEALER, f"{nodes[-1]}~fuzz".encode(), ("none", "foreign", "node")),
        ("state", zmq.XSUB, b"", ("none", "foreign", "operator")),
    ]
    rows = []
    for socket_name, kind, identity, variants in plans:
        for i, variant in enumerate(variants):
            started = time.monotonic()
            label, sub_seed = f"{socket_name}/{variant}", seed * 100 + len(rows) + i
            if variant == "none":
                counts = fuzz_raw(endpoints[socket_name], per_target, seed=sub_seed, label=label)
            elif variant == "foreign":
                creds = keys[variant]
                assert creds is not None
                counts = fuzz_foreign(endpoints[socket_name], max(5, per_target // 2000), kind=kind,
                                      credentials=creds, identity=identity, label=label)
            else:
                counts = fuzz_socket(endpoints[socket_name], per_target, seed=sub_seed, credentials=keys[variant],
                                     kind=kind, identity=identity, nodes=nodes, label=label)
            rows.append({"socket": socket_name, "key": variant, "sent": counts.sent,
                         "would_block": counts.would_block, "replies": counts.replies,
                         "seconds": round(time.monotonic() - started, 2)})
    return rows
