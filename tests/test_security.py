"""Authentication and authorization: the attacks of issue 14 against a real cluster, and every role's
permissions message by message."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any

import pytest
import zmq
from zmq.utils import z85

from sllm_actors.runtime import wire
from sllm_actors.client import Client, ClusterUnavailable, RequestError, TokenEvent
from sllm_actors.messages import (
    ErrorReply,
    KillNode,
    Message,
    StatusRequest,
    TokenChunk,
    message_types,
)
from sllm_actors.runtime.security import (
    CLIENT,
    OPERATOR,
    KeyRing,
    Peer,
    add_key,
    init_keys,
    keys_dir,
    load_credentials,
    redact_for_client,
)

from .conftest import REPO, RunningCluster, with_key

PROMPT = "The capital of France is"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "cli.py"), *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _wait_log(cluster: RunningCluster, fragment: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(cluster.lines):
            if fragment in line:
                return line
        time.sleep(0.05)  # polling the log a subprocess writes, with a deadline
    raise AssertionError(f"no log line with {fragment!r} within {timeout}s:\n" + "".join(cluster.lines[-30:]))


def _raw(endpoint: str, key: str | None = None, identity: bytes = b"") -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    if key is not None:
        with_key(sock, key)
    sock.connect(endpoint)
    return sock


def _sample(cls: type[Message]) -> Message:
    """An instance of any wire message with placeholder values of the right types."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        origin = typing.get_origin(t)
        if t is str:
            values[f.name] = "x"
        elif t in (int, float):
            values[f.name] = t(1)
        elif t is bool:
            values[f.name] = False
        elif t is bytes:
            values[f.name] = b""
        elif origin is list:
            values[f.name] = []
        elif origin is dict:
            values[f.name] = {}
        else:  # Optional[...]
            values[f.name] = None
    return cls(**values)


# ----------------------------------------------------------------------------- keys on disk


def test_keys_init_add_revoke_and_modes(tmp_path: Path) -> None:
    env = {"SLLM_KEYS": str(tmp_path / "keys")}
    topo = tmp_path / "t.yaml"
    topo.write_text("nodes: [{name: n1, gpus: [{device: cpu, memory: 1GiB}]}, "
                    "{name: n2, gpus: [{device: cpu, memory: 1GiB}]}]\nmodels: []\n")
    run = _cli("keys", "init", str(topo), env=env)
    assert run.returncode == 0, run.stderr
    root = tmp_path / "keys"
    for rel in ("controller.key_secret", "operator.key_secret", "nodes/n1.key_secret", "nodes/n2.key_secret"):
        assert stat.S_IMODE((root / rel).stat().st_mode) == 0o600, rel
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    again = _cli("keys", "init", str(topo), env=env)
    assert "every key is there already" in again.stdout, again.stdout
    run = _cli("keys", "add-client", "alice", env=env)
    assert run.returncode == 0, run.stderr
    alice = load_credentials(Path(run.stdout.strip()))
    assert (alice.role, alice.name) == (CLIENT, "alice")
    ring = KeyRing(root)
    assert ring.peer(alice.public) is not None and ring.server_public == alice.server_public
    assert _cli("keys", "add-client", "alice", env=env).returncode != 0  # no silent replacement
    bad = _cli("keys", "add-client", "../evil", env=env)
    assert bad.returncode != 0 and "must be letters" in " ".join(bad.stderr.split())
    assert _cli("keys", "revoke", "alice", env=env).returncode == 0
    ring.refresh()
    assert ring.peer(alice.public) is None
    missing = _cli("keys", "revoke", "alice", env=env)
    assert missing.returncode != 0 and "no client or node key named 'alice'" in " ".join(missing.stderr.split())


def test_a_routable_controller_without_keys_refuses_to_start(tmp_path: Path) -> None:
    topo = tmp_path / "topology.yaml"
    topo.write_text("controller: {host: 0.0.0.0}\nnodes: [{name: n1, gpus: [{device: cpu, memory: 1GiB}]}]\n"
                    "models: []\n")
    run = _cli("up", str(topo), "--headless", env={"SLLM_KEYS": str(tmp_path / "none")})
    assert run.returncode == 2
    said = " ".join(run.stderr.split())  # rich wraps long lines
    assert "not a loopback address" in said and "sllm keys init" in said, said
    assert not (tmp_path / "none" / "controller.key_secret").exists()


def test_redaction_keeps_only_the_clients_own_requests() -> None:
    status = {"requests": [{"request_id": "a"}, {"request_id": "b"}],
              "instances": [{"instance_id": "i", "requests": ["a", "b"]}],
              "queue": [{"request_id": "b"}], "migrations": [{"request_ids": ["b"]}],
              "events": [{"text": "b started"}], "nodes": [{"name": "n"}]}
    out = redact_for_client(status, {"a"})
    assert out["requests"] == [{"request_id": "a"}] and out["instances"][0]["requests"] == ["a"]
    assert out["queue"] == [] and out["migrations"] == [] and out["events"] == []
    assert out["nodes"] == status["nodes"]


