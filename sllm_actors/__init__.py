"""sllm-actors: serverless LLM inference (a re-implementation of ServerlessLLM, OSDI'24) as a supervised actor
system.

What a user of the library reaches for, importable from here:

- ``Client`` and what it returns or raises (``Completion``, ``TokenEvent``, ``RequestError``,
  ``ClusterUnavailable``): talk to a running cluster;
- ``load_topology``, ``Topology``, ``TopologyError``: read and check a ``topology.yaml``;
- ``Controller``: run a cluster's controller process in this one (it starts the local nodes);
- ``messages``: the wire protocol, every message type the cluster speaks, and ``SamplingParams``, the sampling
  fields a request carries;
- ``Engine``: the inference engine one model instance runs (needs torch);
- ``convert``, ``load_model``, ``save_checkpoint``: the checkpoint store (needs torch).

Each name is imported on first use (PEP 562's module ``__getattr__``), so ``import sllm_actors`` imports
nothing else, and the controller, the client and the HTTP front end never import torch: only ``Engine`` and
the storage functions do, and only when asked for. ``tests/test_public_api.py`` holds this to account.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sllm_actors import messages
    from sllm_actors.actors.controller.process import Controller
    from sllm_actors.client import Client, ClusterUnavailable, Completion, RequestError, TokenEvent
    from sllm_actors.gpu.engine import Engine
    from sllm_actors.runtime.topology import Topology, TopologyError, load_topology
    from sllm_actors.messages import SamplingParams
    from sllm_actors.storage import convert, load_model, save_checkpoint

_EXPORTS: dict[str, str] = {
    "Client": "sllm_actors.client",
    "ClusterUnavailable": "sllm_actors.client",
    "Completion": "sllm_actors.client",
    "RequestError": "sllm_actors.client",
    "TokenEvent": "sllm_actors.client",
    "Topology": "sllm_actors.runtime.topology",
    "TopologyError": "sllm_actors.runtime.topology",
    "load_topology": "sllm_actors.runtime.topology",
    "SamplingParams": "sllm_actors.messages",
    "Controller": "sllm_actors.actors.controller.process",
    "Engine": "sllm_actors.gpu.engine",
    "convert": "sllm_actors.storage",
    "load_model": "sllm_actors.storage",
    "save_checkpoint": "sllm_actors.storage",
}
"""Public name -> the module that defines it (imported when the name is first asked for)."""

__all__ = [
    "Client",
    "ClusterUnavailable",
    "Completion",
    "Controller",
    "Engine",
    "RequestError",
    "SamplingParams",
    "TokenEvent",
    "Topology",
    "TopologyError",
    "convert",
    "load_model",
    "load_topology",
    "messages",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name == "messages":
        return importlib.import_module("sllm_actors.messages")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # asked once: later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
