"""The node process: a NodeSupervisor over storage tiers and GPUs, linked to the controller.

Started by ``sllm up`` for local nodes (``python -m sllm_actors.actors.node``) or by hand on another host
with ``sllm node --join tcp://CONTROLLER:PORT --name NAME``. The node learns its GPUs and tiers
from the controller (``NodeConfig``), so the topology file lives in one place.
"""

from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections import OrderedDict
from typing import Any

from sllm_actors.actors.node import gpu as gpu_actors
from sllm_actors.actors.node.gpu import GpuActor, gpu_actor_name
from sllm_actors.messages import (
    PROTOCOL_VERSION,
    CancelInference,
    ErrorReply,
    Heartbeat,
    InferenceFailed,
    InstanceGone,
    KvCopyBegin,
    KvCopyChunk,
    LoadFailed,
    LoadModel,
    Message,
    MigrateOut,
    NodeConfig,
    NodeHello,
    NodeStatus,
    ResumeDone,
    ResumeFailed,
    ResumeRequest,
    StartInference,
    UnloadModel,
    Welcome,
)
from sllm_actors.actors.node.context import NodeContext
from sllm_actors.actors.node.storage_client import StorageClient
from sllm_actors.runtime import trace
from sllm_actors.runtime.supervisor import ChildSpec, Directory, Supervisor
from sllm_actors.runtime.topology import NodeSpec, default_cpu_threads
from sllm_actors.runtime.transport import Transport

__all__ = ["Node", "main"]

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
CONTROLLER_LOST_S = float(os.environ.get("SLLM_CONTROLLER_GRACE_S", "60"))
"""A local node exits when its controller has been silent this long (it would be an orphan). Until then it keeps
its requests running for a restarted controller (``sllm up`` restarts a killed one within seconds, and a new
``sllm up`` on the same topology adopts the nodes of a killed one), and re-registers with it."""
REREGISTER_RETRY_S = 5.0
STOP_TRACE_AFTER_S = 12.0
"""A stop still running after this long dumps every thread's stack into the node's log (the controller SIGKILLs at 20 s)."""
EXIT_GAVE_UP = 3
_PEER_MESSAGES = (ResumeRequest, KvCopyBegin, KvCopyChunk, ResumeDone, ResumeFailed)
"""What one node sends another (a migration's rounds, KV copies and their answers), relayed by the
controller with the sender's node in the address frame; nothing else may come that way."""
_REMEMBERED_MIGRATIONS = 4096


