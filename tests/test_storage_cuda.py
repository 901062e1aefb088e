"""The CUDA paths of the loader (pinned ring + side streams, DRAM tier -> device). Skipped without a GPU."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from sllm_actors import storage
from sllm_actors.storage import CheckpointError
from sllm_eval.tiny_configs import MODEL_KINDS, greedy, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

MiB = 1 << 20


def _mixed_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 384, generator=g)
    sd: dict[str, torch.Tensor] = {
        "base": base,
        "base_t": base.t(),
        "base_rows": base[10:20],
        "base_strided": base[1::3, 2::5],
        "alias": base,
        "bf16": torch.randn(3 * MiB, generator=g).to(torch.bfloat16),  # several read chunks
        "f16": torch.randn(777, 33, generator=g).to(torch.float16),
        "i64": torch.randint(-1000, 1000, (4097,), generator=g),
        "u8": torch.randint(0, 256, (12345,), dtype=torch.uint8, generator=g),
        "bool": torch.randint(0, 2, (999,), generator=g).bool(),
        "empty": torch.empty(0, 3),
    }
    if hasattr(torch, "float8_e4m3fn"):
        sd["f8"] = torch.randn(1000, generator=g).to(torch.float8_e4m3fn)
    return sd


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape, strides and bits (strides compared before .cpu(), which densifies views)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.stride() != b.stride():
        return False
    a, b = a.contiguous().cpu(), b.contiguous().cpu()
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("direct_io", ["auto", True, False])
@pytest.mark.parametrize("threads", [1, 3, 8])
def test_load_state_dict_to_cuda(tmp_path: Path, direct_io: object, threads: int) -> None:
    sd = _mixed_state_dict()
    storage.save_checkpoint(sd, tmp_path / "ckpt", partition_bytes=6 * MiB)
    assert len(storage.read_index(tmp_path / "ckpt").partitions) >= 2
    stats = storage.LoadStats()
    loaded = storage.load_state_dict(
        tmp_path / "ckpt", "cuda", threads=threads, direct_io=direct_io, chunk_bytes=8 * MiB, stats=stats
    )
    for name, t in sd.items():
        assert loaded[name].device.type == "cuda", name
        assert _same(loaded[name], t), name
    assert loaded["alias"] is loaded["base"]
    assert loaded["base_rows"].data_ptr() == loaded["base"].data_ptr() + 10 * 384 * 4
    if direct_io is True and stats.direct_available:
        assert stats.bytes_direct == stats.bytes


def test_explicit_device_index_and_current_device(tmp_path: Path) -> None:
    storage.save_checkpoint({"w": torch.arange(10.0)}, tmp_path / "ckpt")
    last = torch.cuda.device_count() - 1
    w = storage.load_state_dict(tmp_path / "ckpt", f"cuda:{last}")["w"]
    assert w.device == torch.device("cuda", last) and torch.equal(w.cpu(), torch.arange(10.0))
    assert storage.load_state_dict(tmp_path / "ckpt", "cuda")["w"].device.index == torch.cuda.current_device()


def test_corruption_is_caught_on_the_cuda_path(tmp_path: Path) -> None:
    sd = {f"l{i}": torch.randn(3 * MiB) for i in range(3)}
    storage.save_checkpoint(sd, tmp_path / "ckpt")
    victim = next(e for e in storage.read_index(tmp_path / "ckpt").tensors if e.name == "l2")
    with open(tmp_path / "ckpt" / "data_0.bin", "r+b") as f:
        f.seek(victim.offset + 100)
        byte = f.read(1)
        f.seek(victim.offset + 100)
        f.write(bytes([byte[0] ^ 1]))
    for _ in range(2):  # the ring is reused after a failed load
        with pytest.raises(CheckpointError, match=r"data_0\.bin.*l2"):
            storage.load_state_dict(tmp_path / "ckpt", "cuda", threads=4)
    os.truncate(tmp_path / "ckpt" / "data_0.bin", victim.offset)
    with pytest.raises(CheckpointError, match="truncated"):
        storage.load_state_dict(tmp_path / "ckpt", "cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_load_model_on_cuda(tmp_path: Path, kind: str, dtype: torch.dtype) -> None:
    source = tiny_model(kind, dtype)
    storage.save_checkpoint(source, tmp_path / "ckpt")
    loaded = storage.load_model(tmp_path / "ckpt", "cuda")
    assert all(p.device.type == "cuda" for p in loaded.parameters())
    assert all(b.device.type == "cuda" for b in loaded.buffers())
    src_sd = source.state_dict()
    for name, t in loaded.state_dict().items():
        assert _same(t, src_sd[name]), name
    if kind != "llama":
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    source = source.to("cuda")
    prompt = torch.tensor([[1, 17, 42, 99, 7, 250]], device="cuda")
    assert torch.equal(greedy(source, prompt), greedy(loaded, prompt))


@pytest.mark.parametrize("pinned", [True, False])
def test_dram_tier_to_cuda(tmp_path: Path, pinned: bool) -> None:
    sd = _mixed_state_dict()
    storage.save_checkpoint(sd, tmp_path / "ckpt")
    host = storage.load_into_host(tmp_path / "ckpt", pinned=pinned)
    assert host.buffer.is_pinned() is pinned
    for _ in range(2):
        on_gpu = storage.state_dict_from_host(host.buffer, host.index, "cuda")
        for name, t in sd.items():
            assert on_gpu[name].device.type == "cuda" and _same(on_gpu[name], t), name
        assert on_gpu["alias"] is on_gpu["base"]
    raw = storage.copy_host_to_device(host.buffer, "cuda", chunk_bytes=MiB)
    assert torch.equal(raw.cpu(), host.buffer)


def test_pinned_host_buffers_are_released(tmp_path: Path) -> None:
    for _ in range(3):
        buf = storage.alloc_host_buffer(64 * MiB, pinned=True)
        assert buf.is_pinned()
        buf.fill_(7)
        dev = buf.to("cuda", non_blocking=True)
        torch.cuda.synchronize()
        assert int(dev[-1]) == 7
        del buf, dev
        gc.collect()
    storage.release_pinned_buffers()


def test_a_pinned_host_buffer_copies_to_the_device_in_one_piece() -> None:
    # Registering in pieces once broke this: CUDA refuses a copy that spans two registrations.
    buf = storage.alloc_host_buffer(700 * MiB, pinned=True)
    assert buf.is_pinned() and int(buf[-1]) == 0, "faulted in (zeroed) before it was registered"
    buf[::MiB] = 3
    dev = buf.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert int(dev[::MiB].sum()) == 3 * 700 and int(dev[1:MiB].sum()) == 0
    del buf, dev
    gc.collect()


def test_large_load_matches_host_tier(tmp_path: Path) -> None:
    sd = {f"layer{i}": torch.randn(8 * MiB).to(torch.float16) for i in range(6)}  # 96 MiB
    storage.save_checkpoint(sd, tmp_path / "ckpt", partition_bytes=40 * MiB)
    direct = storage.load_state_dict(tmp_path / "ckpt", "cuda")
    via_host = storage.load_into_host(tmp_path / "ckpt").state_dict("cuda")
    for name, t in sd.items():
        assert torch.equal(direct[name].cpu(), t) and torch.equal(via_host[name].cpu(), t), name
