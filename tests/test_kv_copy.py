"""Live migration by copying the KV cache instead of recomputing it, and the cost model that chooses."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from sllm_actors.policy import placement
from sllm_actors.messages import KvCopyBegin, KvCopyChunk, SamplingParams, decode, encode
from sllm_actors.runtime.topology import TopologyError, parse_topology

from .conftest import RunningCluster
from .test_migration import (
    PROMPT,
    _generate_with_action,
    _instance_on_both_nodes,
    _migrate_to_other_node,
    _reference,
    _three_streams_migrated_together,
)

COPY = {"migration_transfer": "copy"}

# ---------------------------------------------------------------------- the cost model (fake numbers)


def test_auto_copies_when_the_link_beats_the_prefill() -> None:
    recompute = placement.MigrationCost(a=0.005, b=0.05)  # 1k tokens: 5.05 s (a CPU prefill)
    link = placement.LinkCost(bytes_per_s=1e9, fixed_s=0.02)  # 46 MB: 0.066 s
    choice = placement.choose_transfer("auto", 46_000_000, 1000, recompute, link)
    assert choice.kind == "copy"
    assert choice.copy_s == pytest.approx(0.066) and choice.recompute_s == pytest.approx(5.05)


def test_auto_recomputes_when_the_link_is_slow_or_the_prefill_fast() -> None:
    # A GPU prefill (20 us a token) against a 1 Gbit/s link: 4k tokens of bf16 KV (~94 MB) take 0.75 s to copy.
    gpu = placement.MigrationCost(a=20e-6, b=0.005)
    slow_link = placement.LinkCost(bytes_per_s=125e6, fixed_s=0.001)
    assert placement.choose_transfer("auto", 94_000_000, 4096, gpu, slow_link).kind == "recompute"
    # The same prefill against a 400 Gbit/s link: copying wins again.
    fast_link = placement.LinkCost(bytes_per_s=50e9, fixed_s=0.001)
    assert placement.choose_transfer("auto", 94_000_000, 4096, gpu, fast_link).kind == "copy"


def test_forced_modes_and_no_cache() -> None:
    cost, link = placement.MigrationCost(a=1.0, b=0.0), placement.LinkCost(bytes_per_s=1.0, fixed_s=100.0)
    assert placement.choose_transfer("copy", 10, 10, cost, link).kind == "copy"  # forced, though slower
    assert placement.choose_transfer("recompute", 10, 10_000, placement.MigrationCost(), placement.LinkCost()).kind \
        == "recompute"
    # Nothing to copy (no cache yet): recompute whatever the mode says.
    assert placement.choose_transfer("copy", 0, 10, cost, link).kind == "recompute"
    assert placement.choose_transfer("auto", 0, 10, cost, link).kind == "recompute"


def test_link_cost_is_refined_from_real_copies() -> None:
    link = placement.LinkCost()
    link.observe(100_000_000, 0.05, 0.1)  # 2 GB/s; the destination's rebuild took 0.1 s
    assert link.bytes_per_s == pytest.approx(2e9) and link.fixed_s == pytest.approx(0.1)
    assert link.estimate(50_000_000) == pytest.approx(0.125)
    link.observe(100_000_000, 0.1, 0.1)  # a slower copy moves the estimate, a moving average like the tiers'
    assert link.bytes_per_s == pytest.approx(0.7 * 2e9 + 0.3 * 1e9)
    link.observe(0, 0.1, 0.1)  # nothing copied: nothing learned
    assert len(link.samples) == 2


def test_the_estimator_reuses_a_measured_link_for_an_unmeasured_pair() -> None:
    est = placement.Estimator()
    assert est.link("a", "b").bytes_per_s == placement.DEFAULT_LINK_BYTES_PER_S
    measured = est.links.setdefault(("a", "b"), placement.LinkCost())
    measured.observe(1_000_000, 0.01, 0.05)
    assert est.link("b", "a").bytes_per_s == pytest.approx(measured.bytes_per_s)


def test_topology_migration_transfer_is_validated() -> None:
    base = {"nodes": [{"name": "a", "gpus": [{"device": "cpu"}]}]}
    assert parse_topology(base, Path("t.yaml")).scheduler.migration_transfer == "auto"
    topo = parse_topology({**base, "scheduler": {"migration_transfer": "copy"}}, Path("t.yaml"))
    assert topo.scheduler.migration_transfer == "copy"
    with pytest.raises(TopologyError, match=r"scheduler.migration_transfer: unknown transfer 'rdma' \(choose from "
                                            r"auto, recompute, copy\)"):
        parse_topology({**base, "scheduler": {"migration_transfer": "rdma"}}, Path("t.yaml"))
    with pytest.raises(TopologyError, match="scheduler.migration_max_rounds: must be at least 1"):
        parse_topology({**base, "scheduler": {"migration_max_rounds": 0}}, Path("t.yaml"))


# ---------------------------------------------------------------------- the engine and the wire form


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Any:
    from sllm_actors.gpu.engine import Engine
    from sllm_actors.models import load_for_inference

    model, tokenizer = load_for_inference(tiny_model, "cpu")
    return Engine(model, tokenizer)


def _seq(engine: Any, temperature: float = 0.0) -> Any:
    from sllm_actors.gpu.sequence import Sequence

    return Sequence("r", engine.tokenize(PROMPT, chat=False), [], SamplingParams(40, temperature, 0.9, 3))


def _wire_copy(engine: Any, seq: Any, corrupt: str = "") -> tuple[KvCopyBegin, dict[int, bytes]]:
    """What the source sends, through msgpack, in small chunks (cut across tensor boundaries)."""
    from sllm_actors.migration import CacheChunks

    n_cached, layers = engine.export_cache(seq)
    whole = b"".join(t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes() for pair in layers for t in pair)
    size = 1000
    cut = CacheChunks([t for pair in layers for t in pair], size)
    crc = cut.crc32()
    chunks: dict[int, bytes] = {}
    while not cut.done():
        index = cut.sent
        chunks[index] = cut.take()
    assert b"".join(chunks[i] for i in range(cut.count)) == whole and cut.total == len(whole)
    assert crc == zlib.crc32(whole) and cut.count == -(-len(whole) // size)
    if corrupt == "flip":
        chunks[1] = bytes([chunks[1][0] ^ 1]) + chunks[1][1:]
    elif corrupt == "short":
        del chunks[1]
    begin = KvCopyBegin(migration_id="m", round=0, request_id=seq.request_id, instance_id="i", source_node="n",
                        source_instance="s", prompt_ids=list(seq.prompt_ids), generated_ids=list(seq.generated_ids),
                        **seq.sampling.fields(), text_so_far=seq.text, n_cached=n_cached,
                        dtype=str(layers[0][0].dtype).removeprefix("torch."),
                        shapes=[[list(k.shape), list(v.shape)] for k, v in layers], total_bytes=cut.total, crc32=crc,
                        n_chunks=cut.count)
    begin = decode(encode(begin))  # type: ignore[assignment]
    chunks = {i: decode(encode(KvCopyChunk("m", 0, seq.request_id, "i", i, c))).data  # type: ignore[attr-defined]
              for i, c in chunks.items()}
    return begin, chunks


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("cut", [0, 1, 7])
def test_a_copied_cache_continues_exactly(engine: Any, temperature: float, cut: int) -> None:
    from sllm_actors.gpu.sequence import Sequence
    from sllm_actors.migration import decode_cache as _decode_cache

    ref = _seq(engine, temperature)
    engine.prefill(ref)
    while not ref.finish_reason:
        engine.step(ref)
    src = _seq(engine, temperature)
    engine.prefill(src)
    for _ in range(cut):
        engine.step(src)
    begin, chunks = _wire_copy(engine, src)
    dest = Sequence("r", list(begin.prompt_ids), list(begin.generated_ids), SamplingParams(40, temperature, 0.9, 3))
    engine.import_cache(dest, begin.n_cached, _decode_cache(begin, chunks))
    while not dest.finish_reason:
        engine.step(dest)
    assert dest.generated_ids == ref.generated_ids


@pytest.mark.parametrize(("corrupt", "problem"), [("flip", "checksum mismatch"), ("short", "short KV copy")])
def test_a_damaged_copy_is_refused(engine: Any, corrupt: str, problem: str) -> None:
    from sllm_actors.migration import decode_cache as _decode_cache

    seq = _seq(engine)
    engine.prefill(seq)
    engine.step(seq)
    begin, chunks = _wire_copy(engine, seq, corrupt)
    with pytest.raises(ValueError, match=problem):
        _decode_cache(begin, chunks)


# ---------------------------------------------------------------------- real clusters


@pytest.fixture(scope="module")
def cluster(slow_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Copy mode, with an instance already loaded on each node (the first migration starts the second)."""
    from .conftest import start_cluster, stop_cluster, write_topology

    topo = write_topology(tmp_path_factory.mktemp("kvcopy") / "topology.yaml", {"slow": slow_model},
                          extra={"scheduler": COPY})
    running = start_cluster(topo)
    try:
        _instance_on_both_nodes(running)
        yield running
    finally:
        stop_cluster(running)