# ----------------------------------------------------------------------------- the four attacks


def test_anonymous_peers_get_nothing_and_the_log_says_why(cluster: RunningCluster) -> None:
    """Attacks 1 and 2 of the issue: KillNode and StatusRequest with no credentials at all."""
    pids = cluster.node_pids()
    sock = _raw(cluster.endpoint)
    try:
        for msg in (KillNode("k1", "node-1"), StatusRequest("s1")):
            try:
                sock.send_multipart(wire.pack(msg), zmq.NOBLOCK)
            except zmq.Again:
                pass  # no handshake, no pipe: the frames never leave (the point)
        assert not sock.poll(2000), "an anonymous peer got an answer"
    finally:
        sock.close()
    _wait_log(cluster, "failed the CURVE handshake (no key")
    # A well-formed key the cluster does not know: refused by ZAP, by name.
    stranger = zmq.Context.instance().socket(zmq.DEALER)
    stranger.setsockopt(zmq.LINGER, 0)
    public, secret = zmq.curve_keypair()
    stranger.curve_publickey, stranger.curve_secretkey = public, secret
    stranger.curve_serverkey = KeyRing(keys_dir()).server_public
    stranger.connect(cluster.endpoint)
    try:
        try:
            stranger.send_multipart(wire.pack(KillNode("k2", "node-1")), zmq.NOBLOCK)
        except zmq.Again:
            pass
        assert not stranger.poll(2000)
    finally:
        stranger.close()
    _wait_log(cluster, "unknown key")
    assert cluster.node_pids() == pids, "a node was killed"


def test_forged_token_chunks_never_reach_the_user(cluster_factory: Any, slow_model: Path) -> None:
    """Attack 3: a peer claiming to be the node hosting a request streams text into it. Without a node key
    it cannot connect; with another node's key, its frames under the hosting node's name are refused, and
    under its own name the router refuses chunks for a request that node does not host."""
    cluster = cluster_factory({"slow": slow_model}, nodes=2)
    with cluster.client() as client:
        client.complete("slow", PROMPT, max_tokens=2)  # warm: the instance exists before the stream
        host = client.status()["instances"][0]["node"]
    other = "node-2" if host == "node-1" else "node-1"
    attackers = [
        _raw(cluster.cluster_endpoint(), None, host.encode()),  # no key, the host's name
        _raw(cluster.cluster_endpoint(), other, f"{host}~forger".encode()),  # another's key, the host's name
        _raw(cluster.cluster_endpoint(), other, f"{other}~forger".encode()),  # its own name, not the host
    ]
    text = ""
    try:
        with cluster.client() as client:
            for event in client.generate("slow", PROMPT, max_tokens=60, request_id="victim"):
                if isinstance(event, TokenEvent):
                    text += event.text
                    nxt = event.index + len(event.token_ids)
                    for sock in attackers:
                        try:  # the keyless one never completes its handshake: its DEALER would block
                            sock.send_multipart(wire.pack(TokenChunk("victim", nxt, [1], "PWNED")), zmq.NOBLOCK)
                        except zmq.Again:
                            pass
    finally:
        for sock in attackers:
            sock.close()
    assert "PWNED" not in text
    _wait_log(cluster, f"refused tokens claiming node {host} from key 'node:{other}'")
    _wait_log(cluster, f"refused tokens for victim from {other}, which does not host it")
    _wait_log(cluster, "failed the CURVE handshake")


def test_deploy_sources_outside_the_model_roots_are_refused(cluster_factory: Any, tiny_model: Path,
                                                             tiny_model_b: Path, tmp_path: Path) -> None:
    """Attack 4: DeployModel naming any directory on the controller's disk."""
    cluster = cluster_factory({"tiny": tiny_model}, extra={"models_roots": [str(tmp_path / "models")]})
    with cluster.client() as client:
        with pytest.raises(RequestError) as err:
            client.deploy("stolen", str(tiny_model_b))
        assert err.value.code == "forbidden"
        assert "outside the allowed model roots" in err.value.message
        assert str(tmp_path / "models") in err.value.message
        with pytest.raises(RequestError, match="outside the allowed model roots"):
            client.deploy("etc", "/etc")
        assert "stolen" not in {m["name"] for m in client.status()["models"]}
    _wait_log(cluster, "refused deploy of 'stolen'")


# ----------------------------------------------------------------------------- roles


def _answer(sock: zmq.Socket, msg: Message) -> ErrorReply | Message | None:
    sock.send_multipart(wire.pack(msg))
    if not sock.poll(5000):
        return None
    return wire.unpack(sock.recv_multipart())[1]


