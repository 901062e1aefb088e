"""``sllm``: start a cluster, send it requests, and look inside it."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
store_app = typer.Typer(no_args_is_help=True, help="The checkpoint store: convert and benchmark.")
app.add_typer(store_app, name="store")
keys_app = typer.Typer(no_args_is_help=True, help="The cluster's CURVE keys (under $SLLM_HOME/keys).")
app.add_typer(keys_app, name="keys")
breaker_app = typer.Typer(no_args_is_help=True, help="The GPUs' load circuit breakers (see `sllm status`).")
app.add_typer(breaker_app, name="breaker")

console = Console(stderr=True)
out = Console()


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _client(cluster: Optional[str], key: Optional[Path] = None) -> Any:
    from sllm_actors.client import Client, ClusterUnavailable, resolve_endpoint
    from sllm_actors.runtime.topology import TopologyError

    try:
        return Client(resolve_endpoint(cluster), key=key)
    except (ClusterUnavailable, TopologyError) as exc:
        _fail(str(exc))


ClusterOpt = typer.Option(None, "--cluster", help="client endpoint tcp://HOST:PORT, or every controller's, "
                          "comma-separated (the client follows the leader) (else $SLLM_CLUSTER, else ./topology.yaml)")
KeyOpt = typer.Option(None, "--key", help="our .key_secret file (else $SLLM_KEY, else the operator's or "
                      "client.key_secret under $SLLM_HOME/keys)")


@app.command()
def up(
    topology: Path = typer.Argument(..., help="the cluster's topology.yaml"),
    headless: bool = typer.Option(False, "--headless", help="no TUI: log, print 'ready', run until SIGINT/SIGTERM"),
    ready_timeout: float = typer.Option(300.0, help="seconds to wait for every node to join"),
    policy: Optional[str] = typer.Option(None, "--policy", help="placement policy, overriding the topology's: "
                                         "serverlessllm, shepherd, locality-wait, availability, random"),
    http_port: Optional[int] = typer.Option(None, "--http-port", help="the OpenAI-compatible HTTP API's port, "
                                            "overriding the topology's controller.http_port (default 8000); 0: off"),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key", help="an API key the HTTP API requires as "
                                                "'Authorization: Bearer KEY' (repeatable; also $SLLM_API_KEY, "
                                                "comma-separated); none: no key needed"),
    controller_name: Optional[str] = typer.Option(None, "--controller", help="with etcd: which of the topology's "
                                                  "controllers this is (its name; default the first)"),
) -> None:
    """Start the controller and the local nodes of TOPOLOGY."""
    from sllm_actors.models import ModelSourceError, prepare_default_model
    from sllm_actors.runtime.topology import DEFAULT_MODEL_SOURCE, TopologyError, load_topology

    interactive = not headless and sys.stdin.isatty() and sys.stdout.isatty()
    log_format = "%(asctime)s controller %(levelname)s %(name)s: %(message)s"
    node_log = None
    if interactive:
        # The TUI owns the terminal: the controller's and the nodes' logs go to a file instead.
        from sllm_actors.models import sllm_home

        log_path = sllm_home() / "logs" / "cluster.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        logging.basicConfig(level=os.environ.get("SLLM_LOG_LEVEL", "INFO"), format=log_format,
                            filename=str(log_path))
        node_log = open(log_path, "ab")
        console.print(f"logs: {log_path}")
    else:
        logging.basicConfig(level=os.environ.get("SLLM_LOG_LEVEL", "INFO"), format=log_format)
    try:
        topo = load_topology(topology)
    except TopologyError as exc:
        _fail(str(exc))
    if policy is not None:
        from dataclasses import replace

        from sllm_actors.runtime.topology import POLICIES

        if policy not in POLICIES:
            _fail(f"--policy: unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
        topo = replace(topo, scheduler=replace(topo.scheduler, policy=policy))
    from sllm_actors.runtime.security import KeyProblem, prepare_keys

    try:
        prepare_keys(topo, say=lambda text: console.print(text))  # made here, where the operator sees it said
    except KeyProblem as exc:
        _fail(str(exc))
    if any(m.source == DEFAULT_MODEL_SOURCE for m in topo.models):
        try:
            prepare_default_model(say=lambda text: console.print(text))
        except ModelSourceError as exc:
            _fail(str(exc))
    from sllm_actors.actors.controller.launcher import ControllerLauncher, ControllerStartError

    if controller_name:
        try:
            topo = topo.as_controller(controller_name)  # its host and ports
        except KeyError as exc:
            _fail(str(exc.args[0]))
    front = _http_front_end(topo, http_port, api_key, node_log)
    # The controller is a process of its own, restarted if it dies (same ports, next epoch): the nodes, the HTTP
    # front end and the clients reconnect to it and go on.
    controller = ControllerLauncher(topology, policy=policy or "", http_endpoint=front.endpoint if front else "",
                                    log_file=node_log, ready_timeout=ready_timeout, controller=controller_name or "")
    stop = threading.Event()
    stopped = threading.Event()

    def stop_cluster() -> None:
        # Once only, whether the TUI's quit or the finally below runs it.
        if not stopped.is_set():
            stopped.set()
            if front is not None:
                front.stop()  # first: its requests are cancelled while the router still answers
            controller.stop()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        endpoints = controller.start()
    except ControllerStartError as exc:  # a port in use, most often: say which and stop what started
        if front is not None:
            front.stop()
        _fail(f"cannot start the controller: {exc}")
    if controller.standby:
        # With etcd: another controller leads. This one answers clients with who does until it takes over.
        print(f"standby: controller {controller_name or topo.controller.name} client endpoint "
              f"{endpoints['client_endpoint']} (answers with the leader until it leads)", flush=True)
        while not stop.is_set() and not controller.leading.wait(0.5):
            pass
        if stop.is_set():
            stop_cluster()
            return
        endpoints = controller.endpoints
    client_endpoint = endpoints["client_endpoint"]
    if front is not None:
        # With standbys, the front end follows the leader: this host's controller first, then the others.
        others = [c.client_endpoint for c in topo.controllers if c.name != topo.controller.name] if topo.etcd else []
        front.start(",".join([client_endpoint, *others]))
    try:
        if interactive:
            from sllm_actors.tui import run_tui

            # No wait for the nodes: the TUI shows them join. Quitting it (q) stops the cluster;
            # SIGINT/SIGTERM set `stop`, which quits the TUI the same way.
            run_tui(client_endpoint, stop_cluster=stop_cluster, exit_when=stop)
            return
        deadline = time.monotonic() + ready_timeout
        missing = ["?"]
        while not stop.is_set() and time.monotonic() < deadline:
            missing = controller.wait_ready(0.5)
            if controller.ready.is_set():
                break
        if missing and not stop.is_set():
            console.print(f"[yellow]warning:[/] nodes not joined after {ready_timeout:.0f}s: {', '.join(missing)}")
        names = sorted(n.name for n in topo.nodes)
        print(f"ready: client endpoint {client_endpoint} state endpoint {endpoints['state_endpoint']} "
              f"nodes {','.join(names)} cluster endpoint {endpoints['cluster_endpoint']}"
              + (f" http endpoint {front.endpoint}" if front is not None else "")
              + f" controller pid {controller.pid} epoch {controller.epoch}", flush=True)
        while not stop.wait(0.5):
            pass
    finally:
        if not stopped.is_set():
            console.print("stopping the cluster...")
            stop_cluster()
        console.print("stopped")
        if node_log is not None:
            node_log.close()


def _http_front_end(topo: Any, port: Optional[int], keys: Optional[list[str]], log_file: Any) -> Any:
    from sllm_actors.http import HttpFrontEnd, parse_api_keys

    port = topo.controller.http_port if port is None else port
    if not 0 <= port <= 65535:
        _fail(f"--http-port: must be 0..65535, got {port}")
    if port == 0:
        return None
    try:
        return HttpFrontEnd(topo.controller.host, port, log_file=log_file,
                            api_keys=parse_api_keys(*(keys or []), os.environ.get("SLLM_API_KEY", "")))
    except OSError as exc:
        _fail(str(exc))


@app.command()
def tui(cluster: Optional[str] = ClusterOpt, key: Optional[Path] = KeyOpt) -> None:
    """Watch and steer a running cluster in an interactive TUI (any number of them can attach; operator key)."""
    if key is not None:
        os.environ["SLLM_KEY"] = str(key)  # the TUI's own connections (client and state feed) find it there
    from sllm_actors.client import ClusterUnavailable, resolve_endpoint
    from sllm_actors.runtime.topology import TopologyError
    from sllm_actors.tui import run_tui

    try:
        endpoint = resolve_endpoint(cluster)
    except (ClusterUnavailable, TopologyError) as exc:
        _fail(str(exc))
    run_tui(endpoint)


@app.command()
def node(
    join: str = typer.Option(..., "--join", help="the controller's cluster endpoint, tcp://HOST:PORT, or every "
                             "controller's, comma-separated (with standby controllers)"),
    name: str = typer.Option(..., "--name", help="this node's name in the topology"),
    key: Optional[Path] = typer.Option(None, "--key", help="this node's key file (from `sllm keys add-node NAME`; "
                                       "else $SLLM_HOME/keys/nodes/NAME.key_secret)"),
) -> None:
    """Run a node process that joins a controller (for nodes on other hosts)."""
    from sllm_actors.actors.node.process import main as node_main

    raise typer.Exit(node_main(["--join", join, "--name", name, *(["--key", str(key)] if key else [])]))


@app.command()
def generate(
    model: str,
    prompt: str,
    max_tokens: int = typer.Option(128, "--max-tokens"),
    temperature: float = typer.Option(0.0, "--temperature"),
    top_p: float = typer.Option(1.0, "--top-p"),
    seed: Optional[int] = typer.Option(None, "--seed"),
    chat: bool = typer.Option(False, "--chat", help="apply the model's chat template"),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
    cluster: Optional[str] = ClusterOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object at the end instead of streaming"),
    key: Optional[Path] = KeyOpt,
) -> None:
    """Stream MODEL's answer to PROMPT."""
    from sllm_actors.client import ClusterUnavailable, Completion, RequestError, TokenEvent

    client = _client(cluster, key)
    try:
        for event in client.generate(model, prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                     seed=seed, chat=chat, stop=stop or []):
            if isinstance(event, TokenEvent) and not as_json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            elif isinstance(event, Completion):
                if as_json:
                    print(json.dumps(event.to_json()))
                else:
                    print()
                    console.print(f"[dim]{len(event.token_ids)} tokens, ttft {event.ttft_s:.3f}s, "
                                  f"total {event.total_s:.3f}s, {event.finish_reason}"
                                  + (f", {len(event.migrations)} migration(s)" if event.migrations else "") + "[/]")
    except (RequestError, ClusterUnavailable) as exc:
        _fail(str(exc), 1)
    finally:
        client.close()


