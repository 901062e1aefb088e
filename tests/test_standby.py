"""A standby controller takes over through etcd (issue 22, item 4), on real processes on loopback.

etcd started here (a temporary data directory, ports of its own, authentication on with the cluster's password), two
controllers (``sllm up --controller ctl-a`` leads, ``ctl-b`` stands by), two nodes joined to both, ZeroMQ clients
given both controllers' endpoints streaming greedy requests. The leader's host is SIGKILLed mid-stream: the standby
wins the lease, the nodes re-register with it with their token logs, and every stream completes token-identical to
an undisturbed run, no token lost or repeated. An HTTP front end runs beside each controller: the stream through the
killed host's is cut (counted apart), a new request to the survivor's succeeds, token-identical. Skips, saying why, where etcd is not installed (CI installs
Debian's etcd-server, ``.ci/run``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq

from sllm_actors.client import Client, ClusterUnavailable
from sllm_actors.messages import PROTOCOL_VERSION, Hello, NotLeader
from sllm_actors.runtime import wire
from sllm_eval.standby_cluster import StandbyCluster, etcd_missing

from . import streams
from .conftest import with_key

pytestmark = pytest.mark.skipif(bool(etcd_missing()), reason=etcd_missing() or "etcd present")

PROMPTS = ["The history of the river", "Once upon a time in a", "A list of the planets:"]
MAX_TOKENS = 160


@pytest.fixture
def standby_cluster(tmp_path: Path, slow_model: Path) -> Any:
    cluster = StandbyCluster(tmp_path, {"slow": {"source": str(slow_model), "keep_alive": "5m", "deterministic": True,
                                                 "target_concurrency": 4, "dtype": "float32"}},
                             slow_model.parent)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def ZmqStream(endpoints: str, prompt: str, max_tokens: int = MAX_TOKENS) -> streams.ZmqStream:
    """A greedy stream through a client given every controller's endpoint (it follows the leader)."""
    return streams.ZmqStream(lambda: Client(endpoints, idle_timeout=120, connect_timeout=30), prompt, max_tokens)


def HttpStream(base: str, prompt: str) -> streams.HttpStream:
    return streams.HttpStream(base, prompt, MAX_TOKENS)


def ask_hello(endpoint: str) -> Any:
    """What a controller's client port answers to a Hello (a Welcome from the leader, NotLeader from a standby)."""
    ctx = zmq.Context.instance()
    sock = with_key(ctx.socket(zmq.DEALER))
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(wire.pack(Hello(PROTOCOL_VERSION, "client")))
        assert sock.poll(10_000), f"no answer from {endpoint}"
        return wire.unpack(sock.recv_multipart())[1]
    finally:
        sock.close()


