"""The TUI against real clusters: driven headlessly with Textual's pilot, and in a real terminal (tmux).

Every wait is a condition polled against a deadline; every cluster, thread and tmux server a test starts
is stopped by it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from rich.text import Text

from sllm_actors.client import Client, ClusterUnavailable, RequestError
from sllm_actors.tui import SllmTui
from sllm_actors.tui.app import ActorTree, PromptScreen, Table
from sllm_actors.feed import ClusterFeed, Event, reachable_state_endpoint
from sllm_actors.tui.view import (
    EventMemory,
    bar,
    fmt_bytes,
    load_parts_line,
    migration_rows,
    node_state,
    pick_migration_target,
    request_rows,
    tree_lines,
)

from .conftest import REPO, RunningCluster

SIZE = (160, 50)
LONG_PROMPT = "a"
"""The tiny model's greedy answer to this runs about a thousand tokens: seconds of work, so a request of it
stays in flight long enough to be seen, selected and acted on."""


# ----------------------------------------------------------------------------- helpers


def run(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Textual's pilot is async; the project has no async pytest plugin, so each test runs its own loop."""
    asyncio.run(scenario())


class Ui:
    """What a test reads off a running SllmTui, and how it waits on it."""

    def __init__(self, app: SllmTui, pilot: Any) -> None:
        self.app = app
        self.pilot = pilot

    async def wait(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = predicate()
            if result:
                return result
            await self.pilot.pause(0.1)
        log = "\n".join(list(self.app.log_lines)[-30:])
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; the TUI's log:\n{log}")

    def tree(self) -> list[str]:
        """Every label of the actor tree, top to bottom."""
        out: list[str] = []
        stack = [self.app.query_one(ActorTree).root]
        while stack:
            node = stack.pop()
            out.append(node.label.plain if isinstance(node.label, Text) else str(node.label))
            stack.extend(reversed(node.children))
        return out

    def tree_line(self, prefix: str) -> str | None:
        return next((label for label in self.tree() if label.startswith(prefix)), None)

    def rows(self, selector: str) -> dict[str, list[str]]:
        table = self.app.query_one(selector, Table)
        return {str(key.value): [_plain(cell) for cell in table.get_row(key)] for key in table.rows}

    def logged(self, *words: str) -> str | None:
        """The first log line holding every word, if any."""
        return next((line for line in self.app.log_lines if all(w in line for w in words)), None)

    async def select_node(self, node: str) -> None:
        """Move the actor tree's cursor to ``node``'s line with the arrow keys, as a user would."""
        tree = self.app.query_one(ActorTree)
        tree.focus()
        for _ in range(40):
            if tree.cursor_line <= 0:
                break
            await self.pilot.press("up")
        for _ in range(40):
            item = tree.cursor_node.data if tree.cursor_node is not None else None
            if item is not None and item.kind == "node" and item.key == node:
                return
            await self.pilot.press("down")
        raise AssertionError(f"the cursor never reached {node}; tree: {self.tree()}")

    async def select_running_request(self) -> str:
        """Tab to the requests pane and put the cursor on a request that runs on an instance."""
        table = self.app.query_one("#requests", Table)
        for _ in range(10):
            if self.app.focused is table:
                break
            await self.pilot.press("tab")
        assert self.app.focused is table, "tab never reached the requests pane"
        def running() -> bool:
            return any(cells[2] == "running" and cells[5] != "-" for cells in self.rows("#requests").values())

        await self.wait(running, 60, "a running request in the requests pane")
        await self.pilot.press("ctrl+home")  # the first row
        for _ in range(20):
            selected = self.app.selected_request()
            if selected is not None and selected.get("state") == "running" and selected.get("node"):
                return str(selected["request_id"])
            await self.pilot.press("down")
        raise AssertionError(f"no running request could be selected: {self.rows('#requests')}")


def _plain(cell: Any) -> str:
    return cell.plain if isinstance(cell, Text) else str(cell)


class Load:
    """Keeps requests in flight: long ones, one after another, on a thread of its own until stopped."""

    def __init__(self, cluster: RunningCluster) -> None:
        self.cluster = cluster
        self.stop = threading.Event()
        self.errors: list[Exception] = []
        self.thread = threading.Thread(target=self._run, name="test-load", daemon=True)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive(), "the load thread did not stop"

    def _run(self) -> None:
        with self.cluster.client() as client:
            while not self.stop.is_set():
                try:
                    for _ in client.generate("tiny", LONG_PROMPT, max_tokens=4000):
                        if self.stop.is_set():
                            break  # leaving the stream cancels the request
                except (RequestError, ClusterUnavailable) as exc:  # a killed node may fail one; keep going
                    self.errors.append(exc)
                    if isinstance(exc, ClusterUnavailable):
                        return


# ----------------------------------------------------------------------------- against a real cluster


def test_shows_nodes_gpus_instances_requests_and_a_prompt_stream(cluster: RunningCluster) -> None:
    async def scenario() -> None:
        app = SllmTui(cluster.endpoint)
        async with app.run_test(size=SIZE) as pilot:
            ui = Ui(app, pilot)
            await ui.wait(lambda: ui.tree_line("node-1 running pid") and ui.tree_line("node-2 running pid"),
                          30, "both nodes in the actor tree")
            assert sum(label.startswith("gpu-0 (cpu)") for label in ui.tree()) == 2, ui.tree()
            assert {"node-1/gpu-0", "node-2/gpu-0"} <= {row[0] for row in ui.rows("#resources").values()}

            # p: the prompt dialog; its stream shows in the stream pane, and the model loads on the way.
            await pilot.press("p")
            await ui.wait(lambda: isinstance(app.screen, PromptScreen), 10, "the prompt dialog")
            await pilot.press(*"hello", "enter")
            await ui.wait(lambda: "tokens · ttft" in app.stream.text, 60, "the prompt's completion")
            assert app.stream.text.startswith("» tiny: hello"), app.stream.text
            assert ui.logged("tui", "128 tokens in"), list(app.log_lines)
            await ui.wait(lambda: ui.logged("load", "tiny loaded on"), 10, "the load event")
            await ui.wait(lambda: " from " in (ui.tree_line("tiny-") or ""), 10, "the instance in the tree")
            assert any("tiny" in row[-1] for row in ui.rows("#resources").values()), "a GPU shows its model"

            # A request in flight shows with its tokens so far, where it runs and its rate.
            with Load(cluster):
                def tokens_showing() -> list[str] | None:
                    return next((cells for cells in ui.rows("#requests").values()
                                 if int(cells[3]) > 0 and cells[5].startswith("node-")), None)

                cells = await ui.wait(tokens_showing, 60, "a request with tokens in the requests pane")
                assert cells[1] == "tiny" and float(cells[4]) > 0, cells
            await pilot.press("q")

    run(scenario)


def test_k_on_a_node_kills_it_and_the_log_shows_the_crash_and_the_restart(cluster: RunningCluster) -> None:
    async def scenario() -> None:
        app = SllmTui(cluster.endpoint)
        async with app.run_test(size=SIZE) as pilot:
            ui = Ui(app, pilot)
            await ui.wait(lambda: ui.tree_line("node-2 running"), 30, "node-2 in the actor tree")
            old_pid = next(n["pid"] for n in app.status["nodes"] if n["name"] == "node-2")
            await ui.select_node("node-2")
            await pilot.press("k")
            await ui.wait(lambda: ui.logged("kill node-2: killed node-2"), 20, "the kill's ack")
            await ui.wait(lambda: ui.logged("crash", "node-2 lost"), 20, "the crash event")
            await ui.wait(lambda: ui.logged("restart", "restarting node-2"), 20, "the restart event")

            def recovered() -> bool:
                node = next(n for n in app.status["nodes"] if n["name"] == "node-2")
                label = ui.tree_line("node-2 ") or ""
                return node["pid"] != old_pid and label.startswith("node-2 running") and "↻1" in label

            await ui.wait(recovered, 60, "node-2 back, running, with one restart")
            cursor = app.query_one(ActorTree).cursor_node
            assert cursor is not None and cursor.data is not None and cursor.data.key == "node-2", \
                "the cursor stayed on node-2 while lines above it came and went"
            await pilot.press("q")

    run(scenario)


def test_m_on_a_request_migrates_it_to_the_other_node(cluster_factory: Any, tiny_model: Path) -> None:
    # The tiny model (0.5 MB) loads in a fraction of a second: with the repository read at 150 kB/s the
    # destination's cold load takes about 3 s, so the migration stays in progress long enough to be seen.
    cluster = cluster_factory({"tiny": tiny_model}, repository_bandwidth="150kB")

    async def scenario() -> None:
        app = SllmTui(cluster.endpoint, action_timeout_s=60)
        async with app.run_test(size=SIZE) as pilot:
            ui = Ui(app, pilot)
            with Load(cluster):
                request_id = await ui.select_running_request()
                source = (app.selected_request() or {})["node"]
                other = "node-2" if source == "node-1" else "node-1"
                await pilot.press("m")
                order = await ui.wait(lambda: ui.logged(f"migrate {request_id} from {source}"), 10,
                                      "the TUI's migrate line")
                assert f"to {other}/gpu-0" in order, order
                # The outcome comes back as a line of its own: the ack, or an error shown (not raised).
                # Meanwhile the destination loads (seconds), so the migrations pane shows it in progress.
                in_pane: list[list[str]] = []

                def outcome() -> str | None:
                    in_pane.extend(row for row in ui.rows("#migrations").values() if request_id in row[1])
                    return ui.logged(f"migrate {request_id} to {other}/gpu-0")

                line = await ui.wait(outcome, 90, "the migration's outcome")
                if "failed" not in line:
                    assert ui.logged("migrate", request_id, f"-> {other}/gpu-0"), "the cluster's event"
                    assert in_pane, "the migration showed in the migrations pane while in progress"
                assert app.is_running
            await pilot.press("q")

    run(scenario)


def test_a_refused_migration_shows_in_the_log_and_the_tui_goes_on(cluster: RunningCluster,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Client, request_id: str, target: str, timeout: float = 300.0) -> str:
        raise RequestError("migrate-x", "not_implemented", "live migration is not implemented")

    monkeypatch.setattr(Client, "migrate", refuse)

    async def scenario() -> None:
        app = SllmTui(cluster.endpoint)
        async with app.run_test(size=SIZE) as pilot:
            ui = Ui(app, pilot)
            with Load(cluster):
                request_id = await ui.select_running_request()
                await pilot.press("m")
                line = await ui.wait(lambda: ui.logged("tui-error", f"migrate {request_id}", "failed"), 20,
                                     "the refusal in the log")
                assert "live migration is not implemented [not_implemented]" in line
                # Still alive and drawing: a new snapshot arrives after the error.
                seen = app.status.get("time")
                await ui.wait(lambda: app.status.get("time") != seen, 10, "a fresh snapshot")
            await pilot.press("q")

    run(scenario)


def test_q_runs_on_quit_once_then_exits(cluster: RunningCluster) -> None:
    calls: list[float] = []

    async def scenario() -> None:
        app = SllmTui(cluster.endpoint, on_quit=lambda: calls.append(time.monotonic()))
        async with app.run_test(size=SIZE) as pilot:
            ui = Ui(app, pilot)
            await ui.wait(lambda: app.feed is not None, 30, "the TUI to attach")
            await pilot.press("q")
            await ui.wait(lambda: not app.is_running, 10, "the app to exit")
        app.run_on_quit()  # what run_tui does after the app ends: must not stop the cluster twice

    run(scenario)
    assert len(calls) == 1


def test_exit_when_quits_like_q(cluster: RunningCluster) -> None:
    """What `sllm up` uses so SIGTERM ends its TUI (and, through on_quit, the cluster)."""
    calls: list[str] = []
    exit_when = threading.Event()

    async def scenario() -> None:
        app = SllmTui(cluster.endpoint, on_quit=lambda: calls.append("stop"), exit_when=exit_when)
        async with app.run_test(size=SIZE) as pilot:
            ui = Ui(app, pilot)
            await ui.wait(lambda: app.feed is not None, 30, "the TUI to attach")
            exit_when.set()
            await ui.wait(lambda: not app.is_running, 10, "the app to exit")

    run(scenario)
    assert calls == ["stop"]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_in_a_real_terminal_it_draws_the_cluster_and_q_exits(cluster: RunningCluster, tmp_path: Path) -> None:
    server = f"sllm-tui-test-{os.getpid()}"  # a tmux server of our own: never touches the user's sessions
    exit_file = tmp_path / "exit-code"
    command = f"{sys.executable} -m sllm_actors.tui --cluster {cluster.endpoint}; echo $? > {exit_file}"

    def tmux(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["tmux", "-L", server, *args], capture_output=True, text=True, timeout=10)

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", "tui").stdout

    def wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)  # polling the terminal with a deadline
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; the screen:\n{screen()}")

    try:
        started = tmux("new-session", "-d", "-x", "160", "-y", "50", "-s", "tui", "-c", str(REPO), command)
        assert started.returncode == 0, started.stderr
        expected = ("node-1 running", "node-2 running", "gpu-0 (cpu)", "node-1/gpu-0", "GPUs & storage tiers",
                    "requests in flight", "events", "q quit", "k kill node", "m migrate request", "p prompt")
        wait(lambda: all(word in screen() for word in expected), 60, "the nodes, GPUs, every pane and key")
        assert len(screen().splitlines()[0]) > 100, "the TUI uses the whole 160-column terminal"
        tmux("send-keys", "-t", "tui", "q")
        wait(lambda: exit_file.exists() and exit_file.read_text().strip() != "", 20, "the TUI to exit")
        assert exit_file.read_text().strip() == "0"
    finally:
        tmux("kill-server")


