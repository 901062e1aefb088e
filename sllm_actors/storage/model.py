"""A ready transformers model from a checkpoint, without ever initialising weights randomly.

The skeleton is built with parameters on the meta device while the loader's threads read the
weights; the loaded tensors (views of one device allocation) are then assigned in place of the
meta parameters. Buffers are created for real during construction (on the CPU, then moved), so
values a module computes in ``__init__`` and does not save, such as rotary ``inv_freq``, are
exactly what ``from_pretrained`` produces.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sllm_actors.storage.format import (
    TOKENIZER_FILES,
    CheckpointError,
    dtype_from_name,
    read_index,
    read_model_info,
)
from sllm_actors.storage.loader import load_state_dict

log = logging.getLogger(__name__)


_meta_tls = threading.local()
_patch_lock = threading.Lock()
_patch_users = 0
_original_register_parameter = torch.nn.Module.register_parameter


def _register_parameter(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
    _original_register_parameter(module, name, param)
    if param is None or not getattr(_meta_tls, "depth", 0) or param.device.type == "meta":
        return
    meta = param.to("meta")
    if type(param) is torch.nn.Parameter:
        new = torch.nn.Parameter(meta, requires_grad=param.requires_grad)
        new.__dict__.update(param.__dict__)
    else:  # parameter subclasses (quantisation libraries) take their attributes as arguments
        kwargs = dict(param.__dict__)
        kwargs["requires_grad"] = param.requires_grad
        new = type(param)(meta, **kwargs)
    module._parameters[name] = new


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside (by this thread) get their parameters on the meta device: no memory,
    no init compute; buffers stay real. Same idea as accelerate's
    ``init_empty_weights(include_buffers=False)``, but other threads building modules meanwhile
    are not affected."""
    global _patch_users
    with _patch_lock:
        if _patch_users == 0:
            torch.nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _patch_users += 1
    _meta_tls.depth = getattr(_meta_tls, "depth", 0) + 1
    try:
        yield
    finally:
        _meta_tls.depth -= 1
        with _patch_lock:
            _patch_users -= 1
            if _patch_users == 0:
                original = _original_register_parameter
                torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def causal_lm_class(config: Any, requested: Any = None) -> Any:
    """The transformers class that builds a causal LM of ``config``: ``requested`` if given (a class, or its
    name in transformers), else the first of the config's architectures transformers has, else
    AutoModelForCausalLM's mapping for the config's type."""
    import transformers

    if requested is not None:
        return getattr(transformers, requested) if isinstance(requested, str) else requested
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    try:
        return transformers.AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise CheckpointError(f"no causal-LM class for config type {type(config).__name__}") from None


def _stored_dtype(root: Path) -> torch.dtype | None:
    name = read_model_info(root).get("dtype")
    return dtype_from_name(name) if name else None


