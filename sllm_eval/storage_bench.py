"""Checkpoint-loading benchmark: our format and loader against the hardware's ceilings and against
safetensors and torch.load, on one device, in one run.

Everything is measured on one random-weight fp16 checkpoint shaped like a 7B Llama's layers
(q/k/v/o of 4096x4096, gate/up/down of 4096x11008, repeated until the asked size), saved in our
format, as safetensors and as a torch .pt file:

* ceilings: cold disk read (page cache evicted with POSIX_FADV_DONTNEED), page-cache read,
  memcpy of the same size (into warm memory, fresh memory, fresh huge-page memory), and on CUDA the
  pinned host-to-device copy bandwidth;
* our loader cold and warm, with and without checksum verification (on CPU also with mmap=True,
  zero-copy from the page cache), and the DRAM tier (disk -> host buffer, then host buffer ->
  device);
* safetensors.torch.load_file and torch.load(mmap=True), cold and warm;
* model-ready time of load_model against transformers' from_pretrained for a smaller model with a
  real 7B config (a few layers), both from the page cache.

On CPU every result is "touched" (one byte per 4 KiB page read) so that lazily memory-mapped
results (safetensors, torch.load(mmap=True)) pay for making their data resident, as ours does.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from sllm_actors.storage.format import crc32_implementation, save_checkpoint
from sllm_actors.storage.loader import (
    LoadStats,
    alloc_host_buffer,
    default_threads,
    load_into_host,
    load_state_dict,
    state_dict_from_host,
)

__all__ = ["run_bench"]

GB = 1e9
LLAMA7B_LAYER = (
    ("self_attn.q_proj.weight", (4096, 4096)),
    ("self_attn.k_proj.weight", (4096, 4096)),
    ("self_attn.v_proj.weight", (4096, 4096)),
    ("self_attn.o_proj.weight", (4096, 4096)),
    ("mlp.gate_proj.weight", (11008, 4096)),
    ("mlp.up_proj.weight", (11008, 4096)),
    ("mlp.down_proj.weight", (4096, 11008)),
)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _touch(tensors: Iterable[torch.Tensor]) -> None:
    """Read one byte of every 4 KiB page of CPU tensors (forces lazily mapped data resident)."""
    total = 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        flat = (
            t.detach().reshape(-1).view(torch.uint8)
            if t.is_contiguous()
            else t.contiguous().view(torch.uint8)
        )
        total += int(flat[::4096].sum())
    del total


def _timed(fn: Callable[[], Any], device: torch.device, touch: bool = False) -> float:
    gc.collect()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    if touch and device.type == "cpu":
        _touch(out.values() if isinstance(out, dict) else [out])
    _sync(device)
    elapsed = time.perf_counter() - t0
    del out
    gc.collect()
    return elapsed


def _evict(paths: Iterable[Path]) -> bool:
    """Drop files from the page cache; True if a non-blocking probe then finds them uncached."""
    evicted = True
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if hasattr(os, "RWF_NOWAIT") and os.fstat(fd).st_size:
                try:
                    os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
                    evicted = False
                except BlockingIOError:
                    pass
                except OSError:
                    pass  # RWF_NOWAIT unsupported: cannot tell
        finally:
            os.close(fd)
    return evicted


def _warm(paths: Iterable[Path]) -> None:
    buf = bytearray(16 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def _files_under(root: Path, pattern: str) -> list[Path]:
    return sorted(root.glob(pattern))


def _read_files(paths: list[Path], direct: bool, threads: int) -> float:
    """Seconds to read ``paths`` whole into a reused buffer per thread (a read-bandwidth ceiling)."""
    from concurrent.futures import ThreadPoolExecutor

    chunk = 16 << 20
    jobs = [(p, off) for p in paths for off in range(0, os.path.getsize(p), chunk)]
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = {p: os.open(p, flags) for p in paths}
    bufs: dict[int, Any] = {}

    def work(job: tuple[Path, int]) -> None:
        import threading

        key = threading.get_ident()
        if key not in bufs:
            bufs[key] = memoryview(alloc_host_buffer(chunk).numpy())
        os.preadv(fds[job[0]], [bufs[key]], job[1])

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, jobs))
        return time.perf_counter() - t0
    finally:
        for fd in fds.values():
            os.close(fd)


def _fs_type(path: Path) -> str:
    best, fstype = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, fstype = parts[1], parts[2]
    except OSError:
        pass
    return fstype


def layer_state_dict(size_bytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random fp16 tensors shaped like 7B Llama layers, in layer order, until ``size_bytes``."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    total, layer = 0, 0
    while total < size_bytes:
        for name, shape in LLAMA7B_LAYER:
            n = shape[0] * shape[1] * 2
            if sd and total + n > size_bytes:
                return sd
            sd[f"model.layers.{layer}.{name}"] = torch.randn(shape, generator=g, dtype=torch.float16)
            total += n
        layer += 1
    return sd


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / GB if seconds > 0 else float("inf")


def run_bench(
    device: str = "cpu",
    size_gb: float = 1.0,
    json_path: str | os.PathLike[str] | None = None,
    *,
    workdir: str | os.PathLike[str] | None = None,
    threads: int | None = None,
    model_layers: int = 4,
    keep: bool = False,
) -> dict[str, Any]:
    """Run the whole benchmark on ``device`` ("cpu", "cuda:0") with a ``size_gb`` checkpoint.

    Writes the results as JSON to ``json_path`` if given, prints a table, returns the results.
    ``workdir`` is where the checkpoints are written (a real disk, not tmpfs, for cold numbers).
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("CUDA requested but not available")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    threads = threads or default_threads()
    root = Path(tempfile.mkdtemp(prefix="sllm-bench-", dir=workdir))
    results: dict[str, Any] = {
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "crc32": crc32_implementation(),
        "workdir": str(root),
        "filesystem": _fs_type(root),
    }
    try:
        _bench_formats(root, dev, size_gb, threads, results)
        if model_layers > 0:
            _bench_model_ready(root, dev, model_layers, results)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    print_table(results)
    if json_path is not None:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results


