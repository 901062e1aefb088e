"""The interactive TUI: a live view of a running cluster, with keys to kill nodes, migrate requests and
send prompts.

It reads the cluster only through the controller's state PUB socket (snapshots and events, see
:mod:`sllm_actors.feed`) and makes one short-lived client connection per action, so any number of
TUIs can watch one cluster from any terminal. Widgets are redrawn by a timer at a steady rate from the
newest snapshot, never per message or per token.

Blocking client calls (connecting, kill, migrate, streaming a prompt) run on daemon threads of their own
rather than Textual's thread workers: those run in asyncio's default executor, which the app waits for on
exit, so a long stream or a slow migration would hold up quitting.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import (
    Checkbox,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    RichLog,
    Select,
    Sparkline,
    Static,
    Tree,
)
from textual.widgets.tree import TreeNode

from sllm_actors.client import Client, ClusterUnavailable, Completion, RequestError, TokenEvent
from sllm_actors.feed import ClusterFeed, Event, reachable_state_endpoint
from sllm_actors.tui.view import (
    Cells,
    EventMemory,
    Item,
    TreeLine,
    event_text,
    load_parts_line,
    migration_rows,
    pick_migration_target,
    request_rows,
    resource_rows,
    tree_lines,
    where,
)

__all__ = ["ActorTree", "PromptScreen", "SllmTui", "Table"]

REFRESH_S = 0.25
STALE_S = 3.0
"""No snapshot for this long (they come every 0.5 s) and the header says the cluster is silent."""
RECONNECT_S = 2.0
LOG_KEEP = 1000


# ----------------------------------------------------------------------------- messages from threads


class Note(Message):
    """A line for the event log from the TUI itself (an action's outcome)."""

    def __init__(self, text: str, error: bool = False) -> None:
        super().__init__()
        self.text = text
        self.error = error


class Attached(Message):
    def __init__(self, feed: ClusterFeed) -> None:
        super().__init__()
        self.feed = feed


class ClusterStopped(Message):
    """on_quit returned: the app may exit now."""


# ----------------------------------------------------------------------------- panes
# Subclasses only to list the arrow keys in the footer: the base widgets bind them with show=False.


class ActorTree(Tree[Item]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor_up", "select", key_display="↑↓"),
        Binding("down", "cursor_down", "select", show=False),
    ]


class Table(DataTable[Any]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "cursor_up", "select", key_display="↑↓"),
        Binding("down", "cursor_down", "select", show=False),
    ]


class EventLog(RichLog):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "scroll_up", "scroll", key_display="↑↓"),
        Binding("down", "scroll_down", "scroll", show=False),
    ]


class StreamPane(VerticalScroll):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "scroll_up", "scroll", key_display="↑↓"),
        Binding("down", "scroll_down", "scroll", show=False),
    ]


# ----------------------------------------------------------------------------- the prompt dialog


@dataclass(frozen=True)
class PromptOrder:
    model: str
    prompt: str
    max_tokens: int
    chat: bool