class Node:
    def __init__(self, join: str, name: str, *, exit_with_controller: bool = False, credentials: Any = None) -> None:
        self.join = join
        self.name = name
        self.exit_with_controller = exit_with_controller
        self.incarnation = uuid.uuid4().hex[:12]
        self.transport = Transport(f"node:{name}")
        if credentials is not None:
            self.transport.use_credentials(credentials)
        self.directory = Directory()
        self.context = NodeContext(name, self._send, self.directory, self.transport.context, join)
        self.context.credentials = credentials
        # migration id -> the node at its other end, learned from what the controller or the source said.
        self._migration_peers: OrderedDict[str, str] = OrderedDict()
        self.spec: NodeSpec | None = None
        self.configured = threading.Event()
        self.done = threading.Event()
        self.exit_code = 0
        self.supervisor: Any = None
        self._last_heard = time.monotonic()
        self._sent_version = -1
        self._seq = 0
        self._last_status_sent = 0.0
        self.epoch = 0
        """The controller epoch this process serves under (``NodeConfig.epoch``)."""
        self._reregistering_at: float | None = None

    def _send(self, msg: Message, address: str = "") -> None:
        self.transport.send("controller", msg, address=address)

    # ------------------------------------------------------------------ IO thread callbacks

    def _peer_problem(self, address: str, msg: Message) -> str:
        """'' when a node-to-node message comes from the migration's other end, else why it is refused."""
        if not address:
            return "" if not isinstance(msg, _PEER_MESSAGES) else f"{msg.tag} must come from a node, not the controller"
        if not isinstance(msg, _PEER_MESSAGES):
            return f"{address} may not send {msg.tag} to another node"
        migration_id = msg.migration_id
        if isinstance(msg, (ResumeRequest, KvCopyBegin)):
            if msg.source_node != address:
                return f"{address} claims to be {msg.source_node}, the source of {migration_id}"
            known = self._migration_peers.get(migration_id)
            if known is not None and known != address:
                return f"migration {migration_id} comes from {known}, not {address}"
            self._remember(migration_id, address)
            return ""
        known = self._migration_peers.get(migration_id)
        if known != address:
            return f"migration {migration_id} has {known or 'no known peer'} at its other end, not {address}"
        return ""

    def _remember(self, migration_id: str, node: str) -> None:
        self._migration_peers[migration_id] = node
        while len(self._migration_peers) > _REMEMBERED_MIGRATIONS:
            self._migration_peers.popitem(last=False)

    def _on_message(self, peer: bytes, address: str, msg: Message, sender: str = "") -> None:
        self._last_heard = time.monotonic()
        problem = self._peer_problem(address, msg)
        if problem:
            log.warning("%s: refused %s: %s", self.name, msg.tag, problem)
            return
        if isinstance(msg, MigrateOut):
            self._remember(msg.migration_id, msg.dest_node)
        if isinstance(msg, NodeConfig):
            if msg.epoch < self.epoch:
                why = (f"{self.name} serves controller epoch {self.epoch}; a config from epoch {msg.epoch} comes from "
                       "a stale controller and is refused")
                log.error("%s: %s", self.name, why)
                self._send(ErrorReply("", "stale_controller", why))
                return
            if not self.configured.is_set():
                self.epoch = msg.epoch
                self.spec = NodeSpec.from_dict(msg.spec).on_this_host()  # its paths are this host's own
                self.configured.set()
            elif msg.epoch != self.epoch or self._reregistering_at is not None:
                log.warning("%s: re-registered with controller epoch %d (was %d)", self.name, msg.epoch, self.epoch)
                self.epoch = msg.epoch
                self._reregistering_at = None
                self.context.release_links()
        elif isinstance(msg, (Welcome, Heartbeat)):
            pass
        elif isinstance(msg, ErrorReply):
            if msg.code == "stale_epoch":
                self._reregister()
                return
            log.error("%s: the controller says: %s (%s)", self.name, msg.message, msg.code)
            if msg.code in ("rejected", "version_mismatch"):
                self.exit_code = 2
                self.done.set()
        elif isinstance(msg, LoadModel):
            if not gpu_actors.load_model(self.directory, msg):
                self._send(LoadFailed(msg.instance_id, self.name, msg.model, f"{self.name} has no gpu-{msg.gpu}"))
        elif isinstance(msg, UnloadModel):
            gpu = self._gpu_of(msg.instance_id)
            if gpu is None or not gpu_actors.unload_model(self.directory, gpu, msg):
                self._send(InstanceGone(msg.instance_id, self.name, "unloaded"))
        elif hasattr(msg, "instance_id"):
            target = msg.instance_id  # type: ignore[attr-defined]
            if isinstance(msg, StartInference):
                trace.mark(msg.request_id, "node_in")
            if not gpu_actors.deliver_to_instance(self.directory, target, msg):
                self._no_instance(msg, target)
        else:
            log.warning("%s: ignoring unexpected %s", self.name, msg.tag)

    def _reregister(self) -> None:
        """The controller restarted (it refused us as not registered under its epoch): report every request our
        instances run, with its token log, and every instance, in a hello; until its config answers, what the
        instances send is held, so the controller has each log before the tokens that extend it."""
        if not self.configured.is_set():
            return  # not configured yet: the tick's hello is our registration
        now = time.monotonic()
        if self._reregistering_at is not None and now - self._reregistering_at < REREGISTER_RETRY_S:
            return
        self._reregistering_at = now
        self.context.hold_links()
        log.warning("%s: the controller restarted (we served epoch %d); re-registering", self.name, self.epoch)

        def report() -> None:
            # Off the IO thread: the instances answer between their steps.
            _, snapshot = self.context.board.snapshot()
            instances = snapshot["instances"]
            running = gpu_actors.running_requests(self.directory, [str(i["instance_id"]) for i in instances])
            self._send(NodeHello(PROTOCOL_VERSION, self.name, os.getpid(), self.incarnation, self.epoch, running,
                                 instances))

        threading.Thread(target=report, name=f"{self.name}-reregister", daemon=True).start()

    def _no_instance(self, msg: Message, instance_id: str) -> None:
        missing = f"instance {instance_id} is not on {self.name}"
        if isinstance(msg, StartInference):
            self._send(InferenceFailed(msg.request_id, instance_id, "no_instance", missing))
        elif isinstance(msg, (ResumeRequest, KvCopyBegin)):
            if not getattr(msg, "final", False):
                self._send(ResumeFailed(msg.migration_id, msg.round, msg.request_id, msg.source_instance, missing),
                           msg.source_node)
        elif not isinstance(msg, (CancelInference, KvCopyChunk)):
            log.warning("%s: %s for instance %s, which is not here", self.name, msg.tag, instance_id)

    def _gpu_of(self, instance_id: str) -> int | None:
        _, snapshot = self.context.board.snapshot()
        for inst in snapshot["instances"]:
            if inst["instance_id"] == instance_id:
                return int(inst["gpu"])
        return None

    def _tick(self) -> None:
        now = time.monotonic()
        if not self.configured.is_set():
            self._send(NodeHello(PROTOCOL_VERSION, self.name, os.getpid(), self.incarnation))
        self._seq += 1
        self._send(Heartbeat(self.name, self._seq))
        if self.exit_with_controller and now - self._last_heard > CONTROLLER_LOST_S:
            log.error("%s: controller silent for %.0fs; exiting", self.name, now - self._last_heard)
            self.exit_code = 1
            self.done.set()

    def _publish_status(self) -> None:
        version, snapshot = self.context.board.snapshot()
        now = time.monotonic()
        # Send on change, and at least every few seconds so a restarted controller catches up.
        if version != self._sent_version or now - self._last_status_sent > 5.0:
            self._sent_version = version
            self._last_status_sent = now
            snapshot["pid"] = os.getpid()
            snapshot["incarnation"] = self.incarnation
            self._send(NodeStatus(self.name, snapshot))

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        self.transport.connect_dealer("controller", self.join, self.name, self._on_message)
        self.transport.every(HEARTBEAT_S, self._tick)
        self.transport.start()
        self._send(NodeHello(PROTOCOL_VERSION, self.name, os.getpid(), self.incarnation))
        deadline = time.monotonic() + 60
        while not self.configured.wait(0.2):
            if self.done.is_set():
                return self.stop()
            if time.monotonic() > deadline:
                log.error("%s: no controller answered at %s within 60s", self.name, self.join)
                self.exit_code = 2
                return self.stop()
        assert self.spec is not None
        # transformers imports lazily, and two instances loading at once in their own threads race on
        # that import ("cannot import name AutoModelForCausalLM"): import once, here, first. All of what a
        # load needs, too: left to the first load, these imports were most of a fresh node's first cold
        # start (7.9 s against 0.4 s for the same 50 MB model next time, on a 2-core machine).
        import torch

        from sllm_actors.storage.model import warm_devices, warm_imports

        warm_imports()
        # The same for a GPU's lazy start (context, cuBLAS, kernels): paid here, not by the first request.
        warmed = warm_devices([g.device for g in self.spec.gpus])
        if warmed:
            log.info("%s: CUDA devices warmed in %.2fs", self.spec.name, warmed)

        cpu_engines = sum(g.device == "cpu" for g in self.spec.gpus)
        if self.spec.threads or cpu_engines:
            threads = self.spec.threads or default_cpu_threads(os.cpu_count() or 1,
                                                               self.spec.cpu_engines_on_host or cpu_engines)
            torch.set_num_threads(threads)
            log.info("%s: %d torch intra-op thread(s)", self.spec.name, threads)
        self.context.storage = StorageClient(self.context, self.spec)
        children = self.context.storage.child_specs()
        for index, gpu in enumerate(self.spec.gpus):
            children.append(
                ChildSpec(
                    gpu_actor_name(index),
                    lambda sup, name, index=index, gpu=gpu: GpuActor.start(
                        sup, name, node=self.context, index=index, spec=gpu
                    ),
                )
            )
        self.supervisor = Supervisor.start(
            None,
            f"{self.name}/supervisor",
            children,
            self.directory,
            strategy="one_for_one",
            max_restarts=5,
            period_s=10.0,
            on_give_up=self._give_up,
            on_event=lambda kind, text, data: self.context.event(kind, text, data),
        )
        # Supervisor.start returns before its children exist; a status now would say "ready" and
        # draw a LoadModel for a gpu actor not yet there.
        wanted = [c.name for c in children]
        deadline = time.monotonic() + 60
        while any(self.directory.get(n) is None for n in wanted) and time.monotonic() < deadline:
            if self.done.wait(0.05):
                return self.stop()
        self.transport.every(0.1, self._publish_status)
        # What the start-up made (imports, CUDA, actors) lives as long as the node: out of the collector's sight, a
        # full collection walks only what serving makes (350k objects here took ~0.1 s per walk otherwise).
        gc.collect()
        gc.freeze()
        log.info("%s: up with %d device(s), pid %d", self.name, len(self.spec.gpus), os.getpid())
        # A timed wait, not a bare one: SIGTERM may land on any of the node's threads (CUDA's, ZeroMQ's), and Python
        # runs its handler only when the main thread wakes. A bare wait slept through it until the controller's
        # 20 s deadline and SIGKILL on the GPU machine.
        while not self.done.wait(0.5):
            pass
        return self.stop()

    def _give_up(self, why: str) -> None:
        self.exit_code = EXIT_GAVE_UP
        self.done.set()

    def stop(self) -> int:
        # A stop that hangs (the controller gives it 20 s, then SIGKILLs) says where, in the node's log.
        faulthandler.dump_traceback_later(STOP_TRACE_AFTER_S, exit=False)
        if self.supervisor is not None:
            try:
                self.supervisor.stop(block=True, timeout=15)
            except Exception:  # already stopped after giving up
                pass
        self.transport.stop()
        faulthandler.cancel_dump_traceback_later()
        return self.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sllm-node")
    parser.add_argument("--join", required=True, help="the controller's cluster endpoint, tcp://HOST:PORT, or every "
                        "controller's, comma-separated (with standby controllers: the node follows the leader)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--exit-with-controller", action="store_true")
    parser.add_argument("--key", help="this node's .key_secret file (default: $SLLM_HOME/keys/nodes/NAME.key_secret)")
    parser.add_argument("--insecure", action="store_true", help="no CURVE (only a controller run without keys)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("SLLM_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s",
    )
    credentials = None
    if not args.insecure:
        from sllm_actors.runtime.security import KeyProblem, find_credentials, no_key_message

        try:
            credentials = find_credentials(args.key, role=args.name)
        except KeyProblem as exc:
            log.error("%s: %s", args.name, exc)
            return 2
        if credentials is None:
            log.error("%s: %s", args.name, no_key_message(f"node {args.name}"))
            return 2
        if credentials.role != "node" or credentials.name != args.name:
            log.error("%s: %s is the key of %s %r, not of node %r", args.name, credentials.path, credentials.role,
                      credentials.name, args.name)
            return 2
    node = Node(args.join, args.name, exit_with_controller=args.exit_with_controller, credentials=credentials)

    def on_signal(signum: int, frame: Any) -> None:
        node.done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return node.run()


if __name__ == "__main__":
    sys.exit(main())
