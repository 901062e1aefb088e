"""A checkpoint fetched from an HTTP(S) repository: parallel range requests, each chunk checked as it arrives.

The repository is any static file server (or an object store's HTTP endpoint) serving a checkpoint directory
in our format (``format.py``). A fetch takes ``index.json`` and the small files first (the model's config and
tokenizer: what a load needs before any weight), then the partitions in fixed-size ranges over several
connections, in file order, so that a load started meanwhile finds its first chunks early: ``wait`` blocks a
reader until the bytes it asks for are written and their CRCs (from the index) checked. That is how the load
pipelines with the fetch (``loader``'s ``arrival``), as it pipelines with the SSD copy of a local repository.

A server that ignores ``Range`` (answers 200, as Python's ``http.server`` does) is read whole, one connection per
file; a connection dropped midway is resumed from the first missing byte (with ``Range``; without it the
body is read again from the start and the bytes already held are skipped), ``tries`` times per range; a chunk
whose CRC differs fails the fetch with a CheckpointError naming the file (its URL) and the tensors in it, and a
failed or cancelled fetch removes everything it wrote.

The small files have no checksums in the format (the index records the partitions' only); each is checked
against its Content-Length by the HTTP client.

Why httpx: it is already a dependency (the HTTP front end's tests and the OpenAI client use it), a small,
well-maintained client with connection pooling, streaming bodies, per-phase timeouts and a thread-safe
``Client``; threads suit the job (socket reads and CRC code release the GIL) and keep the loader's
blocking ``wait`` simple, where its async API would need a loop of its own beside the node's actors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import quote

import httpx

from sllm_actors.storage.format import (
    INDEX_FILE,
    MODEL_FILE,
    TOKENIZER_FILES,
    CheckpointError,
    CheckpointIndex,
    crc32,
)

__all__ = [
    "CONNECTIONS",
    "RANGE_BYTES",
    "SMALL_FILES",
    "TRIES",
    "FetchError",
    "HttpCheckpointFetch",
    "is_url",
]

log = logging.getLogger(__name__)
# httpx logs every request at INFO: a fetch makes one per range (hundreds for a large model). Its failures reach
# our own log lines (a resume, a give-up); the rest is noise in a node's log.
logging.getLogger("httpx").setLevel(logging.WARNING)

CONNECTIONS = 4
"""Connections per fetch: one stream rarely fills a long fat link (TCP's window), a few do."""
RANGE_BYTES = 32 << 20
"""Bytes per range request (rounded up to whole checksum chunks, so each range is checked on its own)."""
TRIES = 5
"""Attempts per range (or small file) before the fetch gives up."""
TIMEOUT_S = 30.0
"""Connect and read timeout per request: a server silent this long counts as a dropped connection."""
SMALL_FILES = (MODEL_FILE, "config.json", "generation_config.json", *TOKENIZER_FILES)
"""The files besides the index and the partitions that a checkpoint may have; those the server lacks (404) are
not part of it. (A static server need not list a directory, so the names come from the format.)"""


def is_url(source: str) -> bool:
    """True for an ``http://`` or ``https://`` model source (a repository reached over the network)."""
    return source.startswith(("http://", "https://"))


class FetchError(RuntimeError):
    """A fetch failed for a reason other than the checkpoint's contents (refused, not found, gave up after
    retries); ``url`` is the file it was fetching."""

    def __init__(self, message: str, *, url: str) -> None:
        super().__init__(message)
        self.url = url


class _Dropped(Exception):
    """The server closed a body before its end (counted as a dropped connection)."""


class _Cancelled(Exception):
    """The fetch was cancelled or failed elsewhere: stop quietly."""


class HttpCheckpointFetch:
    """One checkpoint directory at ``url`` fetched into ``dest`` (which must not exist).

    ``start()`` fetches the index and small files (raising on failure) and starts the partitions behind it;
    ``wait(partition, start, end)`` is the loader's ``arrival``; ``result()`` waits for the whole fetch.
    ``headers`` go with every request (an auth header; never logged). ``on_done(nbytes, seconds)`` is called
    once the partitions are all in: the bytes fetched and the time from the first range to the last.
    """

    def __init__(self, url: str, dest: str | os.PathLike[str], *, headers: Mapping[str, str] | None = None,
                 connections: int = CONNECTIONS, range_bytes: int = RANGE_BYTES, tries: int = TRIES,
                 timeout: float = TIMEOUT_S, on_done: Callable[[int, float], None] | None = None) -> None:
        if not is_url(url):
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.url = url if url.endswith("/") else url + "/"
        self.path = Path(dest)
        self.headers = dict(headers or {})
        self.connections = max(1, connections)
        self.range_bytes = max(1, range_bytes)
        self.tries = max(1, tries)
        self.on_done = on_done
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout), follow_redirects=False,
            limits=httpx.Limits(max_connections=self.connections + 1, max_keepalive_connections=self.connections + 1),
        )
        self.index: CheckpointIndex | None = None
        self.ranged = True
        """The server honours ``Range`` (learned from the index's answer)."""
        self.nbytes = 0
        self.seconds = 0.0
        self.drops = 0
        """Connections that dropped (or timed out) and were resumed."""
        self._cond = threading.Condition()
        self._arrived: list[bytearray] = []
        self._error: BaseException | None = None
        self._cancelled = False
        self._finished = threading.Event()
        self._fds: list[int] = []
        self._thread: threading.Thread | None = None

    def file_url(self, name: str) -> str:
        return self.url + quote(name)

    # ------------------------------------------------------------------ the caller's side

    def start(self) -> HttpCheckpointFetch:
        try:
            self.path.mkdir(parents=True)
            raw = self._get_small(INDEX_FILE, required=True)
            assert raw is not None
            try:
                data = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{self.file_url(INDEX_FILE)}: not valid JSON ({exc})",
                                      path=self.file_url(INDEX_FILE)) from exc
            self.index = CheckpointIndex.from_json(data, source=self.file_url(INDEX_FILE))
            with ThreadPoolExecutor(self.connections, thread_name_prefix="sllm-http-meta") as pool:
                bodies = dict(zip(SMALL_FILES, pool.map(self._get_small, SMALL_FILES)))
            for name, body in bodies.items():
                if body is not None:
                    (self.path / name).write_bytes(body)
            ck = self.index.checksum_chunk_bytes
            for part in self.index.partitions:
                fd = os.open(self.path / part.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                self._fds.append(fd)
                os.ftruncate(fd, part.nbytes)  # the loader checks sizes at open: the file has its size at once
                self._arrived.append(bytearray(-(-part.nbytes // ck)))
            # The index is written last: the directory is a checkpoint to ``is_checkpoint`` only from here on.
            (self.path / INDEX_FILE).write_bytes(raw)
        except BaseException:
            self._close()
            self.client.close()
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"sllm-http-fetch-{self.path.name}")
        self._thread.start()
        return self

    def wait(self, partition: int, start: int, end: int) -> None:
        """Block until bytes ``[start, end)`` of ``partition`` are written and checked; raise the fetch's error
        if it failed (or was cancelled) first."""
        assert self.index is not None
        ck = self.index.checksum_chunk_bytes
        arrived = self._arrived[partition]
        wanted = range(start // ck, -(-end // ck))
        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                if self._cancelled:
                    raise _cancelled_error(self.url)
                if all(arrived[k] for k in wanted):
                    return
                self._cond.wait()

    @property
    def done(self) -> bool:
        """Every partition is in (or the fetch failed or was cancelled): its threads have stopped."""
        return self._finished.is_set()

    @property
    def error(self) -> BaseException | None:
        """Why the fetch failed, once it has (None while it runs, after it succeeded, or when cancelled)."""
        return self._error

    def result(self, timeout: float | None = None) -> Path:
        """The fetched directory, once every partition is in and checked; raises the fetch's error."""
        if not self._finished.wait(timeout):
            raise TimeoutError(f"{self.url}: fetch not done after {timeout}s")
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise _cancelled_error(self.url)
        return self.path

    def cancel(self, timeout: float = TIMEOUT_S * 2) -> None:
        """Stop the fetch and remove what it wrote (its readers' waits raise)."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
        if self._thread is not None:
            self._finished.wait(timeout)
        self.discard()

    def discard(self) -> None:
        """Remove the fetched directory (a copy elsewhere has been made of it, or it is not wanted)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.client.close()

    # ------------------------------------------------------------------ the fetch's threads

    def _run(self) -> None:
        assert self.index is not None
        ck = self.index.checksum_chunk_bytes
        span = -(-self.range_bytes // ck) * ck
        tasks: deque[tuple[int, int, int]] = deque()
        for pi, part in enumerate(self.index.partitions):
            step = span if self.ranged else part.nbytes
            for off in range(0, part.nbytes, step):
                tasks.append((pi, off, min(part.nbytes, off + step)))
        started = time.perf_counter()
        lock = threading.Lock()

        def worker() -> None:
            while True:
                with lock:
                    if not tasks or self._cancelled or self._error is not None:
                        return
                    task = tasks.popleft()
                self._fetch_range(*task)

        try:
            with ThreadPoolExecutor(self.connections, thread_name_prefix="sllm-http-range") as pool:
                futures = [pool.submit(worker) for _ in range(min(self.connections, len(tasks) or 1))]
                for future in futures:
                    exc = future.exception()
                    if exc is not None and not isinstance(exc, _Cancelled):
                        self._fail(exc)
                for future in futures:
                    if isinstance(future.exception(), _Cancelled) and self._error is None and not self._cancelled:
                        self._fail(RuntimeError("a range worker stopped without an error"))  # pragma: no cover
        finally:
            self.seconds = time.perf_counter() - started
            for fd in self._fds:
                if self._error is None and not self._cancelled:
                    os.fsync(fd)
            self._close()
            failed = self._error is not None or self._cancelled
            if failed:
                shutil.rmtree(self.path, ignore_errors=True)
                self.client.close()
            self._finished.set()
        if not failed and self.on_done is not None:
            self.on_done(self.nbytes, self.seconds)

    def _fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._error is None:
                self._error = exc
            self._cond.notify_all()

    def _fetch_range(self, partition: int, start: int, end: int) -> None:
        """Bytes ``[start, end)`` of a partition into its file, chunk by checked chunk; resumed after a drop."""
        assert self.index is not None
        part = self.index.partitions[partition]
        url = self.file_url(part.file)
        ck = self.index.checksum_chunk_bytes
        buf = bytearray(min(ck, end - start))
        chunk_at = start  # the checksum chunk being assembled starts here ...
        fill = 0  # ... and holds this many bytes so far
        failures = 0
        while chunk_at < end:
            want = chunk_at + fill
            headers = dict(self.headers)
            if self.ranged:
                headers["Range"] = f"bytes={want}-{end - 1}"
            try:
                with self.client.stream("GET", url, headers=headers) as resp:
                    body_at = self._body_offset(resp, url, want)
                    pos = body_at
                    for data in resp.iter_raw():
                        if self._cancelled or self._error is not None:
                            raise _Cancelled()
                        lo, hi = max(pos, chunk_at + fill), min(pos + len(data), end)
                        while lo < hi:
                            chunk_end = min(chunk_at + ck, end)
                            take = min(hi, chunk_end) - lo
                            buf[fill:fill + take] = data[lo - pos:lo - pos + take]
                            fill += take
                            lo += take
                            if chunk_at + fill == chunk_end:
                                self._commit(partition, chunk_at, memoryview(buf)[:fill], url)
                                with self._cond:
                                    self.nbytes += fill
                                chunk_at, fill = chunk_end, 0
                        pos += len(data)
                        if pos >= end:
                            break
                    if chunk_at < end:
                        raise _Dropped(f"the body ended at byte {pos}, before byte {end}")
            except (httpx.TransportError, _Dropped) as exc:
                failures += 1
                self.drops += 1
                if failures >= self.tries:
                    raise FetchError(f"{url}: bytes {chunk_at + fill}-{end - 1}: gave up after {failures} tries "
                                     f"({type(exc).__name__}: {exc})", url=url) from exc
                log.info("%s: connection lost at byte %d (%s); resuming (try %d of %d)",
                         url, chunk_at + fill, type(exc).__name__, failures + 1, self.tries)
                time.sleep(min(1.0, 0.05 * 2 ** failures))  # back off a little before asking again

    def _body_offset(self, resp: httpx.Response, url: str, want: int) -> int:
        """Where in the file the body of ``resp`` starts: ``want`` for a 206, 0 for a 200 (Range ignored)."""
        if resp.status_code == 206:
            content_range = resp.headers.get("content-range", "")
            try:
                first = int(content_range.split()[1].split("-")[0])
            except (IndexError, ValueError):
                raise FetchError(f"{url}: a 206 answer with a bad Content-Range {content_range!r}", url=url) from None
            if first != want:
                raise FetchError(f"{url}: asked for byte {want}, the server sent from {first}", url=url)
            return first
        if resp.status_code == 200:
            return 0
        if resp.status_code >= 500 or resp.status_code == 429:
            raise _Dropped(f"HTTP {resp.status_code}")  # the server's trouble: worth another try
        raise self._refused(resp, url)

    def _refused(self, resp: httpx.Response, url: str) -> FetchError:
        why = f"HTTP {resp.status_code} {resp.reason_phrase}"
        if resp.status_code in (401, 403):
            hint = ("its auth header was refused" if self.headers else
                    "it wants an auth header: give the repository one in the topology's repositories:")
            return FetchError(f"{url}: the repository refused the request ({why}): {hint}", url=url)
        return FetchError(f"{url}: {why}", url=url)

    def _commit(self, partition: int, offset: int, data: memoryview, url: str) -> None:
        """A whole checksum chunk: check it, write it, tell the waiting readers."""
        assert self.index is not None
        part = self.index.partitions[partition]
        ck = self.index.checksum_chunk_bytes
        k = offset // ck
        if crc32(data) != part.checksums[k]:
            affected = self.index.tensors_in(partition, offset, offset + len(data))
            shown = ", ".join(affected[:8]) + (f" and {len(affected) - 8} more" if len(affected) > 8 else "")
            raise CheckpointError(
                f"{url}: checksum mismatch in bytes [{offset}, {offset + len(data)}) (chunk {k}) as fetched; "
                f"corrupted tensors: {shown or '(padding only)'}", path=url, tensors=affected)
        written = 0
        while written < len(data):
            written += os.pwrite(self._fds[partition], data[written:], offset + written)
        with self._cond:
            self._arrived[partition][k] = 1
            self._cond.notify_all()

    def _get_small(self, name: str, required: bool = False) -> bytes | None:
        """A small file whole (None when the server has no such file and it is not ``required``). The index's
        answer also says whether the server honours ``Range`` (asked as ``bytes=0-``)."""
        url = self.file_url(name)
        probe = name == INDEX_FILE
        failures = 0
        while True:
            headers = dict(self.headers)
            if probe:
                headers["Range"] = "bytes=0-"
            try:
                resp = self.client.get(url, headers=headers)
            except httpx.TransportError as exc:
                failures += 1
                if failures >= self.tries:
                    raise FetchError(f"{url}: gave up after {failures} tries ({type(exc).__name__}: {exc})",
                                     url=url) from exc
                time.sleep(min(1.0, 0.05 * 2 ** failures))
                continue
            if resp.status_code == 404 and not required:
                return None
            if resp.status_code == 404:
                raise FetchError(f"{url}: HTTP 404: no checkpoint in our format there (its {name} is missing)",
                                 url=url)
            if resp.status_code >= 500 and failures + 1 < self.tries:
                failures += 1
                continue
            if resp.status_code not in (200, 206):
                raise self._refused(resp, url)
            if probe:
                self.ranged = resp.status_code == 206
                if not self.ranged:
                    log.info("%s ignores Range: fetching each file whole", self.url)
            return resp.content

    def _close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def _cancelled_error(url: str) -> FetchError:
    return FetchError(f"{url}: the fetch was cancelled", url=url)