def _memory_ceilings(src: torch.Tensor, dev: torch.device) -> dict[str, float]:
    """memcpy of ``src``'s size into warm, fresh and fresh huge-page memory; pinned H2D on CUDA."""
    cpu = torch.device("cpu")
    nbytes = src.numel()
    out: dict[str, float] = {}
    warm_dst = torch.empty_like(src)
    warm_dst.copy_(src)
    out["memcpy_warm"] = _rate(nbytes, min(_timed(lambda: warm_dst.copy_(src), cpu) for _ in range(3)))
    out["memcpy_fresh"] = _rate(
        nbytes, min(_timed(lambda: torch.empty_like(src).copy_(src), cpu) for _ in range(2))
    )
    out["memcpy_fresh_hugepage"] = _rate(
        nbytes, min(_timed(lambda: alloc_host_buffer(nbytes).copy_(src), cpu) for _ in range(2))
    )
    if dev.type == "cuda":
        pinned = alloc_host_buffer(nbytes, pinned=True)
        pinned.copy_(src)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst.copy_(pinned, non_blocking=True)
        out["pinned_h2d"] = _rate(
            nbytes, min(_timed(lambda: dst.copy_(pinned, non_blocking=True), dev) for _ in range(3))
        )
    return out


def _bench_dram_tier(
    ours: Path, dev: torch.device, threads: int, touch: bool, record: Callable[..., None]
) -> None:
    fill = LoadStats()
    t0 = time.perf_counter()
    host = load_into_host(ours, threads=threads, stats=fill)
    record(
        "dram_tier_fill_cold",
        time.perf_counter() - t0,
        pinned=bool(host.buffer.is_pinned()),
        bytes_direct=fill.bytes_direct,
    )
    if dev.type == "cuda":
        state_dict_from_host(host.buffer, host.index, dev)
        record(
            "dram_tier_to_device",
            min(_timed(lambda: state_dict_from_host(host.buffer, host.index, dev), dev) for _ in range(3)),
        )
    else:
        record(
            "dram_tier_to_device",
            _timed(lambda: state_dict_from_host(host.buffer, host.index, dev), dev, touch),
            note="zero-copy views on CPU",
        )
        record(
            "dram_tier_to_device_copy",
            _timed(lambda: state_dict_from_host(host.buffer, host.index, dev, copy=True), dev, touch),
        )


