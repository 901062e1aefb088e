"""The soak and chaos load (``benchmarks/bench_soak.py``, ``tests/test_soak.py``): N HTTP streams run back to
back for T seconds against a running cluster, SIGKILLs of its processes at chosen times, and what came of it.

- Load: each of N workers sends ``POST /v1/completions`` (``stream: true``, greedy, ``return_token_ids``) and
  reads its SSE stream to ``[DONE]``, then sends the next, until T seconds have passed; what is in flight then
  is let finish (up to a drain limit). The workers' first requests are spread over ``ramp_s``, so the streams do
  not move in lockstep.
- Outcomes, each request exactly one: ``finished`` (``[DONE]`` after a finish reason, no error), ``failed`` (an
  HTTP status other than 200, an error event in the stream, no answer within the client's timeout: the
  cluster's fault), ``cut`` (the connection to the front end closed under the request, before or after the
  response's headers: what a killed front end does to the streams through it), ``unfinished`` (still running
  when the drain limit ended the run). Each failed and cut request says why.
- Exactness: before the load, each prompt is run once alone (the reference); a finished greedy stream must
  carry exactly its prompt's reference tokens (meaningful where the engine is deterministic for it: CPU fp32,
  or the model's ``deterministic: true``).
- Chaos: ``node-1@60,http@120,controller@200`` (seconds from the load's start); ``node`` alone is the node
  running the most requests at that moment (the router's table, looked at until a request runs on a node). The processes are found under the ``sllm up`` process
  (``cluster_processes``), so a restarted one is found by its role again; after each kill the time until its
  role has a new process is recorded.
- Figures: tokens per second (from the streamed ids, as they arrive), each process's RSS over time (from
  /proc: Linux, as the cluster's process handling is) with its spread and slope once settled (and the slope of
  the late half: growth still going on at the end), each GPU's captured CUDA graphs over time (from the
  router's status: host memory that grows with the decode shapes served), and per kill the rate before it and
  how soon a 10 s window is back to 90 % of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PROMPTS",
    "Kill",
    "Outcome",
    "SoakConfig",
    "busiest_node",
    "cluster_processes",
    "parse_kills",
    "plot",
    "rss_bytes",
    "rss_parts",
    "run_soak",
    "summarize",
]

log = logging.getLogger(__name__)

PROMPTS = [
    "Once upon a time there was a small model",
    "The capital of France is",
    "In a hole in the ground there lived",
    "The quick brown fox jumps over",
    "Serverless inference starts a model when",
    "A checkpoint is loaded from the fastest tier",
    "It was the best of times, it was",
    "The three laws of robotics are",
]
"""Distinct prompts, used in turn: requests of one prompt must all give its reference tokens."""

RECOVERY_FRACTION = 0.9
BACKOFF_MAX_S = 5.0
WINDOW_S = 10
VICTIM_WAIT_S = 10.0
"""How long a ``node`` kill looks for the node running the most requests before it is recorded as not done."""
VICTIM_POLL_S = 0.05
GPU_EVERY_S = 10.0
SETTLE_S = 20.0
"""A process's first seconds are its start (imports, a load, caches filling): its memory is judged after them."""


@dataclass(frozen=True)
class Kill:
    target: str
    """``node-N`` (a node by name), ``node`` (the node running the most requests then), ``http``, ``controller``."""
    at_s: float


def parse_kills(spec: str) -> list[Kill]:
    """``node-1@60,http@120`` -> kills at 60 s and 120 s from the load's start, in time order."""
    kills = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        target, sep, at = part.partition("@")
        if not sep or not target:
            raise ValueError(f"--kill: {part!r} is not TARGET@SECONDS (e.g. node-1@60)")
        try:
            seconds = float(at)
        except ValueError:
            raise ValueError(f"--kill: {at!r} in {part!r} is not a number of seconds") from None
        kills.append(Kill(target, seconds))
    return sorted(kills, key=lambda k: k.at_s)


