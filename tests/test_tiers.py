"""Loading through the storage tiers of real node processes: repository -> SSD -> DRAM, and faults."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sllm_actors.client import RequestError

from .conftest import RunningCluster

PROMPT = "The capital of France is"


def _tier_of(cluster: RunningCluster, model: str) -> str:
    with cluster.client() as c:
        return next(i["tier"] for i in c.status()["instances"] if i["model"] == model and i["state"] == "ready")


def _wait_scaled_to_zero(cluster: RunningCluster, model: str) -> None:
    cluster.wait_for(lambda st: not any(i["model"] == model for i in st["instances"]), 30,
                     f"{model} to scale to zero after its keep-alive")


def _flip_a_byte(checkpoint: Path) -> None:
    data = sorted(checkpoint.glob("data_*.bin"))[0]
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 3] ^= 0xFF
    data.write_bytes(bytes(raw))


def test_cold_starts_go_repository_then_dram(cluster_factory: Any, tiny_model: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model}, keep_alive="1s", nodes=1)
    with cluster.client() as c:
        first = c.complete("tiny", PROMPT, max_tokens=8).token_ids
    assert _tier_of(cluster, "tiny") == "repository"
    tiers = cluster.wait_for(
        lambda st: {t["tier"]: t for t in st["tiers"] if "tiny" in t.get("models", [])}
        if {"ssd", "dram"} <= {t["tier"] for t in st["tiers"] if "tiny" in t.get("models", [])} else None,
        30, "tiny in the SSD and DRAM tiers",
    )
    assert tiers["ssd"]["bandwidth"] > 0 and tiers["dram"]["bandwidth"] > 0
    assert tiers["ssd"]["capacity_bytes"] == 2 * 1024**3
    _wait_scaled_to_zero(cluster, "tiny")
    with cluster.client() as c:
        again = c.complete("tiny", PROMPT, max_tokens=8).token_ids
        events = [e["text"] for e in c.status()["events"]]
    assert again == first
    assert _tier_of(cluster, "tiny") == "dram"
    assert any("scale down" in e for e in events), events


def test_corrupt_ssd_copy_is_detected_and_fetched_again(cluster_factory: Any, tiny_model: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model}, keep_alive="1s", nodes=1, dram="0")
    with cluster.client() as c:
        first = c.complete("tiny", PROMPT, max_tokens=8).token_ids
    _wait_scaled_to_zero(cluster, "tiny")
    ssd_copy = cluster.topology.parent / "ssd-1" / "tiny"
    _flip_a_byte(ssd_copy)
    with cluster.client() as c:
        assert c.complete("tiny", PROMPT, max_tokens=8).token_ids == first
        events = [e["text"] for e in c.status()["events"]]
    assert _tier_of(cluster, "tiny") == "repository", "the bad SSD copy was replaced from the repository"
    corrupt = [e for e in events if "failed its checksums" in e]
    assert corrupt and "data_0.bin" in corrupt[0], events


def test_no_good_copy_anywhere_fails_the_request_and_others_are_served(
    cluster_factory: Any, tiny_model: Path, tmp_path: Path
) -> None:
    from sllm_actors.storage import convert

    bad = tmp_path / "bad-ckpt"
    convert(str(tiny_model), str(bad))
    _flip_a_byte(bad)
    cluster = cluster_factory({"tiny": tiny_model, "bad": bad}, nodes=1, dram="0")
    with cluster.client() as c:
        with pytest.raises(RequestError) as info:
            c.complete("bad", PROMPT, max_tokens=4)
        assert info.value.code == "load_failed"
        assert "data_0.bin" in info.value.message and "checksum" in info.value.message.lower()
        assert len(c.complete("tiny", PROMPT, max_tokens=4).token_ids) == 4


def test_a_dram_hit_does_not_need_the_ssd_copy_it_came_from(
    cluster_factory: Any, tiny_model: Path, tmp_path: Path
) -> None:
    from sllm_actors.storage import checkpoint_size, convert

    converted = tmp_path / "sized"
    convert(str(tiny_model), str(converted))
    size = checkpoint_size(converted)
    # Room on SSD for one of the two models, in DRAM for both: the second fetch evicts the first from SSD.
    cluster = cluster_factory({"tiny": tiny_model, "tiny-2": tiny_model}, keep_alive="1s", nodes=1,
                              ssd=str(int(size * 1.5)))

    def tiers(st: dict[str, Any]) -> dict[str, set[str]]:
        return {t["tier"]: set(t.get("models", [])) for t in st["tiers"]}

    with cluster.client() as c:
        first = c.complete("tiny", PROMPT, max_tokens=8).token_ids
    cluster.wait_for(lambda st: "tiny" in tiers(st).get("dram", set()), 30, "tiny in the DRAM tier")
    with cluster.client() as c:
        c.complete("tiny-2", PROMPT, max_tokens=8)
    cluster.wait_for(lambda st: tiers(st).get("ssd") == {"tiny-2"} and {"tiny", "tiny-2"} <= tiers(st)["dram"],
                     30, "tiny evicted from SSD, both models in DRAM")
    assert not (cluster.topology.parent / "ssd-1" / "tiny").exists()
    _wait_scaled_to_zero(cluster, "tiny")
    with cluster.client() as c:
        assert c.complete("tiny", PROMPT, max_tokens=8).token_ids == first
    assert _tier_of(cluster, "tiny") == "dram"


def test_the_ssd_tier_never_evicts_a_copy_being_read(tiny_model: Path, tmp_path: Path) -> None:
    from sllm_actors.actors.node.ssd_tier import SsdTierActor, store
    from sllm_actors.messages import TierLookup, TierRelease
    from sllm_actors.actors.node.context import NodeContext
    from sllm_actors.storage import checkpoint_size, convert
    from sllm_actors.runtime.supervisor import Directory

    source = tmp_path / "source"
    convert(str(tiny_model), str(source))
    size = checkpoint_size(source)
    node = NodeContext("node-t", lambda msg, address: None, Directory())
    ssd = SsdTierActor.start(None, "ssd", node=node, root=str(tmp_path / "ssd"), capacity=int(size * 1.5))
    try:
        store(ssd, "a", str(source)).get(timeout=30)
        ssd.ask(TierRelease("a"), timeout=5)
        held = ssd.ask(TierLookup("a"), timeout=5)  # a build reads this copy now
        store(ssd, "b", str(source)).get(timeout=30)
        assert Path(held, "index.json").is_file(), "a leased copy was evicted"
        assert (tmp_path / "ssd" / "b" / "index.json").is_file()
        for model in ("a", "b"):
            ssd.ask(TierRelease(model), timeout=5)
        store(ssd, "c", str(source)).get(timeout=30)
        assert not Path(held).exists(), "an unleased, least recently used copy stays over capacity"
        assert ssd.ask(TierLookup("c"), timeout=5)
    finally:
        ssd.stop()


def test_the_ssd_tier_answers_while_it_copies(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    import sllm_actors.storage as storage
    from sllm_actors.actors.node.ssd_tier import SsdTierActor, store
    from sllm_actors.messages import TierLookup
    from sllm_actors.actors.node.context import NodeContext
    from sllm_actors.storage import CheckpointError, convert
    from sllm_actors.runtime.supervisor import Directory

    source = tmp_path / "source"
    convert(str(tiny_model), str(source))
    release, copying = threading.Event(), threading.Event()
    real_copy = storage.copy_checkpoint

    def held_copy(src: Any, dest: Any, **kwargs: Any) -> Any:
        copying.set()
        assert release.wait(30), "the test never let the copy go on"
        if Path(src).name == "broken":
            raise CheckpointError(f"{src}: checksum mismatch (a test's)")
        return real_copy(src, dest, **kwargs)

    monkeypatch.setattr(storage, "copy_checkpoint", held_copy)
    node = NodeContext("node-t", lambda msg, address: None, Directory())
    ssd = SsdTierActor.start(None, "ssd", node=node, root=str(tmp_path / "ssd"), capacity=1 << 30)
    try:
        first = store(ssd, "a", str(source))
        again = store(ssd, "a", str(source))  # the same model meanwhile: waits for the one copy
        assert copying.wait(10)
        # A 16 GB copy takes 10 s on the GPU machine: other models' lookups are answered meanwhile.
        assert ssd.ask(TierLookup("other"), timeout=5) is None
        assert ssd.ask(TierLookup("a"), timeout=5) is None, "a copy in progress is not a copy"
        release.set()
        assert first.get(timeout=30) == again.get(timeout=30) == str(tmp_path / "ssd" / "a")
        broken = tmp_path / "broken"
        real_copy(source, broken)
        with pytest.raises(CheckpointError):
            store(ssd, "b", str(broken)).get(timeout=30)
        assert sorted(p.name for p in (tmp_path / "ssd").iterdir() if not p.name.startswith(".bandwidth")) == ["a"]
    finally:
        release.set()
        ssd.stop()
