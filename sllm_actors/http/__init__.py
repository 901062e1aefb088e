"""The OpenAI-compatible HTTP front end: a Starlette app served by uvicorn in a process of its own, talking
to the router through the same ZeroMQ client protocol as ``sllm generate``."""

from sllm_actors.http.process import HttpFrontEnd, parse_api_keys

__all__ = ["HttpFrontEnd", "parse_api_keys"]