def _one_migration(done: Any) -> dict[str, Any]:
    migrations = [m for m in done.migrations if m["kind"] == "migration" and m["outcome"] == "done"]
    assert len(migrations) == 1, json.dumps(done.migrations)
    return migrations[0]


@pytest.mark.parametrize("at_tokens", [3, 40])
def test_greedy_output_is_unchanged_by_a_copy_migration(cluster: RunningCluster, slow_model: Path,
                                                        at_tokens: int) -> None:
    n = 400
    expected = _reference(slow_model, n)
    acks: list[str] = []
    seen, done = _generate_with_action(cluster, at_tokens, _migrate_to_other_node(cluster, acks), max_tokens=n)
    assert seen == expected and done.token_ids == expected
    assert acks and acks[0].startswith("migrated"), acks
    m = _one_migration(done)
    assert m["transfer"] == "copy" and m["kv_bytes"] > 0 and m["copy_s"] > 0, json.dumps(m)
    assert m["from"].split("/")[0] != m["to"].split("/")[0]
    # Only the tokens produced during the copy were recomputed, never the context.
    assert m["tokens_recomputed"] < at_tokens + len(PROMPT), m
    with cluster.client() as c:
        events = c.status()["events"]
    assert any(e["kind"] == "migrate" and "KV cache copied" in e["text"] for e in events), events


