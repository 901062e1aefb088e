"""The OpenAI-compatible HTTP API, a Starlette app: one more client of the router.

    POST /v1/chat/completions   POST /v1/completions   GET /v1/models[/{model}]   GET /health   GET /metrics

Each choice of a request (``n``, or several prompts) is its own request to the router, so each is placed,
migrated and resumed on its own; their tokens come back through one mailbox and leave as one response or
one SSE stream. A client that disconnects cancels what it asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sllm_actors.http.bridge import Group, RouterLink, RouterUnavailable
from sllm_actors.http.chat_template import ChatTemplates
from sllm_actors.http.metrics import CONTENT_TYPE, Metrics
from sllm_actors.http.openai_api import (
    ROUTER_CODES,
    ApiError,
    Choice,
    Job,
    chunk,
    finish_reason,
    full_response,
    parse_chat,
    parse_completion,
    tenant_salt,
    usage_chunk,
)
from sllm_actors.messages import ErrorReply, GenerateDone, GenerateRequest, TokenChunk

__all__ = ["OpenAIServer"]

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 900.0
"""Longest silence from the cluster within one request; the cluster's own queue timeout ends a wait first."""


_encode_str = json.encoder.encode_basestring  # type: ignore[attr-defined]  # what dumps(ensure_ascii=False) uses


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


