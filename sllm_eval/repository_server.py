"""A static file server for a model repository over HTTP, for tests and ``benchmarks/bench_http_repo.py``.

It serves a directory the way a static file server or an object store's HTTP endpoint does, with ``Range``
(one ``bytes=A-B``, ``bytes=A-``; a 206 with Content-Range), plus faults a test asks for: drop a connection once
midway through a file, flip one byte of a file as served, demand a header (an object store's auth). The standard
library's ``SimpleHTTPRequestHandler`` ignores ``Range`` (answers 200 with the whole file): ``serve(ranges=False)``
serves with it, the whole-file case.

Threads per connection (``ThreadingHTTPServer``), HTTP/1.1 keep-alive, bound to 127.0.0.1 on a free port;
``stop()`` shuts it down and closes its socket. As a program it serves a directory on a host of its own
(``sllm_eval.hosts``): ``python -m sllm_eval.repository_server ROOT --host ADDR [--port P]`` prints
``ready: URL`` and serves until killed.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

__all__ = ["Faults", "RepositoryServer", "main", "serve"]

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


@dataclass
class Faults:
    """What the server does wrong, on purpose."""

    drop_once: dict[str, int] = field(default_factory=dict)
    """file name -> a byte offset: the first answer covering it stops there and closes the connection
    (the first ``drop_times`` answers, with ``drop_times``)."""
    drop_times: int = 1
    hold: dict[str, int] = field(default_factory=dict)
    """file name -> a byte offset: an answer covering it waits for ``release`` before sending its body."""
    release: threading.Event = field(default_factory=threading.Event)
    corrupt: dict[str, int] = field(default_factory=dict)
    """file name -> a byte offset whose value is flipped in every answer."""
    require_header: tuple[str, str] | None = None
    """(name, value) every request must carry, else 401."""
    dropped: list[str] = field(default_factory=list)
    """Files whose connection was dropped (what happened, for the test to check)."""
    lock: threading.Lock = field(default_factory=threading.Lock)


class _RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    root: Path
    faults: Faults
    requests: list[tuple[str, str]]

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: a test's output is the test's

    def do_GET(self) -> None:
        self.requests.append((self.path, self.headers.get("Range", "")))
        want = self.faults.require_header
        if want is not None and self.headers.get(want[0]) != want[1]:
            self._plain(401, b"unauthorized\n")
            return
        name = self.path.lstrip("/").split("?", 1)[0]
        path = (self.root / name).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            self._plain(404, b"not found\n")
            return
        size = path.stat().st_size
        start, end, status = 0, size, 200
        asked = self.headers.get("Range")
        if asked:
            m = _RANGE.match(asked.strip())
            if m is None or int(m.group(1)) >= max(size, 1):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start = int(m.group(1))
            end = min(size, int(m.group(2)) + 1) if m.group(2) else size
            status = 206
        self.send_response(status)
        self.send_header("Content-Length", str(end - start))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        self.end_headers()
        stop = end
        with self.faults.lock:
            drop_at = self.faults.drop_once.get(name)
            if drop_at is not None and start <= drop_at < end:
                self.faults.dropped.append(name)
                if self.faults.dropped.count(name) >= self.faults.drop_times:
                    del self.faults.drop_once[name]
                stop = drop_at
        held = self.faults.hold.get(name)
        if held is not None and start <= held < end and not self.faults.release.wait(60):
            stop = start  # never released (the test failed elsewhere): end the answer short
        flip = self.faults.corrupt.get(name)
        with open(path, "rb") as f:
            f.seek(start)
            pos = start
            while pos < stop:
                data = bytearray(f.read(min(1 << 20, stop - pos)))
                if not data:
                    break
                if flip is not None and pos <= flip < pos + len(data):
                    data[flip - pos] ^= 0xFF
                self.wfile.write(data)
                pos += len(data)
        if stop < end:
            self.wfile.flush()
            self.close_connection = True  # the body is short: the client sees the connection end midway

    def _plain(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _QuietStatic(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class RepositoryServer:
    """A running server; ``url`` is its root (``http://127.0.0.1:PORT/``)."""

    def __init__(self, server: ThreadingHTTPServer, requests: list[tuple[str, str]]) -> None:
        self.server = server
        self.requests = requests
        """(path, Range header) of every request served by the ranged handler, in order."""
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}/"
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True,
                                       name=f"repository-server-{port}")
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(root: str | os.PathLike[str], *, ranges: bool = True, faults: Faults | None = None,
          host: str = "127.0.0.1", port: int = 0) -> RepositoryServer:
    """Serve ``root`` over HTTP; ``ranges=False`` serves with the standard library's handler (no Range)."""
    root = Path(root).resolve()
    requests: list[tuple[str, str]] = []
    handler: Any
    if ranges:
        handler = type("Handler", (_RangeHandler,), {"root": root, "faults": faults or Faults(),
                                                     "requests": requests})
    else:
        handler = partial(_QuietStatic, directory=str(root))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return RepositoryServer(server, requests)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import signal

    parser = argparse.ArgumentParser(description="serve a model repository directory over HTTP (with Range)")
    parser.add_argument("root", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with serve(args.root, host=args.host, port=args.port) as server:
        print(f"ready: {server.url}", flush=True)
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