def test_seeded_sampling_continues_exactly_after_a_copy_migration(cluster: RunningCluster, slow_model: Path) -> None:
    n = 400
    expected = _reference(slow_model, n, temperature=0.9, seed=1234)
    acks: list[str] = []
    seen, done = _generate_with_action(cluster, 25, _migrate_to_other_node(cluster, acks), max_tokens=n,
                                       temperature=0.9, top_p=0.95, seed=1234)
    assert seen == expected
    assert _one_migration(done)["transfer"] == "copy"


def test_every_request_of_an_instance_migrates_by_copy(cluster_factory: Any, slow_model: Path) -> None:
    cluster = cluster_factory({"slow": slow_model}, extra={"scheduler": COPY})  # fresh: one instance for all
    for done in _three_streams_migrated_together(cluster, slow_model):
        assert _one_migration(done)["transfer"] == "copy"


@pytest.mark.parametrize(("fault", "problem"), [("corrupt", "checksum mismatch"), ("short", "announced")])
def test_a_damaged_copy_falls_back_to_recompute(cluster_factory: Any, slow_model: Path, fault: str,
                                                problem: str) -> None:
    cluster = cluster_factory({"slow": slow_model}, extra={"scheduler": COPY}, env={"SLLM_FAULT_KV_COPY": fault})
    n = 800  # the destination loads cold first: the request must outlast that
    expected = _reference(slow_model, n)
    acks: list[str] = []
    seen, done = _generate_with_action(cluster, 30, _migrate_to_other_node(cluster, acks), max_tokens=n)
    assert seen == expected and done.token_ids == expected
    assert acks and acks[0].startswith("migrated"), acks
    m = _one_migration(done)
    assert m["transfer"] == "recompute" and problem in m["transfer_note"], m
    assert m["tokens_recomputed"] >= len(PROMPT.split()) + 30, m
