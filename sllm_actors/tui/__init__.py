"""The interactive TUI of a running cluster: ``sllm tui`` (attach) or ``sllm up`` (start and watch).

    python -m sllm_actors.tui --cluster tcp://127.0.0.1:7700
"""

from __future__ import annotations

import argparse
import os
import threading
from collections.abc import Callable

from sllm_actors.tui.app import SllmTui

__all__ = ["SllmTui", "main", "run_tui"]


def run_tui(endpoint: str, *, stop_cluster: Callable[[], None] | None = None,
            exit_when: threading.Event | None = None) -> None:
    """Run the TUI in this (main) thread until the user quits.

    ``stop_cluster`` runs on quit while the TUI shows that it is stopping; it also runs if the app ends any
    other way (an exception), so a cluster started with the TUI never outlives it. Setting ``exit_when``
    (from a signal handler, say) quits as if the user had pressed q.
    """
    # Textual prefers COLUMNS/LINES to the terminal's own size; values inherited from a parent (a shell that
    # exports them, a tmux pane created at another size) would pin the layout and ignore every resize.
    for name in ("COLUMNS", "LINES"):
        os.environ.pop(name, None)
    app = SllmTui(endpoint, on_quit=stop_cluster, exit_when=exit_when)
    try:
        app.run()
    finally:
        app.run_on_quit()


def main(argv: list[str] | None = None) -> int:
    from sllm_actors.client import ClusterUnavailable, resolve_endpoint
    from sllm_actors.runtime.topology import TopologyError

    parser = argparse.ArgumentParser(prog="python -m sllm_actors.tui", description=__doc__.splitlines()[0])
    parser.add_argument("--cluster",
                        help="client endpoint tcp://HOST:PORT (else $SLLM_CLUSTER, else ./topology.yaml)")
    args = parser.parse_args(argv)
    try:
        endpoint = resolve_endpoint(args.cluster)
    except (ClusterUnavailable, TopologyError) as exc:
        parser.error(str(exc))
    run_tui(endpoint)
    return 0