@app.command()
def status(cluster: Optional[str] = ClusterOpt, as_json: bool = typer.Option(False, "--json"),
           key: Optional[Path] = KeyOpt) -> None:
    """Nodes, GPUs, instances, requests in flight and storage tiers (a client key sees only its own requests)."""
    from sllm_actors.client import ClusterUnavailable, RequestError

    client = _client(cluster, key)
    try:
        st = client.status()
    except (RequestError, ClusterUnavailable) as exc:
        _fail(str(exc), 1)
    finally:
        client.close()
    st["http_endpoint"] = client.http_endpoint  # from the handshake; empty when the HTTP API is off
    if as_json:
        print(json.dumps(st, indent=2))
        return
    _print_status(st)


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def _print_status(st: dict[str, Any]) -> None:
    out.print(f"client endpoint {st.get('client_endpoint') or '-'}   HTTP (OpenAI API) "
              f"{st.get('http_endpoint') or 'off'}", highlight=False)
    if st.get("controllers"):
        # With etcd: the controller that answered leads (a standby only redirects); the others stand by.
        standbys = [c["name"] for c in st["controllers"] if c["name"] != st.get("leader")]
        out.print(f"controller {st.get('leader')} leads (epoch {st.get('epoch')}); standby: "
                  f"{', '.join(standbys) or 'none'}", highlight=False)
    t = Table(title="nodes")
    for col in ("name", "pid", "alive", "restarts", "placement"):
        t.add_column(col)
    for n in st["nodes"]:
        t.add_row(n["name"], str(n["pid"]), "yes" if n["alive"] else "[red]no[/]", str(n["restarts"]),
                  f"[yellow]{n['cordoned']}[/]" if n.get("cordoned") else "open")
    out.print(t)
    t = Table(title="gpus")
    for col in ("node", "device", "memory used / total", "models", "health"):
        t.add_column(col)
    for g in st["gpus"]:
        state = g.get("health", "healthy")
        # The reason opens with the state ("breaker open for 12s more: ...", "unhealthy: ...").
        health = "healthy" if state == "healthy" else f"[red]{escape(g.get('health_reason') or state)}[/]"
        t.add_row(g["node"], f"gpu-{g['index']} ({g['device']})",
                  f"{_gib(g['memory_used'])} / {_gib(g['memory_total'])}", ", ".join(g["models"]), health)
    out.print(t)
    t = Table(title="instances")
    for col in ("instance", "model", "where", "state", "requests", "KV blocks used / total", "prefix cache hits",
                "loaded from"):
        t.add_column(col)
    for i in st["instances"]:
        kv = f"{i.get('kv_blocks_used', 0)} / {i.get('kv_blocks_total', 0)}" if i.get("kv_blocks_total") else "-"
        queried = int(i.get("prefix_query_tokens", 0))
        hits = f"{int(i.get('prefix_hit_tokens', 0)) / queried:.0%} of {queried} tok" if queried else "-"
        t.add_row(i["instance_id"], i["model"], f"{i['node']}/gpu-{i['gpu']}", i["state"], str(len(i["requests"])),
                  kv, hits, f"{i['tier']} {i['load_s']:.2f}s" if i["tier"] else "")
    out.print(t)
    t = Table(title="requests in flight")
    for col in ("request", "model", "tokens", "where", "state"):
        t.add_column(col)
    for r in st["requests"]:
        t.add_row(r["request_id"], r["model"], str(r["tokens"]), f"{r['node']}/{r['instance_id']}", r["state"])
    out.print(t)
    t = Table(title="storage tiers")
    for col in ("node", "tier", "models", "used / capacity", "bandwidth"):
        t.add_column(col)
    for tier in st["tiers"]:
        cap = tier.get("capacity_bytes", 0)
        bw = tier.get("bandwidth", 0.0)
        t.add_row(tier["node"], tier["tier"], ", ".join(tier.get("models", [])),
                  f"{_gib(tier.get('used_bytes', 0))} / {_gib(cap) if cap else '-'}",
                  f"{bw / 1e9:.2f} GB/s" if bw else "-")
    out.print(t)


