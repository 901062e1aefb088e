"""The controller as ``sllm up`` runs it: a child process of its own, restarted when it dies.

Each start is a new epoch (generation), one more than the last, kept with the ports it bound in
``$SLLM_HOME/clusters/<topology>-<hash>/state.json``: a restarted controller binds the same ports, so the nodes'
and the clients' endpoints stay valid, and the nodes re-register under the new epoch with the requests they are
running (``process.py``). The same directory holds the local nodes' pids (a restarted controller adopts the nodes
still running) and the cluster's SQLite store (``store.py``). A clean stop forgets the ports (a topology that asks
for port 0 gets fresh ones next time); a killed ``sllm up`` leaves them, so the next ``sllm up`` on the same
topology comes back on the same endpoints and adopts the nodes, which keep their requests for a grace period.

With ``etcd:`` in the topology (a standby controller on another host), the epoch is the one etcd's election gives
(``standby.py``): the child first says ``standby`` (its client port answers with who leads), then ``started`` once it
leads; ``leading`` is set then. A leader that loses its lease exits and is started again here, as a standby.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import sllm_actors
from sllm_actors.runtime.supervisor import RestartIntensity

__all__ = ["ControllerLauncher", "ControllerStartError", "cluster_state_dir"]

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_PERIOD_S = 60.0
START_TIMEOUT_S = 60.0


class ControllerStartError(RuntimeError):
    """The controller process did not come up; the message says why."""


def cluster_state_dir(topology_path: Path, controller: str = "") -> Path:
    """Where a cluster's state lives: one directory per topology file (by its resolved path), and per controller
    when several of one topology run on one host (``controller``: its name)."""
    from sllm_actors.models import sllm_home

    resolved = Path(topology_path).expanduser().resolve()
    digest = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    return sllm_home() / "clusters" / (f"{resolved.stem}-{digest}" + (f"-{controller}" if controller else ""))


class ControllerLauncher:
    def __init__(self, topology_path: Path, *, policy: str = "", http_endpoint: str = "",
                 log_file: IO[bytes] | None = None, ready_timeout: float = 300.0, controller: str = "") -> None:
        """``controller``: which of the topology's controllers this is (with etcd; "" for the first)."""
        self.topology_path = Path(topology_path).resolve()
        self.controller = controller
        self.policy = policy
        self.http_endpoint = http_endpoint
        self.log_file = log_file
        self.ready_timeout = ready_timeout
        self.state_dir = cluster_state_dir(self.topology_path, controller)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_file = self.state_dir / "state.json"
        self.state = self._load_state()
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoints: dict[str, Any] = {}
        self.epoch = int(self.state.get("epoch", 0))
        self.ready = threading.Event()
        self.missing: list[str] = []
        self.restarted = threading.Event()
        """Set on each restart (tests and the soak wait on it)."""
        self.leading = threading.Event()
        """Set while this controller leads (at once without etcd; with etcd once it wins the election)."""
        self.standby = False
        """The child stands by (with etcd): its client port answers with who leads."""
        self._started: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stopping = threading.Event()
        self._restarts = RestartIntensity(MAX_RESTARTS, RESTART_PERIOD_S)
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_file.read_text())
            return state if isinstance(state, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.error("controller: cannot read %s (%s); starting from the topology's ports", self.state_file, exc)
            return {}

    def _save_state(self) -> None:
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state))
        tmp.replace(self.state_file)

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int:
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else 0

    def start(self) -> dict[str, Any]:
        """Start the controller; its endpoints once its sockets are bound. ControllerStartError if it fails."""
        ports = self.state.get("ports")
        try:
            self._start_once(ports)
        except ControllerStartError:
            if not ports:
                raise
            # The ports a killed run left may be another program's by now: the topology's, then.
            log.warning("controller: cannot bind the ports of the previous run %s; using the topology's", ports)
            self.state.pop("ports", None)
            self._start_once(None)
        self._watcher = threading.Thread(target=self._watch, name="controller-watch", daemon=True)
        self._watcher.start()
        return self.endpoints

    def _start_once(self, ports: list[int] | None) -> None:
        proc = self._spawn(ports)
        try:
            started = self._started.get(timeout=START_TIMEOUT_S)
        except queue.Empty:
            proc.kill()
            raise ControllerStartError(f"the controller did not start within {START_TIMEOUT_S:.0f}s") from None
        if started.get("event") not in ("started", "standby"):
            proc.wait()
            raise ControllerStartError(str(started.get("error") or f"the controller exited with code {proc.returncode}"))
        self.endpoints = started
        if started.get("event") == "standby":
            self.standby = True
            return  # its ports are the topology's (fixed with etcd); the epoch comes with the lead
        self._leads(started)

    def _leads(self, started: dict[str, Any]) -> None:
        self.endpoints = started
        self.standby = False
        if "epoch" in started:
            self.epoch = int(started["epoch"])
        self.state["ports"] = [int(started[k].rsplit(":", 1)[1])
                               for k in ("client_endpoint", "cluster_endpoint", "state_endpoint")]
        self._save_state()
        self.leading.set()

    def _spawn(self, ports: list[int] | None) -> subprocess.Popen[bytes]:
        self.epoch = int(self.state.get("epoch", 0)) + 1
        self.state["epoch"] = self.epoch
        self._save_state()  # before it runs: two starts never share an epoch
        cmd = [sys.executable, "-m", "sllm_actors.actors.controller", str(self.topology_path),
               "--epoch", str(self.epoch), "--state-dir", str(self.state_dir), "--ready-timeout", str(self.ready_timeout)]
        if ports:
            cmd += ["--ports", ",".join(str(p) for p in ports)]
        if self.policy:
            cmd += ["--policy", self.policy]
        if self.http_endpoint:
            cmd += ["--http-endpoint", self.http_endpoint]
        if self.controller:
            cmd += ["--controller", self.controller]
        # This checkout's package first on the path, as the nodes get it.
        root = str(Path(sllm_actors.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.log_file, env=env)
        self.proc = proc
        self.ready.clear()
        self.leading.clear()
        log.info("controller: started pid %d, epoch %d", proc.pid, self.epoch)
        threading.Thread(target=self._read, args=(proc,), name="controller-out", daemon=True).start()
        return proc

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        """The controller's JSON lines: started (its endpoints), ready (the nodes joined), failed."""
        assert proc.stdout is not None
        said = False
        for raw in proc.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                continue  # not ours
            if not isinstance(line, dict):
                continue
            if line.get("event") == "started" and said and proc is self.proc:
                # A standby that won the lead: it serves now.
                log.warning("controller: %s leads from epoch %s", line.get("controller", "?"), line.get("epoch"))
                print(f"controller leading: {line.get('controller', '')} epoch {line.get('epoch')} pid {proc.pid}",
                      flush=True)
                self._leads(line)
            elif line.get("event") in ("started", "failed", "standby"):
                said = True
                self._started.put(line)
            elif line.get("event") == "ready" and proc is self.proc:
                self.missing = list(line.get("missing", []))
                self.ready.set()
        if not said:
            self._started.put({"event": "failed"})  # it died before it could say

    def wait_ready(self, timeout: float) -> list[str]:
        """Wait for the nodes to join; the ones that did not (all of them if the controller never said)."""
        if not self.ready.wait(timeout):
            return ["(no answer from the controller)"]
        return self.missing

    def _watch(self) -> None:
        while not self._stopping.is_set():
            proc = self.proc
            assert proc is not None
            code = proc.wait()
            if self._stopping.is_set():
                return
            if code == 0:
                log.info("controller: exited cleanly; not restarting it")
                return
            if not self._restarts.allows():
                log.error("controller: died %d times in %.0fs (last exit code %s); not restarting it",
                          len(self._restarts), RESTART_PERIOD_S, code)
                return
            log.warning("controller: pid %d exited with code %s; restarting it (epoch %d)", proc.pid, code,
                        self.epoch + 1)
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._start_once(self.state.get("ports"))
                except ControllerStartError as exc:
                    log.error("controller: the restart failed: %s", exc)
                    continue
            print(f"controller restarted: epoch {self.epoch} pid {self.pid}", flush=True)
            self.restarted.set()

    def stop(self, timeout: float = 90.0) -> None:
        """Stop the controller (it stops its nodes) and forget the ports: the next ``sllm up`` starts afresh."""
        with self._lock:
            self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.error("controller: did not stop within %.0fs of SIGTERM; killing it", timeout)
                proc.kill()
                proc.wait()
        self.state.pop("ports", None)
        self._save_state()
