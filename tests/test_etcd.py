"""The etcd client, the leader election and the etcd store against a real etcd (started here, removed after).

A second campaign waits while the first leader holds its lease; a lease revoked under the leader is noticed by its
keep-alive (the controller then stops serving); the next leader's epoch is larger; a store written under an old
epoch is refused; etcd's authentication refuses a wrong password and says what to run. Skips without etcd.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllm_actors.actors.controller.store import EtcdStore, StoreError
from sllm_actors.runtime.etcd import Election, EtcdClient, EtcdError, LeaderInfo, enable_auth
from sllm_eval.standby_cluster import EtcdProcess, etcd_missing, start_etcd

pytestmark = pytest.mark.skipif(bool(etcd_missing()), reason=etcd_missing() or "etcd present")

PASSWORD = "a-password-derived-elsewhere"


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdProcess]:
    proc = start_etcd(tmp_path)
    try:
        assert enable_auth([proc.endpoint], PASSWORD)
        assert not enable_auth([proc.endpoint], PASSWORD), "auth is on already: the second call says so"
        yield proc
    finally:
        proc.stop()
    assert not proc.data_dir.exists()


def client(etcd: EtcdProcess, password: str = PASSWORD) -> EtcdClient:
    # A dead endpoint first: the client moves on to the next.
    return EtcdClient(["http://127.0.0.1:1", etcd.endpoint], user="root", password=password)


def test_a_wrong_password_is_refused_naming_the_fix(etcd: EtcdProcess) -> None:
    with pytest.raises(EtcdError, match="sllm keys etcd"):
        client(etcd, "wrong").get("/k")


def test_one_leader_at_a_time_and_a_lost_lease_is_noticed(etcd: EtcdProcess) -> None:
    c = client(etcd)
    key = "/sllm/t/leader"
    a = Election(c, key, LeaderInfo("ctl-a", "tcp://a:1", 0), ttl_s=2)
    epoch_a = a.campaign(threading.Event())
    assert epoch_a > 0 and c.get(key) == (LeaderInfo("ctl-a", "tcp://a:1", 0).encode(), epoch_a)
    lost = threading.Event()
    why: list[str] = []
    a.keep_alive(lambda reason: (why.append(reason), lost.set()))

    b = Election(c, key, LeaderInfo("ctl-b", "tcp://b:1", 0), ttl_s=2)
    give_up = threading.Event()
    timer = threading.Timer(3.0, give_up.set)  # longer than the TTL: a's keep-alive must hold the lead meanwhile
    timer.start()
    assert b.campaign(give_up) == 0, "a standby took the lead from a live leader"
    assert b.leader == LeaderInfo("ctl-a", "tcp://a:1", epoch_a)

    store_a = EtcdStore(c, "/sllm/t/", key, epoch_a)
    store_a.save_deployment("m1", "/models/m1")
    assert store_a.deployments() == [("m1", "/models/m1")]

    c.revoke(a.lease)  # as etcd does when the lease expires
    assert lost.wait(10), "the leader did not notice its lease was gone"
    assert "expired" in why[0]
    epoch_b = b.campaign(threading.Event())
    assert epoch_b > epoch_a, "the next leader's epoch must be newer"

    with pytest.raises(StoreError, match="no longer leads"):
        store_a.save_deployment("m2", "/models/m2")
    store_b = EtcdStore(c, "/sllm/t/", key, epoch_b)
    store_b.save_deployment("m2", "/models/m2")
    store_b.save_estimates("scheduler", {"step_s": [0.01]})
    assert store_b.deployments() == [("m1", "/models/m1"), ("m2", "/models/m2")]
    assert store_b.estimates("scheduler") == {"step_s": [0.01]}
    b.resign()
    assert c.get(key) is None, "a resigned leader's key goes with its lease"
