"""A small client of etcd's v3 JSON gateway, and the leader election of the controllers on it.

Why our own client, over HTTP: etcd 3.4 (Debian's ``etcd-server``) serves its v3 API as JSON on its client port
(``/v3/kv/range``, ``/v3/kv/txn``, ``/v3/lease/grant``, ...), and the controllers need six calls of it. The PyPI
clients were weighed: ``etcd3`` (gRPC) has had no release since 2020 and breaks with protobuf >= 4; ``etcd3gw``
(OpenStack, the same JSON gateway) is maintained but pulls in ``futurist`` and ``pbr`` and runs its watches and
lease keep-alives on threads of its own; ``aetcd`` is asyncio-only. Six calls over the standard library's
``http.client`` need no dependency, install on every Python we run, and put the keep-alive where the controller
can act the instant it fails.

Authentication, as the rest of the cluster's links: etcd's users. The cluster's user (``root``, the role etcd needs
to turn auth on) has a password derived from the controller's CURVE secret key (``derive_password``), which every
controller of the cluster holds and nobody else does; :func:`enable_auth` sets it up once on a fresh etcd (``sllm
keys etcd``). Over ``https://`` endpoints the gateway's TLS carries it (``ca_file`` verifies etcd's certificate);
over ``http://`` it travels in the clear, which is for loopback only.

The election (:class:`Election`): a controller campaigns by creating the leader key under a lease of its own (a
transaction that succeeds only when the key does not exist), keeps the lease alive every quarter of its TTL, and
stops serving the moment a keep-alive fails or finds the lease gone (``on_lost``). The leader's epoch is the etcd
revision that created its key: larger than every earlier leader's, so nodes and clients fence an old leader's
messages by it as they fence a restarted controller's.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["Election", "EtcdClient", "EtcdError", "LeaderInfo", "derive_password", "enable_auth"]

log = logging.getLogger(__name__)

USER = "root"
"""The cluster's etcd user: ``root``, since only root may turn authentication on (a fresh etcd's first step)."""
CALL_TIMEOUT_S = 2.0


class EtcdError(RuntimeError):
    """etcd could not be reached or refused a call; the message says which endpoint and why."""


def _b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode()


def _prefix_end(prefix: str) -> str:
    """etcd's range end for every key starting with ``prefix`` (its last byte plus one)."""
    raw = prefix.encode()
    return _b64(raw[:-1] + bytes([raw[-1] + 1]))


def derive_password(server_secret: bytes) -> str:
    """The cluster's etcd password: a digest of the controller's CURVE secret key, so the controllers (who share
    that key) know it and nothing is stored beside it."""
    return hashlib.sha256(b"sllm-etcd-v1:" + server_secret).hexdigest()


