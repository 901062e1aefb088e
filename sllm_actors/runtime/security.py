"""Keys, identities and roles: who may connect to a cluster and what each peer may send.

Every socket speaks CURVE. The controller has a server key pair; every peer presents a key of its own,
and the controller's ZAP handler (:meth:`KeyRing.authenticate`) admits only the public keys it holds
under ``$SLLM_HOME/keys`` (``$SLLM_KEYS`` overrides the directory). The place of a key in that
directory is its role, its file name its name:

    keys/controller.key[_secret]        the controller's own pair
    keys/operator.key[_secret]          role ``operator``
    keys/nodes/NAME.key[_secret]        role ``node``, for the topology's node NAME
    keys/clients/NAME.key[_secret]      role ``client``

A ``.key_secret`` file is all a peer needs: it carries the peer's pair and, as metadata, the
controller's public key, so ``sllm node --join ... --key node-3.key_secret`` is one file to copy.
ZAP hands the peer's identity (``role:name``) to every frame as its ``User-Id``; the controller reads
it there, never from the message, and checks it again per frame against the live key ring, so a
revoked key stops working without a restart.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from zmq.utils import z85

__all__ = [
    "Credentials",
    "KeyProblem",
    "KeyRing",
    "Peer",
    "add_api_key",
    "add_key",
    "api_key_role",
    "find_credentials",
    "init_keys",
    "keys_dir",
    "load_credentials",
    "no_key_message",
    "parse_user_id",
    "prepare_keys",
    "redact_for_client",
    "revoke_key",
]

log = logging.getLogger(__name__)

CLIENT, OPERATOR, NODE = "client", "operator", "node"
ROLES = (CLIENT, OPERATOR, NODE)
KEYS_ENV = "SLLM_KEYS"
KEY_ENV = "SLLM_KEY"
_NAME_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class KeyProblem(ValueError):
    """A key is missing, unreadable or malformed; the message says which file and what to do."""



def keys_dir() -> Path:
    env = os.environ.get(KEYS_ENV)
    if env:
        return Path(env).expanduser()
    from sllm_actors.models import sllm_home

    return sllm_home() / "keys"


@dataclass(frozen=True)
class Credentials:
    """What one peer presents: its own pair and the controller's public key (all Z85)."""

    public: bytes
    secret: bytes
    server_public: bytes
    role: str
    name: str
    path: Path

    @property
    def user_id(self) -> str:
        return f"{self.role}:{self.name}"

    def apply_client(self, sock: zmq.Socket) -> None:
        """Make ``sock`` (before connect) a CURVE client of the controller with this identity."""
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.curve_serverkey = self.server_public


@dataclass(frozen=True)
class Peer:
    role: str
    name: str

    @property
    def user_id(self) -> str:
        return f"{self.role}:{self.name}"


def parse_user_id(user_id: str | None) -> Peer | None:
    if not user_id or ":" not in user_id:
        return None
    role, name = user_id.split(":", 1)
    return Peer(role, name) if role in ROLES else None


# ----------------------------------------------------------------------------- key files


def _check_name(name: str, what: str) -> None:
    if not name or not set(name) <= _NAME_OK or name.startswith("."):
        raise KeyProblem(f"{what} name {name!r} must be letters, digits, '-', '_' or '.'")


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o600)  # the umask may have widened nothing, but an existing tmp kept its own mode
    os.replace(tmp, path)  # readers (the controller's ring) never see half a key


