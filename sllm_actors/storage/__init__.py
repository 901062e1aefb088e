"""Checkpoint storage: a loading-optimised format, a pipelined loader and converters.

Importing this package imports torch but not transformers: node processes start often, and only
the functions that build models or read foreign formats import transformers, when called.
"""

from __future__ import annotations

from sllm_actors.storage.convert import convert, convert_cli, detect_source, read_sllm_store
from sllm_actors.storage.format import (
    DEFAULT_PARTITION_BYTES,
    FORMAT_VERSION,
    CheckpointError,
    CheckpointIndex,
    CheckpointInfo,
    PartitionInfo,
    TensorEntry,
    checkpoint_size,
    is_checkpoint,
    read_index,
    save_checkpoint,
)
from sllm_actors.storage.http_fetch import FetchError, HttpCheckpointFetch, is_url
from sllm_actors.storage.loader import (
    Arrival,
    HostCheckpoint,
    LoadStats,
    alloc_host_buffer,
    copy_checkpoint,
    copy_host_to_device,
    load_buffer,
    load_into_host,
    load_state_dict,
    map_partitions,
    release_pinned_buffers,
    state_dict_from_host,
    verify_checkpoint,
)
from sllm_actors.storage.model import load_model, load_tokenizer

__all__ = [
    "Arrival",
    "DEFAULT_PARTITION_BYTES",
    "FORMAT_VERSION",
    "CheckpointError",
    "CheckpointIndex",
    "CheckpointInfo",
    "FetchError",
    "HostCheckpoint",
    "HttpCheckpointFetch",
    "LoadStats",
    "PartitionInfo",
    "TensorEntry",
    "alloc_host_buffer",
    "checkpoint_size",
    "convert",
    "convert_cli",
    "copy_checkpoint",
    "copy_host_to_device",
    "detect_source",
    "is_checkpoint",
    "is_url",
    "load_buffer",
    "load_into_host",
    "load_model",
    "load_state_dict",
    "load_tokenizer",
    "map_partitions",
    "read_index",
    "read_sllm_store",
    "release_pinned_buffers",
    "save_checkpoint",
    "state_dict_from_host",
    "verify_checkpoint",
]
