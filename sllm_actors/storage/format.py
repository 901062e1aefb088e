"""The loading-optimised checkpoint format (ServerlessLLM's pillar 1) and its writer.

A checkpoint is a directory::

    DEST/
      data_0.bin, data_1.bin, ...   raw tensor bytes, each file padded to a multiple of 4 KiB
      index.json                    where every tensor lives, its view metadata, per-chunk CRC-32s
      model.json                    architecture, sizes, dtype summary
      config.json, generation_config.json, tokenizer files (when known)

Why this layout: a loader can read every partition whole, in large aligned chunks (O_DIRECT needs
4 KiB-aligned offsets and lengths), straight into one destination allocation per device, and then
hand out tensors as views of it (every tensor starts on a 256-byte boundary, so a view of any dtype
is aligned). Nothing is parsed or copied per tensor at load time.

Tensors that share storage (tied embeddings, views of one buffer) are stored once: each unique
storage becomes one "blob" holding the byte span its tensors use; tensor entries name the blob and
give shape/stride/storage_offset relative to it. An entry that is exactly the same view as an
earlier one carries ``tied_to`` so a loader returns the very same tensor for both names.

Integrity: every partition is checksummed per ``checksum_chunk_bytes`` chunk (CRC-32, zlib's
polynomial). A loader checks the chunk as it reads it, so a truncated or corrupted file is reported,
with the file and the tensors that live in the bad bytes, before any weight is returned.

Atomicity: a checkpoint is written into ``DEST.tmp-<pid>-<rand>``, every file fsynced, then renamed
to DEST and the parent directory fsynced. A checkpoint is whole iff ``DEST/index.json`` exists and
DEST's name is not a temporary one (``is_checkpoint``).
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

try:  # Same CRC-32 as zlib (identical values), PCLMUL-accelerated: ~5x faster, releases the GIL.
    from isal.isal_zlib import crc32 as _fast_crc32
except ImportError:  # pragma: no cover - depends on the environment
    _fast_crc32 = None

__all__ = [
    "CHECKSUM_CHUNK_BYTES",
    "DEFAULT_PARTITION_BYTES",
    "FORMAT_VERSION",
    "PARTITION_ALIGNMENT",
    "STORABLE_DTYPES",
    "TENSOR_ALIGNMENT",
    "TOKENIZER_FILES",
    "CheckpointError",
    "CheckpointIndex",
    "CheckpointInfo",
    "PartitionInfo",
    "ProgressFn",
    "TensorEntry",
    "checkpoint_size",
    "crc32",
    "crc32_implementation",
    "dtype_from_name",
    "is_checkpoint",
    "read_index",
    "read_model_info",
    "save_checkpoint",
]

FORMAT_NAME = "sllm-actors-checkpoint"
FORMAT_VERSION = 1
TENSOR_ALIGNMENT = 256
PARTITION_ALIGNMENT = 4096
DEFAULT_PARTITION_BYTES = 2 << 30
CHECKSUM_CHUNK_BYTES = 8 << 20
CHECKSUM_ALGORITHM = "crc32"
INDEX_FILE = "index.json"
MODEL_FILE = "model.json"
TMP_MARKER = ".tmp-"

# Files that make up a tokenizer in a Hugging Face model directory; copied by the converters.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)

ProgressFn = Callable[[int, int], None]


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, truncated or corrupted.

    ``path`` is the offending file (or directory) and ``tensors`` the names of the tensors whose
    bytes are affected, when that is known.
    """

    def __init__(
        self, message: str, *, path: str | os.PathLike[str] | None = None, tensors: Iterable[str] = ()
    ) -> None:
        super().__init__(message)
        self.path = str(path) if path is not None else None
        self.tensors = list(tensors)


def crc32(data: Any, value: int = 0) -> int:
    """CRC-32 (zlib polynomial) of a bytes-like object, continuing from ``value``."""
    if _fast_crc32 is not None:
        return _fast_crc32(data, value)
    return zlib.crc32(data, value)


def crc32_implementation() -> str:
    return "isal" if _fast_crc32 is not None else "zlib"