# ----------------------------------------------------------------------------- the pieces, without a cluster


STATUS: dict[str, Any] = {
    "time": 1.0,
    "nodes": [
        {"name": "node-1", "pid": 11, "alive": True, "ready": True, "restarts": 0},
        {"name": "node-2", "pid": 12, "alive": False, "ready": False, "restarts": 2},
    ],
    "gpus": [
        {"node": "node-1", "index": 0, "device": "cpu", "memory_total": 1 << 30, "memory_used": 1 << 29,
         "models": ["tiny"]},
        {"node": "node-2", "index": 0, "device": "cpu", "memory_total": 1 << 30, "memory_used": 0,
         "models": []},
    ],
    "instances": [{"instance_id": "tiny-1", "node": "node-1", "gpu": 0, "model": "tiny", "state": "ready",
                   "requests": ["r1"], "waiting": 0, "memory_bytes": 1 << 29, "load_s": 0.5, "tier": "dram"}],
    "requests": [{"request_id": "r1", "model": "tiny", "state": "running", "tokens": 7, "node": "node-1",
                  "instance_id": "tiny-1", "tokens_per_s": 12.5, "migrations": 0}],
    "tiers": [{"node": "node-1", "tier": "dram", "models": ["tiny"], "used_bytes": 10, "capacity_bytes": 100,
               "bandwidth": 2e9}],
}


