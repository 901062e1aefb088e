"""How a model instance obtains its weights: through the node's storage tier actors.

Typed client functions over the tier actors, so instances never build raw tier messages.
"""

from __future__ import annotations

import threading
from pathlib import Path

from sllm_actors.actors.repository_tier import Fetch, RepositoryTierActor
from sllm_actors.models import directory_bytes, load_for_inference
from sllm_actors.node_context import Loaded, NodeContext
from sllm_actors.supervisor import ChildSpec
from sllm_actors.topology import NodeSpec

FETCH_TIMEOUT_S = 900.0
"""A first fetch of the default model downloads and converts it; later ones are instant."""


class StorageClient:
    def __init__(self, node: NodeContext, spec: NodeSpec) -> None:
        self.node = node
        self.spec = spec
        # Building a transformers model touches process-wide state (default dtype and device, lazy
        # init flags): two instances building at once corrupt each other. Loads on a node take turns.
        self.build_lock = threading.Lock()

    def child_specs(self) -> list[ChildSpec]:
        return [
            ChildSpec("repository", lambda sup, name: RepositoryTierActor.start(sup, name, node=self.node)),
        ]

    def load(self, model: str, source: str, device: str) -> Loaded:
        ref = self.node.directory.get("repository")
        if ref is None:
            raise RuntimeError(f"{self.node.name}: the repository tier is restarting; try again")
        path = Path(ref.ask(Fetch(model, source), timeout=FETCH_TIMEOUT_S))
        with self.build_lock:
            hf_model, tokenizer = load_for_inference(path, device)
        memory = sum(p.numel() * p.element_size() for p in hf_model.parameters())
        return Loaded(hf_model, tokenizer, "repository", memory)
