"""The controller process: router, scheduler, node registry and local node processes, supervised.

Three sockets: clients (ROUTER), nodes (ROUTER; a node's identity is its name, and a message with an
address is relayed to that node, which is how two nodes talk during a migration), and state (PUB:
snapshots and events for TUIs).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import IO, Any

import pykka

from sllm_actors.actors.controller import node_process, registry, router, scheduler
from sllm_actors.actors.controller.node_process import NodeProcessActor, node_process_actor_name
from sllm_actors.actors.controller.registry import NodeRegistryActor
from sllm_actors.actors.controller.router import RouterActor
from sllm_actors.actors.controller.scheduler import SchedulerActor
from sllm_actors.actors.controller.context import CLIENTS, CLUSTER, STATE, ClusterContext, EventLog, RequestTable
from sllm_actors.messages import (
    PROTOCOL_VERSION,
    Ack,
    CancelRequest,
    ClusterEvent,
    DeployModel,
    ErrorReply,
    GenerateRequest,
    Heartbeat,
    Hello,
    InferenceDone,
    InferenceFailed,
    InstanceGone,
    InstanceReady,
    KillNode,
    LoadFailed,
    Message,
    MigrateCommand,
    MigrationEnded,
    Migrated,
    NodeCommand,
    NodeHello,
    NodeStatus,
    PromptAccepted,
    StatusRequest,
    TokenBatch,
    TokenChunk,
    Welcome,
)
from sllm_actors.actors.node.context import LINK_SEPARATOR
from sllm_actors.runtime.security import CLIENT, NODE, OPERATOR, KeyRing, Peer, parse_user_id
from sllm_actors.runtime.supervisor import ChildSpec, Directory, Supervisor
from sllm_actors.runtime.topology import Topology
from sllm_actors.runtime.transport import Transport

__all__ = ["Controller", "main"]

log = logging.getLogger(__name__)

EXIT_LOST_LEAD = 75
"""The exit code of a leader that lost its etcd lease (``sllm up`` starts it again, as a standby)."""
TICK_S = 0.5
SEEN_EVERY_S = 0.2
SNAPSHOT_S = 0.5

_TO_ROUTER = (TokenChunk, TokenBatch, PromptAccepted, InferenceDone, InferenceFailed, Migrated)
_TO_SCHEDULER = (InstanceReady, LoadFailed, InstanceGone, MigrationEnded)
KEYS_REFRESH_S = 1.0

_CLIENT_MAY = (Hello, Heartbeat, GenerateRequest, CancelRequest, StatusRequest)
ALLOWED: dict[str, tuple[type[Message], ...]] = {
    CLIENT: _CLIENT_MAY,
    OPERATOR: (*_CLIENT_MAY, DeployModel, MigrateCommand, KillNode, NodeCommand),
    NODE: (),
}
"""What each role may send on the client socket; anything else is answered with an ErrorReply naming both."""


class Controller:
    def __init__(self, topology: Topology, *, spawn_local_nodes: bool = True, node_log: IO[bytes] | None = None,
                 cluster_name: str = "sllm", keys: KeyRing | None = None, epoch: int = 1,
                 state_dir: Path | None = None) -> None:
        """``keys``: the ring every socket authenticates against (CURVE). None runs without CURVE, every
        client an operator: for benchmarks measuring what CURVE costs, never for ``sllm up``. ``epoch``: this
        start's generation (``sllm up`` counts them); nodes re-register under it and anything from a node not
        registered under it is refused (fencing). ``state_dir``: where the local nodes' pids are kept, so a
        restarted controller adopts the nodes still running instead of starting others."""
        self.topology = topology
        self.epoch = epoch
        self.spawn_local_nodes = spawn_local_nodes
        self.node_log = node_log
        self.cluster_name = cluster_name
        self.transport = Transport("controller")
        self.directory = Directory()
        self.events = EventLog(self.transport)
        self.table = RequestTable()
        self.context = ClusterContext(topology, self.transport, self.directory, self.events, self.table)
        self.context.epoch = epoch
        self.context.state_dir = state_dir
        self.keys = keys
        self.context.node_key_dir = keys.root / "nodes" if keys is not None else None
        if keys is not None:
            self.transport.serve_curve(keys.server_public, keys.server_secret, keys.authenticate)
        self.supervisor: pykka.ActorRef[Any] | None = None
        self.node_names = {n.name for n in topology.nodes}
        self._last_seen: dict[str, float] = {}
        self._registered: dict[str, str] = {}
        """node -> the incarnation that said hello to this controller (its epoch): only those are heard."""
        self._fenced_at: dict[str, float] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        ctl = self.topology.controller
        ctx = self.context
        ctx.client_endpoint = self.transport.bind_router(
            CLIENTS, ctl.endpoint(ctl.client_port), self._from_client, on_unreachable=self._client_gone
        )
        # Without keys a restarted node takes over its old connection by name (ROUTER_HANDOVER). With keys
        # it may not: ZAP cannot see the name a peer will claim, so handover would give any node key the
        # route of any node before its first frame could be refused. The name frees when the old
        # connection closes (at once for a killed process; a dead host's within the ZeroMQ heartbeat).
        ctx.cluster_endpoint = self.transport.bind_router(
            CLUSTER, ctl.endpoint(ctl.cluster_port), self._from_node, handover=self.keys is None,
            relay=self._relay_to, heartbeat_s=2.0,
        )
        ctx.state_endpoint = self.transport.bind_pub(STATE, ctl.endpoint(ctl.state_port))
        self.transport.every(TICK_S, self._tick)
        self.transport.every(SNAPSHOT_S, self._snapshot)
        if self.keys is not None:
            self.transport.every(KEYS_REFRESH_S, self.keys.refresh)
        children = [
            ChildSpec("registry", lambda sup, name: NodeRegistryActor.start(sup, name, cluster=ctx)),
            ChildSpec("scheduler", lambda sup, name: SchedulerActor.start(sup, name, cluster=ctx)),
            ChildSpec("router", lambda sup, name: RouterActor.start(sup, name, cluster=ctx)),
        ]
        if self.spawn_local_nodes:
            for node in self.topology.nodes:
                if node.host == "local":
                    children.append(self._node_process_child(ctx, node.name))
        self.transport.start()
        self.supervisor = Supervisor.start(
            None, "controller/supervisor", children, self.directory,
            strategy="one_for_one", max_restarts=10, period_s=30.0,
            on_event=lambda kind, text, data: self.events.emit(kind, text, data),
        )
        self.events.emit("start", f"controller up: clients at {ctx.client_endpoint}")

    def _node_process_child(self, ctx: ClusterContext, node: str) -> ChildSpec:
        return ChildSpec(
            node_process_actor_name(node),
            lambda sup, name: NodeProcessActor.start(sup, name, cluster=ctx, node=node, log_file=self.node_log),
        )

    def wait_ready(self, timeout: float) -> bool:
        """True once every node of the topology has joined."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if set(self.alive_nodes()) >= self.node_names:
                return True
            time.sleep(0.1)
        return False

    def alive_nodes(self) -> list[str]:
        return registry.alive_nodes(self.directory)

    def status(self) -> dict[str, Any]:
        return router.cluster_status(self.directory)

    def kill_node(self, node: str) -> int:
        return node_process.kill(self.directory, node)

    def stop(self) -> None:
        if self.supervisor is not None:
            try:
                self.supervisor.stop(block=True, timeout=60)
            except (pykka.ActorDeadError, pykka.Timeout):
                log.error("controller: supervisor did not stop in time")
        pykka.ActorRegistry.stop_all(block=True, timeout=10)
        self.transport.stop()

    # ------------------------------------------------------------------ IO thread: dispatch only

    def _sender(self, user_id: str) -> Peer | None:
        """The peer a frame's CURVE key names, if that key is still in the ring (revoked keys stop here)."""
        if self.keys is None:
            return Peer(OPERATOR, "insecure")
        peer = parse_user_id(user_id)
        return peer if peer is not None and self.keys.current(user_id) else None

    def _from_client(self, peer: bytes, address: str, msg: Message, user_id: str = "") -> None:
        sender = self._sender(user_id)
        request_id = getattr(msg, "request_id", "")
        if sender is None:
            log.warning("controller: refused %s from %r: key %r is no longer in the ring (revoked)", msg.tag, peer,
                        user_id)
            self.context.to_client(peer, ErrorReply(request_id, "unauthorized",
                                                    f"key {user_id!r} has been revoked"))
            return
        if not isinstance(msg, ALLOWED.get(sender.role, ())):
            log.warning("controller: refused %s from %s (role %s): not allowed", msg.tag, sender.user_id,
                        sender.role)
            self.context.to_client(peer, ErrorReply(request_id, "forbidden",
                                                    f"role {sender.role} may not send {msg.tag} messages"))
            return
        if isinstance(msg, DeployModel):
            problem = self._deploy_source_problem(msg.source)
            if problem:
                log.warning("controller: refused deploy of %r from %s: %s", msg.name, sender.user_id, problem)
                self.context.to_client(peer, ErrorReply(request_id, "forbidden", problem))
                return
        if isinstance(msg, Hello):
            if msg.protocol_version != PROTOCOL_VERSION:
                self.context.to_client(peer, ErrorReply("", "version_mismatch",
                                                        f"protocol version {msg.protocol_version} is not supported; "
                                                        f"this cluster speaks {PROTOCOL_VERSION}"))
            else:
                self.context.to_client(peer, Welcome(PROTOCOL_VERSION, self.cluster_name, self.context.state_endpoint,
                                                        self.context.http_endpoint, self.epoch))
        elif isinstance(msg, (GenerateRequest, CancelRequest, StatusRequest)):
            delivered = router.deliver_from_client(self.directory, peer, msg, sender.role)
            self._unless_restarting("router", delivered, peer, msg)
        elif isinstance(msg, (DeployModel, MigrateCommand, NodeCommand)):
            delivered = scheduler.deliver_from_client(self.directory, peer, msg, sender.role)
            self._unless_restarting("scheduler", delivered, peer, msg)
        elif isinstance(msg, KillNode):
            try:
                pid = self.kill_node(msg.node)
                self.context.to_client(peer, Ack(msg.request_id, f"killed {msg.node} (pid {pid})"))
            except KeyError as exc:
                self.context.to_client(peer, ErrorReply(msg.request_id, "unknown_node", str(exc.args[0])))
        elif isinstance(msg, Heartbeat):
            pass
        else:
            self.context.to_client(peer, ErrorReply(getattr(msg, "request_id", ""), "unexpected",
                                                    f"clients may not send {msg.tag} messages"))

    def _deploy_source_problem(self, source: str) -> str:
        """'' when ``source`` lies under a models root of the topology (or is the default model), else why not."""
        from sllm_actors.models import default_model_dir
        from sllm_actors.runtime.topology import DEFAULT_MODEL_SOURCE

        if source == DEFAULT_MODEL_SOURCE:
            return ""
        if source.startswith(("http://", "https://")):
            from sllm_actors.runtime.topology import repository_for

            if repository_for(source, self.topology.repositories) is not None:
                return ""
            allowed = ", ".join(r.url for r in self.topology.repositories) or "none"
            return (f"deploy source {source} is outside the allowed repositories: {allowed} "
                    f"(add it to repositories: in {self.topology.path})")
        roots = [*self.topology.models_roots, default_model_dir()]
        try:
            path = Path(source).expanduser().resolve()
        except (OSError, RuntimeError, ValueError) as exc:
            return f"deploy source {source!r} is not a usable path: {exc}"
        if any(path == r.resolve() or path.is_relative_to(r.resolve()) for r in roots):
            return ""
        return (f"deploy source {source} is outside the allowed model roots: "
                f"{', '.join(str(r) for r in roots)} (add its directory to models_roots: in {self.topology.path})")

    def _unless_restarting(self, actor: str, delivered: bool, peer: bytes, msg: Message) -> None:
        """Answer ``peer`` that ``actor`` is restarting when its message could not be ``delivered``."""
        if not delivered:
            self.context.to_client(peer, ErrorReply(getattr(msg, "request_id", ""), "unavailable",
                                                    f"the {actor} is restarting; try again"))

    def _relay_to(self, peer: bytes, address: str, user_id: str) -> tuple[bytes, bytes] | None:
        """Node-to-node frames (a migration's rounds and KV copies) go on to the node they name unread,
        with the sender's node (as its key names it) in the address frame; the receiving node decodes them
        and checks that they come from the migration's other end. From anything but a topology node with
        its own key, they are decoded here and refused."""
        sender = peer.decode(errors="replace").split(LINK_SEPARATOR, 1)[0]
        if sender in self.node_names and address in self.node_names and self._node_key_ok(sender, user_id):
            return address.encode(), sender.encode()
        return None

    def _node_key_ok(self, node: str, user_id: str) -> bool:
        if self.keys is None:
            return True
        peer = self._sender(user_id)
        return peer is not None and peer.role == NODE and peer.name == node

    def _from_node(self, peer: bytes, address: str, msg: Message, user_id: str = "") -> None:
        # A node's own socket is named after it; an actor's socket on that node is ``node~actor``.
        node = peer.decode(errors="replace").split(LINK_SEPARATOR, 1)[0]
        if node not in self.node_names:
            self.transport.send(CLUSTER, ErrorReply("", "rejected", f"node {node!r} is not in the topology "
                                                    f"{self.topology.path}"), peer=peer)
            return
        if not self._node_key_ok(node, user_id):
            # ZAP already refuses a key connecting under another node's name; this catches a key revoked since.
            log.warning("controller: refused %s claiming node %s from key %r", msg.tag, node, user_id)
            return
        claimed = getattr(msg, "node", None) if not isinstance(msg, Heartbeat) else msg.sender
        if isinstance(claimed, str) and claimed != node and not isinstance(msg, ClusterEvent):
            log.warning("controller: refused %s from %s claiming to be from %s", msg.tag, node, claimed)
            return
        if isinstance(msg, (NodeHello, NodeStatus)) and LINK_SEPARATOR in peer.decode(errors="replace"):
            # A node speaks for itself on its own socket; its actors' links carry their requests only.
            log.warning("controller: refused %s from %r: not the node's own socket", msg.tag, peer)
            return
        if address:
            # Relayed frames never get here (the relay passes them on unread): this is one the relay
            # refused, from an impostor or to an unknown node.
            log.warning("controller: refused a %s from %s for %r: not relayed", msg.tag, node, address)
            return
        now = time.monotonic()
        if not isinstance(msg, NodeHello) and node not in self._registered:
            self._fence(node, msg, now)
            return
        # A hello comes only from a process not yet configured: a new one, never a sign that the incarnation the
        # registry knows is alive (a restarted host's first frame would "revive" the dead process it replaces).
        if not isinstance(msg, NodeHello) and now - self._last_seen.get(node, 0.0) > SEEN_EVERY_S:
            # Rate-limited: a beat per token would wake the registry's thread for nothing.
            self._last_seen[node] = now
            registry.node_seen(self.directory, node)
        if isinstance(msg, NodeHello):
            if msg.protocol_version != PROTOCOL_VERSION:
                self.transport.send(CLUSTER, ErrorReply("", "version_mismatch",
                                                        f"node speaks protocol {msg.protocol_version}, the "
                                                        f"controller {PROTOCOL_VERSION}"), peer=peer)
                return
            if msg.epoch > self.epoch:
                why = (f"node {node} serves controller epoch {msg.epoch}, newer than this controller's {self.epoch}: "
                       "this controller is stale and refuses it")
                log.error("controller: %s", why)
                self.transport.send(CLUSTER, ErrorReply("", "stale_controller", why), peer=peer)
                return
            if msg.running or msg.instances:
                # Re-registration after a controller restart: the node's logs and instances become ours before
                # the registry configures it (its tokens are held until then, so none arrives before its log).
                log.info("controller: %s re-registers from epoch %d with %d request(s) on %d instance(s)", node,
                         msg.epoch, len(msg.running), len(msg.instances))
                scheduler.adopt_instances(self.directory, node, msg.instances)
                router.adopt_requests(self.directory, node, msg.running)
                self.events.emit("node", f"{node} re-registered from epoch {msg.epoch}: {len(msg.running)} "
                                 f"request(s), {len(msg.instances)} instance(s) adopted", {"node": node})
            self._registered[node] = msg.incarnation
            registry.node_hello(self.directory, msg)
        elif isinstance(msg, NodeStatus):
            registry.node_status(self.directory, msg)
            # Tier contents and bandwidths feed the scheduler's estimates.
            scheduler.deliver_from_node(self.directory, msg)
        elif isinstance(msg, _TO_ROUTER):
            router.deliver_from_node(self.directory, node, msg)
            if isinstance(msg, Migrated):
                # The scheduler moves the request's slot to the destination.
                scheduler.deliver_from_node(self.directory, msg)
        elif isinstance(msg, _TO_SCHEDULER):
            scheduler.deliver_from_node(self.directory, msg)
        elif isinstance(msg, ClusterEvent):
            self.events.add(msg)
        elif isinstance(msg, (Heartbeat, ErrorReply)):
            if isinstance(msg, ErrorReply):
                log.warning("controller: %s reports: %s", node, msg.message)
        else:
            log.warning("controller: unexpected %s from %s", msg.tag, node)

    def _fence(self, node: str, msg: Message, now: float) -> None:
        """Refuse what a node not registered under this epoch sends (it served a controller before this one), and
        tell it (once a second) to re-register: its requests' logs come with its hello, before any of its tokens."""
        if now - self._fenced_at.get(node, 0.0) < 1.0:
            return
        self._fenced_at[node] = now
        log.warning("controller: refused %s from %s: not registered under epoch %d; asking it to re-register",
                    msg.tag, node, self.epoch)
        self.transport.send(CLUSTER, ErrorReply("", "stale_epoch",
                                                f"{node} is not registered with controller epoch {self.epoch} (the "
                                                "controller restarted): re-register"), peer=node.encode())

    def _client_gone(self, peer: bytes) -> None:
        router.client_gone(self.directory, peer)

    def _tick(self) -> None:
        now = time.monotonic()
        registry.tick(self.directory, now)
        scheduler.tick(self.directory, now)
        router.tick(self.directory, now)

    def _snapshot(self) -> None:
        # Built in the router's thread: the IO thread must not wait on actors.
        router.publish_snapshot(self.directory)


