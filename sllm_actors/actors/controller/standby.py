"""A standby controller: it campaigns in etcd for the lead and, until it leads, answers every client with who does.

With ``etcd:`` in the topology, each controller process (``sllm up --controller NAME`` on its host) starts here. It
binds only its client port, with CURVE as the leader's, and answers whatever comes there with a ``NotLeader`` naming
the leader and its client endpoint: a clear redirect, never a served request. It binds no cluster port, so the
nodes, which connect to every controller's cluster port (``--join`` a list; ``ZMQ_IMMEDIATE`` sends only on a
connection made), reach only the leader. Once it wins the lead it lets the client port go and the controller proper
(``process.py``) binds its sockets under the epoch the election gave it.
"""

from __future__ import annotations

import logging
from typing import Any

from sllm_actors.actors.controller.context import CLIENTS
from sllm_actors.messages import Message, NotLeader
from sllm_actors.runtime.etcd import Election, EtcdClient, LeaderInfo, derive_password
from sllm_actors.runtime.security import KeyRing
from sllm_actors.runtime.topology import ControllerSpec, EtcdSpec
from sllm_actors.runtime.transport import Transport

__all__ = ["StandbyServer", "election_for", "etcd_client", "leader_key"]

log = logging.getLogger(__name__)


def etcd_client(spec: EtcdSpec, keys: KeyRing | None) -> EtcdClient:
    """A client of the cluster's etcd, as the cluster's user when the cluster has keys (see ``runtime/etcd.py``)."""
    if keys is None:
        return EtcdClient(list(spec.endpoints), ca_file=spec.ca_file)
    return EtcdClient(list(spec.endpoints), user="root", password=derive_password(keys.server_secret),
                      ca_file=spec.ca_file)


def leader_key(spec: EtcdSpec) -> str:
    return spec.prefix + "leader"


def election_for(spec: EtcdSpec, client: EtcdClient, me: ControllerSpec) -> Election:
    return Election(client, leader_key(spec), LeaderInfo(me.name, me.client_endpoint, 0), spec.lease_ttl_s)


class StandbyServer:
    """The client port of a standby: every message is answered with ``NotLeader`` (who leads, as last read)."""

    def __init__(self, spec: ControllerSpec, keys: KeyRing | None, election: Election) -> None:
        self.spec = spec
        self.election = election
        self.transport = Transport(f"standby:{spec.name}")
        if keys is not None:
            self.transport.serve_curve(keys.server_public, keys.server_secret, keys.authenticate)
        self.endpoint = ""

    def start(self) -> str:
        # Handover: a client asking again (it keeps its identity across controllers) is answered on its new connection.
        self.endpoint = self.transport.bind_router(CLIENTS, self.spec.endpoint(self.spec.client_port), self._answer,
                                                   handover=True)
        self.transport.start()
        return self.endpoint

    def _answer(self, peer: bytes, address: str, msg: Message, user_id: str = "") -> None:
        # Read from the campaign's thread: one attribute, replaced whole, so never half-written.
        leader: Any = self.election.leader
        self.transport.send(CLIENTS, NotLeader(str(getattr(msg, "request_id", "")), self.spec.name,
                                               leader.name if leader else "",
                                               leader.client_endpoint if leader else "",
                                               leader.epoch if leader else 0), peer=peer)

    def stop(self) -> None:
        """Let the client port go (the transport's context ends with it), for the leader's sockets to bind."""
        self.transport.stop()