def test_node_state_comes_from_the_status_or_else_from_restart_events() -> None:
    memory = EventMemory()
    assert node_state(STATUS["nodes"][0], memory) == "running"
    assert node_state(STATUS["nodes"][1], memory) == "dead"
    memory.observe(Event(1.0, "restart", "restarting node-2", {"node": "node-2"}))
    assert node_state(STATUS["nodes"][1], memory) == "restarting"
    memory.observe(Event(2.0, "node", "node-2 joined (pid 13)", {"node": "node-2"}))
    assert node_state(STATUS["nodes"][1], memory) == "dead"
    assert node_state({**STATUS["nodes"][1], "state": "restarting"}, memory) == "restarting"
    memory.observe(Event(3.0, "restart", "node-1/supervisor restarted gpu-0",
                         {"node": "node-1", "child": "gpu-0"}))
    assert memory.restarts_of("node-1", "gpu-0") == 1


def test_the_load_panel_names_the_last_loads_largest_serial_parts() -> None:
    memory = EventMemory()
    assert load_parts_line(memory.last_load) == ""
    parts = {"read": 0.9, "build": 0.2, "read_wait": 0.7, "warmup": 0.05, "tokenizer": 0.4, "queue": 0.0}
    memory.observe(Event(1.0, "load", "tiny loaded on node-1/gpu-0 from ssd in 1.00s",
                         {"node": "node-1", "model": "tiny", "tier": "ssd", "seconds": 1.0, "parts": parts}))
    line = load_parts_line(memory.last_load, limit=3)
    # read and tokenizer overlap the build: not parts of the sum, so not shown
    assert line == "tiny from ssd 1.00s: read_wait 0.70 · build 0.20 · warmup 0.05", line
    memory.observe(Event(2.0, "load", "old node", {"model": "m", "tier": "dram", "seconds": 0.5}))
    assert load_parts_line(memory.last_load) == "m from dram 0.50s", "a load event without parts still shows"