def test_roles_message_by_message(cluster: RunningCluster) -> None:
    add_key(keys_dir(), CLIENT, "roles-client")
    client_key = str(keys_dir() / "clients" / "roles-client.key_secret")
    client_may = {"hello", "heartbeat", "generate", "cancel", "status"}
    operator_may = client_may | {"deploy", "migrate_command", "kill_node", "node_command"}
    pids = cluster.node_pids()
    for role, key, may in ((CLIENT, client_key, client_may), (OPERATOR, None, operator_may)):
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        creds = load_credentials(Path(key)) if key else None
        (creds.apply_client(sock) if creds else with_key(sock))
        sock.connect(cluster.endpoint)
        try:
            for tag, cls in sorted(message_types().items()):
                if tag in ("heartbeat", "generate"):
                    continue  # no answer by design / exercised below with a real request
                msg = _sample(cls)
                if isinstance(msg, KillNode):
                    msg = KillNode("k", "no-such-node")  # an operator's must not kill a real node here
                reply = _answer(sock, msg)
                refused = isinstance(reply, ErrorReply) and reply.code == "forbidden" and "may not send" in reply.message
                if tag in may:
                    assert not refused, (role, tag, reply)
                else:
                    assert refused, (role, tag, reply)
                    assert f"role {role} may not send {tag} messages" == reply.message  # type: ignore[union-attr]
        finally:
            sock.close()
    with Client(cluster.endpoint, key=client_key) as client:
        assert len(client.complete("tiny", PROMPT, max_tokens=3).token_ids) == 3
        with pytest.raises(RequestError, match="role client may not send kill_node"):
            client.kill_node("node-1")
        st = client.status()
        assert st["events"] == [] and "nodes" in st
    assert cluster.node_pids() == pids
    # A node's key on the client socket, and a client's on the cluster socket: refused at the handshake.
    node_on_clients = _raw(cluster.endpoint, "node-1")
    client_on_cluster = zmq.Context.instance().socket(zmq.DEALER)
    client_on_cluster.setsockopt(zmq.LINGER, 0)
    load_credentials(Path(client_key)).apply_client(client_on_cluster)
    client_on_cluster.setsockopt(zmq.IDENTITY, b"node-1~x")
    client_on_cluster.connect(cluster.cluster_endpoint())
    try:
        for sock, msg in ((node_on_clients, StatusRequest("s")), (client_on_cluster, TokenChunk("x", 0, [1], "x"))):
            try:
                sock.send_multipart(wire.pack(msg), zmq.NOBLOCK)
            except zmq.Again:
                pass
        assert not node_on_clients.poll(1500) and not client_on_cluster.poll(100)
    finally:
        node_on_clients.close()
        client_on_cluster.close()
    _wait_log(cluster, "node keys may not connect as clients")
    _wait_log(cluster, "the cluster socket is for nodes, not role client")


def test_a_revoked_client_key_stops_working_without_a_restart(cluster: RunningCluster) -> None:
    add_key(keys_dir(), CLIENT, "bob")
    bob_key = keys_dir() / "clients" / "bob.key_secret"
    with Client(cluster.endpoint, key=bob_key) as bob:
        assert len(bob.complete("tiny", PROMPT, max_tokens=2).token_ids) == 2
        run = _cli("keys", "revoke", "bob")
        assert run.returncode == 0, run.stderr
        deadline = time.monotonic() + 10
        while True:  # the ring is re-read every second; the open connection is refused from then on
            try:
                bob.status()
            except RequestError as exc:
                assert exc.code == "unauthorized" and "revoked" in exc.message
                break
            assert time.monotonic() < deadline, "the revoked key still works"
    with pytest.raises(ClusterUnavailable):
        with Client(cluster.endpoint, key=bob_key, connect_timeout=2.0) as bob:
            bob.status()
    _wait_log(cluster, "is no longer in the ring (revoked)")
    with cluster.client() as operator:
        assert len(operator.complete("tiny", PROMPT, max_tokens=2).token_ids) == 2


def test_a_client_key_sees_only_its_own_requests(cluster_factory: Any, slow_model: Path) -> None:
    cluster = cluster_factory({"slow": slow_model}, nodes=1)
    add_key(keys_dir(), CLIENT, "carol")
    with cluster.client() as operator, Client(cluster.endpoint, key=keys_dir() / "clients" / "carol.key_secret") as carol:
        stream = operator.generate("slow", PROMPT, max_tokens=200, request_id="operators-secret")
        next(stream)  # the first token: the request is in flight
        try:
            theirs = carol.status()
            assert theirs["requests"] == [], theirs["requests"]
            assert all(i["requests"] == [] for i in theirs["instances"])
            assert "operators-secret" not in repr(theirs)
            mine = operator.status()
            assert "operators-secret" in {r["request_id"] for r in mine["requests"]}
        finally:
            stream.close()