class OpenAIServer:
    def __init__(self, cluster_endpoint: str, api_keys: Sequence[str] = ()) -> None:
        self.api_keys = [k.encode() for k in api_keys if k]
        self.metrics = Metrics(self._snapshot)
        self.link = RouterLink(cluster_endpoint, on_event=self.metrics.event)
        self.templates = ChatTemplates()
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
                Route("/v1/models/{model:path}", self.model, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics_text, methods=["GET"]),
            ],
            exception_handlers={ApiError: self._api_error, HTTPException: self._http_error,
                                Exception: self._crash},
            lifespan=self._lifespan,
        )

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.link.start()
        log.info("http: connected to the router at %s", self.link.endpoint)
        try:
            yield
        finally:
            await self.link.close()

    def _snapshot(self) -> dict[str, Any] | None:
        return self.link.fresh_snapshot()

    # ------------------------------------------------------------------ errors and auth

    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        self.metrics.http_errors.labels(str(exc.status)).inc()
        return error_response(exc)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        self.metrics.http_errors.labels(str(exc.status_code)).inc()
        what = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        return error_response(ApiError(exc.status_code, f"{request.method} {request.url.path}: {what}",
                                       type="invalid_request_error", code=str(exc.status_code)))

    async def _crash(self, request: Request, exc: Exception) -> Response:
        # A bug of ours, never the client's input: logged with its traceback, answered in OpenAI's shape.
        log.exception("http: %s %s failed", request.method, request.url.path, exc_info=exc)
        self.metrics.http_errors.labels("500").inc()
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))

    def _authorize(self, request: Request) -> str:
        """The caller's API key ("" where HTTP is open), or a 401."""
        from sllm_actors.runtime.security import CLIENT, OPERATOR, api_key_role, keys_dir

        # Keys given to this front end (--api-key, SLLM_API_KEY), and the cluster's own API keys
        # (keys/api_keys, one role each, revoked by deleting their line): with neither, HTTP is open.
        ring = keys_dir() / "api_keys"
        if not self.api_keys and not ring.is_file():
            return ""
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "no API key: send 'Authorization: Bearer <key>'", type="invalid_request_error",
                           code="invalid_api_key")
        given = key.strip().encode()
        # Every key compared, each in constant time: the answer's timing says nothing about which is close.
        if any([hmac.compare_digest(given, k) for k in self.api_keys]):
            return key.strip()
        peer = api_key_role(key.strip(), ring.parent)
        if peer is None or peer.role not in (CLIENT, OPERATOR):
            raise ApiError(401, "incorrect API key", type="invalid_request_error", code="invalid_api_key")
        return key.strip()

    async def _body(self, request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None

    # ------------------------------------------------------------------ models

    async def _catalog(self, refresh: bool = False) -> dict[str, Any]:
        status = None if refresh else self._snapshot()
        if status is None:
            try:
                status = await self.link.status(timeout=5.0)
            except RouterUnavailable as exc:
                raise ApiError(503, f"the cluster is unavailable: {exc}", code="cluster_unavailable") from None
        return status

    async def _model_source(self, model: str) -> str:
        """The model's checkpoint source; a 404 for a model the cluster does not serve."""
        for refresh in (False, True):  # a model deployed in the last half second is not in the snapshot yet
            status = await self._catalog(refresh)
            for m in status.get("models", []):
                if m.get("name") == model:
                    return str(m.get("source", ""))
        known = ", ".join(sorted(m.get("name", "") for m in status.get("models", []))) or "none"
        raise ApiError(404, f"The model '{model}' does not exist (deployed: {known})", param="model",
                       code="model_not_found")

    def _model_card(self, m: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        name = m.get("name", "")
        instances = [i for i in status.get("instances", []) if i.get("model") == name]
        busy = any(i.get("requests") for i in instances)
        return {
            "id": name, "object": "model", "created": 0, "owned_by": "sllm",
            "state": "serving" if busy else ("loaded" if instances else "cold"),
            "instances": [{"instance_id": i.get("instance_id"), "where": f"{i.get('node')}/gpu-{i.get('gpu')}",
                           "state": i.get("state"), "requests": len(i.get("requests", []))} for i in instances],
            "checkpoint": {
                "source": m.get("source", ""),
                "tiers": [{"node": t.get("node"), "tier": t.get("tier")} for t in status.get("tiers", [])
                          if name in t.get("models", [])],
            },
        }

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        status = await self._catalog()
        return JSONResponse({"object": "list",
                             "data": [self._model_card(m, status) for m in status.get("models", [])]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["model"]
        await self._model_source(name)
        status = await self._catalog()
        for m in status.get("models", []):
            if m.get("name") == name:
                return JSONResponse(self._model_card(m, status))
        raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")

    # ------------------------------------------------------------------ health and metrics

    async def health(self, request: Request) -> Response:
        status = self._snapshot()
        if status is None:
            try:
                status = await self.link.status(timeout=2.0)
            except RouterUnavailable as exc:
                return JSONResponse({"status": "unavailable", "why": f"the controller does not answer: {exc}"},
                                    status_code=503)
        nodes = status.get("nodes", [])
        alive = [n["name"] for n in nodes if n.get("alive")]
        if not alive:
            return JSONResponse({"status": "unavailable", "why": f"no node is up (of {len(nodes)})",
                                 "nodes_alive": []}, status_code=503)
        return JSONResponse({"status": "ok", "nodes_alive": alive, "nodes": len(nodes)})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ generation

    async def chat_completions(self, request: Request) -> Response:
        t0 = time.monotonic()
        api_key = self._authorize(request)
        job, messages = parse_chat(await self._body(request))
        job = replace(job, cache_salt=tenant_salt(api_key, job.cache_salt))
        source = await self._model_source(job.model)
        if len(messages) == 1 and messages[0]["role"] == "user":
            # Exactly what `sllm generate --chat` sends: the instance applies the model's template.
            prompt, chat = messages[0]["content"], True
        else:
            prompt, chat = await self.templates.render(job.model, source, messages), False
        job = replace(job, choices=[Choice(c.index, prompt, chat, 0) for c in job.choices])
        return await self._serve(request, job, t0)

    async def completions(self, request: Request) -> Response:
        t0 = time.monotonic()
        api_key = self._authorize(request)
        job = parse_completion(await self._body(request))
        job = replace(job, cache_salt=tenant_salt(api_key, job.cache_salt))
        await self._model_source(job.model)
        return await self._serve(request, job, t0)

    def _requests(self, job: Job) -> list[GenerateRequest]:
        # Choice i gets seed + i: n seeded choices differ from each other, and the same call repeats exactly.
        seed = job.sampling.seed
        return [
            GenerateRequest(
                request_id=f"{job.id}-{c.index}", model=job.model, prompt=c.prompt, chat=c.chat,
                cache_salt=job.cache_salt,
                **replace(job.sampling, seed=None if seed is None else seed + c.index).fields(),
            )
            for c in job.choices
        ]

    def _error(self, job: Job, msg: ErrorReply) -> ApiError:
        self.metrics.requests.labels(job.model, msg.code or "error").inc()
        status = ROUTER_CODES.get(msg.code, 500)
        param = "model" if msg.code == "unknown_model" else None
        return ApiError(status, msg.message, param=param, code=msg.code)

    async def _serve(self, request: Request, job: Job, t0: float) -> Response:
        group = self.link.open(self._requests(job))
        tracker = _Tracker(self.metrics, job, t0)
        try:
            await group.send()
            # Nothing is answered before the cluster's first word: a refusal (queue timeout, a bad prompt)
            # gets its own status even for a stream, instead of a 200 followed by an error event.
            first = await _until_disconnect(request, group.next(IDLE_TIMEOUT_S))
        except (RouterUnavailable, asyncio.CancelledError, _Disconnected) as exc:
            group.cancel()
            if isinstance(exc, RouterUnavailable):
                raise ApiError(503, str(exc), code="cluster_unavailable") from None
            if isinstance(exc, _Disconnected):
                self.metrics.requests.labels(job.model, "disconnected").inc(len(job.choices))
                return Response(status_code=499)
            raise
        if isinstance(first[1], ErrorReply):
            group.cancel()
            raise self._error(job, first[1])
        if job.stream:
            return EventSourceResponse(self._events(group, job, tracker, first), sep="\n", ping=15,
                                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return await _until_disconnect(request, self._collect(group, job, tracker, first))
        except _Disconnected:
            group.cancel()
            self.metrics.requests.labels(job.model, "disconnected").inc(len(group.pending))
            return Response(status_code=499)
        except BaseException:
            group.cancel()
            raise

    async def _collect(self, group: Group, job: Job, tracker: _Tracker, first: tuple[int, Any]) -> Response:
        texts = [""] * len(job.choices)
        reasons = [""] * len(job.choices)
        ids: list[list[int]] = [[] for _ in job.choices]
        item: tuple[int, Any] | None = first
        while item is not None:
            index, msg = item
            if isinstance(msg, TokenChunk):
                tracker.tokens(index, msg)
            elif isinstance(msg, GenerateDone):
                texts[index] = msg.text
                ids[index] = list(msg.token_ids)
                reasons[index] = finish_reason(msg.finish_reason)
                tracker.done(index, msg)
            elif isinstance(msg, ErrorReply):
                group.cancel()
                raise self._error(job, msg)
            item = None if group.finished else await group.next(IDLE_TIMEOUT_S)
        return JSONResponse(full_response(job, texts, reasons, tracker.prompt_tokens(), tracker.completion_tokens,
                                          ids))

    async def _events(self, group: Group, job: Job, tracker: _Tracker,
                      first: tuple[int, Any]) -> AsyncIterator[bytes]:
        """SSE frames, formatted here and handed to sse-starlette as bytes (it sends them as they are).

        Each wake-up takes every message already queued and writes them in one frame batch, a choice's
        consecutive tokens merged into one delta: a stream that fell behind (many streams, a slow client)
        catches up in one write instead of paying the per-write cost once per token."""
        content = _ContentChunks(job)
        started: set[int] = set()
        batch: list[tuple[int, Any]] = [first]
        try:
            while True:
                out: list[bytes] = []
                texts: dict[int, list[str]] = {}
                ids: dict[int, list[int]] = {}

                def flush(index: int) -> None:
                    parts = texts.pop(index, None)
                    token_ids = ids.pop(index, None)
                    if parts or token_ids:
                        out.append(content.frame(index, "".join(parts or ()), token_ids))

                failed = False
                for index, msg in batch:
                    if job.kind == "chat" and index not in started:
                        started.add(index)
                        out.append(_frame(chunk(job, index, role=True, text="")))
                    if isinstance(msg, TokenChunk):
                        tracker.tokens(index, msg)
                        if msg.text:
                            texts.setdefault(index, []).append(msg.text)
                        if job.return_token_ids:
                            ids.setdefault(index, []).extend(msg.token_ids)
                    elif isinstance(msg, GenerateDone):
                        flush(index)
                        tracker.done(index, msg)
                        out.append(_frame(chunk(job, index, finish=finish_reason(msg.finish_reason))))
                    elif isinstance(msg, ErrorReply):
                        for i in {*texts, *ids}:
                            flush(i)
                        # Headers went out with the first token; the error can only travel in the stream now.
                        group.cancel()
                        out.append(_frame(self._error(job, msg).body()))
                        failed = True
                        break
                for i in sorted({*texts, *ids}):
                    flush(i)
                if group.finished or failed:
                    if job.include_usage and not failed:
                        out.append(_frame(usage_chunk(job, tracker.prompt_tokens(), tracker.completion_tokens)))
                    out.append(b"data: [DONE]\n\n")
                    yield b"".join(out)
                    return
                yield b"".join(out)
                batch = await group.next_batch(IDLE_TIMEOUT_S)
        except RouterUnavailable as exc:
            group.cancel()
            yield _frame(ApiError(503, str(exc), code="cluster_unavailable").body()) + b"data: [DONE]\n\n"
        finally:
            if not group.finished:
                # The client disconnected mid-stream (sse-starlette cancelled us): stop generating.
                self.metrics.requests.labels(job.model, "disconnected").inc(len(group.pending))
                group.cancel()


def _frame(obj: Any) -> bytes:
    return b"data: " + _dumps(obj).encode() + b"\n\n"


class _ContentChunks:
    """The one frame a stream sends per token, built from a preformatted head and tail around the only part
    that changes (json.dumps of the whole chunk per token cost more than everything else we do per token).
    Produces exactly what ``chunk(job, index, text=...)`` serializes to."""

    def __init__(self, job: Job) -> None:
        obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
        self.head = (f'data: {{"id":{_dumps(job.id)},"object":"{obj}","created":{job.created},'
                     f'"model":{_dumps(job.model)},"system_fingerprint":null,"choices":[{{"index":')
        self.chat = job.kind == "chat"
        self.tail = '],"usage":null}\n\n' if job.include_usage else ']}\n\n'

    def frame(self, index: int, text: str, token_ids: list[int] | None = None) -> bytes:
        # token_ids only when the client asked (return_token_ids), as vLLM puts them: in the choice.
        ids = f',"token_ids":[{",".join(map(str, token_ids))}]' if token_ids is not None else ""
        if self.chat:
            body = f'{index},"delta":{{"content":{_encode_str(text)}}},"logprobs":null,"finish_reason":null{ids}}}'
        else:
            body = f'{index},"text":{_encode_str(text)},"logprobs":null,"finish_reason":null{ids}}}'
        return (self.head + body + self.tail).encode()


class _Tracker:
    """Per-call metrics: TTFT and token gaps per choice, tokens, outcomes."""

    def __init__(self, metrics: Metrics, job: Job, t0: float) -> None:
        self.m = metrics
        self.job = job
        self.t0 = t0
        self.last: dict[int, float] = {}
        self.prompt_by_key: dict[int, int] = {}
        self.completion_tokens = 0
        self.ttft = metrics.ttft.labels(job.model)
        self.itl = metrics.itl.labels(job.model)

    def tokens(self, index: int, msg: TokenChunk) -> None:
        now = time.monotonic()
        last = self.last.get(index)
        if last is None:
            self.ttft.observe(now - self.t0)
        else:
            self.itl.observe(now - last)
        self.last[index] = now

    def done(self, index: int, msg: GenerateDone) -> None:
        model = self.job.model
        key = self.job.choices[index].prompt_key
        self.prompt_by_key[key] = max(self.prompt_by_key.get(key, 0), msg.prompt_tokens)
        self.completion_tokens += len(msg.token_ids)
        self.m.requests.labels(model, "success").inc()
        self.m.generation_tokens.labels(model).inc(len(msg.token_ids))
        self.m.prompt_tokens.labels(model).inc(msg.prompt_tokens)
        self.m.e2e.labels(model).observe(time.monotonic() - self.t0)
        if msg.migrations:
            self.m.request_done(model, list(msg.migrations))

    def prompt_tokens(self) -> int:
        return sum(self.prompt_by_key.values())


class _Disconnected(Exception):
    pass


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await ``work``; if the HTTP client disconnects first, cancel it and raise _Disconnected. A plain
    (non-streaming) handler never reads the connection again, so this is how it learns the client left."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        watcher.cancel()
        raise
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _Disconnected()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