def _bench_formats(
    root: Path, dev: torch.device, size_gb: float, threads: int, results: dict[str, Any]
) -> None:
    from safetensors.torch import load_file, save_file

    _say(f"building a {size_gb:g} GB fp16 checkpoint shaped like 7B Llama layers ...")
    sd = layer_state_dict(int(size_gb * GB))
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    results["size_bytes"] = nbytes
    results["num_tensors"] = len(sd)

    saves: dict[str, float] = {}
    ours, st_path, pt_path = root / "ours", root / "model.safetensors", root / "model.pt"
    t0 = time.perf_counter()
    save_checkpoint(sd, ours)
    saves["ours"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_file(sd, str(st_path))
    saves["safetensors"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.save(sd, pt_path)
    saves["torch_save"] = time.perf_counter() - t0
    results["save_seconds"] = saves
    src = torch.cat([t.reshape(-1).view(torch.uint8) for t in sd.values()])
    del sd
    gc.collect()
    our_files = _files_under(ours, "data_*.bin")

    # ---- ceilings
    ceil: dict[str, float] = {}
    _say("ceilings ...")
    ok = _evict(our_files)
    ceil["disk_cold_buffered"] = _rate(nbytes, _read_files(our_files, direct=False, threads=1))
    _evict(our_files)
    try:
        ceil["disk_cold_direct"] = _rate(nbytes, _read_files(our_files, direct=True, threads=threads))
    except OSError:
        pass  # no O_DIRECT here
    _warm(our_files)
    ceil["page_cache_read"] = _rate(
        nbytes, min(_read_files(our_files, direct=False, threads=threads) for _ in range(2))
    )
    results["evicted_ok"] = ok

    ceil.update(_memory_ceilings(src, dev))
    del src
    gc.collect()
    results["ceilings_GBps"] = ceil

    # ---- loads
    loads: dict[str, dict[str, Any]] = {}

    def record(name: str, seconds: float, **extra: Any) -> None:
        loads[name] = {"seconds": seconds, "GBps": _rate(nbytes, seconds), **extra}
        _say(f"  {name:<34} {seconds:8.3f} s  {_rate(nbytes, seconds):7.2f} GB/s")

    touch = dev.type == "cpu"
    _say(f"loads to {dev} ...")
    for cold in (True, False):
        tag = "cold" if cold else "warm"
        files_all = [*our_files, st_path, pt_path]
        if cold:
            _evict(files_all)
        else:
            _warm(files_all)
            # one untimed warm-up each, so allocator and page-cache state are steady
            load_state_dict(ours, dev, threads=threads)
        # Warm figures are the best of `repeats` runs (a shared machine is noisy); cold ones are single
        # runs, each after an eviction.
        repeats = 1 if cold else 3
        stats = LoadStats()
        secs = min(
            _timed(lambda st=stats: load_state_dict(ours, dev, threads=threads, stats=st), dev, touch)
            for _ in range(repeats)
        )
        record(f"ours_{tag}", secs, bytes_direct=stats.bytes_direct, bytes_buffered=stats.bytes_buffered)
        if dev.type == "cpu":
            if cold:
                _evict(files_all)
            mstats = LoadStats()
            record(
                f"ours_{tag}_mmap",
                min(
                    _timed(
                        lambda st=mstats: load_state_dict(ours, dev, threads=threads, mmap=True, stats=st),
                        dev,
                        touch,
                    )
                    for _ in range(repeats)
                ),
            )
        if not cold:
            record(
                "ours_warm_noverify",
                min(
                    _timed(lambda: load_state_dict(ours, dev, threads=threads, verify=False), dev, touch)
                    for _ in range(repeats)
                ),
            )
        if cold:
            _evict(files_all)
        record(
            f"safetensors_{tag}",
            min(_timed(lambda: load_file(str(st_path), device=str(dev)), dev, touch) for _ in range(repeats)),
        )
        if cold:
            _evict(files_all)
        record(
            f"torch_load_mmap_{tag}",
            min(
                _timed(
                    lambda: torch.load(pt_path, mmap=True, map_location=dev, weights_only=True), dev, touch
                )
                for _ in range(repeats)
            ),
        )

    # ---- the DRAM tier
    _evict(our_files)
    _bench_dram_tier(ours, dev, threads, touch, record)
    results["loads"] = loads


def _bench_model_ready(root: Path, dev: torch.device, layers: int, results: dict[str, Any]) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from sllm_actors.storage.model import load_model, parameters_on_meta

    _say(f"model-ready: {layers}-layer Llama with the 7B config ...")
    config = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=layers,
        vocab_size=32000,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    with parameters_on_meta():
        skeleton = LlamaForCausalLM._from_config(config, dtype=torch.float16)
    g = torch.Generator().manual_seed(1)
    sd = {
        k: (torch.randn(v.shape, generator=g, dtype=torch.float32) * 0.02).to(torch.float16)
        if v.dim() > 1
        else torch.ones(v.shape, dtype=torch.float16)
        for k, v in skeleton.state_dict().items()
    }
    config.architectures = ["LlamaForCausalLM"]
    hf = root / "hf"
    hf.mkdir()
    save_file(sd, str(hf / "model.safetensors"), metadata={"format": "pt"})
    config.dtype = torch.float16
    config.save_pretrained(hf)
    ours = root / "model_ours"
    save_checkpoint(sd, ours, config=config)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    del sd, skeleton
    gc.collect()
    _warm([*_files_under(ours, "data_*.bin"), hf / "model.safetensors"])
    prompt = torch.tensor([[1, 450, 7483, 310]], device=dev)

    def ready_ours() -> Any:
        return load_model(ours, dev)

    def ready_hf() -> Any:
        return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float16, device_map=str(dev))

    out: dict[str, Any] = {"layers": layers, "bytes": nbytes}
    candidates: list[tuple[str, Callable[[], Any]]] = [("ours", ready_ours), ("from_pretrained", ready_hf)]
    if dev.type == "cpu":
        candidates.insert(1, ("ours_mmap", lambda: load_model(ours, dev, mmap=True)))
    for name, fn in candidates:
        warm = fn()  # warm-up: imports, CUDA/BLAS kernels, page cache
        with torch.no_grad():
            warm(prompt)
        del warm
        gc.collect()
        _sync(dev)
        t0 = time.perf_counter()
        model = fn()
        _sync(dev)
        ready = time.perf_counter() - t0
        with torch.no_grad():
            model(prompt)
        _sync(dev)
        first = time.perf_counter() - t0
        out[name] = {"ready_s": ready, "ready_plus_first_forward_s": first}
        _say(f"  {name:<18} ready {ready:7.3f} s   ready + first forward {first:7.3f} s")
        del model
        gc.collect()
    out["speedup_ready"] = out["from_pretrained"]["ready_s"] / out["ours"]["ready_s"]
    if "ours_mmap" in out:
        out["speedup_ready_mmap"] = out["from_pretrained"]["ready_s"] / out["ours_mmap"]["ready_s"]
    results["model_ready"] = out


def print_table(results: dict[str, Any]) -> None:
    ceil = results.get("ceilings_GBps", {})
    size = results.get("size_bytes", 0)
    print(
        f"\n{results['device']} ({results['device_name']}), {size / GB:.2f} GB, "
        f"{results['threads']} threads, "
        f"crc32 via {results['crc32']}, {results['filesystem']} at {results['workdir']}"
    )
    print("ceilings (GB/s): " + ", ".join(f"{k} {v:.2f}" for k, v in ceil.items()))
    columns = [
        ("/disk", ceil.get("disk_cold_direct", ceil.get("disk_cold_buffered"))),
        ("/pagecache", ceil.get("page_cache_read")),
        ("/memcpy", ceil.get("memcpy_warm")),
        ("/memcpy_fresh_hp", ceil.get("memcpy_fresh_hugepage")),
    ]
    if ceil.get("pinned_h2d"):
        columns.append(("/pinned_h2d", ceil["pinned_h2d"]))
    print(f"{'load':<28}{'s':>9}{'GB/s':>9}" + "".join(f"{name:>18}" for name, _ in columns))
    for name, r in results.get("loads", {}).items():
        ratios = "".join(f"{(r['GBps'] / ref if ref else float('nan')):>18.0%}" for _, ref in columns)
        print(f"{name:<28}{r['seconds']:9.3f}{r['GBps']:9.2f}{ratios}")
    mr = results.get("model_ready")
    if mr:
        print(
            f"model ready ({mr['layers']}-layer 7B-config Llama, {mr['bytes'] / GB:.2f} GB, page cache): "
            f"ours {mr['ours']['ready_s']:.3f} s, from_pretrained {mr['from_pretrained']['ready_s']:.3f} s "
            f"({mr['speedup_ready']:.1f}x); with a first forward: ours "
            f"{mr['ours']['ready_plus_first_forward_s']:.3f} s, from_pretrained "
            f"{mr['from_pretrained']['ready_plus_first_forward_s']:.3f} s"
        )
        if "ours_mmap" in mr:
            print(
                f"  ours with mmap=True: ready {mr['ours_mmap']['ready_s']:.3f} s, with a first forward "
                f"{mr['ours_mmap']['ready_plus_first_forward_s']:.3f} s"
            )
