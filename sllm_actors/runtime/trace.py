"""Per-hop timestamps of requests: where a request's time to first token goes (``benchmarks/trace_ttft.py``).

Off unless ``SLLM_TRACE`` names a directory (the cluster's processes inherit it from whoever starts them): then
each process appends ``request_id hop wall-clock-seconds`` lines to a file of its own there, one write per call,
and a reader merges the files. The hops a request passes, in order, are :data:`HOPS`; each component marks its
own with :func:`mark` (a no-op costing one global read when tracing is off). Wall-clock time is comparable across
the processes of one host, which is where the benchmark runs the cluster.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

__all__ = ["ENV", "HOPS", "enabled", "mark", "mark_many", "read"]

ENV = "SLLM_TRACE"
HOPS = (
    "client_send",      # the client sends its GenerateRequest (marked by the benchmark's client)
    "router_in",        # the router actor takes it from its mailbox
    "sched_in",         # the scheduler actor takes the placement request
    "sched_placed",     # the scheduler chose an instance and told the router
    "router_start",     # the router sent StartInference towards the node
    "node_in",          # the node's IO thread received it
    "inst_in",          # the instance actor took it from its mailbox
    "engine_queued",    # tokenized and queued in the engine's scheduler
    "step_start",       # the engine step that first prefills it began
    "token_sampled",    # its first token is on the host (after the step's forward and sampling)
    "token_sent",       # the step's TokenBatch left the instance
    "router_token",     # the router took the first token
    "client_token",     # the client received it (marked by the benchmark's client)
)

_directory = os.environ.get(ENV, "")
_file: IO[str] | None = None
_lock = threading.Lock()


def enabled() -> bool:
    return bool(_directory)


def _out() -> IO[str]:
    global _file
    if _file is None:
        Path(_directory).mkdir(parents=True, exist_ok=True)
        # Line-buffered: a process killed at the end of a benchmark (SIGTERM, no atexit) has written what it marked.
        _file = open(Path(_directory) / f"trace-{os.getpid()}.txt", "a", buffering=1, encoding="utf-8")
    return _file


def mark(request_id: str, hop: str, at: float | None = None) -> None:
    """Record that ``request_id`` passed ``hop`` (now, or at wall-clock time ``at``)."""
    if _directory:
        mark_many((request_id,), hop, at)


def mark_many(request_ids: Iterable[str], hop: str, at: float | None = None) -> None:
    """Record one hop of several requests at one time (an engine step's): one write."""
    if not _directory:
        return
    when = time.time() if at is None else at
    lines = "".join(f"{r} {hop} {when:.6f}\n" for r in request_ids)
    if lines:
        with _lock:
            _out().write(lines)


def read(directory: str | Path, prefix: str = "") -> dict[str, dict[str, float]]:
    """request id -> hop -> the earliest time it was marked, from every process's file (ids starting with
    ``prefix``). The earliest: a resumed request passes some hops again."""
    out: dict[str, dict[str, float]] = {}
    for path in Path(directory).glob("trace-*.txt"):
        for line in path.read_text(encoding="utf-8").splitlines():
            parts = line.split(" ")
            if len(parts) != 3 or not parts[0].startswith(prefix):
                continue
            hops = out.setdefault(parts[0], {})
            when = float(parts[2])
            if parts[1] not in hops or when < hops[parts[1]]:
                hops[parts[1]] = when
    return out
