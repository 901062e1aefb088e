"""The model repository over HTTP: parallel range requests against real servers on 127.0.0.1 (one with Range, the
standard library's without), a connection dropped midway and resumed, a corrupt byte (a checksum error, nothing
left behind), the allow-list, an auth header; and a cold start through a cluster from an http:// source, token for
token the same as from the local path."""

from __future__ import annotations

import json
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest
import torch

from sllm_actors.storage import CheckpointError, FetchError, HttpCheckpointFetch, convert, load_state_dict
from sllm_eval.repository_server import Faults, serve

from .conftest import REPO, RunningCluster

CHUNK = 64 << 10
"""The test checkpoint's checksum chunk (the format's default, 8 MiB, is larger than the tiny model): several
chunks and several ranges per partition."""
PROMPT = "The capital of France is"


def _rechunk(path: Path, chunk: int) -> None:
    """Re-checksum a checkpoint's partitions per ``chunk`` bytes (its index says so): what a larger model has."""
    index = json.loads((path / "index.json").read_text())
    for part in index["partitions"]:
        data = (path / part["file"]).read_bytes()
        part["checksums"] = [zlib.crc32(data[i:i + chunk]) for i in range(0, len(data), chunk)]
    index["checksum"]["chunk_bytes"] = chunk
    (path / "index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module")
