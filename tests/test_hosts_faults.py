"""Faults of the network between hosts (network namespaces on this machine): 20 ms of delay and 1 % loss on every
link (the controller's, both nodes', the model repository's), and a partition that heals.

Under delay and loss a cold start from the repository host over HTTP and a live migration between the node hosts
keep the stream token-identical to an undisturbed one; a node cut off long enough is declared dead, its stream
resumes on the other host, and when the link comes back the router refuses what the cut-off node still sends (its
per-request owner check) and the node rejoins.

The delay is a user-space relay per link and the loss an nftables rule (``sllm_eval.link_relay``,
``sllm_eval.hosts``): needs root, iproute2 and nftables (CI installs it); skips saying why elsewhere.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.client import Completion, TokenEvent
from sllm_eval.hosts import (
    HostCluster,
    Hosts,
    RepositoryHost,
    faults_unavailable_reason,
    start_cluster,
    start_repository,
    sweep_stale,
)

PROMPT = "Once upon a time there was a small model"
N = 200
"""Tokens a stream asks for: about 10 ms each for the slow model, so a fault lands mid-stream."""
NODES = ("node-a", "node-b")
DELAY_MS = 20.0
LOSS_PERCENT = 1.0


@pytest.fixture(scope="module")
def faulty(slow_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HostCluster, RepositoryHost]]:
    """Controller, two nodes and a repository host, every link delayed and lossy from before the cluster starts.
    The repository holds the slow model twice, as ``slow`` and ``cold`` (one checkpoint, two names): ``cold`` is
    left for the test that cold-starts it."""
    from sllm_actors.storage import convert

    reason = faults_unavailable_reason()
    if reason:
        pytest.skip(f"no faults on links here: {reason}")
    sweep_stale()
    root = tmp_path_factory.mktemp("hosts-faults")
    with Hosts(root, ["controller", *NODES, "repository"], faults=True) as hosts:
        # Prepared before any host's process starts, in the repository host's home, which no node can open.
        models = hosts["repository"].home / "models"
        for name in ("slow", "cold"):
            convert(str(slow_model), str(models / name))
        repository = start_repository(hosts["repository"], models)
        for host in hosts.hosts.values():
            host.delay(DELAY_MS)
            host.loss(LOSS_PERCENT)
        # 2 GiB: a URL model's first load is planned at 1 GiB until a node reports its real size.
        cluster = start_cluster(hosts, {"slow": repository.url + "slow/", "cold": repository.url + "cold/"},
                                nodes=NODES, memory="2GiB", model_options={"deterministic": True})
        try:
            yield cluster, repository
        finally:
            cluster.stop()
            repository.stop()


@pytest.fixture(scope="module")
def expected(faulty: tuple[HostCluster, RepositoryHost]) -> list[int]:
    """The undisturbed stream: the same cluster with every link's delay and loss off for it (the model is
    ``deterministic``, so a stream's tokens never depend on what else is in its batch)."""
    cluster, _ = faulty
    hosts = cluster.hosts.hosts.values()
    for host in hosts:
        host.clear_faults()
    try:
        with cluster.client() as client:
            done = client.complete("slow", PROMPT, max_tokens=N)
    finally:
        for host in hosts:
            host.delay(DELAY_MS)
            host.loss(LOSS_PERCENT)
    assert len(done.token_ids) == N and not done.migrations
    return list(done.token_ids)


@pytest.fixture
def healthy(faulty: tuple[HostCluster, RepositoryHost]) -> Iterator[HostCluster]:
    cluster, _ = faulty
    cluster.wait_for(lambda st: all(cluster.node_alive(n, st) for n in NODES), 60, "both nodes alive")
    try:
        yield cluster
    finally:
        for name in NODES:
            cluster.nodes[name].heal()


def _stream(cluster: HostCluster, model: str, at_tokens: int,
            action: Callable[[str, str], Any]) -> tuple[list[int], Completion]:
    """One greedy stream of N tokens; once ``at_tokens`` arrived, ``action(request_id, node)`` runs on a thread
    (the stream keeps being read meanwhile). Returns the tokens seen and the completion."""
    seen: list[int] = []
    done: Completion | None = None
    errors: list[BaseException] = []
    worker: threading.Thread | None = None

    def run(request_id: str) -> None:
        try:
            node = next(r["node"] for r in cluster.status()["requests"] if r["request_id"] == request_id)
            action(request_id, node)
        except BaseException as exc:  # noqa: BLE001 (handed to the test thread, surfaced by the assertion below)
            errors.append(exc)

    with cluster.client() as client:
        for event in client.generate(model, PROMPT, max_tokens=N):
            if isinstance(event, TokenEvent):
                seen.extend(event.token_ids)
                if len(seen) >= at_tokens and worker is None:
                    worker = threading.Thread(target=run, args=(event.request_id,), daemon=True)
                    worker.start()
            else:
                assert isinstance(event, Completion)
                done = event
    assert worker is not None, f"the stream ended before {at_tokens} tokens"
    worker.join(90)
    assert not errors, errors
    assert done is not None
    return seen, done


def _other(node: str) -> str:
    return NODES[1] if node == NODES[0] else NODES[0]


