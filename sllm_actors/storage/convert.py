"""Converters into our checkpoint format from the formats models come in.

Sources:

* a Hugging Face model directory: ``model.safetensors``, sharded safetensors with
  ``model.safetensors.index.json``, or PyTorch ``pytorch_model*.bin``. Tensors are read without
  instantiating the model (safetensors memory-mapped, ``torch.load(mmap=True, weights_only=True)``);
  config, generation config and tokenizer files are carried across.
* a GGUF file (or a directory holding exactly one): transformers dequantises it into a float model
  (we take its state dict and config, minus ``quantization_config``, and its tokenizer).
* a ServerlessLLM ``sllm-store`` directory: ``tensor_index.json`` mapping each name to
  ``[offset, size, shape, stride, dtype]`` with offsets into the concatenation of ``tensor.data_0``,
  ``tensor.data_1``, ... (the way sllm-store's loader reads them: file sizes summed in order); each
  record holds a tensor's whole storage, and tied tensors share an offset.
"""

from __future__ import annotations

import bisect
import copy
import json
import logging
import mmap
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from sllm_actors.storage.format import (
    DEFAULT_PARTITION_BYTES,
    TOKENIZER_FILES,
    CheckpointError,
    CheckpointInfo,
    ProgressFn,
    save_checkpoint,
)

__all__ = ["convert", "convert_cli", "detect_source", "read_sllm_store"]

log = logging.getLogger(__name__)

SourceKind = Literal["hf", "gguf", "sllm-store"]

SLLM_STORE_INDEX = "tensor_index.json"
_SLLM_DATA_RE = re.compile(r"^tensor\.data_(\d+)$")


def detect_source(src: str | os.PathLike[str]) -> SourceKind:
    """Which kind of model source ``src`` is; ValueError when it is none we can convert."""
    p = Path(src)
    if p.is_file():
        if p.suffix == ".gguf":
            return "gguf"
        raise ValueError(f"{p}: not a model source (files must be .gguf; otherwise pass a directory)")
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if (p / SLLM_STORE_INDEX).is_file():
        return "sllm-store"
    if any(p.glob("*.safetensors")) or any(p.glob("*.bin")):
        return "hf"
    if len(list(p.glob("*.gguf"))) == 1:
        return "gguf"
    raise ValueError(f"{p}: no safetensors, .bin, .gguf or sllm-store files found")


def convert(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    progress: ProgressFn | None = None,
    *,
    dtype: torch.dtype | None = None,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    overwrite: bool = False,
) -> CheckpointInfo:
    """Convert ``src`` (see module doc) into a checkpoint at ``dest``, written atomically.

    ``dtype`` casts floating tensors (e.g. bfloat16 halves a dequantised GGUF, which is float32).
    ``progress(bytes_done, bytes_total)`` reports the writing of tensor data.
    """
    kind = detect_source(src)
    src_path = Path(src)
    if kind == "gguf":
        gguf_file = src_path if src_path.is_file() else next(src_path.glob("*.gguf"))
        state_dict, config, generation_config, tokenizer = _read_gguf(gguf_file)
        extra: dict[str, Path] = {}
    else:
        state_dict = _read_hf_dir(src_path) if kind == "hf" else read_sllm_store(src_path)
        config, generation_config = _read_hf_configs(src_path)
        tokenizer = None
        extra = {name: src_path / name for name in TOKENIZER_FILES if (src_path / name).is_file()}
        if config is not None:
            _add_missing_tied_keys(state_dict, config)
            if kind == "hf":
                state_dict = _as_transformers_loads_it(src_path, state_dict, config)
    if dtype is not None:
        state_dict = _cast_floating(state_dict, dtype)
    return save_checkpoint(
        state_dict,
        dest,
        config=config,
        tokenizer=tokenizer,
        generation_config=generation_config,
        partition_bytes=partition_bytes,
        overwrite=overwrite,
        extra_files=extra,
        progress=progress,
    )