def repo(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository directory holding ``tiny/``, the tiny model in our format, checksummed per 64 KiB."""
    root = tmp_path_factory.mktemp("http-repo")
    convert(str(tiny_model), str(root / "tiny"))
    _rechunk(root / "tiny", CHUNK)
    assert (root / "tiny" / "data_0.bin").stat().st_size > 4 * CHUNK
    return root


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


def test_parallel_ranges_load_as_they_arrive(repo: Path, tmp_path: Path) -> None:
    faults = Faults(hold={"tiny/data_0.bin": 5 * CHUNK})
    with serve(repo, faults=faults) as server:
        fetch = HttpCheckpointFetch(server.url + "tiny/", tmp_path / "out", connections=3,
                                    range_bytes=2 * CHUNK).start()
        try:
            assert fetch.ranged
            # The first chunks are readable while a later range is held back by the server: a load starts on
            # what has arrived, not after the whole fetch.
            fetch.wait(0, 0, 2 * CHUNK)
            assert not fetch.done
        finally:
            faults.release.set()
        loaded = load_state_dict(fetch.path, arrival=fetch)
        assert fetch.result(30) == tmp_path / "out"
    _same(loaded, load_state_dict(repo / "tiny"))
    ranges = [r for p, r in server.requests if p == "/tiny/data_0.bin"]
    size = (repo / "tiny" / "data_0.bin").stat().st_size
    assert len(ranges) == -(-size // (2 * CHUNK)) and len(set(ranges)) == len(ranges), ranges
    assert all(r.startswith("bytes=") for r in ranges)
    assert fetch.nbytes == sum(p.stat().st_size for p in (repo / "tiny").glob("data_*.bin"))
    assert {p.name for p in (tmp_path / "out").iterdir()} == {p.name for p in (repo / "tiny").iterdir()}


def test_a_server_that_ignores_range_is_read_whole(repo: Path, tmp_path: Path) -> None:
    # The standard library's SimpleHTTPRequestHandler answers every GET with 200 and the whole file.
    with serve(repo, ranges=False) as server:
        fetch = HttpCheckpointFetch(server.url + "tiny", tmp_path / "out", range_bytes=CHUNK).start()
        loaded = load_state_dict(fetch.path, arrival=fetch)
        fetch.result(30)
    assert not fetch.ranged
    _same(loaded, load_state_dict(repo / "tiny"))


def test_a_dropped_connection_is_resumed_from_the_missing_byte(repo: Path, tmp_path: Path) -> None:
    drop_at = 3 * CHUNK + 1000  # midway through a checksum chunk
    faults = Faults(drop_once={"tiny/data_0.bin": drop_at})
    with serve(repo, faults=faults) as server:
        fetch = HttpCheckpointFetch(server.url + "tiny/", tmp_path / "out", range_bytes=2 * CHUNK).start()
        loaded = load_state_dict(fetch.path, arrival=fetch)
        fetch.result(30)
    assert faults.dropped == ["tiny/data_0.bin"] and fetch.drops == 1
    assert ("/tiny/data_0.bin", f"bytes={drop_at}-{4 * CHUNK - 1}") in server.requests, server.requests
    _same(loaded, load_state_dict(repo / "tiny"))


def test_a_connection_that_keeps_dropping_gives_up_with_a_clear_error(repo: Path, tmp_path: Path) -> None:
    faults = Faults(drop_once={"tiny/data_0.bin": CHUNK + 10}, drop_times=100)
    with serve(repo, faults=faults) as server:
        fetch = HttpCheckpointFetch(server.url + "tiny/", tmp_path / "out", range_bytes=2 * CHUNK, tries=3).start()
        with pytest.raises(FetchError, match=r"data_0\.bin: bytes .* gave up after 3 tries"):
            load_state_dict(fetch.path, arrival=fetch)
        with pytest.raises(FetchError):
            fetch.result(30)
    assert len(faults.dropped) == 3
    assert not (tmp_path / "out").exists(), "a failed fetch leaves nothing behind"


def test_a_corrupt_byte_fails_the_fetch_naming_the_file_and_leaves_nothing(repo: Path, tmp_path: Path) -> None:
    faults = Faults(corrupt={"tiny/data_0.bin": 2 * CHUNK + 7})
    with serve(repo, faults=faults) as server:
        fetch = HttpCheckpointFetch(server.url + "tiny/", tmp_path / "out", range_bytes=2 * CHUNK).start()
        with pytest.raises(CheckpointError, match=r"tiny/data_0\.bin: checksum mismatch in bytes \[131072, 196608\)"):
            load_state_dict(fetch.path, arrival=fetch)
        with pytest.raises(CheckpointError) as err:
            fetch.result(30)
    assert err.value.path == server.url + "tiny/data_0.bin" and err.value.tensors
    assert not (tmp_path / "out").exists()


def test_an_auth_header_is_sent_and_its_absence_is_a_clear_error(repo: Path, tmp_path: Path) -> None:
    faults = Faults(require_header=("Authorization", "Bearer s3cret"))
    with serve(repo, faults=faults) as server:
        with pytest.raises(FetchError, match=r"index\.json: the repository refused the request \(HTTP 401 "
                                             r"Unauthorized\): it wants an auth header"):
            HttpCheckpointFetch(server.url + "tiny/", tmp_path / "none").start()
        assert not (tmp_path / "none").exists()
        with pytest.raises(FetchError, match="its auth header was refused") as err:
            HttpCheckpointFetch(server.url + "tiny/", tmp_path / "wrong",
                                headers={"Authorization": "Bearer wr0ng"}).start()
        assert "wr0ng" not in str(err.value)
        fetch = HttpCheckpointFetch(server.url + "tiny/", tmp_path / "out",
                                    headers={"Authorization": "Bearer s3cret"}).start()
        _same(load_state_dict(fetch.path, arrival=fetch), load_state_dict(repo / "tiny"))
        fetch.result(30)


def test_the_allow_list_and_the_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sllm_actors.actors.node.repository_tier import auth_headers
    from sllm_actors.runtime.topology import TopologyError, parse_topology, repository_for

    nodes = [{"name": "n1", "gpus": [{"device": "cpu"}], "ssd": {"path": str(tmp_path / "ssd")}}]
    repos = ["http://127.0.0.1:9/models/",
             {"url": "https://store.example/private", "header": "Authorization", "token_env": "SLLM_TEST_TOKEN"},
             {"url": "https://store.example/filed/", "header": "X-Key", "scheme": "", "token_file": "repo.token"}]
    topo = parse_topology({"nodes": nodes, "repositories": repos,
                           "models": [{"name": "m", "source": "http://127.0.0.1:9/models/tiny"}]},
                          tmp_path / "t.yaml")
    assert topo.models[0].source == "http://127.0.0.1:9/models/tiny/", "a URL stays a URL"
    assert topo.nodes[0].repositories == topo.repositories
    assert [r.url for r in topo.repositories][1] == "https://store.example/private/"
    with pytest.raises(TopologyError, match=r"models\[0\]\.source: http://127.0.0.1:9/other/tiny is outside the "
                                            r"allowed repositories"):
        parse_topology({"nodes": nodes, "repositories": repos,
                        "models": [{"name": "m", "source": "http://127.0.0.1:9/other/tiny"}]}, tmp_path / "t.yaml")
    with pytest.raises(TopologyError, match="needs token_env or token_file"):
        parse_topology({"nodes": nodes, "repositories": [{"url": "https://x.example/", "header": "Authorization"}]},
                       tmp_path / "t.yaml")
    assert repository_for("http://127.0.0.1:9/models/../secret/", topo.repositories) is None
    assert repository_for("http://127.0.0.1:9/modelsX/", topo.repositories) is None
    assert repository_for("https://store.example/private/a/", topo.repositories) is topo.repositories[1]

    # The token is read on the node when it fetches; an error says where it should be, never what it is.
    assert auth_headers(topo.repositories[0]) == {}
    monkeypatch.delenv("SLLM_TEST_TOKEN", raising=False)
    with pytest.raises(FetchError, match="environment variable SLLM_TEST_TOKEN, which is not set"):
        auth_headers(topo.repositories[1])
    monkeypatch.setenv("SLLM_TEST_TOKEN", "t0ken")
    assert auth_headers(topo.repositories[1]) == {"Authorization": "Bearer t0ken"}
    monkeypatch.setenv("SLLM_HOME", str(tmp_path / "home"))
    with pytest.raises(FetchError, match="needs a token in .*repo.token"):
        auth_headers(topo.repositories[2])
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "repo.token").write_text("k3y\n")
    assert auth_headers(topo.repositories[2]) == {"X-Key": "k3y"}


def _generate(cluster: RunningCluster, model: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "generate", model, PROMPT, "--max-tokens", "6", "--json",
         "--cluster", cluster.endpoint],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr + "".join(cluster.lines[-40:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _tiers_holding(st: dict[str, Any], model: str) -> set[str]:
    return {t["tier"] for t in st["tiers"] if model in t.get("models", [])}


def test_a_cold_start_from_an_http_repository(cluster_factory: Any, repo: Path, tmp_path: Path) -> None:
    from sllm_actors.client import RequestError

    faults = Faults(require_header=("Authorization", "Bearer s3cret"))
    with serve(repo, faults=faults) as server:
        cluster = cluster_factory(
            # 2 GiB: the controller does not read a URL's index, so it plans a URL model's first load at the
            # scheduler's size for a model it cannot measure (1 GiB), until a node reports the real size.
            {"local": repo / "tiny", "remote": server.url + "tiny/"}, nodes=1, memory="2GiB",
            extra={"repositories": [{"url": server.url, "header": "Authorization", "token_env": "SLLM_TEST_REPO"}]},
            env={"SLLM_TEST_REPO": "s3cret"},
        )
        local = _generate(cluster, "local")
        remote = _generate(cluster, "remote")
        assert remote["cold_start"]["tier"] == "repository", remote
        assert remote["token_ids"] == local["token_ids"] and len(remote["token_ids"]) == 6
        assert any(p == "/tiny/data_0.bin" and r.startswith("bytes=") for p, r in server.requests)
        # Behind the load: the fetch whole into the SSD tier, then DRAM; the staging copy gone; the repository
        # tier's bandwidth measured from the fetch.
        st = cluster.wait_for(lambda st: {"ssd", "dram"} <= _tiers_holding(st, "remote") and st, 60,
                              "remote in the SSD and DRAM tiers")
        repository = next(t for t in st["tiers"] if t["tier"] == "repository")
        assert repository["bandwidth"] > 0, repository
        staging = tmp_path / "ssd-1.http"
        assert not staging.exists() or not list(staging.iterdir()), list(staging.iterdir())

        with cluster.client() as c:
            assert "deployed" in c.deploy("deployed", server.url + "tiny")
            with pytest.raises(RequestError, match="outside the allowed repositories"):
                c.deploy("elsewhere", "http://127.0.0.1:9/tiny/")
            sources = {m["name"]: m["source"] for m in c.status()["models"]}
            assert sources.get("deployed") == server.url + "tiny/", sources
        assert _generate(cluster, "deployed")["token_ids"] == local["token_ids"]


def test_a_corrupt_or_refused_fetch_through_a_cluster_fails_clearly_and_leaves_nothing(
    cluster_factory: Any, repo: Path, tmp_path: Path
) -> None:
    from sllm_actors.client import RequestError

    faults = Faults(corrupt={"tiny/data_0.bin": 3 * CHUNK + 5})
    with serve(repo, faults=faults) as server, serve(repo, faults=Faults(require_header=("X-Key", "k"))) as locked:
        cluster = cluster_factory({"bad": server.url + "tiny/", "locked": locked.url + "tiny/", "good": repo / "tiny"},
                                  nodes=1, memory="2GiB", extra={"repositories": [server.url, locked.url]})
        with cluster.client() as c:
            with pytest.raises(RequestError) as info:
                c.complete("bad", PROMPT, max_tokens=4)
            assert info.value.code == "load_failed"
            assert "tiny/data_0.bin: checksum mismatch" in info.value.message, info.value.message
            with pytest.raises(RequestError) as info:
                c.complete("locked", PROMPT, max_tokens=4)
            assert "refused the request (HTTP 401" in info.value.message, info.value.message
            assert len(c.complete("good", PROMPT, max_tokens=4).token_ids) == 4
        # The good model's copies arriving in SSD and DRAM tells that the tiers have settled after the bad ones.
        cluster.wait_for(lambda st: {"ssd", "dram"} <= _tiers_holding(st, "good"), 60, "good in SSD and DRAM")
    root = cluster.topology.parent
    assert sorted(p.name for p in (root / "ssd-1").iterdir() if not p.name.startswith(".bandwidth")) == ["good"]
    assert sorted(p.name for p in (root / "ssd-1.dram").iterdir()) == ["good"]
    assert not list((root / "ssd-1.http").iterdir()), "no staging copy is left"
