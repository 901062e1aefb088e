"""NodeProcessActor: keeps one local node process running.

The unit of crash is the node process. A watcher thread waits on the process; when it exits without
being asked to, the registry hears it at once (faster than missed heartbeats) and the process is
started again, within a restart intensity.

A node outlives a killed controller (it keeps its requests for a grace period and re-registers), so each
started node's pid is written under the cluster's state directory; a restarted controller adopts the node
still running there (watching it through a pidfd, as it is not its child) instead of starting a second one.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pykka

import sllm_actors
from sllm_actors.actors.controller import registry
from sllm_actors.actors.controller.context import ClusterContext
from sllm_actors.runtime.supervisor import Directory, SupervisedActor

__all__ = ["NodeProcessActor", "kill", "node_process_actor_name"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessExited:
    """In-process: the watcher saw the process end."""

    pid: int
    returncode: int


@dataclass(frozen=True)
class Kill:
    """In-process: SIGKILL the node process (operators' drills, tests)."""


def node_process_actor_name(node: str) -> str:
    return f"process/{node}"


def kill(directory: Directory, node: str, timeout: float = 5.0) -> int:
    """SIGKILL the local process of ``node``; its pid. KeyError when ``node`` is not a local node here."""
    ref = directory.get(node_process_actor_name(node))
    if ref is None:
        raise KeyError(f"{node} is not a local node of this controller")
    pid: int = ref.ask(Kill(), block=False).get(timeout=timeout)
    return pid


class NodeProcessActor(SupervisedActor):
    def __init__(
        self,
        supervisor: pykka.ActorRef[Any],
        name: str,
        *,
        cluster: ClusterContext,
        node: str,
        log_file: IO[bytes] | None = None,
        max_restarts: int = 5,
        period_s: float = 60.0,
    ) -> None:
        super().__init__(supervisor, name)
        self.cluster = cluster
        self.node = node
        self.log_file = log_file
        self.max_restarts = max_restarts
        self.period_s = period_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts: deque[float] = deque()
        self.restart_count = 0
        self.stopping_now = False

        self.adopted = 0
        """The pid of a node process a previous controller started, still running, that this one watches."""

    def started(self) -> None:
        pid = self._running_node()
        if pid:
            self._adopt(pid)
        else:
            self._spawn()

    def stopping(self) -> None:
        self.stopping_now = True
        self._forget_pid()
        if self.adopted:
            self._stop_adopted(self.adopted)
            return
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            log.warning("%s: did not stop on SIGTERM within 20s; killing it", self.node)
            proc.kill()
            proc.wait(timeout=5)

    # ------------------------------------------------------------------ nodes a previous controller started

    def _pid_file(self) -> Path | None:
        state = self.cluster.state_dir
        return state / "nodes" / f"{self.node}.pid" if state is not None else None

    def _write_pid(self, pid: int) -> None:
        path = self._pid_file()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(f"{pid}\n")
            tmp.replace(path)

    def _forget_pid(self) -> None:
        path = self._pid_file()
        if path is not None:
            path.unlink(missing_ok=True)

    def _running_node(self) -> int:
        """The pid of this node's process a previous controller started, if it still runs and joins our cluster
        endpoint (its command line says so: a reused pid is some other program's)."""
        path = self._pid_file()
        if path is None or not path.is_file():
            return 0
        try:
            pid = int(path.read_text().strip() or 0)
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return 0
        wanted = [b"sllm_actors.actors.node", self.node.encode(),
                  (self.cluster.join_endpoint or self.cluster.cluster_endpoint).encode()]
        return pid if all(w in args for w in wanted) else 0

    def _adopt(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            self._spawn()
            return
        self.adopted = pid
        log.info("%s: adopted node process pid %d (started by a previous controller)", self.node, pid)
        self.cluster.events.emit("node", f"adopted {self.node} (pid {pid}), still running", {"node": self.node})
        me = self.actor_ref

        def watch() -> None:
            try:
                select.select([fd], [], [])
            finally:
                os.close(fd)
            try:
                me.tell(ProcessExited(pid, -1))  # not our child: its exit code is its parent's to read
            except pykka.ActorDeadError:
                pass

        threading.Thread(target=watch, name=f"watch-{self.node}", daemon=True).start()

    def _stop_adopted(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return  # gone already
        try:
            os.kill(pid, signal.SIGTERM)
            if not select.select([fd], [], [], 20)[0]:
                log.warning("%s: did not stop on SIGTERM within 20s; killing it", self.node)
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)

    def _pid(self) -> int:
        if self.adopted:
            return self.adopted
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else 0

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, ProcessExited):
            self._exited(message)
        elif isinstance(message, Kill):
            pid = self._pid()
            if pid:
                log.warning("%s: killing pid %d on request", self.node, pid)
                self.cluster.events.emit("kill", f"SIGKILL {self.node} (pid {pid})", {"node": self.node})
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            return pid or (self.proc.pid if self.proc else 0)
        elif message == "pid":
            return self._pid()
        else:
            raise TypeError(f"{self.name}: unexpected message {message!r}")
        return None

    def _spawn(self) -> None:
        cmd = [
            sys.executable, "-m", "sllm_actors.actors.node",
            "--join", self.cluster.join_endpoint or self.cluster.cluster_endpoint, "--name", self.node,
            "--exit-with-controller",
        ]
        key_dir = self.cluster.node_key_dir
        cmd += ["--key", str(key_dir / f"{self.node}.key_secret")] if key_dir is not None else ["--insecure"]
        stderr = self.log_file if self.log_file is not None else None
        # The node runs the very code the controller runs: this checkout's package first on the path, not
        # whatever copy an editable install elsewhere would put there.
        root = str(Path(sllm_actors.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.adopted = 0
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env)
        self._write_pid(self.proc.pid)
        log.info("%s: started node process pid %d", self.node, self.proc.pid)
        proc, me = self.proc, self.actor_ref

        def watch() -> None:
            code = proc.wait()
            try:
                me.tell(ProcessExited(proc.pid, code))
            except pykka.ActorDeadError:
                pass  # we are shutting down and asked for this exit

        threading.Thread(target=watch, name=f"watch-{self.node}", daemon=True).start()

    def _exited(self, msg: ProcessExited) -> None:
        if self.stopping_now or msg.pid != (self.adopted or (self.proc.pid if self.proc is not None else 0)):
            return
        log.warning("%s: node process pid %d exited with code %d", self.node, msg.pid, msg.returncode)
        registry.node_process_exited(self.cluster.directory, self.node, msg.returncode)
        now = time.monotonic()
        self.restarts.append(now)
        while self.restarts and now - self.restarts[0] > self.period_s:
            self.restarts.popleft()
        if len(self.restarts) > self.max_restarts:
            why = f"{self.node} exited {len(self.restarts)} times in {self.period_s:.0f}s; not restarting it"
            log.error(why)
            self.cluster.events.emit("error", why, {"node": self.node})
            return
        self.restart_count += 1
        self.cluster.events.emit(
            "restart", f"restarting {self.node} (exit code {msg.returncode}, restart #{self.restart_count})",
            {"node": self.node},
        )
        self._spawn()