@app.command()
def deploy(
    name: str,
    source: str = typer.Option(..., "--source", help="a Hugging Face model directory, a .gguf file, or the "
                               "http(s):// URL of a checkpoint under one of the topology's repositories"),
    cluster: Optional[str] = ClusterOpt,
    key: Optional[Path] = KeyOpt,
) -> None:
    """Register model NAME from SOURCE (under the topology's models_roots or repositories) with the running cluster."""
    from sllm_actors.client import ClusterUnavailable, RequestError

    client = _client(cluster, key)
    try:
        out.print(client.deploy(name, source))
    except (RequestError, ClusterUnavailable) as exc:
        _fail(str(exc), 1)
    finally:
        client.close()


@app.command()
def migrate(
    request_id: str,
    to: str = typer.Option(..., "--to", help="destination NODE or NODE/gpu-N"),
    cluster: Optional[str] = ClusterOpt,
    key: Optional[Path] = KeyOpt,
) -> None:
    """Live-migrate a running request to another GPU."""
    from sllm_actors.client import ClusterUnavailable, RequestError

    client = _client(cluster, key)
    try:
        out.print(client.migrate(request_id, to))
    except (RequestError, ClusterUnavailable) as exc:
        _fail(str(exc), 1)
    finally:
        client.close()


def _node_command(call: str, target: str, cluster: Optional[str], key: Optional[Path]) -> None:
    from sllm_actors.client import ClusterUnavailable, RequestError

    client = _client(cluster, key)
    try:
        out.print(getattr(client, call)(target), highlight=False)
    except (RequestError, ClusterUnavailable) as exc:
        _fail(str(exc), 1)
    finally:
        client.close()


