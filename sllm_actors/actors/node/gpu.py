"""GpuActor: one device (``cuda:N`` or ``cpu``), the parent of the model instances on it.

Instances are temporary children: a crashed instance is not restarted here, since where a model
runs next is the scheduler's decision; the GPU reports ``InstanceGone`` and the router resumes the
instance's requests from its token logs.
"""

from __future__ import annotations

import logging
from typing import Any

import pykka

from sllm_actors.actors.node.instance import ModelInstanceActor
from sllm_actors.messages import InstanceGone, LoadFailed, LoadModel, Message, Query, UnloadModel
from sllm_actors.actors.node.context import NodeContext
from sllm_actors.runtime.supervisor import ChildExited, Directory, SupervisedActor
from sllm_actors.runtime.topology import GpuSpec

__all__ = ["GpuActor", "deliver_to_instance", "gpu_actor_name", "load_model", "running_requests", "unload_model"]

log = logging.getLogger(__name__)


def gpu_actor_name(gpu: int) -> str:
    return f"gpu-{gpu}"


def instance_actor_name(instance_id: str) -> str:
    return f"instance/{instance_id}"


# ------------------------------------------------------------------ client functions
# What the node process's IO thread tells its GPU actors and their instances; each returns False when the
# actor is not there (restarting, or never was), as ``Directory.tell`` does, so the caller can answer for it.


def load_model(directory: Directory, order: LoadModel) -> bool:
    """Start an instance of ``order.model`` on GPU ``order.gpu``; it reports ``InstanceReady`` or
    ``LoadFailed``."""
    return directory.tell(gpu_actor_name(order.gpu), order)


def unload_model(directory: Directory, gpu: int, order: UnloadModel) -> bool:
    """Stop the instance ``order.instance_id`` on GPU ``gpu``; it reports ``InstanceGone``."""
    return directory.tell(gpu_actor_name(gpu), order)


def deliver_to_instance(directory: Directory, instance_id: str, message: Message) -> bool:
    """A request or migration message for the instance actor ``instance_id`` (a child of a GPU actor, which
    names it, so its address lives here beside the GPU actor rather than in instance.py)."""
    return directory.tell(instance_actor_name(instance_id), message)


def running_requests(directory: Directory, instance_ids: list[str], timeout: float = 5.0) -> list[dict[str, Any]]:
    """What the instances ``instance_ids`` run, and finished lately, each request with its token log (what a node
    re-registering with a restarted controller reports: ``NodeHello.running``). An instance that does not answer
    in time (still loading) reports nothing."""
    futures = []
    for instance_id in instance_ids:
        ref = directory.get(instance_actor_name(instance_id))
        if ref is not None:
            try:
                futures.append(ref.ask(Query("running"), block=False))
            except pykka.ActorDeadError:
                continue
    out: list[dict[str, Any]] = []
    for future in futures:
        try:
            out += future.get(timeout=timeout)
        except (pykka.ActorDeadError, pykka.Timeout):
            continue
    return out


class GpuActor(SupervisedActor):
    def __init__(
        self, supervisor: pykka.ActorRef[Any], name: str, *, node: NodeContext, index: int, spec: GpuSpec
    ) -> None:
        super().__init__(supervisor, name)
        self.node = node
        self.index = index
        self.spec = spec
        self.instances: dict[str, pykka.ActorRef[Any]] = {}
        self.unloading: set[str] = set()

    def started(self) -> None:
        total = self.spec.memory_bytes
        if self.spec.device.startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(f"{self.spec.device} is in the topology but this host has no CUDA device")
            free, device_total = torch.cuda.mem_get_info(torch.device(self.spec.device))
            total = min(total, device_total) if total else device_total
        self.memory_total = total
        self._publish()

    def stopping(self) -> None:
        for instance_id, ref in list(self.instances.items()):
            self.node.directory.remove(instance_actor_name(instance_id), ref)
            try:
                ref.stop(block=True, timeout=10)
            except (pykka.ActorDeadError, pykka.Timeout):
                pass
        self.instances.clear()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, LoadModel):
            self._load(message)
        elif isinstance(message, UnloadModel):
            self._unload(message.instance_id)
        elif isinstance(message, ChildExited):
            self._instance_exited(message)
        else:
            raise TypeError(f"{self.name}: unexpected message {message!r}")
        return None

    def _load(self, msg: LoadModel) -> None:
        if msg.instance_id in self.instances:
            return  # a repeated order; the first one is loading or loaded
        name = instance_actor_name(msg.instance_id)
        try:
            ref = ModelInstanceActor.start(
                self.actor_ref,
                name,
                node=self.node,
                instance_id=msg.instance_id,
                model_name=msg.model,
                source=msg.source,
                gpu_index=self.index,
                device=self.spec.device,
                max_concurrency=msg.max_concurrency,
                options=msg,
                memory_free=self.memory_total - sum(i.get("memory_bytes", 0)
                                                    for i in self.node.board.instances_on(self.index)),
            )
        except Exception as exc:  # the actor could not even be created: report, stay up
            self.node.send(LoadFailed(msg.instance_id, self.node.name, msg.model, f"cannot start instance: {exc}"))
            return
        self.instances[msg.instance_id] = ref
        self.node.directory.put(name, ref)
        self._publish()

    def _unload(self, instance_id: str) -> None:
        ref = self.instances.get(instance_id)
        if ref is None:
            self.node.send(InstanceGone(instance_id, self.node.name, "unloaded"))
            return
        self.unloading.add(instance_id)
        ref.stop(block=False)

    def _instance_exited(self, notice: ChildExited) -> None:
        instance_id = notice.name.removeprefix("instance/")
        ref = self.instances.pop(instance_id, None)
        if ref is None:
            return
        self.node.directory.remove(notice.name, ref)
        self.node.board.remove_instance(instance_id)
        if instance_id in self.unloading:
            self.unloading.discard(instance_id)
            reason = "unloaded"
        elif notice.abnormal:
            reason = notice.reason
            self.node.event("crash", f"instance {instance_id} on {self.node.name}/gpu-{self.index} {reason}")
        else:
            reason = "stopped"
        self._free_device_memory()
        self.node.send(InstanceGone(instance_id, self.node.name, reason))
        self._publish()

    def _free_device_memory(self) -> None:
        if self.spec.device.startswith("cuda"):
            import gc

            import torch

            from sllm_actors.gpu.device_gate import quiet_for_captures

            gc.collect()
            with quiet_for_captures():  # freeing device memory would break another instance's graph capture
                torch.cuda.empty_cache()

    def _publish(self) -> None:
        used = sum(i.get("memory_bytes", 0) for i in self.node.board.instances_on(self.index))
        self.node.board.update_gpu(
            self.index,
            device=self.spec.device,
            memory_total=self.memory_total,
            memory_used=used,
            instances=sorted(self.instances),
        )
