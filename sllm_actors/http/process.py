"""The HTTP front end as ``sllm up`` runs it: a child process on a socket ``sllm up`` bound, restarted if it
dies (up to a restart intensity), stopped first when the cluster stops."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
from typing import IO

from sllm_actors.runtime.supervisor import RestartIntensity

__all__ = ["API_KEY_ENV", "HttpFrontEnd", "parse_api_keys"]

log = logging.getLogger(__name__)

API_KEY_ENV = "SLLM_API_KEY"
MAX_RESTARTS = 5
RESTART_PERIOD_S = 60.0


def parse_api_keys(*values: str) -> list[str]:
    """Keys from ``--api-key`` (repeatable) and ``SLLM_API_KEY`` (comma-separated), without blanks."""
    keys: list[str] = []
    for value in values:
        for key in value.split(","):
            key = key.strip()
            if key and key not in keys:
                keys.append(key)
    return keys


class HttpFrontEnd:
    def __init__(self, host: str, port: int, *, api_keys: list[str] | None = None,
                 log_file: IO[bytes] | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen for HTTP on {host}:{port}: {exc.strerror or exc} "
                          "(choose another with --http-port, or 0 to turn HTTP off)") from None
        # Accepted connections inherit this. Without it a kept-alive connection's next response waited for
        # the client's delayed ACK of the last one (Nagle): 40 ms added to the time to first token.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(2048)
        sock.set_inheritable(True)
        self.sock = sock
        self.host = host
        self.port = sock.getsockname()[1]
        self.api_keys = list(api_keys or [])
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._restarts = RestartIntensity(MAX_RESTARTS, RESTART_PERIOD_S)

    @property
    def endpoint(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, client_endpoint: str) -> None:
        self.client_endpoint = client_endpoint
        self._spawn()
        self._watcher = threading.Thread(target=self._watch, name="http-front-end", daemon=True)
        self._watcher.start()

    def _spawn(self) -> None:
        env = {**os.environ, API_KEY_ENV: ",".join(self.api_keys)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sllm_actors.http", "--cluster", self.client_endpoint,
             "--fd", str(self.sock.fileno())],
            pass_fds=(self.sock.fileno(),), env=env, stdout=self.log_file, stderr=self.log_file,
        )
        log.info("http: front end at %s (pid %d), API keys %s", self.endpoint, self.proc.pid,
                 "required" if self.api_keys else "off")

    def _watch(self) -> None:
        while not self._stopping.is_set():
            proc = self.proc
            assert proc is not None
            code = proc.wait()
            if self._stopping.is_set():
                return
            if not self._restarts.allows():
                log.error("http: the front end died %d times in %.0fs (last exit code %s); not restarting it",
                          len(self._restarts), RESTART_PERIOD_S, code)
                return
            log.warning("http: the front end exited with code %s; restarting it", code)
            self._spawn()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.error("http: the front end did not stop within %.0fs of SIGTERM; killing it", timeout)
                proc.kill()
                proc.wait()
        if self._watcher is not None:
            self._watcher.join(timeout=timeout)
        self.sock.close()