@app.command()
def cordon(node_name: str, cluster: Optional[str] = ClusterOpt, key: Optional[Path] = KeyOpt) -> None:
    """Take a node out of placement: no new requests or instances there; what runs there goes on."""
    _node_command("cordon", node_name, cluster, key)


@app.command()
def uncordon(node_name: str, cluster: Optional[str] = ClusterOpt, key: Optional[Path] = KeyOpt) -> None:
    """Let a cordoned or drained node take work again."""
    _node_command("uncordon", node_name, cluster, key)


@app.command()
def drain(node_name: str, cluster: Optional[str] = ClusterOpt, key: Optional[Path] = KeyOpt) -> None:
    """Cordon a node, move its running requests elsewhere (or let them finish), then unload its instances."""
    _node_command("drain", node_name, cluster, key)


@breaker_app.command("reset")
def breaker_reset(target: str = typer.Argument(..., metavar="NODE[/gpu-N]|MODEL"), cluster: Optional[str] = ClusterOpt,
                  key: Optional[Path] = KeyOpt) -> None:
    """Close a node's (or one GPU's) load breakers and clear its unhealthy marks: it takes loads again. MODEL: a
    model held off everywhere (its loads failed on several GPUs) loads again."""
    _node_command("breaker_reset", target, cluster, key)