def _cert_text(public: bytes, secret: bytes | None, meta: dict[str, str]) -> str:
    lines = ["#   ZeroMQ CURVE certificate written by `sllm keys`; keep the _secret file private", "metadata"]
    lines += [f'    {k} = "{v}"' for k, v in meta.items()]
    lines += ["curve", f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_pair(base: Path, role: str, name: str, server_public: bytes | None) -> Path:
    public, secret = zmq.curve_keypair()
    meta = {"role": role, "name": name}
    if server_public is not None:
        meta["controller-key"] = server_public.decode()
    _write_private(base.with_suffix(".key"), _cert_text(public, None, meta))
    _write_private(base.with_suffix(".key_secret"), _cert_text(public, secret, meta))
    return base.with_suffix(".key_secret")


def _read_cert(path: Path) -> tuple[dict[str, str], bytes, bytes | None]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyProblem(f"cannot read key file {path}: {exc.strerror}") from None
    values: dict[str, str] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            values[k.strip()] = v.strip().strip('"')
    public = values.get("public-key", "")
    if len(public) != 40:
        raise KeyProblem(f"{path} is not a CURVE key file (no 40-character public-key)")
    secret = values.get("secret-key")
    if secret is not None and len(secret) != 40:
        raise KeyProblem(f"{path}: secret-key must be 40 Z85 characters")
    return values, public.encode(), secret.encode() if secret else None


def _role_path(root: Path, role: str, name: str) -> Path:
    if role == OPERATOR:
        return root / "operator"
    return root / ("nodes" if role == NODE else "clients") / name


def server_public(root: Path) -> bytes:
    return _read_cert(root / "controller.key")[1]


def init_keys(root: Path, nodes: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Create whatever of the cluster's keys is missing (never overwrites one); the files written."""
    written: list[Path] = []
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(root, 0o700)
    if not (root / "controller.key_secret").exists():
        written.append(_write_pair(root / "controller", "controller", "controller", None))
    spub = server_public(root)
    if not (root / "operator.key_secret").exists():
        written.append(_write_pair(root / "operator", OPERATOR, "operator", spub))
    for name in nodes:
        _check_name(name, "node")
        if not (root / "nodes" / f"{name}.key_secret").exists():
            written.append(_write_pair(root / "nodes" / name, NODE, name, spub))
    return written


def add_key(root: Path, role: str, name: str) -> Path:
    if role not in (CLIENT, NODE):
        raise KeyProblem(f"only client and node keys are added by name, not {role!r}")
    _check_name(name, role)
    if not (root / "controller.key").exists():
        raise KeyProblem(f"no cluster keys under {root}: run `sllm keys init` first")
    base = _role_path(root, role, name)
    if base.with_suffix(".key_secret").exists():
        raise KeyProblem(f"{role} {name!r} already has a key: {base.with_suffix('.key_secret')} "
                         f"(`sllm keys revoke {name}` first to replace it)")
    return _write_pair(base, role, name, server_public(root))


def revoke_key(root: Path, name: str) -> list[Path]:
    """Delete NAME's client or node key; the controller refuses it from its next frame on."""
    _check_name(name, "key")
    removed = []
    for role in (CLIENT, NODE):
        for suffix in (".key", ".key_secret"):
            path = _role_path(root, role, name).with_suffix(suffix)
            if path.exists():
                path.unlink()
                removed.append(path)
    if not removed:
        raise KeyProblem(f"no client or node key named {name!r} under {root}")
    return removed


def load_credentials(path: Path) -> Credentials:
    values, public, secret = _read_cert(path)
    if secret is None:
        raise KeyProblem(f"{path} holds no secret key: pass the .key_secret file")
    role, name = values.get("role", ""), values.get("name", "")
    spub = values.get("controller-key", "")
    if role == "controller":
        spub = public.decode()
    if len(spub) != 40:
        raise KeyProblem(f"{path} does not name the controller's public key (controller-key)")
    return Credentials(public, secret, spub.encode(), role, name, path)


def find_credentials(explicit: str | os.PathLike[str] | None = None, role: str = "") -> Credentials | None:
    """``--key``, else ``$SLLM_KEY``, else ``keys/operator.key_secret``, else ``keys/client.key_secret``
    (a client's own key, where `sllm keys add-client` users put it); a node's default is its own key.
    None when there is none (the caller says what to do)."""
    if explicit:
        return load_credentials(Path(explicit).expanduser())
    env = os.environ.get(KEY_ENV)
    if env and not role:  # $SLLM_KEY is a user's key; a node never takes it by accident
        return load_credentials(Path(env).expanduser())
    root = keys_dir()
    candidates = [root / "nodes" / f"{role}.key_secret"] if role else []
    if not role:
        candidates = [root / "operator.key_secret", root / "client.key_secret"]
    for path in candidates:
        if path.is_file():
            return load_credentials(path)
    return None


def no_key_message(what: str) -> str:
    return (f"no key for {what}: pass --key FILE (a .key_secret from `sllm keys`), set {KEY_ENV}, or put it "
            f"under {keys_dir()} (`sllm keys init` makes the cluster's keys)")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "127.0.0.1", "::1"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ----------------------------------------------------------------------------- the controller's ring


class KeyRing:
    """The controller's view of ``keys/``: public key -> peer, re-read when a file in it changes.

    Used from the controller's IO thread (ZAP and per-frame checks) and the CLI; a lock keeps a
    reload and a lookup apart."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._by_key: dict[bytes, Peer] = {}
        self._ids: set[str] = set()
        self._signature: tuple[tuple[str, float], ...] = ()
        self.server_public, self.server_secret = self._server_pair()
        self.refresh(force=True)

    def _server_pair(self) -> tuple[bytes, bytes]:
        path = self.root / "controller.key_secret"
        if not path.is_file():
            raise KeyProblem(f"no controller key at {path}: run `sllm keys init` (or `sllm up` on a loopback "
                             "topology, which makes them)")
        _, public, secret = _read_cert(path)
        assert secret is not None
        return public, secret

    def _files(self) -> list[Path]:
        files = [self.root / "operator.key"]
        for sub in ("nodes", "clients"):
            d = self.root / sub
            if d.is_dir():
                files += sorted(d.glob("*.key"))
        return [f for f in files if f.is_file()]

    def refresh(self, force: bool = False) -> bool:
        """Re-read the ring if a key file was added, changed or removed; True when it was."""
        files = self._files()
        try:
            signature = tuple((str(f), f.stat().st_mtime) for f in files)
        except OSError:
            signature = ()  # a file vanished between the listing and the stat: read again next time
        if not force and signature == self._signature:
            return False
        by_key: dict[bytes, Peer] = {}
        for f in files:
            try:
                _, public, _ = _read_cert(f)
            except KeyProblem as exc:
                log.warning("keys: skipping %s", exc)
                continue
            if f.parent.name == "nodes":
                by_key[public] = Peer(NODE, f.stem)
            elif f.parent.name == "clients":
                by_key[public] = Peer(CLIENT, f.stem)
            else:
                by_key[public] = Peer(OPERATOR, "operator")
        with self._lock:
            self._by_key = by_key
            self._ids = {p.user_id for p in by_key.values()}
            self._signature = signature
        return True

    def peer(self, public_z85: bytes) -> Peer | None:
        with self._lock:
            return self._by_key.get(public_z85)

    def current(self, user_id: str) -> bool:
        with self._lock:
            return user_id in self._ids

    def authenticate(self, domain: str, identity: bytes, client_key: bytes) -> tuple[str, str]:
        """ZAP: ('role:name', '') to admit, ('', why) to refuse. ``domain`` is the socket's name."""
        self.refresh()
        peer = self.peer(z85.encode(client_key))
        if peer is None:
            return "", "unknown key"
        if domain == "state" and peer.role != OPERATOR:
            return "", f"the state feed is for operators, not role {peer.role}"
        if domain == "cluster" and peer.role != NODE:
            return "", f"the cluster socket is for nodes, not role {peer.role}"
        if domain == "clients" and peer.role == NODE:
            return "", "node keys may not connect as clients"
        return peer.user_id, ""


def redact_for_client(status: dict[str, Any], own: set[str]) -> dict[str, Any]:
    """A status as a ``client`` key may see it: the cluster's shape, and of requests only its own."""

    def mine(item: Any) -> bool:
        return not isinstance(item, dict) or item.get("request_id", "") in own

    out = dict(status)
    out["requests"] = [r for r in status.get("requests", []) if mine(r)]
    out["instances"] = [{**i, "requests": [r for r in i.get("requests", []) if r in own]}
                        for i in status.get("instances", [])]
    out["queue"] = [q for q in status.get("queue", []) if mine(q)]
    out["migrations"] = [m for m in status.get("migrations", []) if mine(m)]
    out["events"] = []  # their texts name other users' requests
    return out


def prepare_keys(topology: Any, say: Any = print) -> KeyRing:
    """The key ring ``sllm up`` serves with. On a loopback-only controller missing keys are made (no setup
    step for ``make up`` or the tests); on any other address a cluster without keys refuses to start."""
    root = keys_dir()
    host = topology.controller.host
    if not (root / "controller.key_secret").is_file():
        if not is_loopback(host):
            raise KeyProblem(
                f"the controller binds {host}, which is not a loopback address, and there are no keys under "
                f"{root}: run `sllm keys init {topology.path}` first, then copy keys/nodes/NAME.key_secret to "
                "each node's host (`sllm node --join ... --key FILE`)")
    local = [n.name for n in topology.nodes if getattr(n, "host", "local") == "local"]
    written = init_keys(root, local)
    if written:
        say(f"keys: made {len(written)} key file(s) under {root}")
    return KeyRing(root)


def add_api_key(root: Path, role: str, name: str) -> str:
    """A new HTTP API key for ``name`` with ``role`` (client or operator): its hash goes into ``keys/api_keys``,
    the key itself is returned once and stored nowhere."""
    import hashlib
    import secrets

    if role not in (CLIENT, OPERATOR):
        raise KeyProblem(f"an API key's role is client or operator, not {role!r}")
    _check_name(name, "API key name")
    token = "sllm-" + secrets.token_urlsafe(32)
    path = root / "api_keys"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    existing = path.read_text() if path.is_file() else ""
    _write_private(path, existing + f"{hashlib.sha256(token.encode()).hexdigest()} {role} {name}\n")
    return token


def api_key_role(token: str, root: Path | None = None) -> Peer | None:
    """The hook for the HTTP front end: an API key (bearer token) to the peer and role it stands for.

    ``keys/api_keys`` holds one ``sha256-hex role name`` line per key (only hashes on disk); it is read
    on every call, so removing a line revokes the key at once."""
    import hashlib
    import hmac

    path = (root or keys_dir()) / "api_keys"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    digest = hashlib.sha256(token.encode()).hexdigest()
    for line in lines:
        parts = line.split()
        if len(parts) == 3 and parts[1] in ROLES and hmac.compare_digest(parts[0], digest):
            return Peer(parts[1], parts[2])
    return None