def test_node_to_node_messages_only_from_the_migrations_other_end() -> None:
    from sllm_actors.messages import KvCopyChunk, LoadModel, MigrateOut, ResumeDone, ResumeRequest
    from sllm_actors.actors.node.process import Node

    node = Node("tcp://127.0.0.1:1", "node-2")
    try:
        resume = dict(migration_id="m1", round=0, request_id="r", instance_id="i", source_instance="s",
                      prompt_ids=[], generated_ids=[], max_tokens=1, temperature=0.0, top_p=1.0, seed=0, stop=[],
                      text_so_far="")
        assert "claims to be node-1" in node._peer_problem("node-3", ResumeRequest(source_node="node-1", **resume))
        assert node._peer_problem("node-1", ResumeRequest(source_node="node-1", **resume)) == ""
        assert node._peer_problem("node-1", KvCopyChunk("m1", 0, "r", "i", 0, b"")) == ""
        assert "not node-3" in node._peer_problem("node-3", KvCopyChunk("m1", 0, "r", "i", 0, b""))
        assert "must come from a node" in node._peer_problem("", KvCopyChunk("m1", 0, "r", "i", 0, b""))
        assert "may not send load_model" in node._peer_problem("node-1", LoadModel("i", "m", "s", 0))
        # At a source: answers only from the destination the controller named.
        assert node._peer_problem("", MigrateOut("m2", "i", "node-1", "d", ["r"])) == ""
        node._remember("m2", "node-1")
        assert node._peer_problem("node-1", ResumeDone("m2", 0, "r", "s", 1, 0.0)) == ""
        assert "not node-3" in node._peer_problem("node-3", ResumeDone("m2", 0, "r", "s", 1, 0.0))
    finally:
        node.transport.stop()


def test_a_second_cluster_keyring_is_not_this_ones(tmp_path: Path) -> None:
    """Keys of another cluster (another controller key) are unknown here, whatever their names."""
    a, b = tmp_path / "a", tmp_path / "b"
    init_keys(a, ["n1"])
    init_keys(b, ["n1"])
    ring = KeyRing(a)
    other = load_credentials(b / "nodes" / "n1.key_secret")
    assert ring.authenticate("cluster", b"", z85.decode(other.public)) == ("", "unknown key")
    mine = load_credentials(a / "nodes" / "n1.key_secret")
    assert ring.authenticate("cluster", b"", z85.decode(mine.public)) == ("node:n1", "")
    assert ring.authenticate("state", b"", z85.decode(mine.public))[0] == ""


def test_api_keys_map_to_roles_and_revoke_by_deleting_the_line(tmp_path: Path) -> None:
    import hashlib

    from sllm_actors.runtime.security import api_key_role

    (tmp_path / "api_keys").write_text(f"{hashlib.sha256(b'sk-alice').hexdigest()} client alice\n"
                                       f"{hashlib.sha256(b'sk-ops').hexdigest()} operator ops\n"
                                       f"{hashlib.sha256(b'sk-bad').hexdigest()} root bad\n")
    assert api_key_role("sk-alice", tmp_path) == Peer(CLIENT, "alice")
    assert api_key_role("sk-ops", tmp_path) == Peer(OPERATOR, "ops")
    assert api_key_role("sk-bad", tmp_path) is None  # not a role
    assert api_key_role("sk-nobody", tmp_path) is None
    (tmp_path / "api_keys").write_text(f"{hashlib.sha256(b'sk-ops').hexdigest()} operator ops\n")
    assert api_key_role("sk-alice", tmp_path) is None


def test_a_node_starts_only_with_its_own_key(tmp_path: Path) -> None:
    root = tmp_path / "keys"
    init_keys(root, ["node-1", "node-2"])
    env = {**os.environ, "SLLM_KEYS": str(root)}
    env.pop("SLLM_KEY", None)
    cases = [
        (["--key", str(root / "nodes" / "node-2.key_secret")], "is the key of node 'node-2', not of node 'node-1'"),
        (["--key", str(tmp_path / "missing.key_secret")], "cannot read key file"),
    ]
    for extra, said in cases:
        run = subprocess.run([sys.executable, "-m", "sllm_actors.actors.node", "--join", "tcp://127.0.0.1:1", "--name",
                              "node-1", *extra], capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
        assert run.returncode == 2 and said in run.stderr, run.stderr
    (root / "nodes" / "node-1.key_secret").unlink()
    run = subprocess.run([sys.executable, "-m", "sllm_actors.actors.node", "--join", "tcp://127.0.0.1:1", "--name", "node-1"],
                         capture_output=True, text=True, timeout=60, env=env, cwd=REPO)
    assert run.returncode == 2 and "no key for node node-1" in run.stderr, run.stderr
