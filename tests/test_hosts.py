"""A cluster across three hosts (network namespaces on this machine): ``sllm up`` on one, ``sllm node --join`` on
two others, each with its own ``$SLLM_HOME``, key and mount namespace, CURVE on every link; streams stay
token-identical through a migration between hosts, a host killed, a bandwidth limit and cut links.

Needs root and iproute2 (CI has both); skips saying why elsewhere. The hosts and processes are made by
``sllm_eval.hosts`` and all removed by the fixture, also when a test fails.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.client import Client, ClusterUnavailable, Completion, TokenEvent
from sllm_eval.hosts import HostCluster, Hosts, start_cluster, sweep_stale, unavailable_reason

PROMPT = "Once upon a time there was a small model"
N = 300
"""Tokens a stream asks for: about 10 ms each for the slow model, so a fault lands mid-stream."""
NODES = ("node-a", "node-b")


@pytest.fixture(scope="module")
def hosts_cluster(slow_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostCluster]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    sweep_stale()  # what a killed earlier run left behind
    root = tmp_path_factory.mktemp("hosts")
    # The repository: a directory prepared before the hosts start, read-only on every host.
    with Hosts(root, ["controller", *NODES], shared=[slow_model.parent]) as hosts:
        cluster = start_cluster(hosts, {"slow": slow_model}, nodes=NODES, model_options={"deterministic": True})
        try:
            yield cluster
        finally:
            cluster.stop()


@pytest.fixture(scope="module")
def expected(hosts_cluster: HostCluster) -> list[int]:
    """The undisturbed run, through the same cluster with no fault (the model is ``deterministic``, so a
    stream's tokens never depend on what else is in its batch)."""
    with hosts_cluster.client() as client:
        done = client.complete("slow", PROMPT, max_tokens=N)
    assert len(done.token_ids) == N and not done.migrations
    return list(done.token_ids)


@pytest.fixture
def healthy(hosts_cluster: HostCluster) -> Iterator[HostCluster]:
    """Each test starts with both nodes joined and leaves its links healed and unlimited, even when it fails."""
    hosts_cluster.wait_for(lambda st: all(hosts_cluster.node_alive(n, st) for n in NODES), 60, "both nodes alive")
    try:
        yield hosts_cluster
    finally:
        for name in NODES:
            hosts_cluster.nodes[name].heal()
            hosts_cluster.nodes[name].unlimit()


def _stream(cluster: HostCluster, at_tokens: int, action: Callable[[str, str], Any]) -> tuple[list[int], Completion]:
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
        for event in client.generate("slow", PROMPT, max_tokens=N):
            if isinstance(event, TokenEvent):
                seen.extend(event.token_ids)
                if len(seen) >= at_tokens and worker is None:
                    worker = threading.Thread(target=run, args=(event.request_id,), daemon=True)
                    worker.start()
            else:
                assert isinstance(event, Completion)
                done = event
    assert worker is not None, f"the stream ended before {at_tokens} tokens"
    worker.join(60)
    assert not errors, errors
    assert done is not None
    return seen, done


def _other(node: str) -> str:
    return NODES[1] if node == NODES[0] else NODES[0]


def _tcp_peers(cluster: HostCluster, host_name: str) -> set[str]:
    """The remote addresses of the host's established TCP connections, as its own namespace sees them."""
    host = cluster.hosts[host_name]
    run = subprocess.run(["ip", "netns", "exec", host.netns, "ss", "-Htn", "state", "established"],
                         capture_output=True, text=True, timeout=30, check=True)
    return {line.split()[-1].rsplit(":", 1)[0] for line in run.stdout.splitlines() if line.strip()}


def test_each_host_has_its_own_files_and_talks_only_to_the_controller(healthy: HostCluster) -> None:
    cluster = healthy
    with cluster.client() as client:
        assert len(client.complete("slow", PROMPT, max_tokens=3).token_ids) == 3
    loaded_on = {i["node"] for i in cluster.status()["instances"]}
    assert loaded_on
    for name in loaded_on:  # the node's SSD tier is under its own home, not the controller's
        ssd = cluster.nodes[name].home / "nodes" / name / "ssd"
        assert any(ssd.iterdir()), f"nothing in {name}'s SSD tier at {ssd}"
    assert not (cluster.controller.home / "nodes").exists(), "the controller made a node's directories"
    for name, host in cluster.nodes.items():
        # In the node's mount namespace the controller's and the other node's homes are empty, the repository
        # read-only: the node cannot have opened the controller's keys or topology.
        script = (f"ls -A {cluster.controller.home} {cluster.nodes[_other(name)].home}; "
                  f"touch {host.shared_ro[0]}/x 2>/dev/null || echo read-only")
        look = host.run(["sh", "-c", script])
        assert look.stdout.split() == [f"{cluster.controller.home}:", f"{cluster.nodes[_other(name)].home}:",
                                       "read-only"], look.stdout
        # CURVE on the one link a node has: to the controller's address, nothing else.
        assert _tcp_peers(cluster, name) <= {cluster.controller.address}, _tcp_peers(cluster, name)
        assert _tcp_peers(cluster, name), f"{name} has no connection to the controller"
    # And the controller's sockets take no peer without a key (CURVE is on, not merely available).
    with pytest.raises(ClusterUnavailable), Client(cluster.client_endpoint, insecure=True,
                                                   connect_timeout=2.0) as stranger:
        stranger.status()


def _migrate_to_the_other_host(cluster: HostCluster, acks: list[str]) -> Any:
    """An action for ``_stream``: migrate the request to the node it is not on, its answer kept in ``acks``."""
    def migrate(request_id: str, node: str) -> None:
        with cluster.client() as c:
            acks.append(c.migrate(request_id, _other(node)))
    return migrate


def test_a_migration_between_hosts_keeps_the_stream_exact(healthy: HostCluster, expected: list[int]) -> None:
    cluster = healthy
    acks: list[str] = []
    seen, done = _stream(cluster, 10, _migrate_to_the_other_host(cluster, acks))
    assert acks and acks[0].startswith("migrated"), acks
    assert seen == expected and done.token_ids == expected
    assert [m["kind"] for m in done.migrations] == ["migration"], done.migrations


def test_streams_stay_exact_under_a_bandwidth_limit_and_a_short_cut(healthy: HostCluster,
                                                                   expected: list[int]) -> None:
    cluster = healthy
    for host in cluster.nodes.values():
        host.limit("100mbit")
    acks: list[str] = []
    seen, done = _stream(cluster, 10, _migrate_to_the_other_host(cluster, acks))
    assert acks and acks[0].startswith("migrated"), acks
    assert seen == expected and done.token_ids == expected

    def short_cut(request_id: str, node: str) -> None:
        cluster.nodes[node].cut()
        time.sleep(1.0)  # the fault's length is the test's subject: shorter than the 5 s of missed beats
        cluster.nodes[node].heal()

    seen, done = _stream(cluster, 10, short_cut)
    assert seen == expected and done.token_ids == expected
    assert not any(m["kind"] == "resume" for m in done.migrations), "a 1 s cut must not cost the node its requests"


def test_a_node_cut_off_is_declared_dead_its_stream_resumes_and_it_rejoins_without_stale_tokens(
        healthy: HostCluster, expected: list[int]) -> None:
    cluster = healthy
    cut: list[str] = []

    def long_cut(request_id: str, node: str) -> None:
        cluster.nodes[node].cut()
        cut.append(node)
        cluster.wait_for(lambda st: not cluster.node_alive(node, st), 30, f"{node} declared dead behind a cut")

    try:
        seen, done = _stream(cluster, 10, long_cut)
    finally:
        for host in cluster.nodes.values():
            host.heal()
    # The request resumed on the other host; whatever the cut-off node generated meanwhile reached no one.
    assert seen == expected and done.token_ids == expected, "no stale token from the node that was cut off"
    assert any(m["kind"] == "resume" for m in done.migrations), done.migrations
    node = cut[0]
    cluster.wait_for(lambda st: cluster.node_alive(node, st), 60, f"{node} to rejoin after the cut healed")
    cluster.wait_for(lambda st: all(i["node"] != node or i["state"] != "ready" or not any(
        r["instance_id"] == i["instance_id"] for r in st["requests"]) for i in st["instances"]), 30,
        f"no request left on {node}'s orphaned instance")
    with cluster.client() as client:
        assert client.complete("slow", PROMPT, max_tokens=N).token_ids == expected


def test_a_host_killed_mid_stream_loses_no_token_and_rejoins_when_restarted(healthy: HostCluster,
                                                                            expected: list[int]) -> None:
    """Last in the file: the restarted node's start (imports, warm-up) is the slowest part of these tests."""
    cluster = healthy
    killed: list[str] = []
    killed_at = time.time()

    def kill_host(request_id: str, node: str) -> None:
        cluster.nodes[node].kill_all()  # the whole host stops: every process in its namespace
        killed.append(node)

    seen, done = _stream(cluster, 10, kill_host)
    assert seen == expected and done.token_ids == expected, "one stream, no token lost or repeated"
    assert any(m["kind"] == "resume" for m in done.migrations), done.migrations
    assert not cluster.nodes[killed[0]].pids()
    # The host comes back: the same command, the same key, and the node rejoins.
    cluster.start_node(killed[0])
    st = cluster.wait_for(lambda st: st if cluster.node_alive(killed[0], st) else None, 90, f"{killed[0]} to rejoin")
    # A new process joined; the killed one was never taken for a merely silent one coming back.
    assert not [e for e in st["events"] if e["time"] >= killed_at and e["text"].startswith(f"{killed[0]} back")], \
        st["events"]


def _ours() -> tuple[set[str], set[str]]:
    """Namespaces and links of this machine that carry the hosts' naming."""
    netns = {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                        check=True).stdout.splitlines() if line.strip()}
    links = set()
    for line in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                               check=True).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(("sb", "sv")):
            links.add(name)
    return {n for n in netns if n.startswith("sllm-")}, links


def test_hosts_remove_everything_they_made_when_the_code_inside_fails(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    before = _ours()
    with pytest.raises(RuntimeError, match="a test failed"), Hosts(tmp_path, ["one", "two"]) as hosts:
        sleeper = hosts["one"].popen(["sleep", "600"])
        deadline = time.monotonic() + 10
        while sleeper.pid not in hosts["one"].pids() and time.monotonic() < deadline:
            time.sleep(0.02)  # `ip netns exec` enters the namespace a moment after the fork
        # The wrapper (`ip netns exec` / `unshare`) may still be listed beside the process it starts.
        assert sleeper.pid in hosts["one"].pids()
        assert _ours() != before
        raise RuntimeError("a test failed")
    assert sleeper.wait(10) == -9, "the host's process was SIGKILLed"
    assert _ours() == before


def test_a_dead_runs_leftovers_are_swept(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    gone = subprocess.Popen(["true"])
    gone.wait()
    name = f"sllm-{gone.pid}-left"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "link", "add", f"sb{gone.pid}", "type", "bridge"], check=True)
    assert {name, f"sb{gone.pid}"} <= set(sweep_stale())
    netns, links = _ours()
    assert name not in netns and f"sb{gone.pid}" not in links