def test_the_standby_takes_over_and_every_stream_completes_token_identical(standby_cluster: StandbyCluster) -> None:
    cluster = standby_cluster
    # The standby never serves: it names the leader and where it is.
    answer = ask_hello(cluster.client_endpoint("ctl-b"))
    assert isinstance(answer, NotLeader), answer
    assert answer.controller == "ctl-b" and answer.leader == "ctl-a"
    assert answer.leader_endpoint == cluster.client_endpoint("ctl-a")
    # A client given the standby first follows the redirect to the leader.
    backwards = ",".join(reversed(cluster.endpoints.split(",")))
    with Client(backwards) as client:
        reference = [client.complete("slow", p, max_tokens=MAX_TOKENS, temperature=0.0).token_ids for p in PROMPTS]
        assert client.endpoint == cluster.client_endpoint("ctl-a")
        st = client.status()
        first_epoch = st["epoch"]
        assert st["leader"] == "ctl-a"
        assert {c["name"] for c in st["controllers"]} == {"ctl-a", "ctl-b"}
    assert all(len(r) == MAX_TOKENS for r in reference), "the references must run to max_tokens"

    # Through the leader's own front end (it dies with its host) and beside it the ZeroMQ streams.
    cut = HttpStream(cluster.http_base("ctl-a"), PROMPTS[0])
    cut.start()
    assert cut.flowing.wait(120), "the HTTP stream did not start"
    streams = [ZmqStream(cluster.endpoints, p) for p in PROMPTS]
    for s in streams:
        s.start()
    for s in streams:
        assert s.flowing.wait(120), "a stream did not start"
    assert all(len(s.tokens) < MAX_TOKENS for s in [*streams, cut]), "a stream ended before the kill: nothing tested"
    cluster.kill_host("ctl-a")
    cluster.procs["ctl-b"].wait_line("controller leading: ctl-b", 30)
    for s in streams:
        s.join(240)
        assert not s.is_alive(), "a stream did not finish"
        assert s.error is None, repr(s.error)
    for s, want in zip(streams, reference):
        assert s.done is not None
        assert s.tokens == want, "a ZeroMQ stream lost, repeated or changed a token"
        assert s.done.token_ids == want
        assert s.indexes == sorted(set(s.indexes)), "a chunk came twice"
    cut.join(120)
    assert not cut.is_alive()
    assert cut.error is not None or cut.finish_reason != "length", "the stream through the dead host's front end must be cut"
    assert cut.tokens == reference[0][:len(cut.tokens)], "what the cut stream had was right, as far as it went"
    # The survivor's front end serves new requests (it started when its controller took the lead).
    reply = httpx.post(f"{cluster.http_base('ctl-b')}/v1/completions", timeout=120, json={
        "model": "slow", "prompt": PROMPTS[2], "max_tokens": MAX_TOKENS, "temperature": 0, "return_token_ids": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["token_ids"] == reference[2]

    with Client(cluster.endpoints, connect_timeout=30) as client:
        st = client.status()
        assert st["leader"] == "ctl-b" and client.endpoint == cluster.client_endpoint("ctl-b")
        assert st["epoch"] > first_epoch, "the new leader's epoch (its etcd revision) must be newer"
        assert sorted(n["name"] for n in st["nodes"] if n["alive"]) == cluster.node_names
        # New requests are served by the new leader.
        assert client.complete("slow", PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0.0).token_ids == reference[1]
    log = "".join(cluster.procs["ctl-b"].lines)
    assert "re-registers from epoch" in log, "the nodes did not re-register with their logs"
    # The killed leader's endpoint alone no longer answers.
    with pytest.raises(ClusterUnavailable):
        Client(cluster.client_endpoint("ctl-a"), connect_timeout=2).status()


def test_a_leader_that_loses_its_lease_stops_serving_and_stands_by(standby_cluster: StandbyCluster) -> None:
    """Its lease revoked under it (as when etcd cannot hear it): the leader exits at once, its ``sllm up`` starts it
    again as a standby, the other controller leads, a stream open throughout completes token-identical, and the
    first host's HTTP front end (still up) follows the lead and serves through the new leader."""
    from sllm_actors.actors.controller.standby import etcd_client
    from sllm_actors.runtime.security import KeyRing, keys_dir
    from sllm_actors.runtime.topology import load_topology

    cluster = standby_cluster
    long = 4 * MAX_TOKENS  # a stream long enough to outlast the revoke's round trip
    with Client(cluster.endpoints) as client:
        reference = client.complete("slow", PROMPTS[0], max_tokens=long, temperature=0.0).token_ids
    stream = ZmqStream(cluster.endpoints, PROMPTS[0], long)
    stream.start()
    assert stream.flowing.wait(120), "the stream did not start"
    topo = load_topology(cluster.topology)
    assert topo.etcd is not None
    etcd = etcd_client(topo.etcd, KeyRing(keys_dir()))
    leases = etcd.call("/v3/lease/leases", {}).get("leases") or []
    assert len(leases) == 1, f"only the leader holds a lease: {leases}"
    etcd.revoke(int(leases[0]["ID"]))
    assert len(stream.tokens) < long, "the stream ended before the revoke: nothing tested"
    cluster.procs["ctl-a"].wait_line("controller restarted:", 60)
    cluster.procs["ctl-b"].wait_line("controller leading: ctl-b", 60)
    stream.join(240)
    assert not stream.is_alive() and stream.error is None, repr(stream.error)
    assert stream.tokens == reference, "the stream lost, repeated or changed a token"
    assert "lost the lead" in "".join(cluster.procs["ctl-a"].lines)
    answer = ask_hello(cluster.client_endpoint("ctl-a"))
    assert isinstance(answer, NotLeader) and answer.leader == "ctl-b", answer
    # ctl-a's HTTP front end lived on: its link followed the lead to ctl-b, which serves what comes through it.
    reply = httpx.post(f"{cluster.http_base('ctl-a')}/v1/completions", timeout=120, json={
        "model": "slow", "prompt": PROMPTS[0], "max_tokens": long, "temperature": 0, "return_token_ids": True})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["token_ids"] == reference