# ------------------------------------------------------------------ the controller's own process

def _die_with_parent() -> None:
    """SIGKILL this process when ``sllm up`` dies (Linux): a controller orphaned by a killed ``sllm up`` would
    keep its ports from the next one. The nodes outlive both, for the next controller to adopt."""
    import ctypes
    import os
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:
        os._exit(1)  # the parent died before the call


def main(argv: list[str] | None = None) -> int:
    """``python -m sllm_actors.actors.controller TOPOLOGY --epoch N ...``: the controller as ``sllm up``'s child
    (see ``launcher.py``). Prints one JSON line with its endpoints once its sockets are bound, another when the
    nodes have joined, then runs until SIGTERM/SIGINT."""
    import argparse
    import json
    import os
    import signal
    import threading
    from dataclasses import replace

    from sllm_actors.runtime.security import KeyProblem, prepare_keys
    from sllm_actors.runtime.topology import POLICIES, TopologyError, load_topology

    parser = argparse.ArgumentParser(prog="sllm-controller")
    parser.add_argument("topology")
    parser.add_argument("--epoch", type=int, default=1)
    parser.add_argument("--state-dir", default="")
    parser.add_argument("--ports", default="", help="CLIENT,CLUSTER,STATE: the ports a previous start bound")
    parser.add_argument("--policy", default="")
    parser.add_argument("--http-endpoint", default="")
    parser.add_argument("--ready-timeout", type=float, default=300.0)
    parser.add_argument("--controller", default="", help="this controller's name in the topology (with etcd: which "
                        "of the controllers this one is)")
    args = parser.parse_args(argv)
    _die_with_parent()
    logging.basicConfig(level=os.environ.get("SLLM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s controller %(levelname)s %(name)s: %(message)s")

    def say(event: str, **fields: Any) -> None:
        print(json.dumps({"event": event, **fields}), flush=True)

    try:
        topo = load_topology(Path(args.topology))
    except TopologyError as exc:
        say("failed", error=str(exc))
        return 2
    if args.policy:
        if args.policy not in POLICIES:
            say("failed", error=f"unknown policy {args.policy!r}")
            return 2
        topo = replace(topo, scheduler=replace(topo.scheduler, policy=args.policy))
    if args.ports:
        client, cluster, state = (int(p) for p in args.ports.split(","))
        topo = replace(topo, controller=replace(topo.controller, client_port=client, cluster_port=cluster,
                                                state_port=state))
    try:
        keys = prepare_keys(topo, say=lambda text: log.info("%s", text))
    except KeyProblem as exc:
        say("failed", error=str(exc))
        return 2
    state_dir = Path(args.state_dir) if args.state_dir else None
    import sys

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    election = None
    epoch = args.epoch
    etcd_spec = topo.etcd
    if etcd_spec is not None:
        # Several controllers, one leader: stand by (answering clients with who leads) until this one wins the lead.
        from sllm_actors.actors.controller.standby import StandbyServer, election_for, etcd_client
        from sllm_actors.runtime.etcd import EtcdError

        try:
            topo = topo.as_controller(args.controller or topo.controller.name)
        except KeyError as exc:
            say("failed", error=str(exc.args[0]))
            return 2
        me = topo.controller
        etcd = etcd_client(etcd_spec, keys)
        election = election_for(etcd_spec, etcd, me)
        standby = StandbyServer(me, keys, election)
        try:
            standby_endpoint = standby.start()
        except Exception as exc:  # noqa: BLE001 - a port in use, most often: say which
            standby.stop()
            say("failed", error=f"cannot start standby controller {me.name}: {exc}")
            return 2
        try:
            election.refresh()  # so that the standby names the leader from its first answer
        except EtcdError as exc:
            log.warning("controller %s: etcd cannot say who leads yet: %s", me.name, exc)
        say("standby", controller=me.name, client_endpoint=standby_endpoint)
        log.info("controller %s: standing by at %s; campaigning in etcd %s", me.name, standby_endpoint,
                 ",".join(etcd_spec.endpoints))
        epoch = election.campaign(stop)
        standby.stop()
        if not epoch:
            return 0
        log.warning("controller %s: leads the cluster from epoch %d (etcd revision)", me.name, epoch)

        def lost(why: str) -> None:
            # Stop serving at once: a process gone is a fence no socket of ours can leak through. `sllm up` starts
            # this controller again, as a standby.
            log.error("controller %s: lost the lead: %s; exiting", me.name, why)
            os._exit(EXIT_LOST_LEAD)

        election.keep_alive(lost)

    # The nodes log where the controller does (never to its stdout: that is sllm up's pipe, which a node outlives).
    controller = Controller(topo, keys=keys, epoch=epoch, state_dir=state_dir, node_log=sys.stderr.buffer)
    controller.context.http_endpoint = args.http_endpoint
    if election is not None and etcd_spec is not None:
        from sllm_actors.actors.controller.standby import leader_key
        from sllm_actors.actors.controller.store import EtcdStore

        controller.context.store = EtcdStore(election.client, etcd_spec.prefix, leader_key(etcd_spec), epoch)
        controller.context.controller_name = topo.controller.name
        controller.context.controllers = [{"name": c.name, "client_endpoint": c.client_endpoint}
                                          for c in topo.controllers]
        controller.context.join_endpoint = topo.cluster_endpoints
    elif state_dir is not None:
        from sllm_actors.actors.controller.store import ClusterStore, StoreError

        try:
            controller.context.store = ClusterStore(state_dir / "store.sqlite")
        except StoreError as exc:
            # What must survive a restart is lost, not the cluster: it starts from what the nodes report.
            log.error("controller: %s; starting without it (deployments and estimates of earlier runs are lost)", exc)
            controller.events.emit("error", str(exc))
    try:
        controller.start()
    except Exception as exc:  # noqa: BLE001 - a port in use, most often: say which
        controller.stop()
        say("failed", error=f"cannot start the controller: {exc}")
        return 2
    ctx = controller.context
    say("started", epoch=epoch, client_endpoint=ctx.client_endpoint, cluster_endpoint=ctx.cluster_endpoint,
        state_endpoint=ctx.state_endpoint, controller=ctx.controller_name)
    deadline = time.monotonic() + args.ready_timeout
    while not stop.is_set() and time.monotonic() < deadline:
        if set(controller.alive_nodes()) >= controller.node_names:
            break
        stop.wait(0.1)
    say("ready", missing=sorted(controller.node_names - set(controller.alive_nodes())))
    while not stop.wait(0.5):
        pass
    controller.stop()
    if ctx.store is not None:
        ctx.store.close()
    if election is not None:
        election.resign()  # a standby takes over now rather than a lease's TTL from now
    return 0