def test_tree_and_tables_render_the_status_and_tolerate_missing_keys() -> None:
    memory = EventMemory()
    labels = [label.plain for _, _, label, _ in tree_lines(STATUS, memory)]
    assert "tiny-1 running 1 req · from dram in 0.50s" in labels
    busy, down = "gpu-0 (cpu) running 512.0 MiB/1.0 GiB ↻0", "gpu-0 (cpu) dead 0 B/1.0 GiB ↻0"
    assert labels.index(busy) < labels.index(down), "node-1's GPU works; node-2's is down with its node"
    assert any(label.startswith("node-2 dead pid 12 ↻2") for label in labels)
    assert any(label.startswith("tier dram 10% tiny") for label in labels)
    key, cells = request_rows(STATUS)[0]
    assert key == "r1"
    assert [_plain(c) for c in cells] == ["r1", "tiny", "running", "7", "12.5", "node-1/tiny-1", "0"]
    assert tree_lines({}, memory)[0][0] == "controller"
    assert request_rows({}) == [] and migration_rows({}) == []


def test_migration_rows_read_either_shape_of_migration() -> None:
    rows = migration_rows({"migrations": [
        # what the scheduler reports today
        {"migration_id": "mig-3", "source": "tiny-1", "dest": "tiny-2", "requests": ["r1"],
         "state": "running", "seconds": 1.234},
        # one request per entry, with rounds and recomputed tokens
        {"request_id": "r2", "source": "node-1/gpu-0", "dest": "node-2/gpu-0", "round": 2,
         "tokens_recomputed": 40, "pause_s": 0.05, "state": "running"},
    ]})
    plain = [[_plain(c) for c in cells] for _, cells in rows]
    assert plain[0] == ["mig-3", "r1", "tiny-1", "tiny-2", "running", "-", "-", "-", "1.23s"]
    assert plain[1][1:8] == ["r2", "node-1/gpu-0", "node-2/gpu-0", "running", "2", "40", "0.05s"]