def convert_cli(src: str | os.PathLike[str], dest: str | os.PathLike[str], **kwargs: Any) -> CheckpointInfo:
    """``convert`` with a Rich progress bar (for ``sllm store convert``)."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    kind = detect_source(src)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ) as bar:
        task = bar.add_task(f"reading {kind} {Path(src).name}", total=None)

        def report(done: int, total: int) -> None:
            bar.update(task, description=f"writing {Path(dest).name}", completed=done, total=total)

        info = convert(src, dest, report, **kwargs)
    return info


# ---------------------------------------------------------------------------------------------------
# Hugging Face directories


def _read_hf_configs(root: Path) -> tuple[Any, Any]:
    from transformers import AutoConfig, GenerationConfig

    config = generation_config = None
    if (root / "config.json").is_file():
        config = AutoConfig.from_pretrained(root)
    else:
        log.warning(
            "%s: no config.json; the checkpoint will hold tensors only (load_model needs a config)", root
        )
    if (root / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(root)
    return config, generation_config


def _weight_files(root: Path, index_name: str, single: str, pattern: str) -> list[Path]:
    index = root / index_name
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise CheckpointError(f"{index}: shard(s) missing: {', '.join(missing)}", path=root / missing[0])
        return [root / n for n in names]
    if (root / single).is_file():
        return [root / single]
    return sorted(p for p in root.glob(pattern) if p.is_file())


def _read_hf_dir(root: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    state_dict: dict[str, torch.Tensor] = {}
    files = _weight_files(root, "model.safetensors.index.json", "model.safetensors", "*.safetensors")
    if files:
        for f in files:
            try:  # memory-mapped: the source is read once, when its bytes are written out
                handle = safe_open(str(f), framework="pt", device="cpu", backend="mmap")
            except TypeError:  # older safetensors without the backend argument
                handle = safe_open(str(f), framework="pt", device="cpu")
            with handle as h:
                for key in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    state_dict[key] = h.get_tensor(key)
        return state_dict
    files = _weight_files(root, "pytorch_model.bin.index.json", "pytorch_model.bin", "*.bin")
    if not files:
        raise ValueError(f"{root}: no weight files found")
    for f in files:
        loaded = torch.load(f, map_location="cpu", mmap=True, weights_only=True)
        if not isinstance(loaded, Mapping):
            raise CheckpointError(f"{f}: expected a state dict, found {type(loaded).__name__}", path=f)
        state_dict.update(loaded)
    return state_dict


def _add_missing_tied_keys(state_dict: dict[str, torch.Tensor], config: Any) -> None:
    """Hugging Face files omit tied copies (``lm_head.weight`` of a tied model); record them as
    aliases, so our state dict matches ``model.state_dict()`` and a loader need not know the tie."""
    from sllm_actors.storage.model import causal_lm_class, parameters_on_meta

    try:
        cls = causal_lm_class(config)
        with parameters_on_meta():
            skeleton = cls._from_config(copy.deepcopy(config))
        tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    except (CheckpointError, ValueError, TypeError, AttributeError, RuntimeError, ImportError) as exc:
        log.info(
            "cannot work out tied weights for %s (%s); leaving the state dict as it is",
            type(config).__name__,
            exc,
        )
        return
    for target, source in tied.items():
        if target not in state_dict and source in state_dict:
            state_dict[target] = state_dict[source]


def _expected_keys(config: Any) -> set[str] | None:
    """The state-dict keys of the model the config builds (parameters and persistent buffers)."""
    from sllm_actors.storage.model import causal_lm_class, parameters_on_meta

    try:
        cls = causal_lm_class(config)
        with parameters_on_meta():
            skeleton = cls._from_config(copy.deepcopy(config))
    except (CheckpointError, ValueError, TypeError, AttributeError, RuntimeError, ImportError) as exc:
        log.info("cannot build %s to check its keys (%s)", type(config).__name__, exc)
        return None
    return set(skeleton.state_dict())


def _as_transformers_loads_it(root: Path, state_dict: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """The state dict under the model's own parameter names.

    Files usually hold exactly those, and then are taken as they are. Some architectures store tensors
    under other names or shapes (older names, experts kept one by one where the model fuses them, and
    transformers' ``save_pretrained`` writes such legacy layouts back out); transformers renames and
    converts those while loading, per architecture. Rather than keep a table of our own, let
    transformers load the directory and take its model's state dict: whatever it loads, we store.
    """
    expected = _expected_keys(config)
    if expected is None or expected <= state_dict.keys():
        return state_dict
    from sllm_actors.storage.model import causal_lm_class

    missing = sorted(expected - state_dict.keys())
    log.info("%s: %d tensors stored under other names (%s, ...); loading them the way transformers does",
             root, len(missing), ", ".join(missing[:3]))
    cls = causal_lm_class(config)
    model, info = cls.from_pretrained(root, dtype="auto", output_loading_info=True)
    still_missing = sorted(info.get("missing_keys") or [])
    if still_missing:
        raise CheckpointError(
            f"{root}: transformers cannot find weights the model needs either: {', '.join(still_missing[:10])}",
            path=root, tensors=still_missing,
        )
    return dict(model.state_dict())


def _cast_floating(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    done: dict[tuple[Any, ...], torch.Tensor] = {}
    for name, t in state_dict.items():
        if not t.is_floating_point() or t.dtype == dtype:
            out[name] = t
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key not in done:  # keep exact aliases (tied weights) aliased
            done[key] = t.to(dtype)
        out[name] = done[key]
    return out


# ---------------------------------------------------------------------------------------------------
# GGUF


def _read_gguf(path: Path) -> tuple[dict[str, torch.Tensor], Any, Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # The model is marked quantized (it came through the GGUF quantizer) and refuses save_pretrained,
    # but its tensors are plain dequantised floats: take them and a config without the quantizer.
    state_dict = dict(model.state_dict())
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(model).__name__]
    generation_config = model.generation_config if model.can_generate() else None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, OSError, KeyError, TypeError) as exc:
        log.warning("%s: no usable tokenizer in the GGUF metadata (%s); converting the model only", path, exc)
        tokenizer = None
    return state_dict, config, generation_config, tokenizer


# ---------------------------------------------------------------------------------------------------
# sllm-store


def _sllm_data_files(root: Path) -> list[Path]:
    numbered: dict[int, Path] = {}
    for p in root.iterdir():
        m = _SLLM_DATA_RE.match(p.name)
        if m:
            numbered[int(m.group(1))] = p
    if not numbered:
        raise CheckpointError(f"{root}: no tensor.data_* files", path=root)
    missing = [i for i in range(max(numbered) + 1) if i not in numbered]
    if missing:
        raise CheckpointError(
            f"{root}: tensor.data_{missing[0]} is missing", path=root / f"tensor.data_{missing[0]}"
        )
    return [numbered[i] for i in range(len(numbered))]


def _sllm_dtype(name: str, tensor: str, where: Path) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(
            f"{where}: tensor {tensor!r} has unknown dtype {name!r}", path=where, tensors=[tensor]
        )
    return dtype


def read_sllm_store(root: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The state dict of a ServerlessLLM sllm-store checkpoint directory (memory-mapped)."""
    root = Path(root)
    index_path = root / SLLM_STORE_INDEX
    try:
        index = json.loads(index_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path}: cannot read ({exc})", path=index_path) from exc
    files = _sllm_data_files(root)
    bases: list[int] = []
    views: list[torch.Tensor] = []
    pos = 0
    for f in files:
        size = f.stat().st_size
        bases.append(pos)
        pos += size
        if size == 0:
            views.append(torch.empty(0, dtype=torch.uint8))
            continue
        with open(f, "rb") as fh:
            # Private mapping: pages come from the page cache as they are written out, and the
            # tensors are writable (torch warns about read-only numpy memory).
            mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_COPY)
        views.append(torch.from_numpy(np.frombuffer(mm, dtype=np.uint8)))
    stream_size = pos

    blobs: dict[tuple[int, int], torch.Tensor] = {}
    aliases: dict[tuple[Any, ...], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, record in index.items():
        try:
            offset, size, shape, stride, dtype_str = record
            offset, size = int(offset), int(size)
            shape, stride = tuple(int(s) for s in shape), tuple(int(s) for s in stride)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"{index_path}: bad record for {name!r}: {record!r}", path=index_path, tensors=[name]
            ) from exc
        dtype = _sllm_dtype(dtype_str, name, index_path)
        numel = int(np.prod(shape)) if shape else 1
        if numel == 0:
            out[name] = torch.empty_strided(shape, stride, dtype=dtype)
            continue
        if offset < 0 or size < 0 or offset + size > stream_size:
            raise CheckpointError(
                f"{root}: tensor {name!r} lies past the end of the data files "
                f"({offset}+{size} > {stream_size}); truncated tensor.data_* file?",
                path=files[-1],
                tensors=[name],
            )
        extent = (1 + sum((n - 1) * s for n, s in zip(shape, stride))) * dtype.itemsize
        if extent > size:
            raise CheckpointError(
                f"{index_path}: tensor {name!r} needs {extent} bytes, its record has {size}",
                path=index_path,
                tensors=[name],
            )
        key = (offset, size)
        if key not in blobs:
            blobs[key] = _sllm_bytes(views, bases, offset, size)
        blob = blobs[key]
        alias_key = (offset, size, shape, stride, dtype)
        if alias_key in aliases:
            out[name] = aliases[alias_key]
            continue
        if (blob.storage_offset() % dtype.itemsize) or (blob.data_ptr() % dtype.itemsize):
            blob = blobs[key] = blob.clone()
        typed = blob[: size - size % dtype.itemsize].view(dtype)
        out[name] = aliases[alias_key] = typed.as_strided(
            shape, stride, blob.storage_offset() // dtype.itemsize
        )
    return out


def _sllm_bytes(views: list[torch.Tensor], bases: list[int], offset: int, size: int) -> torch.Tensor:
    i = bisect.bisect_right(bases, offset) - 1
    rel = offset - bases[i]
    if rel + size <= views[i].numel():
        return views[i][rel : rel + size]
    # A record spanning two files: sllm-store's writer never does this, but its reader would cope.
    pieces, need = [], size
    while need > 0:
        piece = views[i][rel : rel + need]
        pieces.append(piece)
        need -= piece.numel()
        i, rel = i + 1, 0
    return torch.cat(pieces)