class PromptScreen(ModalScreen[PromptOrder | None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel")]
    DEFAULT_CSS = """
    PromptScreen { align: center middle; }
    #dialog { width: 80; height: auto; border: round $accent; padding: 1 2; background: $surface; }
    #dialog > * { margin-bottom: 1; }
    #max-tokens { width: 20; }
    """

    def __init__(self, models: list[str]) -> None:
        super().__init__()
        self.models = models

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label("send a prompt  (enter: send · esc: cancel · tab: next field)")
            yield Select([(m, m) for m in self.models], value=self.models[0], allow_blank=False, id="model")
            yield Input(placeholder="prompt", id="prompt")
            with Horizontal():
                yield Input(value="128", placeholder="max tokens", id="max-tokens", type="integer")
                yield Checkbox("chat template", value=True, id="chat")

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()

    @on(Input.Submitted)
    def submit(self) -> None:
        prompt = self.query_one("#prompt", Input).value.strip()
        if not prompt:
            self.notify("type a prompt first", severity="warning")
            return
        max_tokens_text = self.query_one("#max-tokens", Input).value.strip()
        model = self.query_one("#model", Select).value
        self.dismiss(PromptOrder(
            model=str(model), prompt=prompt, max_tokens=int(max_tokens_text) if max_tokens_text else 128,
            chat=self.query_one("#chat", Checkbox).value,
        ))

    def action_cancel(self) -> None:
        self.dismiss(None)


# ----------------------------------------------------------------------------- the stream of a prompt


class PromptStream:
    """Written by the streaming thread per token, read by the redraw timer; only the text is shared."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: list[str] = []
        self.version = 0
        self.cancel = threading.Event()

    def start(self, header: str) -> None:
        with self._lock:
            self._parts = [header, "\n"]
            self.version += 1

    def append(self, text: str) -> None:
        with self._lock:
            self._parts.append(text)
            self.version += 1

    @property
    def text(self) -> str:
        with self._lock:
            return "".join(self._parts)


# ----------------------------------------------------------------------------- the app


class SllmTui(App[None]):
    """Attach to the cluster whose client endpoint is ``endpoint``; ``on_quit`` runs when the user quits
    (``sllm up`` passes the controller's stop, so quitting its TUI stops the cluster)."""

    TITLE = "sllm"
    ENABLE_COMMAND_PALETTE = False  # every action has its key, listed in the footer
    CSS = """
    Screen { layout: vertical; }
    .row { height: 1fr; }
    #top { height: 2fr; }
    #actors { width: 64; }
    .pane { border: round $panel-lighten-2; border-title-color: $text-muted; }
    .pane:focus { border: round $accent; border-title-color: $accent; border-title-style: bold; }
    #right { width: 1fr; }
    #resources { height: auto; max-height: 50%; }
    #requests { height: 1fr; }
    #migrations { width: 1fr; height: 1fr; }
    #plots { width: 56; padding: 0 1; }
    #plots Sparkline { height: 2; margin-bottom: 1; }
    #events { width: 2fr; }
    #stream { width: 1fr; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q", "quit", "quit"),
        # Priority so they also show in the footer: the screen binds them first, hidden.
        Binding("tab", "app.focus_next", "next pane", priority=True),
        Binding("shift+tab", "app.focus_previous", "prev pane", priority=True),
        Binding("k", "kill", "kill node"),
        Binding("m", "migrate", "migrate request"),
        Binding("p", "prompt", "prompt"),
    ]

    def __init__(
        self,
        endpoint: str,
        on_quit: Callable[[], None] | None = None,
        *,
        exit_when: threading.Event | None = None,
        refresh_s: float = REFRESH_S,
        action_timeout_s: float = 120.0,
    ) -> None:
        super().__init__()
        self.endpoint = endpoint
        self.http_endpoint = ""
        self.on_quit = on_quit
        self.on_quit_called = False
        self._on_quit_lock = threading.Lock()
        self.exit_when = exit_when
        self.refresh_s = refresh_s
        self.action_timeout_s = action_timeout_s
        self.status: dict[str, Any] = {}
        self.memory = EventMemory()
        self.feed: ClusterFeed | None = None
        self.log_lines: deque[str] = deque(maxlen=LOG_KEEP)
        """Plain text of the event log, newest last (what the log pane shows, for tests and copy-paste)."""
        self.stream = PromptStream()
        self._stream_version = 0
        self._actor_nodes: dict[str, TreeNode[Item]] = {}
        self._actor_labels: dict[str, Text] = {}
        self._threads_stop = threading.Event()
        self._quitting = False
        self._since_message: float | None = None

    # ------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="top", classes="row"):
            yield ActorTree(Text("controller"), data=Item("controller", "controller"), id="actors",
                            classes="pane")
            with Vertical(id="right"):
                yield Table(id="resources", classes="pane", cursor_type="row")
                yield Table(id="requests", classes="pane", cursor_type="row")
        with Horizontal(classes="row"):
            yield Table(id="migrations", classes="pane", cursor_type="row")
            with Vertical(id="plots", classes="pane"):
                yield Static(id="load-label")
                yield Sparkline([], id="load-times", summary_function=max)
                yield Static(id="throughput-label")
                yield Sparkline([], id="throughput", summary_function=max)
        with Horizontal(classes="row"):
            yield EventLog(id="events", classes="pane", max_lines=LOG_KEEP, wrap=True, markup=False)
            with StreamPane(id="stream", classes="pane"):
                yield Static("press p to send a prompt", id="stream-text")
        yield Footer()

    def on_mount(self) -> None:
        titles = {
            "#actors": "actors", "#resources": "GPUs & storage tiers", "#requests": "requests in flight",
            "#migrations": "migrations in progress", "#plots": "load times · throughput", "#events": "events",
            "#stream": "prompt stream",
        }
        for selector, title in titles.items():
            self.query_one(selector).border_title = title
        self.query_one("#resources", Table).add_columns("where", "what", "fill", "used / total", "bandwidth",
                                                        "contents")
        self.query_one("#requests", Table).add_columns("request", "model", "state", "tokens", "tok/s",
                                                       "where", "migr")
        self.query_one("#migrations", Table).add_columns("migration", "requests", "from", "to", "state",
                                                         "round", "recomputed", "pause", "elapsed")
        tree = self.query_one(ActorTree)
        tree.root.expand()
        self._actor_nodes["controller"] = tree.root
        tree.focus()
        self.sub_title = f"{self.endpoint} · connecting"
        self._spawn(self._connect, "sllm-tui-connect")
        self.set_interval(self.refresh_s, self._redraw)

    def on_unmount(self) -> None:
        self._threads_stop.set()
        self.stream.cancel.set()
        if self.feed is not None:
            self.feed.stop()

    # ------------------------------------------------------------------ connecting

    def _connect(self) -> None:
        """Handshake for the state endpoint, then hand a started feed to the UI; retry until it works."""
        said = False
        while not self._threads_stop.is_set():
            try:
                with Client(self.endpoint, connect_timeout=3.0) as client:
                    status = client.status(timeout=5.0)
                    state_endpoint = client.state_endpoint
                    self.http_endpoint = client.http_endpoint
                    reached = client.endpoint  # the leader, of several

            except (ClusterUnavailable, RequestError) as exc:
                if not said:
                    self.post_message(Note(
                        f"cannot reach the cluster: {exc}; retrying every {RECONNECT_S:.0f}s", error=True))
                    said = True
                self._threads_stop.wait(RECONNECT_S)
                continue
            feed = ClusterFeed(reachable_state_endpoint(state_endpoint, reached))
            feed.offer_status(status)
            feed.start()
            if not self.post_message(Attached(feed)):
                feed.stop()  # the app closed meanwhile
            return

    def on_attached(self, message: Attached) -> None:
        if self._threads_stop.is_set():
            message.feed.stop()
            return
        self.feed = message.feed
        self._redraw()  # the history the snapshot brought goes first, then this line
        self.note(f"attached to {self.endpoint} (state from {message.feed.state_endpoint})")

    # ------------------------------------------------------------------ redraw, at a steady rate

    def _redraw(self) -> None:
        if self.exit_when is not None and self.exit_when.is_set():
            self.action_quit()
        if self.stream.version != self._stream_version:
            self._stream_version = self.stream.version
            self.query_one("#stream-text", Static).update(Text(self.stream.text))
            self.query_one(StreamPane).scroll_end(animate=False)
        if self.feed is None:
            return
        update = self.feed.take()
        self._since_message = update.since_last_message_s
        if "," in self.endpoint and (update.since_last_message_s or 0.0) > STALE_S:
            # Several controllers: the leader went silent; attach to whichever leads now (the client follows it).
            self.feed.stop()
            self.feed = None
            self.note("the leading controller is silent; attaching to the one that leads now")
            self._spawn(self._connect, "sllm-tui-connect")
            return
        for event in update.events:
            self.memory.observe(event)
            self._write_log(event)
        if update.status is not None:
            self.status = update.status
            self.memory.observe_status(update.status)
            self._draw_status()
        self._draw_title()

    def _draw_status(self) -> None:
        status = self.status
        self._sync_tree(tree_lines(status, self.memory))
        _sync_table(self.query_one("#resources", Table), resource_rows(status))
        _sync_table(self.query_one("#requests", Table), request_rows(status))
        migrations = self.query_one("#migrations", Table)
        _sync_table(migrations, migration_rows(status))
        migrations.border_subtitle = "" if "migrations" in status else "(not reported by this controller)"
        loads = [s.value for s in self.memory.load_times]
        label = "model load time (s): "
        label += f"last {loads[-1]:.2f} · max {max(loads):.2f} · n={len(loads)}" if loads else "no loads yet"
        parts = load_parts_line(self.memory.last_load)
        if parts:
            label += "\n" + parts
        self.query_one("#load-label", Static).update(label)
        # All-equal data draws as full blocks; nothing to show reads better as an empty line.
        self.query_one("#load-times", Sparkline).data = loads if any(loads) else []
        rates = [s.value for s in self.memory.throughput]
        self.query_one("#throughput-label", Static).update(
            f"throughput (tok/s): now {rates[-1]:.0f} · max {max(rates):.0f}" if rates else "")
        self.query_one("#throughput", Sparkline).data = rates if any(rates) else []

    def _draw_title(self) -> None:
        since = self._since_message
        nodes = self.status.get("nodes", [])
        up = sum(1 for n in nodes if n.get("alive"))
        requests = len(self.status.get("requests", []))
        parts = [self.endpoint, f"{up}/{len(nodes)} nodes up", f"{requests} requests"]
        if self.http_endpoint:
            parts.insert(1, f"HTTP {self.http_endpoint}")
        if self.status.get("controllers"):
            # With etcd: which controller leads (the snapshots come from the leader alone).
            parts.insert(1, f"leader {self.status.get('leader')} (epoch {self.status.get('epoch')})")
        if since is not None and since > STALE_S:
            parts.append(f"no snapshot for {since:.0f}s: is the cluster up?")
        self.sub_title = " · ".join(parts)

    def _sync_tree(self, lines: list[TreeLine]) -> None:
        """Update the tree in place (labels, new and gone actors) so expansion and the cursor survive."""
        tree = self.query_one(ActorTree)
        cursor = tree.cursor_node
        wanted = {key for key, *_ in lines}
        for key in reversed(list(self._actor_nodes)):  # children before their parents
            if key not in wanted:
                node = self._actor_nodes.pop(key)
                self._actor_labels.pop(key, None)
                if node.tree is tree and node.parent is not None and node in node.parent.children:
                    node.remove()
        for key, parent_key, label, item in lines:
            existing = self._actor_nodes.get(key)
            if existing is not None:
                node = existing
                node.data = item
            else:
                parent = self._actor_nodes[parent_key or "controller"]
                if item.kind in ("actor", "instance", "tier"):
                    node = parent.add_leaf(label, data=item)
                else:
                    node = parent.add(label, data=item, expand=True)
                self._actor_nodes[key] = node
            if self._actor_labels.get(key) != label:
                node.set_label(label)
                self._actor_labels[key] = label
        # Lines above the cursor come and go (an instance loads); keep the cursor on the same actor, so
        # `k` never hits a node the operator did not pick. last_line makes the tree lay out its lines.
        if cursor is not None and cursor in self._actor_nodes.values() and tree.last_line >= 0:
            if tree.cursor_node is not cursor:
                tree.move_cursor(cursor)

    # ------------------------------------------------------------------ the log

    def _write_log(self, event: Event) -> None:
        line = event_text(event)
        self.query_one(EventLog).write(line)
        self.log_lines.append(line.plain)

    def note(self, text: str, error: bool = False) -> None:
        self._write_log(Event(time.time(), "tui-error" if error else "tui", text))

    def on_note(self, message: Note) -> None:
        self.note(message.text, message.error)

    # ------------------------------------------------------------------ actions

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # With the prompt dialog open, letters belong to it (its Select does not consume them).
        if action in ("kill", "migrate", "prompt", "quit") and isinstance(self.screen, PromptScreen):
            return False
        return True

    def action_quit(self) -> None:  # type: ignore[override]
        if self._quitting:
            return
        self._quitting = True
        if self.on_quit is None:
            self.exit()
            return
        self.note("stopping the cluster...")
        self._spawn(self._stop_cluster, "sllm-tui-stop")

    def _stop_cluster(self) -> None:
        self.run_on_quit()
        self.post_message(ClusterStopped())

    def run_on_quit(self) -> None:
        """Call on_quit once, whoever asks first (the quit key, or run_tui once the app has ended).

        A second caller waits for the first call to finish, so run_tui never returns (and lets the process
        exit) while the cluster is still stopping on the quit thread.
        """
        with self._on_quit_lock:
            if self.on_quit is None or self.on_quit_called:
                return
            self.on_quit_called = True
            self.on_quit()

    def on_cluster_stopped(self, message: ClusterStopped) -> None:
        self.exit()

    def action_kill(self) -> None:
        node = self.selected_node()
        if node is None:
            self.note("select a node first (in the actors or GPUs pane), then press k", error=True)
            return
        self.note(f"kill {node}...")
        self._client_call(f"kill {node}", lambda client: client.kill_node(node, timeout=10.0))

    def action_migrate(self) -> None:
        request = self.selected_request()
        if request is None:
            self.note("select a running request first (requests pane), then press m", error=True)
            return
        request_id = str(request.get("request_id"))
        target = pick_migration_target(request, self.status)
        if target is None:
            self.note(f"{request_id}: no GPU on another node that is up to migrate it to", error=True)
            return
        origin = where(str(request.get("node", "")), str(request.get("instance_id", "")))
        self.note(f"migrate {request_id} from {origin} to {target}...")
        timeout = self.action_timeout_s
        self._client_call(f"migrate {request_id} to {target}",
                          lambda client: client.migrate(request_id, target, timeout=timeout))

    def action_prompt(self) -> None:
        models = [str(m.get("name")) for m in self.status.get("models", []) if m.get("name")]
        if not models:
            self.note("no models known yet (not attached to the cluster?)", error=True)
            return
        self.push_screen(PromptScreen(models), self._prompt_chosen)

    def _prompt_chosen(self, order: PromptOrder | None) -> None:
        if order is None:
            return
        # One stream at a time: a new prompt stops the previous one (its request is cancelled).
        self.stream.cancel.set()
        self.stream = PromptStream()
        self.stream.start(f"» {order.model}: {order.prompt}")
        self.note(f"prompt to {order.model} ({order.max_tokens} tokens max)")
        stream = self.stream
        self._spawn(lambda: self._run_prompt(order, stream), "sllm-tui-prompt")

    def _run_prompt(self, order: PromptOrder, stream: PromptStream) -> None:
        try:
            with Client(self.endpoint, connect_timeout=5.0) as client:
                for event in client.generate(order.model, order.prompt, max_tokens=order.max_tokens,
                                             chat=order.chat):
                    if stream.cancel.is_set():
                        stream.append("\n[stopped]")
                        return  # leaving the generator cancels the request
                    if isinstance(event, TokenEvent):
                        stream.append(event.text)
                    elif isinstance(event, Completion):
                        moved = f", {len(event.migrations)} migration(s)" if event.migrations else ""
                        stream.append(f"\n[{len(event.token_ids)} tokens · ttft {event.ttft_s:.3f}s · "
                                      f"total {event.total_s:.3f}s · {event.finish_reason}{moved}]")
                        self.post_message(Note(f"{event.request_id}: {len(event.token_ids)} tokens in "
                                               f"{event.total_s:.2f}s (ttft {event.ttft_s:.3f}s){moved}"))
        except (RequestError, ClusterUnavailable) as exc:
            stream.append(f"\n[error: {exc}]")
            self.post_message(Note(f"prompt to {order.model} failed: {exc}", error=True))

    def _client_call(self, what: str, call: Callable[[Client], str]) -> None:
        def run() -> None:
            try:
                with Client(self.endpoint, connect_timeout=5.0) as client:
                    detail = call(client)
            except RequestError as exc:
                self.post_message(Note(f"{what} failed: {exc.message} [{exc.code}]", error=True))
            except ClusterUnavailable as exc:
                self.post_message(Note(f"{what} failed: {exc}", error=True))
            else:
                self.post_message(Note(f"{what}: {detail}"))

        self._spawn(run, f"sllm-tui-{what.split()[0]}")

    @staticmethod
    def _spawn(target: Callable[[], None], name: str) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

    # ------------------------------------------------------------------ selection

    def selected_node(self) -> str | None:
        """The node under the cursor of the GPUs pane when it has focus, else of the actor tree."""
        resources = self.query_one("#resources", Table)
        if self.focused is resources and resources.row_count:
            key = _row_key_at_cursor(resources)
            if key is not None:
                return key.split(":", 1)[1].split("/", 1)[0]
        cursor = self.query_one(ActorTree).cursor_node
        if cursor is None or cursor.data is None or not cursor.data.node:
            return None
        return cursor.data.node

    def selected_request(self) -> dict[str, Any] | None:
        key = _row_key_at_cursor(self.query_one("#requests", Table))
        if key is None:
            return None
        return next((r for r in self.status.get("requests", []) if r.get("request_id") == key), None)


# ----------------------------------------------------------------------------- tables


def _row_key_at_cursor(table: DataTable[Any]) -> str | None:
    if not table.row_count or not table.is_valid_row_index(table.cursor_row):
        return None
    return table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value


def _sync_table(table: DataTable[Any], rows: list[tuple[str, Cells]]) -> None:
    """Update rows in place, add new ones, drop gone ones: the cursor stays on the row it was on."""
    cursor_key = _row_key_at_cursor(table)
    wanted = dict(rows)
    for row_key in list(table.rows):
        if row_key.value not in wanted:
            table.remove_row(row_key)
    columns = [column.key for column in table.ordered_columns]
    for key, cells in rows:
        if key in table.rows:
            for column, cell in zip(columns, cells, strict=True):
                if table.get_cell(key, column) != cell:
                    table.update_cell(key, column, cell, update_width=True)
        else:
            table.add_row(*cells, key=key)
    if cursor_key is not None and cursor_key in table.rows:
        index = table.get_row_index(cursor_key)
        if index != table.cursor_row:
            table.move_cursor(row=index, animate=False)
