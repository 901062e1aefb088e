"""OpenAI's request and response shapes: parameter checks that name the parameter, and the JSON we answer.

Only what we can honour is accepted. Unknown fields are ignored (as vLLM, SGLang and llama.cpp's server do,
so clients that send vendor extras keep working); known fields we cannot honour with the value given
(``logprobs: true``, ``tools``, penalties other than 0, ...) are a 400 naming them rather than an answer
that silently differs from what was asked.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from sllm_actors.messages import SamplingParams

__all__ = [
    "ROUTER_CODES",
    "ApiError",
    "Choice",
    "Job",
    "bad",
    "chunk",
    "finish_reason",
    "full_response",
    "parse_chat",
    "parse_completion",
    "tenant_salt",
    "usage",
    "usage_chunk",
]

MAX_N = 128
MAX_STOP = 4
MAX_SEED = (1 << 63) - 1 - MAX_N
DEFAULT_MAX_TOKENS_COMPLETIONS = 16
"""OpenAI's legacy completions default."""
DEFAULT_MAX_TOKENS_CHAT = 1024
"""OpenAI's chat default is 'up to the context'; the engine stops at the context anyway, this bounds a
request that forgot max_tokens."""
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          429: "rate_limit_exceeded", 503: "service_unavailable", 500: "server_error"}

# The router's error codes, as HTTP statuses.
ROUTER_CODES = {
    "bad_request": 400,
    "unknown_model": 404,
    "no_capacity": 429,      # the queue timeout expired with no instance free
    "unavailable": 503,      # an actor of the controller is restarting
    "load_failed": 503,
    "migration_aborted": 503,
    "cancelled": 499,
}