def test_a_cold_start_from_the_repository_host_and_a_migration_stay_exact_under_delay_and_loss(
        healthy: HostCluster, expected: list[int]) -> None:
    cluster = healthy
    lost_before = sum(h.lost() for h in cluster.hosts.hosts.values())
    acks: list[str] = []

    def migrate(request_id: str, node: str) -> None:
        with cluster.client() as c:
            acks.append(c.migrate(request_id, _other(node)))

    # ``cold`` is in no node's tiers: its first load fetches it from the repository host over a delayed, lossy
    # link, and the migration's destination fetches it too.
    seen, done = _stream(cluster, "cold", 10, migrate)
    assert done.cold_start.get("tier") == "repository", done.cold_start
    assert acks and acks[0].startswith("migrated"), acks
    assert seen == expected and done.token_ids == expected
    assert [m["kind"] for m in done.migrations] == ["migration"], done.migrations
    # The faults were there: packets were dropped on the links while this ran.
    assert sum(h.lost() for h in cluster.hosts.hosts.values()) > lost_before


def test_a_partition_that_heals_under_delay_and_loss(healthy: HostCluster, expected: list[int]) -> None:
    cluster = healthy
    cut: list[str] = []

    def long_cut(request_id: str, node: str) -> None:
        cluster.nodes[node].cut()
        cut.append(node)
        cluster.wait_for(lambda st: not cluster.node_alive(node, st), 30, f"{node} declared dead behind a cut")
        cluster.nodes[node].heal()  # at once: the cut-off node comes back while the stream still runs elsewhere

    try:
        seen, done = _stream(cluster, "slow", 10, long_cut)
    finally:
        for host in cluster.nodes.values():
            host.heal()
    # The request resumed on the other host; whatever the cut-off node generated for it reached no client: what
    # it sent before the heal died with its connection, and what it sends after is refused by the router's owner
    # check unless the scheduler has already stopped its orphaned instance (it does so as the node comes back).
    assert seen == expected and done.token_ids == expected, "no stale token from the node that was cut off"
    assert any(m["kind"] == "resume" for m in done.migrations), done.migrations
    node = cut[0]
    cluster.wait_for(lambda st: cluster.node_alive(node, st), 60, f"{node} to rejoin after the cut healed")
    cluster.wait_for(lambda st: all(i["node"] != node or i["state"] != "ready" or not any(
        r["instance_id"] == i["instance_id"] for r in st["requests"]) for i in st["instances"]), 30,
        f"no request left on {node}'s orphaned instance")
    with cluster.client() as client:
        assert client.complete("slow", PROMPT, max_tokens=N).token_ids == expected


ECHO = """
import socket
s = socket.socket()
s.bind(("0.0.0.0", 5000))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    while data := c.recv(65536):
        c.sendall(data)
    c.close()
"""
ROUND_TRIPS = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5000), timeout=30)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
for _ in range(int(sys.argv[2])):
    started = time.monotonic()
    c.sendall(b"x" * 100)
    got = 0
    while got < 100:
        got += len(c.recv(100))
    print(time.monotonic() - started, flush=True)
"""

BLAST = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(500):
    try:
        s.sendto(b"x", (sys.argv[1], 5001))
    except PermissionError:
        pass  # dropped on the way out: a local sender is told (EPERM), a remote one never is
"""


def test_delay_and_loss_are_on_the_link_and_outlive_a_host_kill(tmp_path: Path) -> None:
    """Without a cluster: an echo server on one host, a client on another, both links delayed and lossy."""
    import subprocess
    import sys

    reason = faults_unavailable_reason()
    if reason:
        pytest.skip(f"no faults on links here: {reason}")
    with Hosts(tmp_path, ["one", "two"], faults=True) as hosts:
        one, two = hosts["one"], hosts["two"]
        relays = [h.relay for h in (one, two)]

        def echo() -> subprocess.Popen[str]:
            server = one.popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE)
            assert server.stdout is not None and server.stdout.readline().strip() == "listening"
            return server

        def round_trips(n: int) -> list[float]:
            run = two.run([sys.executable, "-c", ROUND_TRIPS, one.address, str(n)], timeout=60)
            assert run.returncode == 0, run.stderr
            return [float(x) for x in run.stdout.split()]

        echo()
        for host in (one, two):
            host.delay(DELAY_MS)
        # Each byte waits in both links' relays on the way there and back: 4 delays at least, never less.
        assert min(round_trips(5)) >= 4 * DELAY_MS / 1000
        # Loss: 500 datagrams across both links at 20 % each; some are dropped (all kept has odds of 1e-48).
        blast = [sys.executable, "-c", BLAST, one.address]
        for host in (one, two):
            host.loss(20)
        assert two.run(blast).returncode == 0
        assert one.lost() > 0 and two.lost() > 0
        for host in (one, two):
            host.clear_faults()
        lost = one.lost() + two.lost()
        assert two.run(blast).returncode == 0
        assert one.lost() + two.lost() == lost, "no loss once cleared"
        # The whole host stops, but its link (the relay) stays: a server started again is reached through it.
        one.kill_all()
        assert all(r is not None and r.poll() is None for r in relays)
        echo()
        assert len(round_trips(3)) == 3
    assert all(r is not None and r.wait(10) is not None for r in relays), "the relays stop with the hosts"


def test_the_relays_and_rules_go_with_the_hosts_when_the_code_inside_fails(tmp_path: Path) -> None:
    import subprocess

    reason = faults_unavailable_reason()
    if reason:
        pytest.skip(f"no faults on links here: {reason}")
    with pytest.raises(RuntimeError, match="a test failed"), Hosts(tmp_path, ["one"], faults=True) as hosts:
        one = hosts["one"]
        relay = one.relay
        one.delay(DELAY_MS)
        one.loss(LOSS_PERCENT)
        raise RuntimeError("a test failed")
    assert relay is not None and relay.wait(10) is not None, "the relay stopped"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert one.netns not in netns, "the namespace (and the rules in it) removed"
