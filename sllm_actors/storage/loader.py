"""The pipelined checkpoint loader (ServerlessLLM's multi-tier loading pipeline, in Python).

Reader threads read a checkpoint's partitions in large chunks and check each chunk's CRC as it
arrives. Where the bytes go depends on the target:

* CPU: straight into one destination allocation (a page-aligned, transparent-huge-page backed
  uint8 buffer holding all partitions back to back). A page-cache hit is then a single kernel copy
  into the final memory: that is memcpy speed, nothing faster is possible.
* CUDA: into a ring of reusable pinned host buffers; each filled buffer is copied to one device
  allocation with a non-blocking copy on a side stream, and an event tells when the buffer can be
  read into again. Disk reads, checksums and PCIe transfers of different chunks overlap, and the
  host never holds more than the ring.

Tensors are views of the destination allocation, so a load costs one allocation per device and no
per-tensor copies. The DRAM tier uses ``load_into_host`` (a whole checkpoint in one host buffer,
pinned when CUDA is present) and ``state_dict_from_host`` (host buffer -> device, chunked on side
streams).

Direct I/O: with ``direct_io="auto"`` (the default) the loader asks the kernel which pages of a
chunk are in the page cache (``mincore`` on a mapping of the file, which starts no I/O); the cached
part is copied from the page cache, the rest is read with ``O_DIRECT`` into the aligned destination.
So a cold load neither pays for a page-cache copy nor evicts useful pages, and a warm one still gets
memcpy speed. (Where ``mincore`` cannot see the page cache, a non-blocking ``RWF_NOWAIT`` read is
the probe instead; it is second best because a miss starts readahead.) File systems that refuse
``O_DIRECT`` (tmpfs, some overlays) are detected by trying, and read buffered.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch

from sllm_actors.storage.format import (
    CheckpointError,
    CheckpointIndex,
    TensorEntry,
    crc32,
    dtype_from_name,
    read_index,
)

__all__ = [
    "Arrival",
    "HostCheckpoint",
    "LoadStats",
    "alloc_host_buffer",
    "copy_checkpoint",
    "copy_host_to_device",
    "default_threads",
    "load_buffer",
    "load_into_host",
    "load_state_dict",
    "map_partitions",
    "release_pinned_buffers",
    "state_dict_from_host",
    "verify_checkpoint",
]

log = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 16 << 20
DIRECT_ALIGNMENT = 4096
HUGE_PAGE = 2 << 20
HOST_TO_DEVICE_CHUNK_BYTES = 64 << 20
MAX_CACHED_RINGS = 2

DirectIO = bool | Literal["auto"]


class Arrival(Protocol):
    """Bytes of a checkpoint still arriving while it loads (a fetch from an HTTP repository): ``wait`` returns
    once bytes ``[start, end)`` of partition ``partition`` are in its file and checked, and raises the fetch's
    error if it failed first. The files have their full size from the start (the loader checks sizes)."""

    def wait(self, partition: int, start: int, end: int) -> None: ...


def default_threads() -> int:
    # A page-cache hit is bound by how many threads copy out of the page cache: on the 16-core GPU
    # machine, page cache -> pinned ring -> GPU made 23.5 GB/s with 8 threads and 34.0 with 16
    # (shared/ANCHORS.md), against a 36.8 GB/s page-cache read ceiling. Cold reads lose nothing by it.
    return min(16, (os.cpu_count() or 1) * 2)


COPY_THREADS = min(4, default_threads())
"""A tier's copy is bound by one disk's writes, not by threads (16 GB on the H200 machine: 10.6 s on 4 threads,
11.3 s on 16), and it runs behind a model that is already serving, whose own threads want the GIL."""


@dataclass
class LoadStats:
    """What a load did; filled in when passed as ``stats=`` (the benchmark reports it)."""

    bytes: int = 0
    seconds: float = 0.0
    bytes_direct: int = 0
    bytes_buffered: int = 0
    direct_available: bool = False
    chunks: int = 0
    threads: int = 0
    chunk_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, direct: int, buffered: int) -> None:
        with self._lock:
            self.bytes_direct += direct
            self.bytes_buffered += buffered
            self.chunks += 1


# ---------------------------------------------------------------------------------------------------
# host memory


def _cuda_host_register(t: torch.Tensor) -> bool:
    """Page-lock ``t``'s memory in place (so H2D copies from it are DMA, asynchronous).

    The pages are faulted in first, outside CUDA: registering fresh memory faults in every page inside the call,
    while it holds the CUDA driver's lock (a 16 GB DRAM-tier registration coincided with 3.6 s of KV-pool allocation
    by an instance starting beside it on the H200 machine). Registering in pieces instead would leave a buffer that
    one copy cannot span: CUDA refuses a copy across two registrations."""
    t.zero_()
    try:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(t.data_ptr(), t.numel(), 0)
    except (RuntimeError, AttributeError) as exc:
        log.debug("cudaHostRegister unavailable: %s", exc)
        return False
    if int(err) != 0:
        log.debug("cudaHostRegister failed with error %s", int(err))
        return False
    return True


def _cuda_host_unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except (RuntimeError, AttributeError) as exc:  # interpreter shutdown, CUDA torn down
        log.debug("cudaHostUnregister(%#x) failed: %s", ptr, exc)


def alloc_host_buffer(nbytes: int, *, pinned: bool = False) -> torch.Tensor:
    """A 2 MiB-aligned uint8 CPU tensor of ``nbytes``, backed by anonymous memory that asks for
    transparent huge pages.

    Why not ``torch.empty``: fresh memory must be faulted in as it is first written, and with 4 KiB
    pages that costs more than the copy itself (measured ~2 GB/s vs ~5 GB/s with huge pages).
    With ``pinned`` the memory is also page-locked for CUDA (registered in place, so the size is not
    rounded up to a power of two as torch's pinned allocator does); the registration is dropped when
    the last view of the buffer dies.
    """
    if pinned and not torch.cuda.is_available():
        pinned = False
    try:
        mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (OSError, ValueError, AttributeError) as exc:  # non-Linux or out of address space
        log.debug("anonymous mmap failed (%s); using torch.empty", exc)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # THP disabled: still correct, just more page faults
    base = np.frombuffer(mm, dtype=np.uint8, count=1).ctypes.data
    skip = (-base) % HUGE_PAGE
    arr = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=skip)
    tensor = torch.from_numpy(arr)
    if pinned and nbytes:
        if _cuda_host_register(tensor):
            # torch.from_numpy keeps `arr` alive exactly as long as some view of the buffer exists;
            # unregister before numpy lets go of the mapping.
            weakref.finalize(arr, _cuda_host_unregister, tensor.data_ptr())
        else:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return tensor


class _PinnedRing:
    """Reusable pinned staging buffers for one load; cached between loads because pinning is slow."""

    def __init__(self, count: int, chunk: int) -> None:
        self.chunk = chunk
        self.buffers = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(count)]


_ring_lock = threading.Lock()
_free_rings: dict[int, list[_PinnedRing]] = {}


def thread_buffers(nbytes: int) -> Callable[[], torch.Tensor]:
    """A function giving each calling thread a host buffer of ``nbytes`` of its own, made on its first call (a
    reader pool's scratch space: one buffer per thread, reused for every chunk it reads)."""
    buffers: dict[int, torch.Tensor] = {}
    lock = threading.Lock()

    def buffer() -> torch.Tensor:
        ident = threading.get_ident()
        with lock:
            buf = buffers.get(ident)
            if buf is None:
                buf = buffers[ident] = alloc_host_buffer(nbytes)
        return buf

    return buffer


def _acquire_ring(count: int, chunk: int) -> _PinnedRing:
    with _ring_lock:
        rings = _free_rings.get(chunk, [])
        for i, ring in enumerate(rings):
            if len(ring.buffers) >= count:
                return rings.pop(i)
    return _PinnedRing(count, chunk)


def _release_ring(ring: _PinnedRing) -> None:
    with _ring_lock:
        rings = _free_rings.setdefault(ring.chunk, [])
        if len(rings) < MAX_CACHED_RINGS:
            rings.append(ring)


def release_pinned_buffers() -> None:
    """Drop the cached pinned staging rings (they are reused across loads otherwise)."""
    with _ring_lock:
        _free_rings.clear()


# ---------------------------------------------------------------------------------------------------
# reading


def _load_mincore() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        fn = libc.mincore
    except (OSError, AttributeError, TypeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    fn.restype = ctypes.c_int
    return fn


_mincore = _load_mincore()
_PAGE = mmap.PAGESIZE


class _Residency:
    """Which pages of a file are in the page cache, without reading (or reading ahead) anything."""

    def __init__(self, fd: int, size: int) -> None:
        self.mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        self.arr: np.ndarray | None = np.frombuffer(self.mm, dtype=np.uint8)
        self.addr = self.arr.ctypes.data

    @classmethod
    def open(cls, path: Path, fd: int, size: int) -> _Residency | None:
        st = os.fstat(fd)
        # Since Linux 5.0 mincore reports page-cache residency only for files the caller owns or
        # may write; for others every page would look absent (and we would always read direct).
        if _mincore is None or size == 0 or not (st.st_uid == os.geteuid() or os.access(path, os.W_OK)):
            return None
        try:
            return cls(fd, size)
        except (OSError, ValueError):
            return None

    def cached_prefix(self, offset: int, length: int) -> int:
        """Bytes from ``offset`` (page-aligned) that are resident, up to ``length``."""
        pages = -(-length // _PAGE)
        vec = (ctypes.c_ubyte * pages)()
        if _mincore(self.addr + offset, length, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        absent = np.flatnonzero((np.frombuffer(vec, dtype=np.uint8) & 1) == 0)
        return length if absent.size == 0 else min(length, int(absent[0]) * _PAGE)

    def close(self) -> None:
        self.arr = None  # release the buffer export before closing the mapping
        self.mm.close()


@dataclass(frozen=True)
class _Chunk:
    partition: int
    file_offset: int
    length: int
    dest_offset: int  # offset in a buffer holding all partitions back to back


class _PartitionFile:
    def __init__(self, path: Path, fd: int, direct_fd: int | None, residency: _Residency | None) -> None:
        self.path = path
        self.fd = fd
        self.direct_fd = direct_fd
        self.residency = residency


class _Reader:
    """Opens a checkpoint's partitions, reads chunks of them into memory and verifies them."""

    def __init__(
        self,
        root: Path,
        index: CheckpointIndex,
        *,
        chunk_bytes: int | None,
        verify: bool,
        direct_io: DirectIO,
        stats: LoadStats | None,
        arrival: Arrival | None = None,
    ) -> None:
        self.root = root
        self.arrival = arrival
        self.index = index
        self.verify = verify
        self.mode = direct_io
        self.stats = stats
        ck = index.checksum_chunk_bytes
        # A read must cover whole checksum chunks, so that each thread can check what it read alone.
        self.chunk = max(ck, -(-(chunk_bytes or DEFAULT_CHUNK_BYTES) // ck) * ck)
        self.nowait_probe = hasattr(os, "RWF_NOWAIT")
        self.files: list[_PartitionFile] = []
        try:
            for pi, part in enumerate(index.partitions):
                self.files.append(self._open(pi, part.file, part.nbytes))
        except BaseException:
            self.close()
            raise
        self.direct_ok = any(f.direct_fd is not None for f in self.files)
        if stats is not None:
            stats.direct_available = self.direct_ok
            stats.chunk_bytes = self.chunk

    def _open(self, pi: int, name: str, expected: int) -> _PartitionFile:
        path = self.root / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            lost = self.index.tensors_in(pi, 0, expected)
            raise CheckpointError(
                f"{path}: partition file is missing; tensors lost: {_names(lost)}",
                path=path,
                tensors=lost,
            ) from None
        size = os.fstat(fd).st_size
        if size != expected:
            os.close(fd)
            affected = self.index.tensors_in(pi, min(size, expected), max(size, expected))
            what = "truncated" if size < expected else "longer than recorded"
            raise CheckpointError(
                f"{path}: partition is {what} ({size} bytes, index says {expected}); "
                f"affected tensors: {_names(affected)}",
                path=path,
                tensors=affected,
            )
        direct_fd = None
        if self.mode is not False and hasattr(os, "O_DIRECT"):
            try:
                direct_fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError as exc:  # EINVAL on tmpfs and others: read buffered
                log.debug("%s: O_DIRECT unavailable (%s)", path, exc)
        if direct_fd is None or self.mode == "auto":
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except (OSError, AttributeError):
                pass
        residency = _Residency.open(path, fd, size) if direct_fd is not None and self.mode == "auto" else None
        return _PartitionFile(path, fd, direct_fd, residency)

    def close(self) -> None:
        for f in self.files:
            if f.residency is not None:
                f.residency.close()
            os.close(f.fd)
            if f.direct_fd is not None:
                os.close(f.direct_fd)
        self.files = []

    def chunks(self) -> list[_Chunk]:
        out = []
        for pi, part in enumerate(self.index.partitions):
            base = self.index.partition_bases[pi]
            for off in range(0, part.nbytes, self.chunk):
                out.append(_Chunk(pi, off, min(self.chunk, part.nbytes - off), base + off))
        return out

    def read(self, c: _Chunk, mv: memoryview, address: int) -> None:
        """Fill ``mv`` (which lives at ``address``) with chunk ``c``, then verify it."""
        if self.arrival is not None:
            self.arrival.wait(c.partition, c.file_offset, c.file_offset + c.length)
        f = self.files[c.partition]
        n = c.length
        done = 0
        direct_bytes = 0
        use_direct = (
            f.direct_fd is not None
            and self.mode is not False
            and address % DIRECT_ALIGNMENT == 0
            and c.file_offset % DIRECT_ALIGNMENT == 0
        )
        if use_direct and self.mode == "auto":
            done = self._read_cached_prefix(f, mv, c.file_offset)
        if use_direct and done < n:
            start = done - done % DIRECT_ALIGNMENT
            try:
                _pread_full(f.direct_fd, mv[start:], c.file_offset + start)
                direct_bytes = n - start
                done = n
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: this file system does not do O_DIRECT after all
                    raise
                log.debug("%s: O_DIRECT read refused (%s); reading buffered", f.path, exc)
                self.mode = False
                done = start
        if done < n:
            _pread_full(f.fd, mv[done:], c.file_offset + done, path=f.path)
        if self.stats is not None:
            self.stats.add(direct_bytes, n - direct_bytes)
        if self.verify:
            self.check(c, mv)

    def _read_cached_prefix(self, f: _PartitionFile, mv: memoryview, offset: int) -> int:
        """Copy the leading page-cached part of a chunk from the page cache; returns its length."""
        if f.residency is not None:
            try:
                cached = f.residency.cached_prefix(offset, len(mv))
            except OSError as exc:
                log.debug("%s: mincore failed (%s); probing with RWF_NOWAIT", f.path, exc)
                f.residency.close()
                f.residency = None
            else:
                if cached:
                    _pread_full(f.fd, mv[:cached], offset, path=f.path)
                return cached
        if not self.nowait_probe:
            return 0
        try:
            return os.preadv(f.fd, [mv], offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0  # not cached
        except OSError as exc:  # the kernel or file system does not support RWF_NOWAIT
            log.debug("RWF_NOWAIT unsupported (%s); reading with O_DIRECT", exc)
            self.nowait_probe = False
            return 0

    def check(self, c: _Chunk, mv: memoryview) -> None:
        part = self.index.partitions[c.partition]
        ck = self.index.checksum_chunk_bytes
        for rel in range(0, c.length, ck):
            piece = mv[rel : rel + ck]
            k = (c.file_offset + rel) // ck
            if crc32(piece) != part.checksums[k]:
                start = c.file_offset + rel
                end = start + len(piece)
                affected = self.index.tensors_in(c.partition, start, end)
                raise CheckpointError(
                    f"{self.files[c.partition].path}: checksum mismatch in bytes [{start}, {end}) "
                    f"(chunk {k}); corrupted tensors: {_names(affected)}",
                    path=self.files[c.partition].path,
                    tensors=affected,
                )


def _names(names: Sequence[str], limit: int = 8) -> str:
    if not names:
        return "(padding only)"
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _pread_full(fd: int, mv: memoryview, offset: int, path: Path | None = None) -> None:
    got = 0
    while got < len(mv):
        n = os.preadv(fd, [mv[got:]], offset + got)
        if n == 0:
            raise CheckpointError(
                f"{path}: unexpected end of file at byte {offset + got} (truncated while loading?)", path=path
            )
        got += n


def _run_parallel(items: Sequence[_Chunk], fn: Callable[[_Chunk], None], threads: int) -> None:
    """Run ``fn`` over ``items`` on ``threads`` threads, in order; stop early and re-raise on error,
    preferring a CheckpointError (the root cause) over errors it provoked elsewhere."""
    abort = threading.Event()

    def guarded(c: _Chunk) -> None:
        if abort.is_set():
            return
        try:
            fn(c)
        except BaseException:
            abort.set()
            raise

    errors: list[BaseException] = []
    if threads <= 1 or len(items) <= 1:
        for c in items:
            fn(c)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="sllm-load") as pool:
        futures = [pool.submit(guarded, c) for c in items]
        for fut in futures:
            exc = fut.exception()
            if exc is not None:
                errors.append(exc)
    if errors:
        raise next((e for e in errors if isinstance(e, CheckpointError)), errors[0])


def _read_to_host(reader: _Reader, dest: torch.Tensor, threads: int) -> None:
    mv = memoryview(dest.numpy())
    base = dest.data_ptr()

    def work(c: _Chunk) -> None:
        reader.read(c, mv[c.dest_offset : c.dest_offset + c.length], base + c.dest_offset)

    _run_parallel(reader.chunks(), work, threads)


class _Slot:
    def __init__(self, buffer: torch.Tensor, stream: Any) -> None:
        self.buffer = buffer
        self.view = memoryview(buffer.numpy())
        self.stream = stream
        self.event: Any = None


def _cuda_device(device: torch.device) -> torch.device:
    if device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _read_to_cuda(reader: _Reader, dest: torch.Tensor, threads: int) -> None:
    """Disk -> pinned ring buffer (reader threads, checksummed) -> device, on side streams."""
    device = dest.device
    num_streams = max(1, min(4, threads))
    streams = [torch.cuda.Stream(device) for _ in range(num_streams)]
    # Enough buffers that every reader has one to fill while earlier ones are still in flight.
    ring = _acquire_ring(2 * threads, reader.chunk)
    slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
    all_slots = [_Slot(buf, streams[i % num_streams]) for i, buf in enumerate(ring.buffers)]
    for s in all_slots:
        slots.put(s)

    def work(c: _Chunk) -> None:
        slot = slots.get()
        try:
            if slot.event is not None:
                slot.event.synchronize()  # the previous copy out of this buffer is done
            reader.read(c, slot.view[: c.length], slot.buffer.data_ptr())
            with torch.cuda.device(device), torch.cuda.stream(slot.stream):
                dest[c.dest_offset : c.dest_offset + c.length].copy_(
                    slot.buffer[: c.length], non_blocking=True
                )
                event = torch.cuda.Event()
                event.record(slot.stream)
                slot.event = event
        finally:
            slots.put(slot)

    try:
        _run_parallel(reader.chunks(), work, threads)
    finally:
        for s in all_slots:
            if s.event is not None:
                s.event.synchronize()
        for st in streams:
            st.synchronize()
        _release_ring(ring)
    torch.cuda.synchronize(device)


def _alloc_device(nbytes: int, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return alloc_host_buffer(nbytes)
    with torch.cuda.device(device):
        return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _views(buffer: torch.Tensor | Sequence[torch.Tensor], index: CheckpointIndex) -> dict[str, torch.Tensor]:
    """Tensors of ``index`` as views of ``buffer`` (all partitions back to back) or of one buffer
    per partition."""
    out: dict[str, torch.Tensor] = {}
    device = buffer.device if isinstance(buffer, torch.Tensor) else torch.device("cpu")
    for e in index.tensors:
        if e.tied_to is not None:
            out[e.name] = out[e.tied_to]
        elif e.numel == 0:
            out[e.name] = torch.empty_strided(
                e.shape, e.stride, dtype=dtype_from_name(e.dtype), device=device
            )
        elif isinstance(buffer, torch.Tensor):
            out[e.name] = _view(buffer, index.partition_bases[e.partition], e)
        else:
            out[e.name] = _view(buffer[e.partition], 0, e)
    return out


def _view(buffer: torch.Tensor, base: int, e: TensorEntry) -> torch.Tensor:
    dtype = dtype_from_name(e.dtype)
    start = base + e.offset
    itemsize = dtype.itemsize
    # Blobs start 256-byte aligned and hold whole elements, so the byte view reinterprets cleanly
    # (buffers themselves are page-aligned).
    typed = buffer[start : start + e.nbytes - e.nbytes % itemsize].view(dtype)
    return typed.as_strided(
        e.shape, e.stride, (buffer.storage_offset() + start) // itemsize + e.storage_offset
    )


def _resolve_device(device: str | torch.device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {dev} requested but CUDA is not available")
        return _cuda_device(dev)
    if dev.type != "cpu":
        raise ValueError(f"unsupported device {dev} (cpu and cuda are)")
    return dev


def _open(
    path: str | os.PathLike[str],
    chunk_bytes: int | None,
    verify: bool,
    direct_io: DirectIO,
    stats: LoadStats | None,
    arrival: Arrival | None = None,
) -> tuple[CheckpointIndex, _Reader]:
    root = Path(path)
    index = read_index(root)
    return index, _Reader(
        root, index, chunk_bytes=chunk_bytes, verify=verify, direct_io=direct_io, stats=stats, arrival=arrival
    )


def load_buffer(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    verify: bool = True,
    direct_io: DirectIO = "auto",
    stats: LoadStats | None = None,
    arrival: Arrival | None = None,
) -> tuple[torch.Tensor, CheckpointIndex]:
    """Read a whole checkpoint into one uint8 allocation on ``device``; returns it with the index. With
    ``arrival`` each chunk is read once it has arrived (a checkpoint still being fetched)."""
    dev = _resolve_device(device)
    threads = threads or default_threads()
    t0 = time.perf_counter()
    index, reader = _open(path, chunk_bytes, verify, direct_io, stats, arrival)
    try:
        dest = _alloc_device(index.total_bytes, dev)
        if dev.type == "cuda":
            _read_to_cuda(reader, dest, threads)
        else:
            _read_to_host(reader, dest, threads)
    finally:
        reader.close()
    if stats is not None:
        stats.bytes = index.total_bytes
        stats.seconds = time.perf_counter() - t0
        stats.threads = threads
    return dest, index


def map_partitions(
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    verify: bool = True,
    stats: LoadStats | None = None,
    arrival: Arrival | None = None,
) -> tuple[list[torch.Tensor], CheckpointIndex]:
    """Memory-map every partition (private, copy-on-write) as a uint8 CPU tensor, zero-copy.

    The tensors share the page cache's pages instead of copying them. With ``verify`` every chunk
    is checksummed through the mapping (threads in parallel), which also faults it in, so a
    corrupted or truncated file is still reported before anything is returned. Safe against our
    own writers (they never modify files in place: a new checkpoint replaces the directory, and
    mapped pages of an unlinked file stay valid); a file truncated by someone else while mapped
    would fault (SIGBUS) on access, as with any memory-mapped loader.
    """
    threads = threads or default_threads()
    t0 = time.perf_counter()
    index, reader = _open(path, None, verify, False, stats, arrival)
    maps: list[torch.Tensor] = []
    try:
        for f, part in zip(reader.files, index.partitions):
            mm = mmap.mmap(f.fd, part.nbytes, access=mmap.ACCESS_COPY)
            if hasattr(mmap, "MADV_WILLNEED"):
                mm.madvise(mmap.MADV_WILLNEED)  # start reading ahead the whole file now
            maps.append(torch.from_numpy(np.frombuffer(mm, dtype=np.uint8)))
        if verify or arrival is not None:  # a checkpoint still arriving is waited for, checked or not
            views = [memoryview(m.numpy()) for m in maps]

            def work(c: _Chunk) -> None:
                if arrival is not None:
                    arrival.wait(c.partition, c.file_offset, c.file_offset + c.length)
                if verify:
                    reader.check(c, views[c.partition][c.file_offset : c.file_offset + c.length])
                if stats is not None:
                    stats.add(0, c.length)

            _run_parallel(reader.chunks(), work, threads)
    finally:
        reader.close()
    if stats is not None:
        stats.bytes = index.total_bytes
        stats.seconds = time.perf_counter() - t0
        stats.threads = threads
    return maps, index


def load_state_dict(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    verify: bool = True,
    direct_io: DirectIO = "auto",
    mmap: bool = False,
    stats: LoadStats | None = None,
    arrival: Arrival | None = None,
) -> dict[str, torch.Tensor]:
    """Load a checkpoint's tensors onto ``device`` ("cpu", "cuda", "cuda:N").

    All tensors are views of one allocation; tied entries are the same tensor object. With
    ``verify`` every chunk's CRC is checked as it is read and a CheckpointError (naming the file
    and the affected tensors) is raised before anything is returned.

    ``mmap=True`` (CPU only) maps the partitions instead of reading them (see ``map_partitions``):
    no copy and no private memory, the fastest way to get a page-cached checkpoint onto the CPU.
    """
    if mmap:
        if torch.device(device).type != "cpu":
            raise ValueError(f"mmap=True loads to the CPU only, not {device}")
        maps, index = map_partitions(path, threads=threads, verify=verify, stats=stats, arrival=arrival)
        return _views(maps, index)
    buffer, index = load_buffer(
        path,
        device,
        threads=threads,
        chunk_bytes=chunk_bytes,
        verify=verify,
        direct_io=direct_io,
        stats=stats,
        arrival=arrival,
    )
    return _views(buffer, index)


def verify_checkpoint(
    path: str | os.PathLike[str], *, threads: int | None = None, chunk_bytes: int | None = None
) -> CheckpointIndex:
    """Check a checkpoint whole (index, file sizes, every checksum) without keeping it in memory.

    Raises CheckpointError naming the file and the tensors affected; returns the index when sound.
    """
    threads = threads or default_threads()
    index, reader = _open(path, chunk_bytes, True, "auto", None)
    try:
        buffer = thread_buffers(reader.chunk)

        def work(c: _Chunk) -> None:
            buf = buffer()
            reader.read(c, memoryview(buf.numpy())[: c.length], buf.data_ptr())

        _run_parallel(reader.chunks(), work, threads)
    finally:
        reader.close()
    return index


# ---------------------------------------------------------------------------------------------------
# the DRAM tier


class HostCheckpoint(NamedTuple):
    """A checkpoint held in host memory: all partitions back to back in ``buffer`` (uint8)."""

    buffer: torch.Tensor
    index: CheckpointIndex

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def state_dict(self, device: str | torch.device = "cpu", **kwargs: Any) -> dict[str, torch.Tensor]:
        return state_dict_from_host(self.buffer, self.index, device, **kwargs)


def load_into_host(
    path: str | os.PathLike[str],
    *,
    pinned: bool | None = None,
    threads: int | None = None,
    chunk_bytes: int | None = None,
    verify: bool = True,
    direct_io: DirectIO = "auto",
    stats: LoadStats | None = None,
) -> HostCheckpoint:
    """Read a checkpoint into one host buffer (page-locked when CUDA is present, unless ``pinned``
    says otherwise), for the DRAM tier to keep and later copy to devices with
    ``state_dict_from_host``."""
    if pinned is None:
        pinned = torch.cuda.is_available()
    threads = threads or default_threads()
    t0 = time.perf_counter()
    index, reader = _open(path, chunk_bytes, verify, direct_io, stats)
    try:
        buffer = alloc_host_buffer(index.total_bytes, pinned=pinned)
        _read_to_host(reader, buffer, threads)
    finally:
        reader.close()
    if stats is not None:
        stats.bytes = index.total_bytes
        stats.seconds = time.perf_counter() - t0
        stats.threads = threads
    return HostCheckpoint(buffer, index)


def copy_host_to_device(
    host: torch.Tensor,
    device: str | torch.device,
    *,
    chunk_bytes: int = HOST_TO_DEVICE_CHUNK_BYTES,
    streams: int = 2,
    threads: int | None = None,
) -> torch.Tensor:
    """Copy a host uint8 buffer to a new allocation on a CUDA ``device``, chunk by chunk on side
    streams. A pageable (unpinned) buffer is staged through the pinned ring by worker threads."""
    dev = _resolve_device(device)
    if dev.type != "cuda":
        raise ValueError(f"copy_host_to_device needs a CUDA device, not {dev}")
    n = host.numel()
    with torch.cuda.device(dev):
        dest = torch.empty(n, dtype=torch.uint8, device=dev)
    if n == 0:
        return dest
    if host.is_pinned():
        side = [torch.cuda.Stream(dev) for _ in range(max(1, streams))]
        with torch.cuda.device(dev):
            for i, off in enumerate(range(0, n, chunk_bytes)):
                end = min(n, off + chunk_bytes)
                with torch.cuda.stream(side[i % len(side)]):
                    dest[off:end].copy_(host[off:end], non_blocking=True)
        for s in side:
            s.synchronize()
    else:
        _stage_to_cuda(host, dest, threads or default_threads())
    torch.cuda.synchronize(dev)
    return dest


def _stage_to_cuda(host: torch.Tensor, dest: torch.Tensor, threads: int) -> None:
    chunk = DEFAULT_CHUNK_BYTES
    ring = _acquire_ring(2 * threads, chunk)
    num_streams = max(1, min(4, threads))
    streams = [torch.cuda.Stream(dest.device) for _ in range(num_streams)]
    slots: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
    all_slots = [_Slot(buf, streams[i % num_streams]) for i, buf in enumerate(ring.buffers)]
    for s in all_slots:
        slots.put(s)
    n = host.numel()
    items = [_Chunk(0, off, min(chunk, n - off), off) for off in range(0, n, chunk)]

    def work(c: _Chunk) -> None:
        slot = slots.get()
        try:
            if slot.event is not None:
                slot.event.synchronize()
            slot.buffer[: c.length].copy_(host[c.dest_offset : c.dest_offset + c.length])
            with torch.cuda.device(dest.device), torch.cuda.stream(slot.stream):
                dest[c.dest_offset : c.dest_offset + c.length].copy_(
                    slot.buffer[: c.length], non_blocking=True
                )
                event = torch.cuda.Event()
                event.record(slot.stream)
                slot.event = event
        finally:
            slots.put(slot)

    try:
        _run_parallel(items, work, threads)
    finally:
        for s in all_slots:
            if s.event is not None:
                s.event.synchronize()
        _release_ring(ring)


def state_dict_from_host(
    host_buffer: torch.Tensor,
    index: CheckpointIndex,
    device: str | torch.device = "cpu",
    *,
    copy: bool = False,
) -> dict[str, torch.Tensor]:
    """Tensors of a host-resident checkpoint (``load_into_host``) on ``device``.

    CUDA: one device allocation, filled from the host buffer in chunks on side streams.
    CPU: views of the host buffer itself (zero-copy: the model shares the DRAM tier's memory and
    keeps it alive), or of a private copy with ``copy=True``.
    """
    if host_buffer.dtype != torch.uint8 or host_buffer.dim() != 1 or host_buffer.device.type != "cpu":
        raise ValueError("host_buffer must be a 1-D uint8 CPU tensor (as returned by load_into_host)")
    if host_buffer.numel() != index.total_bytes:
        raise ValueError(
            f"host_buffer holds {host_buffer.numel()} bytes, the index describes {index.total_bytes}"
        )
    dev = _resolve_device(device)
    if dev.type == "cuda":
        return _views(copy_host_to_device(host_buffer, dev), index)
    if copy:
        private = alloc_host_buffer(host_buffer.numel())
        private.copy_(host_buffer)
        return _views(private, index)
    return _views(host_buffer, index)


def copy_checkpoint(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    threads: int | None = None,
    chunk_bytes: int | None = None,
) -> CheckpointIndex:
    """Copy a checkpoint directory into ``dest`` (which must not exist), checking every chunk's CRC
    as it passes: a source that is corrupt or cut short raises CheckpointError (naming file and
    tensors) and ``dest`` is removed, so no partial or bad copy is left to be taken for a good one.

    Reads are buffered, not O_DIRECT: a load reading the same source at the same time (a repository
    cold start, pipelined) then shares the page cache's pages instead of reading the disk twice.
    """
    import shutil

    root, out = Path(src), Path(dest)
    threads = threads or COPY_THREADS
    index, reader = _open(root, chunk_bytes, True, False, None)
    fds: list[int] = []
    try:
        out.mkdir(parents=True)
        weight_files = {p.file for p in index.partitions}
        for child in root.iterdir():
            if child.name not in weight_files:
                if child.is_dir():
                    shutil.copytree(child, out / child.name)
                else:
                    shutil.copy2(child, out / child.name)
        for part in index.partitions:
            fd = os.open(out / part.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fds.append(fd)
            os.ftruncate(fd, part.nbytes)
        buffer = thread_buffers(reader.chunk)

        def work(c: _Chunk) -> None:
            buf = buffer()
            mv = memoryview(buf.numpy())[: c.length]
            reader.read(c, mv, buf.data_ptr())
            written = 0
            while written < c.length:
                written += os.pwrite(fds[c.partition], mv[written:], c.file_offset + written)

        _run_parallel(reader.chunks(), work, threads)
        for fd in fds:
            os.fsync(fd)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    finally:
        reader.close()
        for fd in fds:
            os.close(fd)
    return index