def bad(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Choice:
    """One generation: one request to the router."""

    index: int
    prompt: str
    chat: bool
    prompt_key: int
    """Which distinct prompt it answers, so usage counts each prompt's tokens once across ``n``."""


@dataclass(frozen=True)
class Job:
    """A validated request: what to generate, and how to answer."""

    kind: str  # "chat" or "completion"
    model: str
    choices: list[Choice]
    sampling: SamplingParams
    stream: bool
    include_usage: bool
    id: str = field(default_factory=lambda: "")
    return_token_ids: bool = False
    """vLLM's extension (``return_token_ids``): each choice (each streamed delta) also carries its tokens' ids,
    so a client can check a stream token for token (text alone cannot: a resumed request's detokenizer may
    render a multi-byte character split across the resume differently)."""
    created: int = field(default_factory=lambda: int(time.time()))
    cache_salt: str = ""
    """vLLM's ``cache_salt``: requests share cached prompt prefixes only under equal salts. The front end adds
    the caller's API key to it (``tenant_salt``), so tenants never share prefix blocks with each other."""


def tenant_salt(api_key: str, requested: str = "") -> str:
    """The prefix-cache salt of a request: its API key's digest (never the key: the salt travels to every node)
    and the salt the request asked for, so a tenant can also keep its own requests apart."""
    if not api_key:
        return requested
    digest = hashlib.sha256(api_key.encode()).hexdigest()[:32]
    return f"{digest}:{requested}" if requested else digest


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(key, f"'{key}' must be a number, got {type(value).__name__} {value!r}", "invalid_type")
    return float(value)


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad(key, f"'{key}' must be an integer, got {type(value).__name__} {value!r}", "invalid_type")
    return value


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(key, f"'{key}' must be a boolean, got {type(value).__name__} {value!r}", "invalid_type")
    return value


def _unsupported(body: dict[str, Any]) -> None:
    for key in ("logprobs", "echo"):
        if body.get(key) not in (None, False, 0):
            raise bad(key, f"'{key}' is not supported by this server", "unsupported_parameter")
    if body.get("top_logprobs") not in (None, 0):
        raise bad("top_logprobs", "'top_logprobs' is not supported by this server", "unsupported_parameter")
    for key in ("tools", "functions", "logit_bias"):
        if body.get(key):
            raise bad(key, f"'{key}' is not supported by this server", "unsupported_parameter")
    for key in ("tool_choice", "function_call"):
        if body.get(key) not in (None, "none"):
            raise bad(key, f"'{key}' is not supported by this server", "unsupported_parameter")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0) != 0.0:
            raise bad(key, f"'{key}' other than 0 is not supported by this server", "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise bad("response_format", "only response_format {'type': 'text'} is supported", "unsupported_parameter")
    if _integer(body, "best_of") not in (None, 1):
        raise bad("best_of", "'best_of' other than 1 is not supported by this server", "unsupported_parameter")
    if body.get("suffix"):
        raise bad("suffix", "'suffix' is not supported by this server", "unsupported_parameter")


def _common(body: dict[str, Any], default_max_tokens: int, *, chat: bool) -> dict[str, Any]:
    model = body.get("model")
    if model is None:
        raise bad("model", "'model' is required", "missing_required_parameter")
    if not isinstance(model, str) or not model.strip():
        raise bad("model", f"'model' must be a non-empty string, got {model!r}", "invalid_type")
    _unsupported(body)
    max_tokens = _integer(body, "max_tokens")
    if chat and body.get("max_completion_tokens") is not None:
        mct = _integer(body, "max_completion_tokens")
        if max_tokens is not None and mct != max_tokens:
            raise bad("max_completion_tokens", "'max_tokens' and 'max_completion_tokens' disagree; send one")
        max_tokens = mct
        key = "max_completion_tokens"
    else:
        key = "max_tokens"
    if max_tokens is None:
        max_tokens = default_max_tokens
    if max_tokens <= 0:
        raise bad(key, f"'{key}' must be at least 1, got {max_tokens}")
    temperature = _number(body, "temperature", 1.0)
    if not 0.0 <= temperature <= 2.0:
        raise bad("temperature", f"'temperature' must be between 0 and 2, got {temperature}")
    top_p = _number(body, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        raise bad("top_p", f"'top_p' must be in (0, 1], got {top_p}")
    seed = _integer(body, "seed")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise bad("seed", f"'seed' must be between 0 and {MAX_SEED}, got {seed}")
    stop_raw = body.get("stop")
    if stop_raw is None:
        stop: list[str] = []
    elif isinstance(stop_raw, str):
        stop = [stop_raw]
    elif isinstance(stop_raw, list) and all(isinstance(s, str) for s in stop_raw):
        stop = list(stop_raw)
    else:
        raise bad("stop", f"'stop' must be a string or a list of strings, got {stop_raw!r}", "invalid_type")
    if len(stop) > MAX_STOP:
        raise bad("stop", f"'stop' takes at most {MAX_STOP} sequences, got {len(stop)}")
    if any(not s for s in stop):
        raise bad("stop", "'stop' sequences must not be empty")
    n = _integer(body, "n")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise bad("n", f"'n' must be between 1 and {MAX_N}, got {n}")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise bad("stream_options", "'stream_options' is only allowed with 'stream': true")
        if not isinstance(options, dict):
            raise bad("stream_options", f"'stream_options' must be an object, got {options!r}", "invalid_type")
        include_usage = _flag(options, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("user", f"'user' must be a string, got {type(user).__name__}", "invalid_type")
    salt = body.get("cache_salt")
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise bad("cache_salt", f"'cache_salt' must be a non-empty string, got {salt!r}", "invalid_type")
    return {"model": model, "sampling": SamplingParams(max_tokens, temperature, top_p, seed, tuple(stop)), "n": n,
            "stream": stream, "include_usage": include_usage, "return_token_ids": _flag(body, "return_token_ids"),
            "cache_salt": salt or ""}


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{j}]", "only text content parts ({'type': 'text', 'text': ...}) are "
                          "supported", "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise bad(f"{where}.content", f"content must be a string or a list of text parts, got {type(content).__name__}",
              "invalid_type")


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if messages is None:
        raise bad("messages", "'messages' is required", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "'messages' must be a non-empty list of messages", "invalid_type")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"each message must be an object, got {type(m).__name__}", "invalid_type")
        role = m.get("role")
        if role not in ROLES:
            raise bad(f"{where}.role", f"role must be one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content_text(m.get("content"), where)})
    if not any(m["content"].strip() for m in out):
        raise bad("messages", "every message is empty")
    return out


def parse_chat(body: Any) -> tuple[Job, list[dict[str, str]]]:
    """The job (its choices' prompts still to be rendered when there is more than one user message)."""
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    messages = parse_messages(body)
    c = _common(body, DEFAULT_MAX_TOKENS_CHAT, chat=True)
    job = Job(kind="chat", model=c["model"], choices=[], sampling=c["sampling"], stream=c["stream"],
              include_usage=c["include_usage"], id=f"chatcmpl-{uuid.uuid4().hex}",
              return_token_ids=c["return_token_ids"], cache_salt=c["cache_salt"])
    return _with_n(job, c["n"]), messages


def _with_n(job: Job, n: int) -> Job:
    return replace(job, choices=[Choice(i, "", True, 0) for i in range(n)])


def parse_completion(body: Any) -> Job:
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("prompt", "'prompt' is required", "missing_required_parameter")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) or isinstance(p, list) for p in prompt):
        raise bad("prompt", "prompts as token ids are not supported; send text", "unsupported_parameter")
    else:
        raise bad("prompt", "'prompt' must be a non-empty string or a non-empty list of strings", "invalid_type")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise bad("prompt", "the prompt is empty" if len(prompts) == 1 else f"prompt[{i}] is empty")
    c = _common(body, DEFAULT_MAX_TOKENS_COMPLETIONS, chat=False)
    n = c["n"]
    if len(prompts) * n > MAX_N:
        raise bad("n", f"{len(prompts)} prompts x n={n} is more than {MAX_N} choices")
    # OpenAI's order: the n choices of the first prompt, then the second prompt's, ...
    choices = [Choice(k * n + i, p, False, k) for k, p in enumerate(prompts) for i in range(n)]
    return Job(kind="completion", model=c["model"], choices=choices, sampling=c["sampling"], stream=c["stream"],
               include_usage=c["include_usage"], id=f"cmpl-{uuid.uuid4().hex}",
               return_token_ids=c["return_token_ids"], cache_salt=c["cache_salt"])