@app.command("kill-node")
def kill_node(node_name: str, cluster: Optional[str] = ClusterOpt, key: Optional[Path] = KeyOpt) -> None:
    """SIGKILL a local node process (to watch the cluster recover)."""
    from sllm_actors.client import ClusterUnavailable, RequestError

    client = _client(cluster, key)
    try:
        out.print(client.kill_node(node_name))
    except (RequestError, ClusterUnavailable) as exc:
        _fail(str(exc), 1)
    finally:
        client.close()


@app.command()
def prepare() -> None:
    """Fetch and convert the default model (SmolLM2-135M-Instruct) into the local cache."""
    from sllm_actors.models import ModelSourceError, prepare_default_model

    try:
        path = prepare_default_model(say=lambda text: console.print(text))
    except ModelSourceError as exc:
        _fail(str(exc))
    out.print(f"default model ready at {path}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def simulate(ctx: typer.Context) -> None:
    """Compare the placement policies on a simulated cluster (discrete events; `sllm simulate --help`)."""
    from sllm_eval.simulator import main as simulate_main

    raise typer.Exit(simulate_main(ctx.args))


bench_app = typer.Typer(no_args_is_help=True, help="Workloads against a running or fresh cluster.")
app.add_typer(bench_app, name="bench")


@bench_app.command("replay", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                                "help_option_names": []})
def bench_replay(ctx: typer.Context) -> None:
    """Replay a Gamma or Azure-trace workload per policy and compare latency (`sllm bench replay --help`)."""
    from sllm_eval.replay import main as replay_main

    raise typer.Exit(replay_main(ctx.args))


@keys_app.command("init")
def keys_init(topology: Optional[Path] = typer.Argument(None, help="the cluster's topology.yaml (default: "
                                                         "./topology.yaml): one key per node it names")) -> None:
    """Write the cluster's keys: the controller's, the operator's and one per node (existing ones are kept)."""
    from sllm_actors.runtime.security import KeyProblem, init_keys, keys_dir
    from sllm_actors.runtime.topology import TopologyError, load_topology

    path = topology or Path("topology.yaml")
    nodes: list[str] = []
    if topology is not None or path.is_file():
        try:
            nodes = [n.name for n in load_topology(path).nodes]
        except TopologyError as exc:
            _fail(str(exc))
    try:
        written = init_keys(keys_dir(), nodes)
    except KeyProblem as exc:
        _fail(str(exc))
    for f in written:
        print(f)
    out.print(f"{len(written)} key file(s) written under {keys_dir()} (mode 0600)" if written
              else f"every key is there already under {keys_dir()}")