# ---------------------------------------------------------------------------------------------------
# dtypes


def _storable_dtypes() -> dict[str, torch.dtype]:
    names = (
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "complex128",
        "complex64",
        "complex32",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint64",
        "uint32",
        "uint16",
        "uint8",
        "bool",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
        "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    )
    table: dict[str, torch.dtype] = {}
    for name in names:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            continue  # older torch builds lack some of the float8/float4 types
        try:
            with warnings.catch_warnings():  # complex32 warns that it is experimental
                warnings.simplefilter("ignore")
                torch.empty(1, dtype=dtype).view(torch.uint8).view(dtype)
        except (RuntimeError, TypeError):
            continue
        table[name] = dtype
    return table


STORABLE_DTYPES: dict[str, torch.dtype] = _storable_dtypes()


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in STORABLE_DTYPES:
        raise ValueError(f"dtype {dtype} cannot be stored in a checkpoint")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return STORABLE_DTYPES[name]
    except KeyError:
        raise CheckpointError(f"unknown dtype {name!r} (this torch build cannot represent it)") from None


# ---------------------------------------------------------------------------------------------------
# index


@dataclass(frozen=True)
class TensorEntry:
    """One state-dict entry. ``offset``/``nbytes`` locate its blob inside ``partition``;
    ``storage_offset`` (in elements of ``dtype``), ``shape`` and ``stride`` describe the view."""

    name: str
    partition: int
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int
    dtype: str
    tied_to: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "partition": self.partition,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "shape": list(self.shape),
            "stride": list(self.stride),
            "storage_offset": self.storage_offset,
            "dtype": self.dtype,
        }
        if self.tied_to is not None:
            out["tied_to"] = self.tied_to
        return out

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def view_nbytes(self) -> int:
        """Bytes of the logical tensor (what it would occupy contiguously)."""
        return self.numel * dtype_from_name(self.dtype).itemsize


@dataclass(frozen=True)
class PartitionInfo:
    file: str
    nbytes: int
    checksums: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "nbytes": self.nbytes, "checksums": list(self.checksums)}