@dataclass
class SoakConfig:
    url: str
    """The HTTP front end, http://HOST:PORT."""
    model: str
    streams: int
    duration_s: float
    max_tokens: int = 64
    kills: list[Kill] = field(default_factory=list)
    up_pid: int = 0
    """The ``sllm up`` process: its children are the cluster's processes (0: no kills, no RSS but ours)."""
    client_endpoint: str = ""
    """The router's client endpoint, for ``node`` kills and the check that nothing is left running."""
    api_key: str = ""
    check_tokens: bool = True
    drain_s: float = 120.0
    request_timeout_s: float = 300.0
    rss_every_s: float = 2.0
    prompts: list[str] = field(default_factory=lambda: list(PROMPTS))
    ramp_s: float = 2.0
    """Worker w sends its first request ``w / streams * ramp_s`` after the start. Started together, streams of
    equal length stay in step for the whole run (one wave after another), which no real load does and which
    empties the router between waves where the engine outruns the clients."""


@dataclass
class Outcome:
    worker: int
    prompt: int
    started_s: float
    ended_s: float = 0.0
    status: str = "unfinished"
    why: str = ""
    request_id: str = ""
    headers: bool = False
    """The response's headers had come when it ended (a cut after them is a stream cut mid-way)."""
    finish_reason: str = ""
    tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    """Kept only for the token check (at hundreds of streams for minutes, millions of ids otherwise)."""


# ---------------------------------------------------------------------------------------------- processes


def rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` (0 when it is gone), from /proc."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


RSS_PARTS = ("RssAnon", "RssFile", "RssShmem")
"""What resident memory is made of (/proc/PID/status): the process's own heap and stacks (anonymous: Python objects,
torch's host allocations, CUDA's host-side state), pages of files it maps (a checkpoint read through mmap), and
shared memory it maps (a tier's copy in /dev/shm). Growth in one and not the others says where to look."""


def rss_parts(pid: int) -> dict[str, int]:
    """``RSS_PARTS`` of ``pid`` in bytes ({} when it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in RSS_PARTS:
                    out[name] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return {}
    return out


def _children(pid: int) -> dict[int, list[str]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            if int(stat[1]) == pid and stat[0] != "Z":
                out[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError):
            continue
    return out


def cluster_processes(up_pid: int) -> dict[str, int]:
    """Role -> pid of the processes of the cluster ``sllm up`` runs: ``controller`` (the child running the controller
    where ``sllm up`` supervises one, else ``sllm up`` itself), each node by its name, ``http``. Nodes are the
    controller's children, and a node that outlived a killed controller (it waits for the next to adopt it) is
    found by the cluster endpoint it joined."""
    if not up_pid or rss_bytes(up_pid) == 0:
        return {}
    roles = {"controller": up_pid}
    join = ""
    todo = [up_pid]
    while todo:
        for pid, argv in _children(todo.pop()).items():
            line = " ".join(argv)
            if "sllm_actors.actors.node" in line and "--name" in argv:
                roles[argv[argv.index("--name") + 1]] = pid
                join = argv[argv.index("--join") + 1] if "--join" in argv else join
            elif "sllm_actors.http" in line:
                roles["http"] = pid
            elif "sllm_actors.actors.controller" in line:
                roles["controller"] = pid
                todo.append(pid)
    for pid, argv in _processes().items():
        # Orphaned nodes of this cluster (their controller was killed): the same --join as the others had, or as
        # any node of ours that a previous look found.
        if "sllm_actors.actors.node" in argv and "--name" in argv and "--join" in argv:
            name, endpoint = argv[argv.index("--name") + 1], argv[argv.index("--join") + 1]
            if name not in roles and endpoint in (join, _JOINS.get(up_pid, "")):
                roles[name] = pid
    if join:
        _JOINS[up_pid] = join
    return roles


_JOINS: dict[int, str] = {}
"""sllm up's pid -> the cluster endpoint its nodes join (remembered: after a controller kill no node is under it)."""


def _processes() -> dict[int, list[str]]:
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
    return out


# ---------------------------------------------------------------------------------------------- HTTP


class _Client:
    """aiohttp where installed (the test extra; the cheaper client at hundreds of streams), else httpx."""

    def __init__(self, timeout_s: float, streams: int) -> None:
        try:
            import aiohttp

            # A connection per request: a pooled keep-alive connection to a killed front end would fail the
            # next request on it before it was sent, which says nothing about the cluster.
            self.session: Any = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, force_close=True),
                timeout=aiohttp.ClientTimeout(total=timeout_s, sock_read=timeout_s))
            self.kind = "aiohttp"
            self.refused: tuple[type[BaseException], ...] = (aiohttp.ClientConnectorError,)
            self.lost: tuple[type[BaseException], ...] = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError,
                                                          ConnectionError)
        except ImportError:
            import httpx

            self.session = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(
                max_connections=streams * 2, max_keepalive_connections=0))
            self.kind = "httpx"
            self.refused = (httpx.ConnectError,)
            self.lost = (httpx.TransportError, ConnectionError)

    async def close(self) -> None:
        if self.kind == "aiohttp":
            await self.session.close()
        else:
            await self.session.aclose()

    async def lines(self, url: str, body: dict[str, Any], headers: dict[str, str], out: Outcome) -> Any:
        """Yield the response's lines; a status other than 200 ends it with ``out`` failed."""
        if self.kind == "aiohttp":
            async with self.session.post(url, json=body, headers=headers) as r:
                out.headers = True
                if r.status != 200:
                    out.status, out.why = "failed", f"HTTP {r.status}: {_error_text(await r.text())}"
                    return
                async for raw in r.content:
                    yield raw.decode(errors="replace").rstrip("\r\n")
        else:
            async with self.session.stream("POST", url, json=body, headers=headers) as r:
                out.headers = True
                if r.status_code != 200:
                    out.status, out.why = "failed", f"HTTP {r.status_code}: {_error_text((await r.aread()).decode())}"
                    return
                async for line in r.aiter_lines():
                    yield line


def _error_text(body: str) -> str:
    try:
        err = json.loads(body)["error"]
        return f"{err.get('code')}: {err.get('message')}"
    except (ValueError, KeyError, TypeError):
        return body[:200]


async def _request(client: _Client, cfg: SoakConfig, body: dict[str, Any], out: Outcome,
                   on_tokens: Callable[[int], None]) -> Outcome:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    done = False
    try:
        async for line in client.lines(f"{cfg.url}/v1/completions", body, headers, out):
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            payload = json.loads(line[len("data: "):])
            if "error" in payload:
                err = payload["error"]
                out.status, out.why = "failed", f"error event: {err.get('code')}: {err.get('message')}"
                continue
            out.request_id = out.request_id or f"{payload.get('id', '')}-0"
            for choice in payload.get("choices", []):
                ids = choice.get("token_ids") or []
                out.tokens += len(ids)
                if cfg.check_tokens:
                    out.token_ids.extend(ids)
                on_tokens(len(ids))
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
    except client.refused as exc:
        # Nothing listens (the front end and its socket are gone): the service is down, no stream was cut.
        out.status, out.why = "failed", f"cannot connect: {type(exc).__name__}"
    except client.lost as exc:
        out.status = "cut"
        out.why = f"{'stream' if out.headers else 'connection'} lost: {type(exc).__name__}: {exc}"[:300]
    except TimeoutError:
        out.status, out.why = "failed", f"no answer within {cfg.request_timeout_s:.0f}s"
    if out.status == "unfinished":
        if done and out.finish_reason:
            out.status = "finished"
        elif done:
            out.status, out.why = "failed", "[DONE] without a finish reason"
        else:
            out.status, out.why = "cut", "the stream ended without [DONE]"
    return out


def _body(cfg: SoakConfig, prompt: int) -> dict[str, Any]:
    return {"model": cfg.model, "prompt": cfg.prompts[prompt], "max_tokens": cfg.max_tokens, "temperature": 0,
            "stream": True, "return_token_ids": True}


# ---------------------------------------------------------------------------------------------- the run


def _router_requests(endpoint: str) -> dict[str, Any]:
    from sllm_actors.client import Client

    with Client(endpoint) as c:
        return c.status()


def _left_running(endpoint: str) -> list[str]:
    """The requests the router or an instance still holds; ["(the cluster does not answer)"] when it is down."""
    try:
        status = _router_requests(endpoint)
    except (ConnectionError, RuntimeError) as exc:
        return [f"(the cluster does not answer: {exc})"]
    ids = {r["request_id"] for r in status.get("requests", [])}
    for inst in status.get("instances", []):
        ids.update(inst.get("requests", []))
    return sorted(ids)


def busiest_node(requests: list[dict[str, Any]]) -> tuple[str, int]:
    """The node running the most of the router's ``requests`` (``status()["requests"]``) and how many; ("", 0)
    when none runs one."""
    counts = Counter(r["node"] for r in requests if r.get("node"))
    return counts.most_common(1)[0] if counts else ("", 0)


def _busiest_node(endpoint: str, within_s: float = VICTIM_WAIT_S) -> tuple[str, int, int]:
    """(node, requests it runs, status polls it took): the router's table looked at until a request runs on a
    node. One look is not enough: streams of equal length started together stay in step, and where the front end
    and the clients are slower than the engine (256 streams on an H200) the router finishes one wave before the
    clients send the next, so its table is empty for a moment each round (the H200 soak's "no node runs a
    request now" was a look that fell into that moment)."""
    deadline = time.monotonic() + within_s
    polls = 0
    seen: Counter[str] = Counter()
    while True:
        status = _router_requests(endpoint)
        polls += 1
        requests = status.get("requests", [])
        node, count = busiest_node(requests)
        if node:
            return node, count, polls
        seen.update(r.get("state", "?") for r in requests)
        if time.monotonic() > deadline:
            raise RuntimeError(f"no node ran a request in {polls} looks over {within_s:.0f}s (requests seen by "
                               f"state: {dict(seen) or 'none'})")
        time.sleep(VICTIM_POLL_S)  # polling a condition with a deadline


async def run_soak(cfg: SoakConfig, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole run: reference, load with its kills, drain, check; the raw record ``summarize`` reads."""
    client = _Client(cfg.request_timeout_s, cfg.streams)
    try:
        return await _run(cfg, client, say)
    finally:
        await client.close()


async def _run(cfg: SoakConfig, client: _Client, say: Callable[[str], None]) -> dict[str, Any]:
    reference: dict[int, list[int]] = {}
    if cfg.check_tokens:
        for i in range(len(cfg.prompts)):
            out = await _request(client, cfg, _body(cfg, i), Outcome(-1, i, 0.0), lambda n: None)
            if out.status != "finished":
                raise RuntimeError(f"the reference request for prompt {i} {out.status}: {out.why}")
            reference[i] = out.token_ids
        say(f"soak: reference tokens for {len(reference)} prompts")
    t0 = time.monotonic()
    end = t0 + cfg.duration_s
    tokens_by_s: list[int] = []
    outcomes: list[Outcome] = []
    rss: list[tuple[float, str, int, int]] = []
    parts: list[tuple[float, str, int, dict[str, int]]] = []
    gpus: list[tuple[float, str, int, int, int]] = []
    kills: list[dict[str, Any]] = []
    stop_sampling = asyncio.Event()

    def on_tokens(n: int) -> None:
        second = int(time.monotonic() - t0)
        while len(tokens_by_s) <= second:
            tokens_by_s.append(0)
        tokens_by_s[second] += n

    async def worker(w: int) -> None:
        k = 0
        backoff = 0.0
        await asyncio.sleep(w / max(1, cfg.streams) * cfg.ramp_s)
        while time.monotonic() < end:
            prompt = (w + k * cfg.streams) % len(cfg.prompts)
            out = Outcome(w, prompt, time.monotonic() - t0)
            outcomes.append(out)
            await _request(client, cfg, _body(cfg, prompt), out, on_tokens)
            out.ended_s = time.monotonic() - t0
            k += 1
            backoff = 0.0 if out.status == "finished" else min(BACKOFF_MAX_S, max(0.2, backoff * 2))
            if backoff and time.monotonic() < end:
                # A cluster that is down refuses at once: a client backs off (0.2 s doubling to 5 s) rather
                # than record a refusal every millisecond.
                await asyncio.sleep(backoff)

    async def sampler() -> None:
        while not stop_sampling.is_set():
            now = time.monotonic() - t0
            for role, pid in {**cluster_processes(cfg.up_pid), "bench": os.getpid()}.items():
                rss.append((round(now, 2), role, pid, rss_bytes(pid)))
                parts.append((round(now, 2), role, pid, rss_parts(pid)))
            try:
                await asyncio.wait_for(stop_sampling.wait(), cfg.rss_every_s)
            except TimeoutError:
                pass

    async def gpu_sampler() -> None:
        # What the nodes hold that grows with the shapes served: the CUDA graphs they captured, beside their RSS.
        while not stop_sampling.is_set():
            now = time.monotonic() - t0
            try:
                status = await asyncio.to_thread(_router_requests, cfg.client_endpoint)
                for g in status.get("gpus", []):
                    gpus.append((round(now, 2), g["node"], g["index"], int(g.get("cuda_graphs", 0)),
                                 len(g.get("models", []))))
            except (ConnectionError, RuntimeError):
                pass  # the controller is down (a kill): the next look finds the new one
            try:
                await asyncio.wait_for(stop_sampling.wait(), GPU_EVERY_S)
            except TimeoutError:
                pass

    async def chaos() -> None:
        for kill in cfg.kills:
            await asyncio.sleep(max(0.0, t0 + kill.at_s - time.monotonic()))
            # Listed before it is carried out: a kill whose restart the run's end cut short is still recorded.
            record: dict[str, Any] = {"target": kill.target, "at_s": kill.at_s}
            kills.append(record)
            await _kill(cfg, kill, t0, say, outcomes, record)

    workers = [asyncio.create_task(worker(w)) for w in range(cfg.streams)]
    side = [asyncio.create_task(sampler()), asyncio.create_task(chaos())]
    if cfg.client_endpoint:
        side.append(asyncio.create_task(gpu_sampler()))
    done, pending = await asyncio.wait(workers, timeout=cfg.duration_s + cfg.drain_s)
    for task in pending:
        task.cancel()  # over the drain limit: their requests stay "unfinished"
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        task.result()  # a bug in the load generator itself is not a result
    wall = time.monotonic() - t0
    stop_sampling.set()
    side[1].cancel()
    await asyncio.gather(*side, return_exceptions=True)
    for out in outcomes:
        if out.status == "unfinished":
            out.why = f"still running {cfg.drain_s:.0f}s after the load ended"
    left: list[str] | None = None
    if cfg.client_endpoint:
        # Every stream has ended here, finished or cut: the cluster must have let every request go.
        deadline = time.monotonic() + 30
        while True:
            left = await asyncio.to_thread(_left_running, cfg.client_endpoint)
            if not left or left[0].startswith("(") or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)  # polling a condition with a deadline
    config = {**asdict(cfg), "kills": [asdict(k) for k in cfg.kills], "api_key": "***" if cfg.api_key else ""}
    return {"config": config, "client": client.kind,
            "wall_s": wall, "reference": {str(k): v for k, v in reference.items()},
            "outcomes": [asdict(o) for o in outcomes], "tokens_by_s": tokens_by_s,
            "rss": rss, "rss_parts": parts, "gpus": gpus, "kills": kills, "left_running": left}


async def _kill(cfg: SoakConfig, kill: Kill, t0: float, say: Callable[[str], None], outcomes: list[Outcome],
                record: dict[str, Any]) -> None:
    """SIGKILL the target's process, then fill ``record``: which pid, when it was killed (``t_s``: a request
    started after it cannot have reached the killed process), and how soon its role had a new one."""
    record["t_s"] = round(time.monotonic() - t0, 2)  # replaced by the moment of the kill once it is done
    try:
        role = kill.target
        if role == "node":
            if not cfg.client_endpoint:
                raise RuntimeError("'node' (the busiest) needs the router's client endpoint (--cluster)")
            role, running, polls = await asyncio.to_thread(_busiest_node, cfg.client_endpoint)
            record.update(requests_on_victim=running, victim_looks=polls)
        pid = cluster_processes(cfg.up_pid).get(role, 0)
        if not pid:
            raise RuntimeError(f"no process for {role!r} under sllm up (pid {cfg.up_pid})")
        os.kill(pid, signal.SIGKILL)
        record["t_s"] = round(time.monotonic() - t0, 2)
    except (RuntimeError, OSError) as exc:
        record["error"] = str(exc)
        say(f"soak: kill {kill.target} at {record['t_s']}s failed: {exc}")
        return
    record.update(role=role, pid=pid)
    say(f"soak: SIGKILL {role} (pid {pid}) at {record['t_s']}s")
    # Its supervisor starts a new one: how soon (not waited for by the load; the run goes on meanwhile).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        new = cluster_processes(cfg.up_pid).get(role, 0)
        if new and new != pid and new != cfg.up_pid:  # sllm up itself stands for a controller not yet back
            record.update(new_pid=new, restarted_after_s=round(time.monotonic() - t0 - record["t_s"], 2))
            say(f"soak: {role} restarted as pid {new} after {record['restarted_after_s']}s")
            break
        await asyncio.sleep(0.2)  # polling a condition with a deadline
    if role == "http" and cfg.client_endpoint:
        await _cut_cleared(cfg, record, t0, outcomes, say)


async def _cut_cleared(cfg: SoakConfig, record: dict[str, Any], t0: float, outcomes: list[Outcome],
                       say: Callable[[str], None]) -> None:
    """The streams the killed front end cut: how soon the cluster let their requests go (it hears of it only
    when it next sends them something), and which it still runs 30 s on."""
    cut = {o.request_id for o in outcomes if o.status == "cut" and o.request_id and o.ended_s >= record["t_s"]}
    record["cut_requests"] = sorted(cut)
    deadline = time.monotonic() + 30
    while True:
        running = set(await asyncio.to_thread(_left_running, cfg.client_endpoint))
        if not cut & running:
            record["cut_cleared_after_s"] = round(time.monotonic() - t0 - record["t_s"], 2)
            say(f"soak: the {len(cut)} requests the front end's death cut left the cluster within "
                f"{record['cut_cleared_after_s']}s of the kill")
            return
        if time.monotonic() > deadline:
            record["cut_still_running"] = sorted(cut & running)
            say(f"soak: {len(cut & running)} cut requests still run 30s after the kill")
            return
        await asyncio.sleep(0.2)  # polling a condition with a deadline


# ---------------------------------------------------------------------------------------------- figures


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0


def _slope_mib_per_min(points: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (seconds, bytes) in MiB per minute; None for fewer than 3 points or no time span."""
    if len(points) < 3:
        return None
    mt = sum(t for t, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    var = sum((t - mt) ** 2 for t, _ in points)
    if var <= 0:
        return None
    return round(sum((t - mt) * (v - mv) for t, v in points) / var * 60 / 2**20, 2)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    """Counts, failures by why, exactness, tokens per 10 s, per kill its recovery, per process its memory."""
    outcomes = raw["outcomes"]
    counts = Counter(o["status"] for o in outcomes)
    reference = {int(k): v for k, v in raw["reference"].items()}
    mismatched = []
    checked = 0
    for o in outcomes:
        if o["status"] == "finished" and o["prompt"] in reference:
            checked += 1
            want = reference[o["prompt"]]
            if o["token_ids"] != want:
                at = next((i for i, (a, b) in enumerate(zip(o["token_ids"], want)) if a != b),
                          min(len(o["token_ids"]), len(want)))
                mismatched.append({"request_id": o["request_id"], "prompt": o["prompt"], "first_difference": at,
                                   "got": len(o["token_ids"]), "want": len(want)})
    per_s = raw["tokens_by_s"]
    per_10s = [sum(per_s[i:i + WINDOW_S]) for i in range(0, len(per_s), WINDOW_S)]
    kills = []
    for k in raw["kills"]:
        k = dict(k)
        at = int(k["t_s"])
        before = per_s[max(0, at - 30):at]
        rate = _mean(before)
        k["tok_s_before"] = round(rate, 1)
        k["back_to_90pct_after_s"] = None
        for s in range(max(0, len(per_s) - at - WINDOW_S + 1)):
            if rate and _mean(per_s[at + s:at + s + WINDOW_S]) >= RECOVERY_FRACTION * rate:
                k["back_to_90pct_after_s"] = s  # the first whole 10 s window from here is at 90 % or more
                break
        kills.append(k)
    memory: dict[str, dict[str, Any]] = {}
    for t, role, pid, value in raw["rss"]:
        if value:
            memory.setdefault(f"{role} (pid {pid})", {"role": role, "pid": pid, "samples": []})["samples"].append(
                (t, value))
    for entry in memory.values():
        samples = entry.pop("samples")
        born = samples[0][0]
        # The first 20 s of a process are its start (imports, a load, caches filling): flat is judged after.
        points = [(t, v) for t, v in samples if t - born >= SETTLE_S] or samples
        settled = [v for _, v in points]
        late = points[len(points) // 2:]
        entry.update(first_mib=round(samples[0][1] / 2**20, 1), last_mib=round(samples[-1][1] / 2**20, 1),
                     max_mib=round(max(v for _, v in samples) / 2**20, 1),
                     settled_min_mib=round(min(settled) / 2**20, 1), settled_max_mib=round(max(settled) / 2**20, 1),
                     settled_spread_pct=round((max(settled) - min(settled)) / min(settled) * 100, 1),
                     # A spread says how far it moved, a slope whether it is still moving: growth that goes on at
                     # the end of the run (the late half's slope) is a leak or an unbounded cache; one that
                     # stopped is a cache that filled.
                     settled_slope_mib_per_min=_slope_mib_per_min(points),
                     late_slope_mib_per_min=_slope_mib_per_min(late),
                     from_s=born, to_s=samples[-1][0])
    by_process: dict[str, list[tuple[float, dict[str, int]]]] = {}
    for t, role, pid, by_part in raw.get("rss_parts", []):
        if by_part:
            by_process.setdefault(f"{role} (pid {pid})", []).append((t, by_part))
    for key, entry in memory.items():
        # Each part's late-half slope: which kind of memory the growth is (see RSS_PARTS).
        series = by_process.get(key, [])
        part_points = [(t, p) for t, p in series if t - entry["from_s"] >= SETTLE_S] or series
        part_late = part_points[len(part_points) // 2:]
        entry["late_slope_by_part_mib_per_min"] = {
            name: _slope_mib_per_min([(t, p.get(name, 0)) for t, p in part_late]) for name in RSS_PARTS
        } if part_late else {}
        if series:
            entry["last_by_part_mib"] = {name: round(series[-1][1].get(name, 0) / 2**20, 1) for name in RSS_PARTS}
    graphs: dict[str, dict[str, Any]] = {}
    for t, node, gpu, n, _ in raw.get("gpus", []):
        entry = graphs.setdefault(f"{node}/gpu-{gpu}", {"first": n, "max": n, "series": []})
        entry.update(last=n, max=max(entry["max"], n))
        entry["series"].append((t, n))
    durations = [o["ended_s"] - o["started_s"] for o in outcomes if o["status"] == "finished"]
    return {
        "requests": len(outcomes), "finished": counts["finished"], "failed": counts["failed"], "cut": counts["cut"],
        "unfinished": counts["unfinished"],
        "cut_mid_stream": sum(1 for o in outcomes if o["status"] == "cut" and o["headers"]),
        "why": dict(Counter(f"{o['status']}: {o['why']}" for o in outcomes if o["status"] != "finished")),
        "tokens": sum(per_s), "tok_s": round(sum(per_s) / max(raw["wall_s"], 1e-9), 1),
        "tokens_per_10s": per_10s,
        "request_s_p50": round(statistics.median(durations), 3) if durations else None,
        "exactness": {"checked": checked, "mismatched": len(mismatched), "examples": mismatched[:10]},
        "kills": kills, "memory": memory, "cuda_graphs": graphs, "left_running": raw["left_running"],
    }


def plot(raw: dict[str, Any], path: Path, title: str = "") -> None:
    """Tokens per 10 s and each process's RSS over time, the kills marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    per_s = raw["tokens_by_s"]
    starts = list(range(0, len(per_s), WINDOW_S))
    # The last window may be short (the drain): its rate is over the seconds it has.
    top.bar([s + WINDOW_S / 2 for s in starts], [sum(per_s[s:s + WINDOW_S]) / len(per_s[s:s + WINDOW_S])
                                                 for s in starts], width=WINDOW_S * 0.9, color="tab:blue")
    top.set_ylabel("tokens/s (10 s windows)")
    series: dict[tuple[str, int], list[tuple[float, int]]] = {}
    for t, role, pid, value in raw["rss"]:
        if value:
            series.setdefault((role, pid), []).append((t, value))
    colors: dict[str, str] = {}
    for (role, pid), points in series.items():
        first = role not in colors  # one legend entry per role, however often it was restarted
        color = colors.setdefault(role, f"C{len(colors)}")
        bottom.plot([t for t, _ in points], [v / 2**20 for _, v in points], color=color,
                    label=role if first else None)
    bottom.set_ylabel("RSS (MiB)")
    bottom.set_xlabel("seconds from the load's start")
    bottom.legend(loc="upper left", fontsize=8, ncol=3)
    for k in raw["kills"]:
        for ax in (top, bottom):
            ax.axvline(k["t_s"], color="red", linestyle="--", linewidth=1)
        top.annotate(f"kill {k.get('role', k['target'])}", (k["t_s"], top.get_ylim()[1] * 0.95), color="red",
                     fontsize=8, rotation=90, va="top", ha="right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
