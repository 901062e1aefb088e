"""The checkpoint format and loader on plain state dicts: every dtype, views, layout, I/O modes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sllm_actors import storage
from sllm_actors.storage.format import (
    CHECKSUM_CHUNK_BYTES,
    PARTITION_ALIGNMENT,
    STORABLE_DTYPES,
    TENSOR_ALIGNMENT,
)


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns of any dtype (no arithmetic needed, so float8/float4/bool work too)."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    """The logical contents of ``t`` as raw bytes (bit-exact, NaN-safe)."""
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t).reshape(-1).view(torch.uint8)


def _assert_same(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    assert a.dtype == b.dtype, name
    assert a.shape == b.shape, name
    assert a.stride() == b.stride(), name
    assert torch.equal(_bytes_of(a), _bytes_of(b)), name


def _all_dtypes_state_dict() -> dict[str, torch.Tensor]:
    sd = {}
    for i, (name, dtype) in enumerate(sorted(STORABLE_DTYPES.items())):
        sd[f"{name}.matrix"] = _random((7, 13), dtype, seed=i)
        sd[f"{name}.scalar"] = _random((), dtype, seed=100 + i)
    return sd


def test_every_dtype_round_trips(tmp_path: Path) -> None:
    expected = {
        "bfloat16",
        "float16",
        "float32",
        "float64",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
    }
    assert expected <= STORABLE_DTYPES.keys()
    sd = _all_dtypes_state_dict()
    storage.save_checkpoint(sd, tmp_path / "ckpt")
    for direct_io in ("auto", True, False):
        loaded = storage.load_state_dict(tmp_path / "ckpt", direct_io=direct_io)
        assert list(loaded) == list(sd)
        for name, t in sd.items():
            _assert_same(loaded[name], t, name)


def test_bfloat16_bits_survive_including_nan_and_subnormals(tmp_path: Path) -> None:
    patterns = [0x7FC1, 0xFF81, 0x0001, 0x8001, 0x7F80, 0x3F80, 0x0000, 0x8000]
    bits = torch.tensor([p - 0x10000 if p >= 0x8000 else p for p in patterns], dtype=torch.int16)
    t = bits.view(torch.bfloat16)
    storage.save_checkpoint({"w": t}, tmp_path / "ckpt")
    assert torch.equal(storage.load_state_dict(tmp_path / "ckpt")["w"].view(torch.int16), bits)


def test_views_non_contiguous_and_storage_offsets(tmp_path: Path) -> None:
    base = _random((64, 48), torch.float32, seed=1)
    other = _random((10, 10), torch.float16, seed=2)
    sd = {
        "base": base,
        "transposed": base.t(),
        "row_slice": base[5:9],
        "strided": base[1::3, 2::5],
        "column": base[:, 7],
        "scalar_view": base[3, 4],
        "alias": base,
        "half_t": other.t()[2:],
        "empty": torch.empty(0, 5),
        "empty_view": base[4:4],
        "expanded": torch.arange(6, dtype=torch.int64).expand(4, 6),
    }
    storage.save_checkpoint(sd, tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "index.json").read_text())
    by_name = {t["name"]: t for t in index["tensors"]}
    assert by_name["strided"]["storage_offset"] == 1 * 48 + 2
    assert by_name["alias"]["tied_to"] == "base"
    assert by_name["expanded"]["stride"] == [0, 1]
    # One blob for all the views of `base`.
    assert (
        len(
            {
                (t["partition"], t["offset"])
                for t in index["tensors"]
                if t["nbytes"] and t["name"] not in ("half_t", "expanded")
            }
        )
        == 1
    )

    loaded = storage.load_state_dict(tmp_path / "ckpt")
    for name, t in sd.items():
        _assert_same(loaded[name], t, name)
        assert loaded[name].storage_offset() >= 0
    assert loaded["alias"] is loaded["base"]
    # Views still share memory after loading, as they did before saving.
    assert loaded["row_slice"].data_ptr() == loaded["base"].data_ptr() + 5 * 48 * 4
    loaded["base"][6, 0] = 12345.0
    assert loaded["row_slice"][1, 0].item() == 12345.0


def test_slice_of_a_large_storage_stores_only_the_slice(tmp_path: Path) -> None:
    big = torch.zeros(1 << 20)
    info = storage.save_checkpoint({"piece": big[1000:1010]}, tmp_path / "ckpt")
    assert info.tensor_bytes <= 10 * 4 + 16
    assert torch.equal(storage.load_state_dict(tmp_path / "ckpt")["piece"], big[1000:1010])


def test_layout_alignment_and_partitions(tmp_path: Path) -> None:
    sd = {f"t{i}": _random((1000 + 37 * i,), torch.float16, seed=i) for i in range(12)}
    sd["odd"] = _random((3,), torch.int8, seed=99)
    partition_bytes = 8192
    info = storage.save_checkpoint(sd, tmp_path / "ckpt", partition_bytes=partition_bytes)
    index = storage.read_index(tmp_path / "ckpt")
    assert info.num_partitions == len(index.partitions) > 3
    for p in index.partitions:
        size = os.path.getsize(tmp_path / "ckpt" / p.file)
        assert size == p.nbytes and size % PARTITION_ALIGNMENT == 0
        assert len(p.checksums) == -(-size // CHECKSUM_CHUNK_BYTES)
    for e in index.tensors:
        assert e.offset % TENSOR_ALIGNMENT == 0
        assert e.offset + e.nbytes <= max(partition_bytes, e.nbytes)
    loaded = storage.load_state_dict(tmp_path / "ckpt", threads=3)
    for name, t in sd.items():
        _assert_same(loaded[name], t, name)
    # One allocation holds everything.
    ptrs = sorted(t.data_ptr() for t in loaded.values())
    assert ptrs[-1] - ptrs[0] < index.total_bytes


def test_tensor_larger_than_a_partition_gets_its_own(tmp_path: Path) -> None:
    sd = {"small": torch.ones(10), "big": _random((5000,), torch.float32, seed=3), "after": torch.zeros(3)}
    storage.save_checkpoint(sd, tmp_path / "ckpt", partition_bytes=4096)
    index = storage.read_index(tmp_path / "ckpt")
    assert [e.partition for e in index.tensors] == [0, 1, 2]
    loaded = storage.load_state_dict(tmp_path / "ckpt")
    for name, t in sd.items():
        _assert_same(loaded[name], t, name)


@pytest.mark.parametrize("chunk_bytes", [1, CHECKSUM_CHUNK_BYTES, 3 * CHECKSUM_CHUNK_BYTES])
@pytest.mark.parametrize("threads", [1, 4])
def test_multi_chunk_checkpoint_with_threads_and_io_modes(
    tmp_path: Path, chunk_bytes: int, threads: int
) -> None:
    # ~40 MiB across 2 partitions: several read chunks and checksum chunks per partition.
    sd = {
        f"layer{i}": _random((1 << 20,), torch.float16 if i % 2 else torch.float32, seed=i) for i in range(14)
    }
    storage.save_checkpoint(sd, tmp_path / "ckpt", partition_bytes=24 << 20)
    assert len(storage.read_index(tmp_path / "ckpt").partitions) == 2
    for direct_io in ("auto", True, False):
        stats = storage.LoadStats()
        loaded = storage.load_state_dict(
            tmp_path / "ckpt", threads=threads, chunk_bytes=chunk_bytes, direct_io=direct_io, stats=stats
        )
        for name, t in sd.items():
            assert torch.equal(loaded[name].view(torch.uint8), t.view(torch.uint8)), (name, direct_io)
        assert stats.bytes_direct + stats.bytes_buffered == stats.bytes
        if direct_io is False:
            assert stats.bytes_direct == 0
        elif direct_io is True and stats.direct_available:
            assert stats.bytes_direct == stats.bytes


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_auto_io_reads_cached_pages_buffered_and_the_rest_direct(tmp_path: Path) -> None:
    sd = {"w": _random((8 << 20,), torch.float32, seed=5)}  # 32 MiB: 4 chunks of 8 MiB
    storage.save_checkpoint(sd, tmp_path / "ckpt")
    stats = storage.LoadStats()
    storage.load_state_dict(tmp_path / "ckpt", stats=stats, direct_io=True)
    if not stats.direct_available:
        pytest.skip("this file system refuses O_DIRECT")
    data = tmp_path / "ckpt" / "data_0.bin"

    _evict(data)
    cold = storage.LoadStats()
    _assert_same(
        storage.load_state_dict(tmp_path / "ckpt", stats=cold, chunk_bytes=8 << 20)["w"], sd["w"], "w"
    )
    assert cold.bytes_direct > cold.bytes * 0.9

    # Cache the first 12 MiB only: chunk 0 is all cached, chunk 1 half, chunks 2-3 not at all. The kernel may
    # reclaim cached pages on its own between two loads (proactive reclaim runs on these VMs): a round whose
    # cache state changed underneath is tried again, a loader that misreads it fails every round.
    for attempt in range(3):
        _evict(data)
        with open(data, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_RANDOM)  # no readahead: cache exactly what is read
            f.read(12 << 20)
        mixed = storage.LoadStats()
        _assert_same(
            storage.load_state_dict(tmp_path / "ckpt", stats=mixed, chunk_bytes=8 << 20)["w"], sd["w"], "w"
        )
        warm = storage.LoadStats()
        _assert_same(storage.load_state_dict(tmp_path / "ckpt", stats=warm)["w"], sd["w"], "w")
        if (mixed.bytes_buffered, warm.bytes_buffered) == (12 << 20, 12 << 20) or attempt == 2:
            break
    assert mixed.bytes_buffered == 12 << 20, mixed
    assert mixed.bytes_direct == mixed.bytes - mixed.bytes_buffered
    # Direct reads do not populate the page cache, so only what was cached before is served from it.
    assert warm.bytes_buffered == 12 << 20, warm

    with open(data, "rb") as f:
        f.read()
    hot = storage.LoadStats()
    storage.load_state_dict(tmp_path / "ckpt", stats=hot)
    assert hot.bytes_direct == 0


def test_empty_state_dict(tmp_path: Path) -> None:
    info = storage.save_checkpoint({}, tmp_path / "ckpt")
    assert info.num_partitions == 0 and info.total_bytes == 0
    assert storage.load_state_dict(tmp_path / "ckpt") == {}
    storage.verify_checkpoint(tmp_path / "ckpt")


def test_checkpoint_size_and_info(tmp_path: Path) -> None:
    w = torch.ones(100, 10)
    info = storage.save_checkpoint({"a": w, "b": w, "c": torch.ones(3, dtype=torch.int64)}, tmp_path / "ckpt")
    assert storage.checkpoint_size(tmp_path / "ckpt") == info.tensor_bytes == 100 * 10 * 4 + 3 * 8
    assert info.dtypes == {"float32": 2 * 4000, "int64": 24}
    assert info.total_bytes == storage.read_index(tmp_path / "ckpt").total_bytes == 8192


def test_existing_destination(tmp_path: Path) -> None:
    storage.save_checkpoint({"x": torch.ones(3)}, tmp_path / "ckpt")
    with pytest.raises(FileExistsError):
        storage.save_checkpoint({"x": torch.zeros(3)}, tmp_path / "ckpt")
    storage.save_checkpoint({"x": torch.zeros(3)}, tmp_path / "ckpt", overwrite=True)
    assert torch.equal(storage.load_state_dict(tmp_path / "ckpt")["x"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_rejects_what_cannot_be_stored(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="meta"):
        storage.save_checkpoint({"m": torch.empty(3, device="meta")}, tmp_path / "a")
    with pytest.raises(ValueError, match="strided"):
        storage.save_checkpoint({"s": torch.eye(3).to_sparse()}, tmp_path / "b")
    with pytest.raises(TypeError):
        storage.save_checkpoint({"n": 3}, tmp_path / "c")  # type: ignore[dict-item]
    assert not any(tmp_path.iterdir())


def test_host_tier_round_trip(tmp_path: Path) -> None:
    sd = {"a": _random((300, 7), torch.bfloat16, seed=1), "b": _random((5,), torch.int32, seed=2)}
    sd["a_again"] = sd["a"]
    storage.save_checkpoint(sd, tmp_path / "ckpt")
    host = storage.load_into_host(tmp_path / "ckpt", pinned=False)
    assert host.buffer.dtype == torch.uint8 and host.nbytes == host.index.total_bytes
    assert host.buffer.data_ptr() % 4096 == 0

    views = storage.state_dict_from_host(host.buffer, host.index, "cpu")
    for name, t in sd.items():
        _assert_same(views[name], t, name)
    assert views["a_again"] is views["a"]
    # Zero-copy on CPU: the tensors live in the host buffer ...
    lo, hi = host.buffer.data_ptr(), host.buffer.data_ptr() + host.nbytes
    assert all(lo <= t.data_ptr() < hi for t in views.values())
    # ... unless a private copy is asked for.
    private = host.state_dict("cpu", copy=True)
    for name, t in sd.items():
        _assert_same(private[name], t, name)
    assert not any(lo <= t.data_ptr() < hi for t in private.values())

    with pytest.raises(ValueError):
        storage.state_dict_from_host(host.buffer[:-4096], host.index, "cpu")


def test_views_outlive_the_loader(tmp_path: Path) -> None:
    import gc

    sd = {"w": _random((1 << 18,), torch.float32, seed=8)}
    storage.save_checkpoint(sd, tmp_path / "ckpt")
    w = storage.load_state_dict(tmp_path / "ckpt")["w"]
    gc.collect()
    _assert_same(w, sd["w"], "w")


def test_gpu_unavailable_is_a_clear_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    storage.save_checkpoint({"x": torch.ones(2)}, tmp_path / "ckpt")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        storage.load_state_dict(tmp_path / "ckpt", "cuda:0")


def test_mmap_load_is_zero_copy_and_verified(tmp_path: Path) -> None:
    sd = _all_dtypes_state_dict()
    sd["big"] = _random((3 << 20,), torch.float32, seed=4)  # several checksum chunks
    sd["big_view"] = sd["big"][100:200]
    storage.save_checkpoint(sd, tmp_path / "ckpt", partition_bytes=4 << 20)
    stats = storage.LoadStats()
    loaded = storage.load_state_dict(tmp_path / "ckpt", mmap=True, stats=stats)
    assert stats.bytes == storage.read_index(tmp_path / "ckpt").total_bytes
    for name, t in sd.items():
        _assert_same(loaded[name], t, name)
    assert loaded["big_view"].data_ptr() == loaded["big"].data_ptr() + 400
    # Private mapping: writes stay in this process, the file is untouched.
    loaded["big"][0] = 1.5
    again = storage.load_state_dict(tmp_path / "ckpt", mmap=True)
    _assert_same(again["big"], sd["big"], "big")

    victim = next(e for e in storage.read_index(tmp_path / "ckpt").tensors if e.name == "big")
    part = storage.read_index(tmp_path / "ckpt").partitions[victim.partition].file
    with open(tmp_path / "ckpt" / part, "r+b") as f:
        f.seek(victim.offset + 12345)
        b = f.read(1)
        f.seek(victim.offset + 12345)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(storage.CheckpointError, match=rf"{part}.*big"):
        storage.load_state_dict(tmp_path / "ckpt", mmap=True)
    with pytest.raises(ValueError, match="CPU"):
        storage.load_state_dict(tmp_path / "ckpt", "cuda", mmap=True)


def test_mmap_load_model(tmp_path: Path) -> None:
    from sllm_eval.tiny_configs import greedy, tiny_model

    source = tiny_model("gpt2", torch.bfloat16)
    storage.save_checkpoint(source, tmp_path / "ckpt")
    loaded = storage.load_model(tmp_path / "ckpt", mmap=True)
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(greedy(source, prompt), greedy(loaded, prompt))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