@dataclass
class CheckpointIndex:
    partitions: list[PartitionInfo]
    tensors: list[TensorEntry]
    checksum_chunk_bytes: int = CHECKSUM_CHUNK_BYTES
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    tensor_alignment: int = TENSOR_ALIGNMENT
    format_version: int = FORMAT_VERSION
    # Derived: byte offset of each partition in a buffer holding all partitions back to back.
    partition_bases: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        bases, pos = [], 0
        for p in self.partitions:
            bases.append(pos)
            pos += p.nbytes
        self.partition_bases = bases

    @property
    def total_bytes(self) -> int:
        """Bytes of all partitions, padding included: the size of a buffer that holds the checkpoint."""
        return sum(p.nbytes for p in self.partitions)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data, each shared blob counted once, padding excluded."""
        seen: set[tuple[int, int]] = set()
        total = 0
        for e in self.tensors:
            key = (e.partition, e.offset)
            if e.tied_to is None and e.nbytes and key not in seen:
                seen.add(key)
                total += e.nbytes
        return total

    def tensors_in(self, partition: int, start: int, end: int) -> list[str]:
        """Names of the tensors whose stored bytes overlap ``[start, end)`` of ``partition``."""
        return [
            e.name
            for e in self.tensors
            if e.partition == partition and e.nbytes and e.offset < end and e.offset + e.nbytes > start
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tensor_alignment": self.tensor_alignment,
            "checksum": {"algorithm": self.checksum_algorithm, "chunk_bytes": self.checksum_chunk_bytes},
            "total_bytes": self.total_bytes,
            "partitions": [p.to_json() for p in self.partitions],
            "tensors": [e.to_json() for e in self.tensors],
        }

    @classmethod
    def from_json(cls, data: Any, source: str = INDEX_FILE) -> CheckpointIndex:
        try:
            if data.get("format") != FORMAT_NAME:
                raise CheckpointError(f"{source}: not a {FORMAT_NAME} index", path=source)
            version = int(data["format_version"])
            if version > FORMAT_VERSION:
                raise CheckpointError(
                    f"{source}: format_version {version} is newer than this reader ({FORMAT_VERSION})",
                    path=source,
                )
            checksum = data["checksum"]
            partitions = [
                PartitionInfo(str(p["file"]), int(p["nbytes"]), tuple(int(c) for c in p["checksums"]))
                for p in data["partitions"]
            ]
            tensors = [
                TensorEntry(
                    name=str(t["name"]),
                    partition=int(t["partition"]),
                    offset=int(t["offset"]),
                    nbytes=int(t["nbytes"]),
                    shape=tuple(int(s) for s in t["shape"]),
                    stride=tuple(int(s) for s in t["stride"]),
                    storage_offset=int(t["storage_offset"]),
                    dtype=str(t["dtype"]),
                    tied_to=t.get("tied_to"),
                )
                for t in data["tensors"]
            ]
            index = cls(
                partitions=partitions,
                tensors=tensors,
                checksum_chunk_bytes=int(checksum["chunk_bytes"]),
                checksum_algorithm=str(checksum["algorithm"]),
                tensor_alignment=int(data["tensor_alignment"]),
                format_version=version,
            )
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"{source}: malformed index ({type(exc).__name__}: {exc})", path=source
            ) from exc
        index.validate(source)
        return index

    def validate(self, source: str = INDEX_FILE) -> None:
        """Reject an index a loader could not serve safely (views out of their blob, bad offsets)."""
        if self.checksum_algorithm != CHECKSUM_ALGORITHM:
            raise CheckpointError(f"{source}: unsupported checksum {self.checksum_algorithm!r}", path=source)
        ck = self.checksum_chunk_bytes
        if ck <= 0 or ck % PARTITION_ALIGNMENT:
            raise CheckpointError(f"{source}: checksum chunk {ck} is not a multiple of 4 KiB", path=source)
        for p in self.partitions:
            if p.nbytes % PARTITION_ALIGNMENT:
                raise CheckpointError(
                    f"{source}: partition {p.file} size {p.nbytes} is not 4 KiB-aligned", path=source
                )
            if len(p.checksums) != -(-p.nbytes // ck):
                raise CheckpointError(
                    f"{source}: partition {p.file} has {len(p.checksums)} checksums, "
                    f"expected {-(-p.nbytes // ck)}",
                    path=source,
                )
            if Path(p.file).name != p.file:
                raise CheckpointError(
                    f"{source}: partition file name {p.file!r} is not a plain name", path=source
                )
        names: set[str] = set()
        for e in self.tensors:
            where = f"{source}: tensor {e.name!r}"
            if e.name in names:
                raise CheckpointError(f"{where} appears twice", path=source, tensors=[e.name])
            names.add(e.name)
            dtype = dtype_from_name(e.dtype)
            if len(e.shape) != len(e.stride) or any(s < 0 for s in (*e.shape, *e.stride)):
                raise CheckpointError(f"{where} has a bad shape/stride", path=source, tensors=[e.name])
            if e.tied_to is not None and e.tied_to not in names:
                raise CheckpointError(
                    f"{where} is tied to {e.tied_to!r}, which is not an earlier tensor",
                    path=source,
                    tensors=[e.name],
                )
            if e.numel == 0:
                continue
            if not 0 <= e.partition < len(self.partitions):
                raise CheckpointError(
                    f"{where} names partition {e.partition}, which does not exist",
                    path=source,
                    tensors=[e.name],
                )
            if e.offset % max(dtype.itemsize, 1) or e.offset < 0:
                raise CheckpointError(
                    f"{where} offset {e.offset} is misaligned", path=source, tensors=[e.name]
                )
            if e.offset + e.nbytes > self.partitions[e.partition].nbytes:
                raise CheckpointError(
                    f"{where} lies past the end of its partition", path=source, tensors=[e.name]
                )
            extent = e.storage_offset + 1 + sum((n - 1) * s for n, s in zip(e.shape, e.stride))
            if e.storage_offset < 0 or extent * dtype.itemsize > e.nbytes:
                raise CheckpointError(
                    f"{where}: its view reaches past its stored bytes", path=source, tensors=[e.name]
                )


def read_index(path: str | os.PathLike[str]) -> CheckpointIndex:
    root = Path(path)
    index_path = root / INDEX_FILE
    if TMP_MARKER in root.name:
        raise CheckpointError(f"{root}: a temporary (unfinished) checkpoint directory", path=root)
    try:
        raw = index_path.read_text()
    except FileNotFoundError:
        raise CheckpointError(f"{root}: not a checkpoint (no {INDEX_FILE})", path=index_path) from None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{index_path}: not valid JSON ({exc})", path=index_path) from exc
    return CheckpointIndex.from_json(data, source=str(index_path))


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """True iff ``path`` is a whole checkpoint (its index exists and it is not a temporary directory)."""
    root = Path(path)
    return TMP_MARKER not in root.name and (root / INDEX_FILE).is_file()


def checkpoint_size(path: str | os.PathLike[str]) -> int:
    """Bytes of tensor data in the checkpoint (shared tensors counted once, padding excluded).

    A buffer holding the whole checkpoint needs ``read_index(path).total_bytes`` (padding included).
    """
    return read_index(path).tensor_bytes


def read_model_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        return json.loads((Path(path) / MODEL_FILE).read_text())
    except FileNotFoundError:
        return {}


# ---------------------------------------------------------------------------------------------------
# writer


@dataclass
class CheckpointInfo:
    path: Path
    num_tensors: int
    num_partitions: int
    tensor_bytes: int
    total_bytes: int
    architecture: str | None
    dtypes: dict[str, int]


@dataclass
class _Blob:
    """One unique storage: the byte span [lo, hi) of it that its tensors use."""

    storage: torch.UntypedStorage
    lo: int
    hi: int
    partition: int = 0
    offset: int = 0

    @property
    def nbytes(self) -> int:
        return self.hi - self.lo


def _align_up(n: int, a: int) -> int:
    return -(-n // a) * a


def _tensor_byte_span(t: torch.Tensor) -> tuple[int, int]:
    itemsize = t.element_size()
    start = t.storage_offset() * itemsize
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return start, start + extent * itemsize


def _check_storable(name: str, t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"state dict entry {name!r} is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        raise ValueError(f"tensor {name!r}: only dense strided tensors can be stored (layout {t.layout})")
    if t.device.type == "meta":
        raise ValueError(f"tensor {name!r} is on the meta device: it has no data to store")
    dtype_name(t.dtype)
    return t.detach()


def _plan(
    state_dict: Mapping[str, torch.Tensor], partition_bytes: int
) -> tuple[list[_Blob], list[tuple[str, torch.Tensor, int | None]], int]:
    """Group tensors by storage and lay the blobs out in partitions, in state-dict order."""
    blobs: list[_Blob] = []
    by_storage: dict[tuple[str, int], int] = {}
    members: list[tuple[str, torch.Tensor, int | None]] = []  # (name, tensor, blob index or None)
    for name, raw in state_dict.items():
        t = _check_storable(name, raw)
        if t.numel() == 0:
            members.append((name, t, None))
            continue
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        lo, hi = _tensor_byte_span(t)
        if key in by_storage:
            b = blobs[by_storage[key]]
            b.lo, b.hi = min(b.lo, lo), max(b.hi, hi)
        else:
            by_storage[key] = len(blobs)
            blobs.append(_Blob(storage, lo, hi))
        members.append((name, t, by_storage[key]))
    for b in blobs:
        # Every view of the blob must stay element-aligned whatever its dtype (itemsize <= 16).
        b.lo -= b.lo % 16
    partition, pos = 0, 0
    for b in blobs:
        off = _align_up(pos, TENSOR_ALIGNMENT)
        if pos > 0 and off + b.nbytes > partition_bytes:
            partition, off = partition + 1, 0
        b.partition, b.offset = partition, off
        pos = off + b.nbytes
    num_partitions = partition + 1 if blobs else 0
    return blobs, members, num_partitions


class _ChecksummingWriter:
    """Writes a partition file, computing a CRC-32 per ``chunk`` bytes of the file as it goes."""

    def __init__(self, path: Path, chunk: int) -> None:
        self.path = path
        self.chunk = chunk
        self.file = open(path, "wb")  # noqa: SIM115 - closed in close()
        self.pos = 0
        self.crc = 0
        self.checksums: list[int] = []

    def write(self, data: memoryview) -> None:
        data = data.cast("B")
        while len(data):
            room = self.chunk - self.pos % self.chunk
            piece = data[:room]
            self.file.write(piece)
            self.crc = crc32(piece, self.crc)
            self.pos += len(piece)
            data = data[len(piece) :]
            if self.pos % self.chunk == 0:
                self.checksums.append(self.crc)
                self.crc = 0

    def pad_to(self, pos: int) -> None:
        if pos < self.pos:
            raise AssertionError("writer cannot move backwards")
        zeros = bytes(min(pos - self.pos, 1 << 20))
        while self.pos < pos:
            self.write(memoryview(zeros)[: pos - self.pos])

    def close(self) -> int:
        self.pad_to(_align_up(self.pos, PARTITION_ALIGNMENT))
        if self.pos % self.chunk:
            self.checksums.append(self.crc)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.pos


def _blob_bytes(b: _Blob) -> memoryview:
    dev = b.storage.device
    u8 = torch.empty(0, dtype=torch.uint8, device=dev).set_(b.storage, 0, (b.storage.nbytes(),), (1,))
    span = u8[b.lo : b.hi]
    if dev.type != "cpu":
        span = span.cpu()
    return memoryview(span.numpy())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for fname in filenames:
            fd = os.open(os.path.join(dirpath, fname), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def tmp_dir_for(dest: Path) -> Path:
    return dest.with_name(f"{dest.name}{TMP_MARKER}{os.getpid()}-{secrets.token_hex(4)}")


def publish_dir(tmp: Path, dest: Path, *, overwrite: bool) -> None:
    """Atomically move a fully written (and fsynced) ``tmp`` directory to ``dest``."""
    _fsync_tree(tmp)
    old: Path | None = None
    if dest.exists():
        if not overwrite:
            raise FileExistsError(f"{dest} already exists (pass overwrite=True to replace it)")
        old = tmp_dir_for(dest)
        os.rename(dest, old)
    os.rename(tmp, dest)
    _fsync_dir(dest.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _summarise(members: list[tuple[str, torch.Tensor, int | None]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for _name, t, _b in members:
        key = dtype_name(t.dtype)
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def dominant_float_dtype(dtypes: Mapping[str, int]) -> torch.dtype | None:
    floats = {k: v for k, v in dtypes.items() if STORABLE_DTYPES[k].is_floating_point}
    if not floats:
        return None
    return STORABLE_DTYPES[max(floats, key=lambda k: floats[k])]


def _is_pretrained_model(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "config") and hasattr(obj, "save_pretrained")


def save_checkpoint(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    config: Any = None,
    tokenizer: Any = None,
    generation_config: Any = None,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    overwrite: bool = False,
    extra_files: Mapping[str, str | os.PathLike[str]] | None = None,
    progress: ProgressFn | None = None,
) -> CheckpointInfo:
    """Write a model (its state dict, config, generation config) or a plain state dict as a checkpoint.

    ``extra_files`` maps names inside the checkpoint to files to copy in (e.g. tokenizer files of a
    source directory). ``progress(bytes_done, bytes_total)`` is called as tensor data is written.
    Raises FileExistsError if ``path`` exists and ``overwrite`` is false.
    """
    dest = Path(path).absolute()
    if partition_bytes < PARTITION_ALIGNMENT:
        raise ValueError(f"partition_bytes must be at least {PARTITION_ALIGNMENT}")
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} already exists (pass overwrite=True to replace it)")
    if TMP_MARKER in dest.name:
        raise ValueError(f"{dest.name}: checkpoint names must not contain {TMP_MARKER!r}")

    architecture: str | None = None
    if isinstance(model_or_state_dict, torch.nn.Module):
        model = model_or_state_dict
        state_dict: Mapping[str, torch.Tensor] = model.state_dict()
        if _is_pretrained_model(model):
            architecture = type(model).__name__
            if config is None:
                config = copy.deepcopy(model.config)
                config.architectures = [architecture]
            if generation_config is None and getattr(model, "can_generate", lambda: False)():
                generation_config = getattr(model, "generation_config", None)
    else:
        state_dict = model_or_state_dict
    if architecture is None and config is not None:
        archs = getattr(config, "architectures", None) or []
        architecture = archs[0] if archs else None

    blobs, members, num_partitions = _plan(state_dict, partition_bytes)
    dtypes = _summarise(members)
    total = sum(b.nbytes for b in blobs)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_dir_for(dest)
    tmp.mkdir()
    try:
        partitions: list[PartitionInfo] = []
        done = 0
        if progress is not None:
            progress(0, total)
        blob_iter = iter(blobs)
        pending = next(blob_iter, None)
        for p in range(num_partitions):
            fname = f"data_{p}.bin"
            writer = _ChecksummingWriter(tmp / fname, CHECKSUM_CHUNK_BYTES)
            try:
                while pending is not None and pending.partition == p:
                    writer.pad_to(pending.offset)
                    writer.write(_blob_bytes(pending))
                    done += pending.nbytes
                    if progress is not None:
                        progress(done, total)
                    pending = next(blob_iter, None)
            finally:
                size = writer.close()
            partitions.append(PartitionInfo(fname, size, tuple(writer.checksums)))

        entries: list[TensorEntry] = []
        seen_views: dict[tuple[Any, ...], str] = {}
        for name, t, bi in members:
            if bi is None:
                entries.append(
                    TensorEntry(name, 0, 0, 0, tuple(t.shape), tuple(t.stride()), 0, dtype_name(t.dtype))
                )
                continue
            b = blobs[bi]
            start, _end = _tensor_byte_span(t)
            rel = (start - b.lo) // t.element_size()
            view_key = (bi, rel, tuple(t.shape), tuple(t.stride()), t.dtype)
            tied_to = seen_views.get(view_key)
            if tied_to is None:
                seen_views[view_key] = name
            entries.append(
                TensorEntry(
                    name,
                    b.partition,
                    b.offset,
                    b.nbytes,
                    tuple(t.shape),
                    tuple(t.stride()),
                    rel,
                    dtype_name(t.dtype),
                    tied_to,
                )
            )
        index = CheckpointIndex(partitions=partitions, tensors=entries)
        index.validate(str(tmp / INDEX_FILE))
        (tmp / INDEX_FILE).write_text(json.dumps(index.to_json(), indent=1))

        float_dtype = dominant_float_dtype(dtypes)
        if config is not None:
            config = copy.deepcopy(config)
            if float_dtype is not None and hasattr(config, "dtype"):
                # Our loader builds the model in the dtype the weights are stored in; say so in the
                # config too, as transformers' own save_pretrained does.
                config.dtype = float_dtype
            config.save_pretrained(tmp)
        if generation_config is not None:
            generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for rel_name, src in (extra_files or {}).items():
            target = tmp / rel_name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, target)
        model_info = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "architecture": architecture,
            "num_tensors": len(entries),
            "tensor_bytes": index.tensor_bytes,
            "total_bytes": index.total_bytes,
            "num_partitions": len(partitions),
            "dtypes": dtypes,
            "dtype": dtype_name(float_dtype) if float_dtype is not None else None,
        }
        (tmp / MODEL_FILE).write_text(json.dumps(model_info, indent=1))
        publish_dir(tmp, dest, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CheckpointInfo(
        path=dest,
        num_tensors=len(entries),
        num_partitions=len(partitions),
        tensor_bytes=index.tensor_bytes,
        total_bytes=index.total_bytes,
        architecture=architecture,
        dtypes=dtypes,
    )