def load_model(
    path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    model_class: Any = None,
    host: Any = None,
    timings: dict[str, float] | None = None,
    **loader_kwargs: Any,
) -> Any:
    """A transformers model (class from the config's architectures, else AutoModelForCausalLM's
    mapping) with the checkpoint's weights on ``device``, tied weights re-tied, in eval mode.

    ``dtype`` casts floating weights if it differs from the stored dtype (a copy); by default the
    model is built in the stored dtype and the loaded tensors are used as they are.
    ``loader_kwargs`` go to ``load_state_dict`` (threads, chunk_bytes, verify, direct_io, stats).
    ``host``: a HostCheckpoint of this checkpoint (the DRAM tier's copy) to take the weights from
    instead of the files; the model gets its own copy on a GPU (on the CPU the model shares the host
    copy's memory, which stays alive as long as the model, whatever the tier does with it).
    ``timings``: filled with where the time went, in seconds: ``config`` (index and config files),
    ``read`` (weights to the device, on a thread of its own), ``build`` (the skeleton, meanwhile),
    ``read_wait`` (what the read took beyond the build), ``assign`` (weights into the skeleton, ties,
    buffers to the device).
    """
    from transformers import AutoConfig, GenerationConfig

    t0 = time.perf_counter()
    root = Path(path)
    read_index(root)  # a missing or unfinished checkpoint fails here, before anything starts
    config = AutoConfig.from_pretrained(root)
    cls = causal_lm_class(config, model_class)
    stored = _stored_dtype(root)
    build_dtype = dtype or stored or getattr(config, "dtype", None) or torch.float32
    if isinstance(build_dtype, str):
        build_dtype = getattr(torch, build_dtype)

    # Read the weights while the (GIL-bound) skeleton is built: the reader threads mostly wait on
    # I/O or run checksum code that releases the GIL.
    read_s = [0.0]

    def read() -> dict[str, torch.Tensor]:
        started = time.perf_counter()
        try:
            if host is not None:
                # A private copy on the CPU would double the bytes moved for nothing: weights are never
                # written, and the view keeps the tier's buffer alive after an eviction.
                return host.state_dict(device, copy=False)
            return load_state_dict(root, device, **loader_kwargs)
        finally:
            read_s[0] = time.perf_counter() - started

    t1 = time.perf_counter()
    with ThreadPoolExecutor(1, thread_name_prefix="sllm-load-model") as pool:
        future = pool.submit(read)
        try:
            with parameters_on_meta():
                model = cls._from_config(config, dtype=build_dtype)
        finally:
            t2 = time.perf_counter()
            state_dict = future.result()
    t3 = time.perf_counter()

    if dtype is not None and stored is not None and dtype != stored:
        cast: dict[int, torch.Tensor] = {}
        for k, t in state_dict.items():
            if t.is_floating_point():
                state_dict[k] = cast.setdefault(id(t), t.to(dtype))

    result = model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    if result.unexpected_keys:
        log.warning(
            "%s: tensors the model does not use were ignored: %s",
            root,
            ", ".join(result.unexpected_keys[:10]),
        )
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    still_meta += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if still_meta:
        raise CheckpointError(
            f"{root}: the checkpoint lacks weights the model needs: {', '.join(still_meta[:10])}"
            + (f" and {len(still_meta) - 10} more" if len(still_meta) > 10 else ""),
            path=root,
            tensors=still_meta,
        )
    # Weights are already on the device; this moves the buffers built during construction.
    model.to(torch.device(device))
    if (root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(root)
    model.eval()
    if timings is not None:
        timings.update(config=t1 - t0, read=read_s[0], build=t2 - t1, read_wait=t3 - t2,
                       assign=time.perf_counter() - t3)
    return model


WARM_ARCHITECTURES = ("LlamaForCausalLM",)
"""The default model's and the replay family's architecture: importing it pulls in most of what any
transformers causal LM needs (modeling, generation and masking utilities)."""


def warm_imports(architectures: tuple[str, ...] = WARM_ARCHITECTURES) -> None:
    """Import what a first load needs: transformers' auto classes, the model and config modules of
    ``architectures``, the tokenizer stack. A fresh process otherwise pays for these imports inside its
    first cold start (3-8 s on a 2-core machine, against 0.4 s for the same 50 MB load afterwards)."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer, DynamicCache, GenerationConfig  # noqa: F401
    from transformers import PreTrainedTokenizerFast  # noqa: F401

    for name in architectures:
        getattr(transformers, name, None)


def warm_devices(devices: list[str] | tuple[str, ...]) -> float:
    """Start what a first forward on each CUDA device would otherwise start lazily: the CUDA context,
    cuBLAS/cuBLASLt handles and workspaces, and the kernels a decoder layer uses (matmuls in each
    float dtype, softmax, SiLU, RMS norm, rotary-style elementwise ops, SDPA, embedding lookups).
    Does nothing for CPU devices (nothing there is lazy enough to matter). Returns the seconds spent."""
    import time

    cuda = sorted({d for d in devices if str(d).startswith("cuda")})
    if not cuda or not torch.cuda.is_available():
        return 0.0
    started = time.perf_counter()
    for name in cuda:
        dev = torch.device(name)
        with torch.cuda.device(dev), torch.inference_mode():
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                x = torch.randn(8, 256, device=dev, dtype=dtype)
                w = torch.randn(512, 256, device=dev, dtype=dtype)
                y = torch.nn.functional.linear(x, w)
                y = torch.nn.functional.silu(y) * y
                y = torch.softmax(y.float(), dim=-1).to(dtype)
                var = y.float().pow(2).mean(-1, keepdim=True)
                y = (y.float() * torch.rsqrt(var + 1e-6)).to(dtype)
                torch.cat([y[..., 1:], -y[..., :1]], dim=-1)
                q = torch.randn(1, 4, 8, 64, device=dev, dtype=dtype)
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
                torch.nn.functional.embedding(torch.arange(8, device=dev), w)
                torch.matmul(x.unsqueeze(0), w.t().unsqueeze(0))
            torch.argmax(torch.randn(1, 1000, device=dev), dim=-1).item()
        torch.cuda.synchronize(dev)
    return time.perf_counter() - started


def has_tokenizer(path: str | os.PathLike[str]) -> bool:
    root = Path(path)
    return any(
        (root / name).is_file()
        for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "tokenizer_config.json")
    )


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """The tokenizer saved in the checkpoint directory, or None if it has none."""
    if not has_tokenizer(path):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(path))


__all__ = [
    "TOKENIZER_FILES", "causal_lm_class", "has_tokenizer", "load_model", "load_tokenizer", "parameters_on_meta",
    "warm_devices", "warm_imports",
]