@keys_app.command("etcd")
def keys_etcd(topology: Path = typer.Argument(..., help="the cluster's topology.yaml, with an etcd: section")) -> None:
    """Turn authentication on in a fresh etcd with the cluster's user: root, its password derived from the
    controller's key (every controller of the cluster holds that key; run once, on any of their hosts)."""
    from sllm_actors.runtime.etcd import EtcdError, derive_password, enable_auth
    from sllm_actors.runtime.security import KeyProblem, KeyRing, keys_dir
    from sllm_actors.runtime.topology import TopologyError, load_topology

    try:
        topo = load_topology(topology)
        ring = KeyRing(keys_dir())
    except (TopologyError, KeyProblem) as exc:
        _fail(str(exc))
    if topo.etcd is None:
        _fail(f"{topology} has no etcd: section")
    try:
        made = enable_auth(list(topo.etcd.endpoints), derive_password(ring.server_secret), topo.etcd.ca_file)
    except EtcdError as exc:
        _fail(str(exc))
    out.print("etcd: authentication on, user root with the cluster's password" if made
              else "etcd: authentication was on already (the controllers say if the password is not the cluster's)")


@keys_app.command("add-client")
def keys_add_client(name: str) -> None:
    """Make client NAME's key; give them the printed file (`--key FILE`, or save it as keys/client.key_secret)."""
    from sllm_actors.runtime.security import CLIENT, KeyProblem, add_key, keys_dir

    try:
        print(add_key(keys_dir(), CLIENT, name))  # plain: scripts read the path, rich would wrap it
    except KeyProblem as exc:
        _fail(str(exc))


@keys_app.command("add-node")
def keys_add_node(name: str) -> None:
    """Make node NAME's key; copy the printed file to its host (`sllm node --join ... --key FILE`)."""
    from sllm_actors.runtime.security import NODE, KeyProblem, add_key, keys_dir

    try:
        print(add_key(keys_dir(), NODE, name))
    except KeyProblem as exc:
        _fail(str(exc))


@keys_app.command("add-api-key")
def keys_add_api_key(name: str, role: str = typer.Option("client", "--role", help="client or operator")) -> None:
    """Make an HTTP API key for NAME (printed once; only its hash is kept). Remove its line from keys/api_keys
    to revoke it; the HTTP front end reads that file on every request."""
    from sllm_actors.runtime.security import KeyProblem, add_api_key, keys_dir

    try:
        print(add_api_key(keys_dir(), role, name))
    except KeyProblem as exc:
        _fail(str(exc))


@keys_app.command("revoke")
def keys_revoke(name: str) -> None:
    """Delete client or node NAME's key: a running controller refuses it from its next frame (no restart)."""
    from sllm_actors.runtime.security import KeyProblem, keys_dir, revoke_key

    try:
        for f in revoke_key(keys_dir(), name):
            print(f"removed {f}")
    except KeyProblem as exc:
        _fail(str(exc))


@store_app.command("convert")
def store_convert(src: Path, dest: Path) -> None:
    """Convert SRC (HF directory, .gguf, or sllm-store directory) into our checkpoint format at DEST."""
    from sllm_actors.storage import CheckpointError
    from sllm_actors.storage.convert import convert_cli

    try:
        convert_cli(str(src), str(dest))
    except (CheckpointError, ValueError, OSError) as exc:
        _fail(str(exc))


@store_app.command("bench")
def store_bench(
    device: str = typer.Option("cpu", "--device"),
    size: float = typer.Option(1.0, "--size", help="checkpoint size in GB"),
    as_json: Optional[Path] = typer.Option(None, "--json", help="write the figures to this file"),
) -> None:
    """Loader bandwidth against the hardware ceilings and the usual baselines, in one run."""
    from sllm_eval.storage_bench import run_bench

    run_bench(device, size, str(as_json) if as_json else None)


if __name__ == "__main__":
    app()
