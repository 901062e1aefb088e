"""A cluster across three hosts on this machine, to poke at by hand: the controller and two nodes, each in a
network namespace of its own with its own address, home (``$SLLM_HOME``), key and mount namespace, CURVE on
every link, joined the README's way (``sllm keys init``, the node's key file copied to its host, ``sllm node
--join``). Prints how to reach it, then runs until Ctrl-C (or SIGTERM) and removes every process, namespace and
link it made.

    sudo .venv/bin/python demo/hosts.py            # needs root (network namespaces) and iproute2
    sudo .venv/bin/python demo/hosts.py --smoke    # bring it up, stream one answer, tear it down
    sudo .venv/bin/python demo/hosts.py --delay-ms 20 --loss 1    # every link delayed and lossy (needs nftables)

The models are tiny random-weight ones made before the hosts start (``sllm_eval.tiny_models``), in a
repository directory every host reads (read-only). Faults to try while it runs are printed with the rest.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sllm_actors.client import Completion, TokenEvent
from sllm_eval.hosts import (
    HostCluster,
    Hosts,
    faults_unavailable_reason,
    start_cluster,
    sweep_stale,
    unavailable_reason,
)
from sllm_eval.tiny_models import make_tiny_model

NODES = ("node-a", "node-b")


def _explain(cluster: HostCluster) -> None:
    sllm = f"{shlex.quote(sys.executable)} {REPO / 'cli.py'}"
    key = f"--cluster {cluster.client_endpoint} --key {cluster.operator_key}"
    print("\nhosts (network namespace, address, home):")
    for host in [cluster.controller, *cluster.nodes.values()]:
        role = "controller" if host is cluster.controller else "node"
        print(f"  {host.name:<11} {role:<10} {host.netns:<26} {host.address:<14} {host.home}")
    print(f"  {'(this one)':<11} {'clients':<10} {'(root namespace)':<26} {cluster.hosts.gateway:<14} "
          f"{cluster.operator_key.parent}")
    print("\nreach it from here:")
    print(f"  {sllm} generate slow 'Once upon a time' --max-tokens 64 {key}")
    print(f"  {sllm} status {key}")
    print(f"  {sllm} tui {key}")
    print(f"  {sllm} migrate REQUEST_ID --to node-b {key}")
    if cluster.http_endpoint:
        print(f"  curl -s {cluster.http_endpoint}/v1/models    # the HTTP API (no API key set)")
    a = cluster.nodes[NODES[0]]
    print("\nfaults (as root, while a stream runs):")
    print(f"  ip link set {a.veth} down; sleep 8; ip link set {a.veth} up    # cut {a.name} off, then heal")
    print(f"  tc qdisc replace dev {a.veth} root tbf rate 100mbit burst 32kbit latency 400ms    # a slow link")
    print(f"  kill -9 $(ip netns pids {a.netns})    # the whole host stops")
    if a.relay is not None:
        print(f"  ip netns exec {a.netns} nft list table ip sllm_faults    # {a.name}'s loss rule and its count "
              f"(demo/hosts.py --delay-ms/--loss set them)")
    print(f"  ip netns exec {a.netns} ss -tn    # {a.name}'s connections: only to {cluster.controller.address}")
    print(f"\nlogs: {cluster.controller.home}/controller.log, "
          + ", ".join(f"{h.home}/{h.name}.log" for h in cluster.nodes.values()))


def _smoke(cluster: HostCluster) -> int:
    with cluster.client() as client:
        for event in client.generate("slow", "Once upon a time", max_tokens=48):
            if isinstance(event, TokenEvent):
                print(event.text, end="", flush=True)
            elif isinstance(event, Completion):
                where = next((i["node"] for i in cluster.status()["instances"]), "?")
                print(f"\n{len(event.token_ids)} tokens from {where}, first after {event.ttft_s:.2f}s")
                return 0 if event.token_ids else 1
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, help="where the hosts' homes and the repository go (default: a "
                        "new temporary directory)")
    parser.add_argument("--http-port", type=int, default=8000, help="the controller host's HTTP API (0: off)")
    parser.add_argument("--smoke", action="store_true", help="stream one answer, then tear down")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay on every link, each way (a TCP relay)")
    parser.add_argument("--loss", type=float, default=0.0, help="percent of packets dropped on every link, each way")
    args = parser.parse_args(argv)
    faults = bool(args.delay_ms or args.loss)
    reason = faults_unavailable_reason() if faults else unavailable_reason()
    if reason:
        print(f"cannot make hosts here: {reason}", file=sys.stderr)
        return 2
    for name in sweep_stale():
        print(f"removed {name}, left by a run that is gone")
    root = args.root or Path(tempfile.mkdtemp(prefix="sllm-hosts-"))
    repository = root / "repository"
    if not (repository / "slow").is_dir():  # before any host starts: no host downloads or builds anything
        print(f"making the model in {repository} ...")
        make_tiny_model(repository / "slow", arch="llama", seed=7, hidden_size=384, layers=6)
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with Hosts(root, ["controller", *NODES], shared=[repository], faults=faults) as hosts:
        print(f"hosts on {hosts.subnet}.0/24 (bridge {hosts.bridge}); starting the cluster ...")
        if faults:
            for host in hosts.hosts.values():
                host.delay(args.delay_ms)
                host.loss(args.loss)
            print(f"every link: {args.delay_ms:g} ms each way, {args.loss:g} % of packets dropped each way")
        cluster = start_cluster(hosts, {"slow": repository / "slow"}, nodes=NODES, http_port=args.http_port)
        code = 0
        try:
            if args.smoke:
                code = _smoke(cluster)
            else:
                _explain(cluster)
                print("\nrunning; Ctrl-C stops the cluster and removes the hosts", flush=True)
                while not stop.wait(0.5):
                    pass
        finally:
            print("stopping ...")
            cluster.stop()
    print("stopped; every namespace, link and process removed")
    return code


if __name__ == "__main__":
    sys.exit(main())