def test_migration_target_is_another_nodes_gpu_that_is_up() -> None:
    request = STATUS["requests"][0]
    assert pick_migration_target(request, STATUS) is None, "node-2 is down"
    up = {**STATUS, "nodes": [{**n, "alive": True, "ready": True} for n in STATUS["nodes"]]}
    assert pick_migration_target(request, up) == "node-2/gpu-0"
    assert pick_migration_target({**request, "node": ""}, up) is None, "not placed yet"


def test_formatting() -> None:
    assert fmt_bytes(512) == "512 B" and fmt_bytes(1536) == "1.5 KiB" and fmt_bytes(3 << 30) == "3.0 GiB"
    assert bar(1, 2, width=4).plain == "██░░  50%"
    assert bar(5, 0).plain.endswith("-"), "an unknown capacity draws no fill"


def test_feed_merges_snapshot_history_with_live_events_once() -> None:
    feed = ClusterFeed("tcp://127.0.0.1:1")  # never started: offer_status alone feeds it
    event = {"time": 5.0, "kind": "load", "text": "tiny loaded", "data": {"seconds": 0.5}}
    feed.offer_status({"events": [event]})
    first = feed.take()
    assert first.status is not None and [e.text for e in first.events] == ["tiny loaded"]
    feed.offer_status({"events": [event, {"time": 6.0, "kind": "crash", "text": "node-2 lost"}]})
    second = feed.take()
    assert [e.text for e in second.events] == ["node-2 lost"], "the repeated event is not shown twice"
    assert feed.take().status is None, "no new snapshot since the last take"


def test_a_wildcard_state_endpoint_is_reached_at_the_clients_host() -> None:
    assert reachable_state_endpoint("tcp://0.0.0.0:7702", "tcp://10.0.0.5:7700") == "tcp://10.0.0.5:7702"
    assert reachable_state_endpoint("tcp://127.0.0.1:7702", "tcp://10.0.0.5:7700") == "tcp://127.0.0.1:7702"
