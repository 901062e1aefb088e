"""Cold starts end to end: where a load's time went, the repository fetch pipelined with the load, and
what a bad fetch leaves behind (nothing, in any tier)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.client import RequestError

from .conftest import REPO, RunningCluster

PROMPT = "The capital of France is"


def _converted(tiny_model: Path, dest: Path, **kwargs: Any) -> Path:
    """The tiny model in our format, as a repository would hold it for the pipelined path."""
    from sllm_actors.storage import convert

    convert(str(tiny_model), str(dest), **kwargs)
    return dest


def _generate_json(cluster: RunningCluster, model: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "generate", model, PROMPT, "--max-tokens", "4", "--json",
         "--cluster", cluster.endpoint],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tiers_holding(st: dict[str, Any], model: str) -> set[str]:
    return {t["tier"] for t in st["tiers"] if model in t.get("models", [])}


def test_a_cold_start_reports_where_its_time_went(cluster_factory: Any, tiny_model: Path, tmp_path: Path) -> None:
    from sllm_actors.actors.node.storage_client import SERIAL_PARTS

    repo = _converted(tiny_model, tmp_path / "repo" / "tiny")
    cluster = cluster_factory({"tiny": repo}, nodes=1)
    cold = _generate_json(cluster, "tiny")
    start = cold["cold_start"]
    assert start["tier"] == "repository" and start["node"] == "node-1"
    parts = start["parts"]
    # Our format in the repository: loaded from there while the SSD tier copied it.
    for part in ("lookup", "fetch", "queue", "read", "build", "assign", "kv_pool", "norms", "warmup", "engine"):
        assert isinstance(parts.get(part), float) and parts[part] >= 0, (part, parts)
    assert "store" not in parts, "a source in our format is not converted before the load, nor waited for after it"
    serial = sum(parts[p] for p in SERIAL_PARTS if p in parts)
    assert serial <= start["load_s"] + 1e-6 <= start["wait_s"] + 1e-6 <= cold["ttft_s"] + 1e-6, (start, cold)
    assert parts["read"] > 0 and parts["warmup"] > 0

    cluster.wait_for(lambda st: {"ssd", "dram"} <= _tiers_holding(st, "tiny"), 30, "tiny in the SSD and DRAM tiers")
    warm = _generate_json(cluster, "tiny")
    assert warm["cold_start"] == {}, "a request that found the model loaded waited for no load"
    assert warm["token_ids"] == cold["token_ids"]
    with cluster.client() as c:
        events = c.status()["events"]
    loads = [e for e in events if e["kind"] == "load"]
    assert loads and loads[-1]["data"]["parts"]["warmup"] > 0 and loads[-1]["data"]["parts"]["read"] > 0, loads
    assert [e for e in events if e["kind"] == "store" and e["data"]["model"] == "tiny"], "the copy behind the load"


def test_a_model_loaded_again_skips_the_warm_up(cluster_factory: Any, tiny_model: Path, tmp_path: Path) -> None:
    repo = _converted(tiny_model, tmp_path / "repo" / "tiny")
    cluster = cluster_factory({"tiny": repo}, nodes=1, keep_alive="1s")
    first = _generate_json(cluster, "tiny")
    assert first["cold_start"]["parts"]["warmup"] > 0
    cluster.wait_for(lambda st: "dram" in _tiers_holding(st, "tiny") and not st["instances"], 60,
                     "tiny unloaded and in the DRAM tier")
    again = _generate_json(cluster, "tiny")
    # The same model on the same node: its kernels are loaded and its code known to run on the paged path.
    assert again["cold_start"]["tier"] == "dram" and again["cold_start"]["parts"]["warmup"] == 0, again
    assert again["token_ids"] == first["token_ids"]


def test_a_converted_source_is_stored_before_its_load(cluster_factory: Any, tiny_model: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model}, nodes=1)
    parts = _generate_json(cluster, "tiny")["cold_start"]["parts"]
    assert parts["store"] > 0 and "store_wait" not in parts, parts


def _flip_a_byte_at(path: Path, fraction: float) -> None:
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * fraction)] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("fault", ["corrupt", "truncated"])
def test_a_bad_fetch_fails_clearly_and_leaves_no_copy_in_any_tier(
    cluster_factory: Any, tiny_model: Path, tmp_path: Path, fault: str
) -> None:
    bad = _converted(tiny_model, tmp_path / "repo" / "bad")
    data = sorted(bad.glob("data_*.bin"))[-1]
    if fault == "corrupt":
        _flip_a_byte_at(data, 0.9)
    else:
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    good = _converted(tiny_model, tmp_path / "repo" / "good")
    cluster = cluster_factory({"bad": bad, "good": good}, nodes=1)
    with cluster.client() as c:
        with pytest.raises(RequestError) as info:
            c.complete("bad", PROMPT, max_tokens=4)
        assert info.value.code == "load_failed"
        assert data.name in info.value.message
        assert ("checksum" if fault == "corrupt" else "truncated") in info.value.message
        assert len(c.complete("good", PROMPT, max_tokens=4).token_ids) == 4
    # The good model's copies arriving in SSD and DRAM tells that the tiers have settled after the bad one.
    st = cluster.wait_for(lambda st: st if {"ssd", "dram"} <= _tiers_holding(st, "good") else None, 30,
                          "good in the SSD and DRAM tiers")
    assert _tiers_holding(st, "bad") == set() or _tiers_holding(st, "bad") == {"repository"}, st["tiers"]
    ssd_root = cluster.topology.parent / "ssd-1"
    assert sorted(p.name for p in ssd_root.iterdir() if not p.name.startswith(".bandwidth")) == ["good"]
    dram_meta = cluster.topology.parent / "ssd-1.dram"
    assert sorted(p.name for p in dram_meta.iterdir()) == ["good"]


def test_copying_a_checkpoint_that_breaks_midway_leaves_nothing(tiny_model: Path, tmp_path: Path) -> None:
    from sllm_actors.storage import CheckpointError, copy_checkpoint, load_state_dict

    # Small partitions: the copy has written the first ones when it reaches the bad last one.
    src = _converted(tiny_model, tmp_path / "src", partition_bytes=64 * 1024)
    parts = sorted(src.glob("data_*.bin"))
    assert len(parts) >= 3
    good = tmp_path / "good"
    copy_checkpoint(src, good, threads=1)
    expected = load_state_dict(src)
    for name, tensor in load_state_dict(good).items():
        assert tensor.equal(expected[name]), name

    _flip_a_byte_at(parts[-1], 0.5)
    dest = tmp_path / "copy"
    with pytest.raises(CheckpointError) as info:
        copy_checkpoint(src, dest, threads=1)
    assert parts[-1].name in str(info.value)
    assert not dest.exists()
