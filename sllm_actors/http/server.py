"""The HTTP front end's process: uvicorn serving the OpenAI app on a socket its parent bound.

The parent (``sllm up``) binds the listening socket and hands its descriptor over, so a port in use is
reported by ``sllm up`` itself, the endpoint is known before this process has started, and a restarted
front end takes over the same socket with no window where connections are refused.
API keys come in ``SLLM_API_KEY`` (never on the command line, where ``ps`` would show them).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time

from sllm_actors.http.process import API_KEY_ENV, parse_api_keys

__all__ = ["main"]


PARENT_CHECK_S = 1.0


def _exit_with_parent() -> None:
    """Stop (gracefully, as on SIGTERM) when ``sllm up`` is gone, even killed -9: a front end whose
    cluster is gone would hold its port and answer 503s forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        logging.getLogger(__name__).error("http: sllm up (pid %d) is gone; stopping", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sllm_actors.http")
    parser.add_argument("--cluster", required=True, help="the router's client endpoint, tcp://HOST:PORT")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--fd", type=int, help="a listening socket inherited from the parent")
    where.add_argument("--port", type=int, help="bind this port ourselves (with --host)")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("SLLM_LOG_LEVEL", "INFO"),
                        format="%(asctime)s http %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from sllm_actors.http.app import OpenAIServer

    _exit_with_parent()
    server = OpenAIServer(args.cluster, parse_api_keys(os.environ.get(API_KEY_ENV, "")))
    where_kw = {"fd": args.fd} if args.fd is not None else {"host": args.host, "port": args.port}
    # uvloop and httptools when installed (they are dependencies): the per-chunk cost of a stream is what
    # the throughput of many streams comes down to. No access log: a line per request at 128 streams is noise.
    config = uvicorn.Config(server.app, **where_kw, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    uvicorn.Server(config).run()
    return 0
