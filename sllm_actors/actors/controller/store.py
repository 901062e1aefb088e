"""The cluster's persistent store: what must survive a controller restart, in one SQLite file under
``$SLLM_HOME``.

What a restart would otherwise lose lives only in the controller: the models deployed with ``sllm deploy``
(the topology's own models come back from the topology) and the scheduler's estimates (model sizes, load fits
per node and tier, decode step times), which took real loads and requests to learn. Everything else is
rebuilt from what the nodes report when they re-register (their instances, their requests' token logs).

With ``etcd:`` in the topology the same records live in etcd instead (:class:`EtcdStore`), so a standby controller on
another host has them when it takes over; every write is a transaction that holds only while the writer still leads.

SQLite: in the standard library, transactional (a write killed half-way leaves the last whole state), one
file. A file that is not a database (or is corrupt) or that another process holds locked is a
:class:`StoreError` naming the file; the controller then starts without it, from what the nodes report.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from sllm_actors.runtime.etcd import EtcdClient, EtcdError

__all__ = ["ClusterStore", "EtcdStore", "StoreError"]

LOCK_TIMEOUT_S = 2.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS deployments (name TEXT PRIMARY KEY, source TEXT NOT NULL, deployed_at REAL)",
    "CREATE TABLE IF NOT EXISTS estimates (key TEXT PRIMARY KEY, value TEXT NOT NULL, saved_at REAL)",
)


class StoreError(RuntimeError):
    """The store cannot be used; the message names the file and what is wrong with it."""


class ClusterStore:
    """One connection, used from any of the controller's actors' threads under a lock (writes are rare)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(str(path), timeout=LOCK_TIMEOUT_S, check_same_thread=False,
                                       isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the cluster store {path}: {exc}") from None
        try:
            # An immediate transaction takes the write lock now: a store another process holds is found at start.
            self._db.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                self._db.execute(statement)
            problem = self._db.execute("PRAGMA quick_check").fetchone()[0]
            self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._db.close()
            if "locked" in str(exc) or "busy" in str(exc):
                raise StoreError(f"the cluster store {path} is locked by another process ({exc}): is another "
                                 "controller of this cluster running?") from None
            raise StoreError(f"the cluster store {path} cannot be used: {exc} (move it aside to start afresh)") from None
        except sqlite3.DatabaseError as exc:
            self._db.close()
            raise StoreError(f"the cluster store {path} is corrupt or not a SQLite database: {exc} (move it aside "
                             "to start afresh)") from None
        if problem != "ok":
            self._db.close()
            raise StoreError(f"the cluster store {path} is corrupt: {problem} (move it aside to start afresh)")

    def _write(self, sql: str, params: tuple[Any, ...]) -> None:
        with self._lock:
            try:
                self._db.execute(sql, params)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot write the cluster store {self.path}: {exc}") from None

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return list(self._db.execute(sql, params).fetchall())
            except sqlite3.Error as exc:
                raise StoreError(f"cannot read the cluster store {self.path}: {exc}") from None

    def save_deployment(self, name: str, source: str) -> None:
        self._write("INSERT OR REPLACE INTO deployments VALUES (?, ?, ?)", (name, source, time.time()))

    def deployments(self) -> list[tuple[str, str]]:
        """(name, source) of each model deployed with ``sllm deploy``, oldest first."""
        return [(str(n), str(s)) for n, s in self._read("SELECT name, source FROM deployments ORDER BY deployed_at")]

    def save_estimates(self, key: str, value: Any) -> None:
        self._write("INSERT OR REPLACE INTO estimates VALUES (?, ?, ?)", (key, json.dumps(value), time.time()))

    def estimates(self, key: str) -> Any:
        rows = self._read("SELECT value FROM estimates WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def close(self) -> None:
        with self._lock:
            self._db.close()


class EtcdStore:
    """The store's records in etcd under ``prefix`` (``deployments/NAME``, ``estimates/KEY``), written only while
    the leader key ``leader_key`` is still the one created at ``epoch`` (a controller that lost the lead cannot
    overwrite its successor's records). Same calls as :class:`ClusterStore`; a failed call is a StoreError."""

    def __init__(self, client: EtcdClient, prefix: str, leader_key: str, epoch: int) -> None:
        self.client = client
        self.prefix = prefix
        self.leader_key = leader_key
        self.epoch = epoch
        self.path = f"etcd {','.join(client.endpoints)} {prefix}"

    def _write(self, key: str, value: Any) -> None:
        try:
            if not self.client.put_if_created_at(self.prefix + key, json.dumps(value), self.leader_key, self.epoch):
                raise StoreError(f"not written to {self.path}{key}: this controller no longer leads (epoch {self.epoch})")
        except EtcdError as exc:
            raise StoreError(f"cannot write the cluster store {self.path}: {exc}") from None

    def save_deployment(self, name: str, source: str) -> None:
        self._write(f"deployments/{name}", {"source": source, "deployed_at": time.time()})

    def deployments(self) -> list[tuple[str, str]]:
        try:
            rows = self.client.get_prefix(self.prefix + "deployments/")
        except EtcdError as exc:
            raise StoreError(f"cannot read the cluster store {self.path}: {exc}") from None
        found = []
        for key, value in rows:
            record = json.loads(value)
            found.append((float(record.get("deployed_at", 0.0)), key.rsplit("/", 1)[1], str(record["source"])))
        return [(name, source) for _, name, source in sorted(found)]

    def save_estimates(self, key: str, value: Any) -> None:
        self._write(f"estimates/{key}", value)

    def estimates(self, key: str) -> Any:
        try:
            found = self.client.get(self.prefix + f"estimates/{key}")
        except EtcdError as exc:
            raise StoreError(f"cannot read the cluster store {self.path}: {exc}") from None
        return json.loads(found[0]) if found else None

    def close(self) -> None:
        pass  # no connection is kept