class EtcdClient:
    """Calls to one of ``endpoints`` (``http(s)://HOST:PORT``), the next one when a call cannot reach it. Thread-safe:
    each call opens its own connection (calls are rare: a campaign, a keep-alive every half second, a store write)."""

    def __init__(self, endpoints: list[str], *, user: str = "", password: str = "", ca_file: str = "",
                 timeout: float = CALL_TIMEOUT_S) -> None:
        if not endpoints:
            raise EtcdError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self.user, self.password = user, password
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file or None)
        self._token = ""
        self._lock = threading.Lock()
        self._current = 0

    # ------------------------------------------------------------------ transport

    def _post_once(self, endpoint: str, path: str, body: dict[str, Any], token: str) -> tuple[int, dict[str, Any]]:
        url = urlsplit(endpoint)
        conn: http.client.HTTPConnection
        if url.scheme == "https":
            conn = http.client.HTTPSConnection(url.netloc, timeout=self.timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(url.netloc, timeout=self.timeout)
        try:
            headers = {"Content-Type": "application/json", **({"Authorization": token} if token else {})}
            conn.request("POST", path, json.dumps(body), headers)
            reply = conn.getresponse()
            raw = reply.read()
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"error": raw.decode(errors="replace")}
        return reply.status, data if isinstance(data, dict) else {}

    def call(self, path: str, body: dict[str, Any], *, auth: bool = True) -> dict[str, Any]:
        """POST ``body`` to ``path`` (``/v3/kv/range`` ...); the reply's JSON. EtcdError when no endpoint answers or
        etcd refuses (its message)."""
        problems: list[str] = []
        for attempt in range(len(self.endpoints) + 1):
            with self._lock:
                endpoint = self.endpoints[self._current % len(self.endpoints)]
            token = self._authenticate(endpoint) if auth and self.user else ""
            try:
                status, data = self._post_once(endpoint, path, body, token)
            except (OSError, http.client.HTTPException) as exc:
                problems.append(f"{endpoint}: {exc}")
                with self._lock:
                    self._current += 1
                continue
            if status == 200:
                return data
            message = str(data.get("error") or data.get("message") or data)
            if "invalid auth token" in message and attempt == 0:
                with self._lock:
                    self._token = ""  # expired (etcd's simple tokens): once more with a fresh one
                continue
            raise EtcdError(f"etcd at {endpoint} refused {path}: {message}")
        raise EtcdError(f"no etcd endpoint answered {path}: {'; '.join(problems)}")

    def _authenticate(self, endpoint: str) -> str:
        with self._lock:
            if self._token:
                return self._token
        try:
            status, data = self._post_once(endpoint, "/v3/auth/authenticate",
                                           {"name": self.user, "password": self.password}, "")
        except (OSError, http.client.HTTPException):
            return ""  # the call that follows fails on the same endpoint and moves on
        if status != 200:
            raise EtcdError(f"etcd at {endpoint} refused user {self.user!r}: "
                            f"{data.get('error') or data.get('message') or data} (run `sllm keys etcd TOPOLOGY` "
                            "once on a fresh etcd)")
        with self._lock:
            self._token = str(data.get("token", ""))
            return self._token

    # ------------------------------------------------------------------ kv and leases

    def get(self, key: str) -> tuple[str, int] | None:
        """(value, create revision) of ``key``, or None."""
        kvs = self.call("/v3/kv/range", {"key": _b64(key)}).get("kvs") or []
        if not kvs:
            return None
        return _unb64(kvs[0].get("value", "")), int(kvs[0].get("create_revision", 0))

    def get_prefix(self, prefix: str) -> list[tuple[str, str]]:
        """(key, value) of every key under ``prefix``, in key order."""
        kvs = self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)}).get("kvs") or []
        return [(_unb64(kv["key"]), _unb64(kv.get("value", ""))) for kv in kvs]

    def put(self, key: str, value: str, *, lease: int = 0) -> int:
        """The revision the put made."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("/v3/kv/put", body).get("header", {}).get("revision", 0))

    def put_if_created_at(self, key: str, value: str, guard: str, revision: int) -> bool:
        """Put ``key`` only while ``guard`` exists as created at ``revision`` (the leader key of this leader):
        a controller that lost the lead cannot write."""
        reply = self.call("/v3/kv/txn", {
            "compare": [{"key": _b64(guard), "target": "CREATE", "result": "EQUAL", "create_revision": str(revision)}],
            "success": [{"requestPut": {"key": _b64(key), "value": _b64(value)}}],
        })
        return bool(reply.get("succeeded"))

    def create(self, key: str, value: str, lease: int) -> int:
        """Create ``key`` under ``lease`` if it does not exist: the revision that created it, or 0 if it existed."""
        reply = self.call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
            "success": [{"requestPut": {"key": _b64(key), "value": _b64(value), "lease": str(lease)}}],
        })
        return int(reply.get("header", {}).get("revision", 0)) if reply.get("succeeded") else 0

    def grant(self, ttl_s: int) -> int:
        reply = self.call("/v3/lease/grant", {"TTL": str(ttl_s)})
        if reply.get("error"):
            raise EtcdError(f"etcd refused a lease: {reply['error']}")
        return int(reply["ID"])

    def keep_alive(self, lease: int) -> int:
        """Renew ``lease``: its TTL left, 0 when it is gone (expired or revoked)."""
        reply = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int((reply.get("result") or {}).get("TTL", 0) or 0)

    def revoke(self, lease: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)})


def enable_auth(endpoints: list[str], password: str, ca_file: str = "") -> bool:
    """Give a fresh etcd the cluster's user (``root``, ``password``) and turn authentication on. False when it is
    on already (then the password must be the cluster's: the controllers' first call says if it is not)."""
    bare = EtcdClient(endpoints, ca_file=ca_file)
    try:
        bare.call("/v3/auth/user/add", {"name": USER, "password": password}, auth=False)
        bare.call("/v3/auth/user/grant", {"user": USER, "role": "root"}, auth=False)
        bare.call("/v3/auth/enable", {}, auth=False)
    except EtcdError as exc:
        # With auth on, a call without a token is refused as "user name is empty" (etcd 3.4's words).
        if any(w in str(exc) for w in ("user name already exists", "user name is empty", "permission denied")):
            return False
        raise
    return True


@dataclass(frozen=True)
class LeaderInfo:
    """What the leader key holds: who leads, where, since which revision (its epoch)."""

    name: str
    client_endpoint: str
    epoch: int

    def encode(self) -> str:
        return json.dumps({"name": self.name, "client_endpoint": self.client_endpoint})

    @staticmethod
    def decode(value: str, epoch: int) -> LeaderInfo:
        try:
            data = json.loads(value)
        except ValueError:
            data = {}
        return LeaderInfo(str(data.get("name", "?")), str(data.get("client_endpoint", "")), epoch)


class Election:
    """One controller's campaign for the leader key ``key`` (under a lease of ``ttl_s``)."""

    def __init__(self, client: EtcdClient, key: str, me: LeaderInfo, ttl_s: int, poll_s: float = 0.2) -> None:
        self.client = client
        self.key = key
        self.me = me
        self.ttl_s = ttl_s
        self.poll_s = poll_s
        self.lease = 0
        self.epoch = 0
        self.leader: LeaderInfo | None = None
        """Who leads, as last read (a standby answers clients with it)."""
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None

    def refresh(self) -> LeaderInfo | None:
        """Read who leads now (None: nobody); kept in ``leader``. EtcdError when etcd cannot say."""
        current = self.client.get(self.key)
        self.leader = LeaderInfo.decode(current[0], current[1]) if current is not None else None
        return self.leader

    def campaign(self, stop: threading.Event) -> int:
        """Block until this controller leads (its epoch) or ``stop`` is set (0). etcd unreachable: keep trying."""
        said, said_at = "", 0.0
        while not stop.is_set():
            try:
                if self.refresh() is None:
                    lease = self.client.grant(self.ttl_s)
                    revision = self.client.create(self.key, self.me.encode(), lease)
                    if revision:
                        self.lease, self.epoch = lease, revision
                        self.leader = LeaderInfo(self.me.name, self.me.client_endpoint, revision)
                        return revision
                    self.client.revoke(lease)  # another standby was faster
            except EtcdError as exc:
                now = time.monotonic()
                if str(exc) != said or now - said_at > 10.0:  # not five times a second while etcd is away
                    said, said_at = str(exc), now
                    log.warning("election: %s", exc)
            stop.wait(self.poll_s)
        return 0

    def keep_alive(self, on_lost: Callable[[str], None]) -> None:
        """Renew the lease every quarter TTL on a thread; ``on_lost(why)`` once when the lease is gone or no renewal
        succeeded for most of a TTL (etcd may have let it expire: another controller may lead by now)."""
        def run() -> None:
            last_ok = time.monotonic()
            while not self._stop.wait(self.ttl_s / 4):
                try:
                    if self.client.keep_alive(self.lease) > 0:
                        last_ok = time.monotonic()
                        continue
                    why = "the leader lease expired"
                except EtcdError as exc:
                    if time.monotonic() - last_ok < self.ttl_s * 0.75:
                        continue
                    why = f"no lease renewal for {time.monotonic() - last_ok:.1f}s ({exc})"
                if not self._stop.is_set():
                    on_lost(why)
                return

        self._keeper = threading.Thread(target=run, name="etcd-keepalive", daemon=True)
        self._keeper.start()

    def resign(self) -> None:
        """Stop renewing and give the lead up at once (a clean stop: a standby takes over without waiting a TTL)."""
        self._stop.set()
        if self.lease:
            try:
                self.client.revoke(self.lease)
            except EtcdError as exc:
                log.warning("election: could not revoke the lease (it expires within %ds): %s", self.ttl_s, exc)
            self.lease = 0