def finish_reason(reason: str) -> str:
    # The engine's reasons: eos and stop strings end a choice as OpenAI's "stop"; the token limit and the
    # model's context as "length".
    return "length" if reason in ("length", "context") else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(job: Job, texts: list[str], reasons: list[str], prompt_tokens: int,
                  completion_tokens: int, token_ids: list[list[int]] | None = None) -> dict[str, Any]:
    if job.kind == "chat":
        choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                    "finish_reason": reasons[i]} for i in range(len(texts))]
        obj = "chat.completion"
    else:
        choices = [{"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i]}
                   for i in range(len(texts))]
        obj = "text_completion"
    if job.return_token_ids and token_ids is not None:
        for choice, ids in zip(choices, token_ids):
            choice["token_ids"] = ids
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model, "system_fingerprint": None,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}


def chunk(job: Job, index: int, *, text: str | None = None, role: bool = False,
          finish: str | None = None) -> dict[str, Any]:
    """One streamed choice delta."""
    if job.kind == "chat":
        delta: dict[str, Any] = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    out: dict[str, Any] = {"id": job.id, "object": obj, "created": job.created, "model": job.model,
                           "system_fingerprint": None, "choices": [choice]}
    if job.include_usage:
        out["usage"] = None
    return out


def usage_chunk(job: Job, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    obj = "chat.completion.chunk" if job.kind == "chat" else "text_completion"
    return {"id": job.id, "object": obj, "created": job.created, "model": job.model, "system_fingerprint": None,
            "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
