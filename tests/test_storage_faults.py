"""Damaged and unfinished checkpoints are detected before any weight is served."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sllm_actors import storage
from sllm_actors.storage import CheckpointError
from sllm_eval.tiny_configs import tiny_model

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _layers(n: int, numel: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return {f"layer{i}.weight": torch.randn(numel, generator=g) for i in range(n)}


def _entry(path: Path, name: str) -> storage.TensorEntry:
    return next(e for e in storage.read_index(path).tensors if e.name == name)


def _flip_byte(file: Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def _all_loaders(path: Path) -> list[object]:
    return [
        lambda: storage.load_state_dict(path),
        lambda: storage.load_state_dict(path, direct_io=False, threads=1),
        lambda: storage.load_into_host(path, pinned=False),
        lambda: storage.verify_checkpoint(path),
    ]


def test_flipped_byte_names_file_and_tensor(tmp_path: Path) -> None:
    # Three 12 MiB tensors: each spans its own checksum chunks, so the report can be precise.
    sd = _layers(3, 3 * MiB)
    ckpt = tmp_path / "ckpt"
    storage.save_checkpoint(sd, ckpt)
    victim = _entry(ckpt, "layer1.weight")
    _flip_byte(ckpt / "data_0.bin", victim.offset + victim.nbytes // 2)

    for load in _all_loaders(ckpt):
        with pytest.raises(CheckpointError) as info:
            load()  # type: ignore[operator]
        message = str(info.value)
        assert "data_0.bin" in message and "layer1.weight" in message
        assert "layer0.weight" not in message and "layer2.weight" not in message
        assert info.value.tensors == ["layer1.weight"]
        assert info.value.path is not None and info.value.path.endswith("data_0.bin")
    # The check is what catches it: without it the corrupted bytes load silently.
    loaded = storage.load_state_dict(ckpt, verify=False)
    assert not torch.equal(loaded["layer1.weight"], sd["layer1.weight"])
    assert torch.equal(loaded["layer0.weight"], sd["layer0.weight"])


def test_flipped_byte_in_a_small_model(tmp_path: Path) -> None:
    model = tiny_model("gpt2")
    ckpt = tmp_path / "ckpt"
    storage.save_checkpoint(model, ckpt, partition_bytes=64 * 1024)
    victim = _entry(ckpt, "transformer.h.1.mlp.c_fc.weight")
    part = storage.read_index(ckpt).partitions[victim.partition].file
    _flip_byte(ckpt / part, victim.offset + 5)
    with pytest.raises(CheckpointError) as info:
        storage.load_model(ckpt)
    assert part in str(info.value) and "transformer.h.1.mlp.c_fc.weight" in str(info.value)


def test_truncated_partition_names_file_and_lost_tensors(tmp_path: Path) -> None:
    sd = _layers(4, 256 * 1024)  # 1 MiB each
    ckpt = tmp_path / "ckpt"
    storage.save_checkpoint(sd, ckpt)
    cut = _entry(ckpt, "layer2.weight").offset + 1000
    os.truncate(ckpt / "data_0.bin", cut)
    for load in [*_all_loaders(ckpt), lambda: storage.load_state_dict(ckpt, verify=False)]:
        with pytest.raises(CheckpointError) as info:
            load()  # type: ignore[operator]
        message = str(info.value)
        assert "data_0.bin" in message and "truncated" in message
        assert "layer2.weight" in message and "layer3.weight" in message
        assert "layer0.weight" not in message and "layer1.weight" not in message


def test_missing_partition(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    storage.save_checkpoint(_layers(3, 2048), ckpt, partition_bytes=8192)
    (ckpt / "data_1.bin").unlink()
    with pytest.raises(CheckpointError, match=r"data_1\.bin.*missing.*layer1\.weight"):
        storage.load_state_dict(ckpt)


def test_damaged_index(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    storage.save_checkpoint(_layers(2, 100), ckpt)
    index_path = ckpt / "index.json"
    good = index_path.read_text()

    index_path.write_text(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="index.json"):
        storage.load_state_dict(ckpt)

    data = json.loads(good)
    data["tensors"][1]["shape"] = [10_000]  # a view reaching past its stored bytes
    index_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="layer1.weight"):
        storage.load_state_dict(ckpt)

    data = json.loads(good)
    data["tensors"][0]["dtype"] = "float7"
    index_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="float7"):
        storage.load_state_dict(ckpt)

    data = json.loads(good)
    data["format_version"] = 99
    index_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="newer"):
        storage.load_state_dict(ckpt)


def test_crash_mid_write_leaves_no_checkpoint(tmp_path: Path) -> None:
    """A writer killed mid-way (no cleanup possible) leaves only a temporary directory."""
    dest = tmp_path / "ckpt"
    script = textwrap.dedent(f"""
        import os, torch
        from sllm_actors.storage import format as fmt
        written = []
        original = fmt._blob_bytes
        def dying(blob):
            written.append(blob)
            if len(written) == 3:
                os._exit(9)  # like SIGKILL: no finally blocks, no cleanup
            return original(blob)
        fmt._blob_bytes = dying
        sd = {{f"t{{i}}": torch.ones(20000) * i for i in range(6)}}
        fmt.save_checkpoint(sd, {str(dest)!r}, partition_bytes=100_000)
    """)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, timeout=300, check=False
    )
    assert proc.returncode == 9, proc.stderr.decode()
    assert not dest.exists()
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith("ckpt.tmp-")
    assert any(p.name.startswith("data_") for p in leftovers[0].iterdir())
    assert not storage.is_checkpoint(leftovers[0])
    assert not storage.is_checkpoint(dest)
    with pytest.raises(CheckpointError, match="temporary"):
        storage.load_state_dict(leftovers[0])
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        storage.load_state_dict(dest)
    # Even with an index present, a temporary directory is never taken for a checkpoint.
    (leftovers[0] / "index.json").write_text("{}")
    assert not storage.is_checkpoint(leftovers[0])


def test_disk_full_mid_write_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sllm_actors.storage import format as fmt

    calls = {"n": 0}
    original = fmt._ChecksummingWriter.write

    def failing_write(self: object, data: memoryview) -> None:
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(self, data)  # type: ignore[arg-type]

    monkeypatch.setattr(fmt._ChecksummingWriter, "write", failing_write)
    with pytest.raises(OSError, match="No space"):
        storage.save_checkpoint(_layers(6, 1000), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sllm_actors.storage import format as fmt

    ckpt = tmp_path / "ckpt"
    old = _layers(2, 100)
    storage.save_checkpoint(old, ckpt)

    def broken(blob: object) -> memoryview:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(fmt, "_blob_bytes", broken)
    with pytest.raises(OSError):
        storage.save_checkpoint(_layers(3, 50), ckpt, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = storage.load_state_dict(ckpt)
    assert loaded.keys() == old.keys() and all(torch.equal(loaded[k], old[k]) for k in old)


def test_removed_index_means_not_a_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    storage.save_checkpoint(_layers(1, 10), ckpt)
    assert storage.is_checkpoint(ckpt)
    (ckpt / "index.json").unlink()
    assert not storage.is_checkpoint(ckpt)
    with pytest.raises(CheckpointError):
        storage.verify_checkpoint(ckpt)
