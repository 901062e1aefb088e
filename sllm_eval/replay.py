"""Replay a workload against a running cluster and compare placement policies on it.

    sllm bench replay --policy all                       # every policy, its own cluster each, same workload
    sllm bench replay --policy serverlessllm,random,rayserve,rayserve-cache,kserve --seeds 0,1,2   # paired
    sllm bench replay --policy serverlessllm --cluster tcp://127.0.0.1:7700   # against a running cluster

Besides the placement policies, ``--policy`` takes the paper's baselines (``BASELINES``: Ray Serve, Ray Serve with
a local cache, KServe), each a placement policy plus a node load mode (``scheduler.load_mode``); they read the
family as safetensors (:func:`export_safetensors`). ``--seeds`` replays each seed's workload under every policy,
and the report pairs them by seed (``sllm_eval.stats.paired_comparison``).

Four parts:

* :func:`make_model_family`: random-weight variants of the default model's architecture (its vocabulary and
  tokenizer, hidden size and depth scaled) at about 50, 150, 400 and 1000 MB, written once in our
  checkpoint format and reused.
* :func:`replay`: sends each :class:`~sllm_eval.workload.Arrival` at its time from a pool of threads,
  one :class:`~sllm_actors.client.Client` per thread, and records per request the time to the first
  token event and to the completion (both from the scheduled arrival), the migrations the completion
  lists, and the error (code and message) of a refused or failed request. A subscriber on the cluster's
  state socket collects every event of the run (cold starts by tier, migrations, scheduling decisions
  with their estimates) and samples which GPUs are serving, for the GPU busy time.
* :func:`summarize` and :func:`plot`: the figures of one run, and latency against arrival time and a
  latency CDF with one line per policy.
* :func:`main`: ``sllm bench replay``: for each policy it writes a topology (the family on 2 nodes x 1
  ``cpu`` device sized so that about two models fit, DRAM and SSD tiers smaller than the family and
  repository and SSD reads held to stated bandwidths, so that where a model starts matters), starts a cluster,
  replays the same workload, stops the cluster, and prints the comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sllm_actors.runtime.security import keys_dir
from sllm_actors.runtime.topology import POLICIES
from sllm_eval.stats import REPLAY_POINTS, paired_comparison, stats

__all__ = [
    "BASELINES",
    "CHOICES",
    "REPOSITORY_BW_MB_S",
    "FamilyModel",
    "PromptMaker",
    "ReplayRecords",
    "RequestRecord",
    "cluster_mode",
    "export_safetensors",
    "family_shape",
    "main",
    "make_model_family",
    "merge_reports",
    "paired_report",
    "plot",
    "plot_paired",
    "print_table",
    "replay",
    "seed_ssd_tiers",
    "start_cluster",
    "stop_cluster",
    "summarize",
    "warm_up",
    "write_bench_topology",
]

REPO = Path(__file__).resolve().parent.parent

BASELINES: dict[str, str] = {"rayserve": "availability", "rayserve-cache": "availability", "kserve": "availability"}
"""The paper's baselines, as the replay runs them: each name is a node load mode (``scheduler.load_mode``, see
``actors/node/baseline_loader.py``) and runs under the placement policy it maps to (any GPU with room)."""
CHOICES = (*POLICIES, *BASELINES)
"""What ``--policy`` takes: our placement policies (loading through the storage tiers) and the baselines."""
REPOSITORY_BW_MB_S = 1250.0
"""The model repository's bandwidth, the same for every policy and baseline: a 10 Gbit/s link to an object store
(MB/s). Every download from it (our repository tier's fetch, a baseline's copy) is held to this rate."""
SSD_BW_MB_S = 2000.0
"""A node's local SSD read limit (MB/s): one NVMe drive's sequential read (a cap; a slower disk is its own limit)."""


def cluster_mode(name: str) -> tuple[str, str]:
    """The (placement policy, load mode) a ``--policy`` name runs: a baseline's policy and its own load mode, or
    one of our policies with our load path."""
    if name in BASELINES:
        return BASELINES[name], name
    return name, "serverlessllm"


DEFAULT_SIZES_MB = (50, 150, 400, 1000)
HIDDEN_CHOICES = (192, 384, 576, 768, 960, 1152, 1536, 2304)
"""Multiples of 3 x 64: heads of 64 dims, and key/value heads a third of them, as in SmolLM2."""

# ---------------------------------------------------------------------------------------------- model family


@dataclass(frozen=True)
class FamilyModel:
    name: str
    path: Path
    size_mb: int
    """The size asked for; ``bytes`` is what the checkpoint holds."""
    bytes: int
    hidden_size: int
    layers: int


def _llama_params(vocab: int, hidden: int, layers: int, intermediate: int, kv_heads: int, head_dim: int,
                  tied: bool) -> int:
    attn = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    mlp = 3 * hidden * intermediate
    per_layer = attn + mlp + 2 * hidden
    return vocab * hidden * (1 if tied else 2) + layers * per_layer + hidden


def family_shape(size_mb: float, base: dict[str, Any], bytes_per_param: int = 4) -> dict[str, int]:
    """hidden size, layers, intermediate size and heads that make a model of about ``size_mb`` MB."""
    vocab = int(base["vocab_size"])
    head_dim = int(base.get("head_dim") or base["hidden_size"] // base["num_attention_heads"])
    tied = bool(base.get("tie_word_embeddings", True))
    target = size_mb * 1e6 / bytes_per_param
    # Width grows with the square root of the size around the default model (576 wide, ~540 MB in fp32),
    # as in scaled model families; depth makes up the rest.
    ideal = float(base["hidden_size"]) * math.sqrt(size_mb * 4 / bytes_per_param / 540.0)
    candidates = sorted(HIDDEN_CHOICES, key=lambda h: abs(h - ideal))
    for hidden in candidates:
        heads = hidden // head_dim
        kv = max(1, heads // 3)
        intermediate = round(hidden * 8 / 3 / 64) * 64
        fixed = _llama_params(vocab, hidden, 0, intermediate, kv, head_dim, tied)
        per_layer = _llama_params(vocab, hidden, 1, intermediate, kv, head_dim, tied) - fixed
        layers = round((target - fixed) / per_layer)
        if layers >= 2:
            return {"hidden_size": hidden, "num_hidden_layers": layers, "intermediate_size": intermediate,
                    "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim}
    raise ValueError(f"{size_mb} MB is too small for a model with a {vocab}-token vocabulary")


def make_model_family(dest_dir: str | os.PathLike[str], sizes_mb: Sequence[float] = DEFAULT_SIZES_MB,
                      seed: int = 0, *, dtype: str = "float32", base_model: str | os.PathLike[str] | None = None,
                      say: Callable[[str], None] | None = None, init_device: str = "cpu",
                      safetensors_dir: str | os.PathLike[str] | None = None) -> list[FamilyModel]:
    """Random-weight variants of the default model's architecture, one per size, in our checkpoint format.

    Each keeps the default model's vocabulary and tokenizer files; hidden size, depth and MLP width are
    scaled to hit about ``size_mb`` MB in ``dtype``. A variant already written (same size, seed, dtype)
    is reused. Names are ``llama-<size>mb-s<seed>`` (the same size twice gets ``-b``, ``-c``...).

    ``init_device`` (e.g. ``cuda``) draws the random weights there: a family of many GB takes minutes to
    initialise on a CPU and seconds on a GPU (the weights then differ from a CPU-drawn family's, which only
    matters across machines). ``safetensors_dir`` also writes each new model there as :func:`export_safetensors`
    would, from the weights already in memory (the baselines' repository copy without reading ours back).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sllm_actors.models import default_model_dir
    from sllm_actors.storage import checkpoint_size, is_checkpoint, save_checkpoint

    say = say or (lambda text: None)
    base_dir = Path(base_model) if base_model else default_model_dir()
    if not (base_dir / "config.json").is_file():
        raise FileNotFoundError(f"{base_dir}: no config.json (run `sllm prepare` for the default model)")
    base = json.loads((base_dir / "config.json").read_text())
    torch_dtype = getattr(torch, dtype)
    bytes_per_param = torch.tensor([], dtype=torch_dtype).element_size()
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    out: list[FamilyModel] = []
    seen: Counter[str] = Counter()
    for i, size in enumerate(sizes_mb):
        stem = f"llama-{int(size)}mb-s{seed}" + ("" if dtype == "float32" else f"-{dtype}")
        seen[stem] += 1
        name = stem if seen[stem] == 1 else f"{stem}-{chr(ord('a') + seen[stem] - 1)}"
        path = dest / name
        shape = family_shape(size, base, bytes_per_param)
        if not is_checkpoint(path):
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(base_dir)
            say(f"writing {name} ({shape['hidden_size']} wide, {shape['num_hidden_layers']} layers) to {path}")
            fields = {k: v for k, v in base.items() if not k.startswith("_") and k not in ("architectures",
                                                                                            "transformers_version")}
            config = LlamaConfig(**{**fields, **shape})
            config.architectures = ["LlamaForCausalLM"]
            torch.manual_seed(seed * 1000 + i)
            with torch.device(init_device):
                model = LlamaForCausalLM(config).to(torch_dtype)
            model = model.to("cpu").eval()
            if path.exists():
                shutil.rmtree(path)  # a partial leftover without an index
            save_checkpoint(model, path, tokenizer=tokenizer)
            if safetensors_dir is not None:
                _write_safetensors(model, Path(path), Path(safetensors_dir).expanduser() / name)
            del model
        out.append(FamilyModel(name, path, int(size), checkpoint_size(path), shape["hidden_size"],
                               shape["num_hidden_layers"]))
    return out


def export_safetensors(models: Sequence[FamilyModel], dest_dir: str | os.PathLike[str], *,
                       say: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Each model as transformers' ``save_pretrained`` writes it (``model.safetensors``, config, generation config,
    tokenizer files): what the baselines' model repository holds, the same weights as our format's copy.
    Written once under ``dest_dir/<name>`` (renamed into place when whole) and reused."""
    from sllm_actors.storage import load_model

    say = say or (lambda text: None)
    out: dict[str, Path] = {}
    for m in models:
        path = Path(dest_dir).expanduser() / m.name
        if not any(path.glob("*.safetensors")):
            say(f"writing {m.name} as safetensors to {path}")
            model = load_model(m.path, "cpu")
            for param in model.parameters():  # tied weights are one parameter: cloned once, still tied
                # Our loader's tensors are views of one allocation; safetensors refuses shared storage.
                param.data = param.data.clone()
            _write_safetensors(model, Path(m.path), path)
            del model
        out[m.name] = path
    return out


def _write_safetensors(model: Any, ours: Path, path: Path) -> None:
    """``model`` as ``save_pretrained`` writes it, plus the tokenizer files of our copy ``ours``, renamed into
    ``path`` when whole."""
    from sllm_actors.storage.format import TOKENIZER_FILES

    partial = path.with_name(f"{path.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (ours / name).is_file():
            shutil.copy2(ours / name, partial / name)
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)


# ---------------------------------------------------------------------------------------------- prompts

_TEXT = (
    "the model starts on demand and loads its checkpoint from the fastest tier that holds it while a request "
    "streams tokens to its client and another inference migrates by sending its tokens so the destination "
    "recomputes the cache servers share few accelerators among many models a scheduler estimates how long "
    "each start takes and picks the server where it finishes first people ask about cities rivers history "
    "science music food travel weather sports books films games code maths stars oceans forests mountains"
)
_WORDS = _TEXT.split()


class PromptMaker:
    """Prompts of about ``n`` tokens: a deterministic word sequence, cut to ``n`` tokens if a tokenizer is given."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[tuple[int, int], str] = {}

    def __call__(self, n: int, salt: int = 0) -> str:
        n = max(1, int(n))
        key = (n, salt % 97)
        if key in self._cache:
            return self._cache[key]
        words = [_WORDS[(salt * 7 + i * 13) % len(_WORDS)] for i in range(n + 8)]
        text = " ".join(words)
        if self.tokenizer is not None:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            text = self.tokenizer.decode(ids[:n])
        else:
            text = " ".join(words[:n])
        self._cache[key] = text
        return text


# ---------------------------------------------------------------------------------------------- replay


@dataclass
class RequestRecord:
    index: int
    model: str
    arrival_s: float
    """Scheduled arrival, seconds from the start of the run; ttft and latency count from here."""
    prompt_tokens: int
    output_tokens: int
    request_id: str = ""
    send_delay_s: float = 0.0
    """How late the request left the client (a full thread pool delays it)."""
    ttft_s: float | None = None
    """Scheduled arrival to the first token event at the client."""
    latency_s: float | None = None
    """Scheduled arrival to the completion (or to the error)."""
    server_ttft_s: float | None = None
    tokens: int = 0
    prompt_tokens_seen: int = 0
    finish_reason: str = ""
    migrations: list[dict[str, Any]] = field(default_factory=list)
    error_code: str = ""
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return not self.error_code and self.latency_s is not None


class ReplayRecords(list[RequestRecord]):
    """The records of one run, with what the cluster said during it."""

    events: list[dict[str, Any]]
    busy_s: dict[str, float]
    """GPU -> seconds during which an instance on it served at least one request (from state snapshots)."""
    loading_s: dict[str, float]
    duration_s: float
    label: str

    def __init__(self, records: Iterable[RequestRecord] = ()) -> None:
        super().__init__(records)
        self.events, self.busy_s, self.loading_s, self.duration_s, self.label = [], {}, {}, 0.0, ""


class _Watcher:
    """Events and GPU occupancy of the run, from the controller's state PUB socket.

    Events are also merged from the final ``status()`` (the feed deduplicates), in case the subscriber
    missed some; snapshots come every half second, so busy times are accurate to about that.
    """

    def __init__(self, state_endpoint: str) -> None:
        from sllm_actors.feed import ClusterFeed

        self.feed = ClusterFeed(state_endpoint)
        self.events: list[dict[str, Any]] = []
        self.samples: list[tuple[float, set[str], set[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay-watcher", daemon=True)

    def start(self) -> None:
        self.feed.start()
        self._thread.start()

    def _take(self) -> None:
        update = self.feed.take()
        for e in update.events:
            self.events.append({"time": e.time, "kind": e.kind, "text": e.text, "data": dict(e.data)})
        st = update.status
        if st is not None:
            busy: set[str] = set()
            loading: set[str] = set()
            for inst in st.get("instances", []):
                where = f"{inst.get('node')}/gpu-{inst.get('gpu')}"
                if inst.get("requests"):
                    busy.add(where)
                elif inst.get("state") == "loading":
                    loading.add(where)
            self.samples.append((float(st.get("time", time.time())), busy, loading))

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._take()

    def offer_status(self, status: dict[str, Any]) -> None:
        self.feed.offer_status(status)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._take()
        self.feed.stop()

    def occupancy(self, since: float) -> tuple[dict[str, float], dict[str, float]]:
        busy: dict[str, float] = defaultdict(float)
        loading: dict[str, float] = defaultdict(float)
        samples = sorted((s for s in self.samples if s[0] >= since), key=lambda s: s[0])
        for (t, b, ld), (t2, _, _) in itertools.pairwise(samples):
            dt = min(t2 - t, 2.0)  # a gap in the feed is not evidence of work
            for g in b:
                busy[g] += dt
            for g in ld:
                loading[g] += dt
        return dict(busy), dict(loading)


def replay(endpoint: str, workload: Sequence[Any], *, concurrency_limit: int = 32, timeout_s: float = 300.0,
           prompt_maker: Callable[[int, int], str] | None = None, temperature: float = 0.0,
           say: Callable[[str], None] | None = None, label: str = "") -> ReplayRecords:
    """Send each arrival (``time_s``, ``model``, ``prompt_tokens``, ``output_tokens``) at its time.

    ``concurrency_limit`` threads, each with its own Client, send the requests; a request that finds
    every thread busy leaves late (``send_delay_s``) and its latency still counts from its scheduled
    arrival. A request that takes longer than ``timeout_s`` from its arrival is cancelled and recorded
    with error code ``timeout``. Returns the records in arrival order, with the run's events and GPU busy
    times attached (see :class:`ReplayRecords`).
    """
    from sllm_actors.client import Client, ClusterUnavailable, Completion, RequestError, TokenEvent
    from sllm_actors.feed import reachable_state_endpoint

    say = say or (lambda text: None)
    make_prompt = prompt_maker or PromptMaker()
    arrivals = sorted(workload, key=lambda a: a.time_s)
    records = [RequestRecord(i, a.model, float(a.time_s), int(a.prompt_tokens), int(a.output_tokens))
               for i, a in enumerate(arrivals)]
    prompts = [make_prompt(r.prompt_tokens, r.index) for r in records]

    with Client(endpoint) as probe:
        probe.status()  # connects: fails fast with ClusterUnavailable if nobody answers
        state_endpoint = reachable_state_endpoint(probe.state_endpoint, endpoint)
    watcher = _Watcher(state_endpoint)
    watcher.start()

    local = threading.local()
    clients: list[Any] = []
    clients_lock = threading.Lock()
    done_count = [0]

    def client() -> Any:
        c = getattr(local, "client", None)
        if c is None:
            c = Client(endpoint, idle_timeout=timeout_s)
            local.client = c
            with clients_lock:
                clients.append(c)
        return c

    t0 = time.monotonic()

    def run_one(rec: RequestRecord, prompt: str) -> None:
        start = time.monotonic()
        rec.send_delay_s = max(0.0, start - t0 - rec.arrival_s)
        arrival_abs = t0 + rec.arrival_s
        try:
            stream = client().generate(rec.model, prompt, max_tokens=rec.output_tokens, temperature=temperature)
            try:
                for event in stream:
                    now = time.monotonic()
                    if isinstance(event, TokenEvent):
                        rec.request_id = event.request_id
                        if rec.ttft_s is None:
                            rec.ttft_s = now - arrival_abs
                    elif isinstance(event, Completion):
                        rec.request_id = event.request_id
                        rec.latency_s = now - arrival_abs
                        if rec.ttft_s is None:
                            rec.ttft_s = rec.latency_s
                        rec.server_ttft_s = event.ttft_s
                        rec.tokens = len(event.token_ids)
                        rec.prompt_tokens_seen = event.prompt_tokens
                        rec.finish_reason = event.finish_reason
                        rec.migrations = list(event.migrations)
                    if now - arrival_abs > timeout_s and rec.latency_s is None:
                        rec.error_code, rec.error_message = "timeout", f"no completion within {timeout_s:.0f}s"
                        break
            finally:
                stream.close()  # an abandoned stream cancels its request
        except RequestError as exc:
            rec.request_id = rec.request_id or exc.request_id
            rec.error_code, rec.error_message = exc.code, exc.message
        except ClusterUnavailable as exc:
            rec.error_code, rec.error_message = "unavailable", str(exc)
            local.client = None  # closed by the Client on silence; the next request connects again
        if rec.error_code:
            rec.latency_s = time.monotonic() - arrival_abs
        with clients_lock:
            done_count[0] += 1

    pool = ThreadPoolExecutor(max_workers=max(1, concurrency_limit), thread_name_prefix="replay")
    futures = []
    interrupted = False
    t0_wall = time.time()
    t0 = time.monotonic()
    last_say = t0
    try:
        for rec, prompt in zip(records, prompts):
            delay = t0 + rec.arrival_s - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # the workload's clock: each request leaves at its arrival time
            futures.append(pool.submit(run_one, rec, prompt))
            if time.monotonic() - last_say > 15:
                last_say = time.monotonic()
                say(f"  {label} t={time.monotonic() - t0:5.0f}s sent {len(futures)}/{len(records)}, "
                    f"done {done_count[0]}")
        for f in futures:
            f.result()
    except BaseException:
        # Interrupted (Ctrl-C): leave the in-flight requests to their threads instead of waiting them out.
        interrupted = True
        watcher.stop()
        raise
    finally:
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        if not interrupted:
            with clients_lock:
                for c in clients:
                    c.close()
    duration = time.monotonic() - t0
    try:
        with Client(endpoint) as c:
            watcher.offer_status(c.status())
    except (ClusterUnavailable, RequestError) as exc:
        say(f"  (final status unavailable: {exc})")
    watcher.stop()
    out = ReplayRecords(records)
    out.events = sorted((e for e in watcher.events if e["time"] >= t0_wall - 0.5), key=lambda e: e["time"])
    out.busy_s, out.loading_s = watcher.occupancy(t0_wall - 0.5)
    out.duration_s = duration
    out.label = label
    return out


# ---------------------------------------------------------------------------------------------- summary


def _estimates(events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The scheduler's start-up estimates against the measured starts (its ``estimate`` events), by tier."""
    pairs: list[tuple[str, float, float]] = []
    for e in events:
        data = e.get("data") or {}
        if e["kind"] == "estimate" and isinstance(data.get("estimate_s"), (int, float)) \
                and isinstance(data.get("measured_s"), (int, float)):
            pairs.append((str(data.get("tier") or "?"), float(data["estimate_s"]), float(data["measured_s"])))
    if not pairs:
        return None

    def agg(items: list[tuple[str, float, float]]) -> dict[str, float]:
        return {
            "count": len(items),
            "mean_estimate_s": sum(e for _, e, _ in items) / len(items),
            "mean_measured_s": sum(m for _, _, m in items) / len(items),
            "mean_abs_error_s": sum(abs(m - e) for _, e, m in items) / len(items),
            "mean_rel_error": sum((e - m) / m for _, e, m in items if m > 0) / len(items),
        }

    tiers = sorted({t for t, _, _ in pairs})
    return {**agg(pairs), "by_tier": {t: agg([p for p in pairs if p[0] == t]) for t in tiers}}


def summarize(records: Sequence[RequestRecord]) -> dict[str, Any]:
    """Latency and TTFT (mean/p50/p90/p99/max), errors, cold starts by tier, migrations, GPU busy time."""
    ok = [r for r in records if r.ok]
    events: list[dict[str, Any]] = list(getattr(records, "events", []) or [])
    errors = Counter(r.error_code for r in records if r.error_code)
    examples: dict[str, str] = {}
    for r in records:
        if r.error_code and r.error_code not in examples:
            examples[r.error_code] = r.error_message
    by_tier: dict[str, dict[str, float]] = {}
    for e in events:
        data = e.get("data") or {}
        if e["kind"] == "load":
            tier = str(data.get("tier") or "?")
            t = by_tier.setdefault(tier, {"count": 0, "total_s": 0.0})
            t["count"] += 1
            t["total_s"] += float(data.get("seconds") or 0.0)
    for t in by_tier.values():
        t["mean_s"] = t["total_s"] / t["count"] if t["count"] else 0.0
    mig_events = [e for e in events if e["kind"] == "migrate"]
    outcomes = Counter()
    for e in mig_events:
        text = e["text"]
        if text.startswith("migration "):
            for word in ("done", "aborted", "failed"):
                if f" {word}" in text:
                    outcomes[word] += 1
                    break
    kinds = Counter(e["kind"] for e in events)
    duration = float(getattr(records, "duration_s", 0.0) or 0.0)
    busy: dict[str, float] = dict(getattr(records, "busy_s", {}) or {})
    loading: dict[str, float] = dict(getattr(records, "loading_s", {}) or {})
    tokens = sum(r.tokens for r in ok)
    return {
        "label": getattr(records, "label", ""),
        "requests": len(records),
        "completed": len(ok),
        "errors": dict(errors),
        "error_examples": examples,
        "latency_s": stats([r.latency_s for r in ok if r.latency_s is not None], REPLAY_POINTS),
        # Failed requests counted at their time to failure (a lower bound on what they would have taken).
        "latency_all_s": stats([r.latency_s for r in records if r.latency_s is not None], REPLAY_POINTS),
        "ttft_s": stats([r.ttft_s for r in ok if r.ttft_s is not None], REPLAY_POINTS),
        "server_ttft_s": stats([r.server_ttft_s for r in ok if r.server_ttft_s is not None], REPLAY_POINTS),
        "send_delay_max_s": max((r.send_delay_s for r in records), default=0.0),
        "tokens": tokens,
        "duration_s": duration,
        "tokens_per_s": tokens / duration if duration else None,
        "cold_starts": {"total": sum(int(t["count"]) for t in by_tier.values()), "by_tier": by_tier},
        "migrations": {
            "requests_migrated": sum(1 for r in ok if any(m.get("kind") == "migration" for m in r.migrations)),
            "records_by_kind": dict(Counter(str(m.get("kind")) for r in ok for m in r.migrations)),
            # Orders only: "migrate R A -> B (why)"; not "R migrated to ..." nor "migration M done ...".
            "ordered": sum(1 for e in mig_events if e["text"].startswith("migrate ")),
            "outcomes": dict(outcomes),
        },
        "decisions": dict(Counter(str((e.get("data") or {}).get("decision")) for e in events
                                  if e["kind"] == "schedule" and (e.get("data") or {}).get("decision"))),
        "preemptions": sum(1 for e in events if e["kind"] == "schedule"
                           and (e.get("data") or {}).get("decision") == "preempt"),
        "requests_restarted": sum(1 for r in ok if any(m.get("kind") == "restart" for m in r.migrations)),
        "unloads": kinds.get("unload", 0),
        "events_by_kind": dict(kinds),
        "estimator": _estimates(events),
        "gpu_busy_s": busy,
        "gpu_loading_s": loading,
        "gpu_busy_fraction": {g: s / duration for g, s in busy.items()} if duration else {},
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def comparison_rows(summaries: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["policy", "done/req", "errors", "lat p50", "lat p99", "p99 all", "lat mean", "ttft p50", "ttft p99",
              "cold starts (tier: n, mean s)", "migr.", "preempt", "busy s"]
    rows = []
    for policy, s in summaries.items():
        tiers = ", ".join(f"{t}: {int(v['count'])}, {v['mean_s']:.1f}s"
                          for t, v in sorted(s["cold_starts"]["by_tier"].items()))
        m = s["migrations"]
        rows.append([
            policy, f"{s['completed']}/{s['requests']}",
            ",".join(f"{k}:{v}" for k, v in s["errors"].items()) or "0",
            _fmt(s["latency_s"]["p50"]), _fmt(s["latency_s"]["p99"]), _fmt(s["latency_all_s"]["p99"]),
            _fmt(s["latency_s"]["mean"]),
            _fmt(s["ttft_s"]["p50"]), _fmt(s["ttft_s"]["p99"]),
            tiers or "-", f"{m['ordered']} ({m['requests_migrated']} req)",
            f"{s['preemptions']} ({s['requests_restarted']} req)",
            f"{sum(s['gpu_busy_s'].values()):.0f}",
        ])
    return header, rows


def print_table(summaries: dict[str, dict[str, Any]], file: Any = None) -> None:
    header, rows = comparison_rows(summaries)
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="replay: latencies in seconds from arrival")
        for col in header:
            table.add_column(col)
        for row in rows:
            table.add_row(*row)
        Console(file=file, width=200).print(table)
    except ImportError:  # rich is a dependency; plain text keeps this usable without it
        print("\t".join(header), file=file)
        for row in rows:
            print("\t".join(row), file=file)


def plot(results_by_policy: dict[str, Sequence[RequestRecord]], png_path: str | os.PathLike[str]) -> Path:
    """Latency against arrival time, the latency CDF and the TTFT CDF; one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for policy, records in results_by_policy.items():
        ok = sorted((r for r in records if r.ok), key=lambda r: r.arrival_s)
        bad = [r for r in records if not r.ok]
        label = policy + (f" ({len(bad)} failed)" if bad else "")
        (line,) = axes[0].plot([r.arrival_s for r in ok], [r.latency_s for r in ok], marker=".", lw=0.8,
                               label=label)
        if bad:
            axes[0].scatter([r.arrival_s for r in bad], [r.latency_s or 0.0 for r in bad], marker="x",
                            color=line.get_color())
        for ax, values in ((axes[1], [r.latency_s for r in ok]), (axes[2], [r.ttft_s for r in ok])):
            xs = sorted(v for v in values if v is not None)
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=label, color=line.get_color())
    axes[0].set(xlabel="arrival time (s)", ylabel="latency (s)", title="latency by arrival (x: failed)")
    axes[1].set(xlabel="latency (s)", ylabel="fraction of requests", title="latency CDF", xscale="log")
    axes[2].set(xlabel="time to first token (s)", ylabel="fraction of requests", title="TTFT CDF", xscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save_figure(fig, png_path)


def plot_paired(results_by_seed: dict[Any, dict[str, Sequence[RequestRecord]]], paired: dict[str, Any] | None,
                png_path: str | os.PathLike[str]) -> Path:
    """Policies over several seeds: the latency and TTFT CDFs per policy (every seed's requests together; failed
    requests at their time to failure in the latency CDF) and each seed's p99 latency ratio over serverlessllm
    (above 1: serverlessllm is better on that seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    policies = list(dict.fromkeys(p for by_policy in results_by_seed.values() for p in by_policy))
    colors = {p: f"C{i % 10}" for i, p in enumerate(policies)}
    for policy in policies:
        recs = [r for by_policy in results_by_seed.values() for r in by_policy.get(policy, [])]
        for ax, values in ((axes[0], [r.latency_s for r in recs]), (axes[1], [r.ttft_s for r in recs if r.ok])):
            xs = sorted(v for v in values if v is not None)
            if xs:
                ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", color=colors[policy],
                        label=f"{policy} ({len(results_by_seed)} seeds, {len(xs)} req)")
    if paired is not None:
        seeds = paired["seeds"]
        for policy, metrics in paired["ratios"].items():
            per_seed = metrics.get("latency", {}).get("p99", {}).get("per_seed", {})
            xs = [i for i, s in enumerate(seeds) if per_seed.get(s) is not None]
            axes[2].plot(xs, [per_seed[seeds[i]] for i in xs], marker="o", color=colors.get(policy), label=policy)
        axes[2].axhline(1.0, color="k", lw=0.8)
        axes[2].set_xticks(range(len(seeds)), [str(s) for s in seeds])
    axes[0].set(xlabel="latency (s)", ylabel="fraction of requests", title="latency CDF, all seeds", xscale="log")
    axes[1].set(xlabel="time to first token (s)", ylabel="fraction of requests", title="TTFT CDF, all seeds",
                xscale="log")
    axes[2].set(xlabel="seed", ylabel="p99 latency / serverlessllm's", title="p99 latency ratio per seed",
                yscale="log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save_figure(fig, png_path)



def _save_figure(fig: Any, png_path: str | os.PathLike[str]) -> Path:
    """Lay the figure out, write it as a PNG (its folder made if missing) and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

# ---------------------------------------------------------------------------------------------- clusters


@dataclass
class LocalCluster:
    proc: subprocess.Popen[str]
    endpoint: str
    topology: Path
    log_path: Path


def write_bench_topology(path: Path, models: Sequence[FamilyModel], *, policy: str, keep_alive_s: float = 10.0,
                         nodes: int = 2, gpu_models: int = 2, dram_fraction: float = 0.6,
                         ssd_fraction: float = 0.8, repository_bw: float = 60e6, ssd_bw: float = 300e6,
                         threads: int = 1, target_concurrency: int = 2, max_instances: int | None = None,
                         queue_timeout_s: float = 120.0,
                         migration: bool = True, warmup_model: Path | None = None,
                         devices: Sequence[Sequence[str]] | None = None, load_mode: str = "serverlessllm",
                         sources: dict[str, Path] | None = None, gpu_bytes: int | None = None,
                         dram_bytes: int | None = None, ssd_bytes: int | None = None) -> Path:
    """``nodes`` nodes x 1 ``cpu`` device with room for the ``gpu_models`` largest models side by side.

    ``devices`` (one list per node, e.g. ``[["cuda:0"], ["cuda:1"]]``) replaces the ``cpu`` devices; each
    device keeps the same memory budget, so the contention for room is the same on a GPU machine.

    Each node's DRAM tier holds ``dram_fraction`` and its SSD tier ``ssd_fraction`` of the family (at
    least the largest model), and reads from the SSD and the repository are throttled: a start from the
    local DRAM tier is several times faster than one from the SSD, itself several times faster than one
    from the repository, so where a model starts decides how long it takes; and a node's tiers cannot keep
    the whole family, so which node served a model recently matters. ``max_instances`` (default: one per
    device) keeps a burst for one model from filling every device with copies of it. ``load_mode`` is the
    nodes' way of loading (a baseline's, ``BASELINES``), and ``sources`` (model -> directory) replaces the
    family's checkpoints as the repository's copies (a baseline's safetensors, from :func:`export_safetensors`).

    ``gpu_bytes`` (each device's memory budget), ``dram_bytes`` and ``ssd_bytes`` (each node's tiers) replace
    the sizes derived from the family: a sweep states them (e.g. GPUs that together hold a third of the family).
    """
    import yaml

    sizes = sorted((m.bytes for m in models), reverse=True)
    overhead = 1.15  # the scheduler's room for activations beside the weights
    gpu_bytes = gpu_bytes or int(overhead * sum(sizes[: max(1, gpu_models)]) * 1.02)
    total = sum(sizes)
    dram = dram_bytes or max(int(total * dram_fraction), int(sizes[0] * 1.05))
    ssd = ssd_bytes or max(int(total * ssd_fraction), int(sizes[0] * 1.05))
    model_entries = [{"name": m.name, "source": str((sources or {}).get(m.name, m.path)), "keep_alive": f"{keep_alive_s}s",
                      "target_concurrency": target_concurrency, "max_instances": max_instances or nodes}
                     for m in models]
    if warmup_model is not None:
        model_entries.append({"name": WARMUP_MODEL, "source": str(warmup_model), "keep_alive": "2s"})
    data = {
        "controller": {"host": "127.0.0.1", "client_port": 0, "cluster_port": 0, "state_port": 0, "http_port": 0},
        "nodes": [
            {
                "name": f"node-{i + 1}",
                "gpus": [{"device": dev, "memory": gpu_bytes} for dev in (devices[i] if devices else ["cpu"])],
                "threads": threads,
                "dram": {"capacity": dram},
                "ssd": {"path": str(path.parent / f"ssd-{i + 1}"), "capacity": ssd, "bandwidth": int(ssd_bw)},
                "repository": {"bandwidth": int(repository_bw)},
            }
            for i in range(nodes)
        ],
        "models": model_entries,
        "scheduler": {"policy": policy, "migration": migration, "queue_timeout": f"{queue_timeout_s}s",
                      "load_mode": load_mode},
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def seed_ssd_tiers(work: Path, models: Sequence[FamilyModel], *, nodes: int, replicas: int,
                   load_mode: str = "serverlessllm", sources: dict[str, Path] | None = None) -> dict[str, list[str]]:
    """Put each model's checkpoint on ``replicas`` nodes' SSD tiers before the cluster starts.

    A serverless platform keeps checkpoints on its servers' local SSDs, not only in a remote repository,
    so a request's best start is from some node's SSD and a placement that ignores where the copies are
    pays the repository's price. Model ``k`` (popularity order) goes to nodes ``k, k+1, ...`` (mod
    ``nodes``). Files are hard-linked from the family (copied where that fails): the SSD tier finds them
    at start as it finds what it stored before a restart. Returns model -> nodes holding it.

    ``rayserve-cache`` keeps its copies (safetensors, ``sources``) in a directory of its own beside the SSD
    tier's: they go there, the same models on the same nodes. The baselines without a cache keep nothing.
    """
    from sllm_actors.actors.node.baseline_loader import COMPLETE, baseline_dir

    placed: dict[str, list[str]] = {}
    if load_mode not in ("serverlessllm", "rayserve-cache"):
        return placed
    for k, model in enumerate(models):
        for r in range(min(replicas, nodes)):
            node = (k + r) % nodes
            origin = Path(model.path)
            dest = work / f"ssd-{node + 1}" / model.name
            if load_mode == "rayserve-cache":
                origin = Path((sources or {})[model.name])
                dest = baseline_dir(work / f"ssd-{node + 1}", load_mode) / model.name
            for src in origin.rglob("*"):
                target = dest / src.relative_to(origin)
                if src.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, target)
                except OSError:
                    shutil.copy2(src, target)
            if load_mode == "rayserve-cache":
                (dest / COMPLETE).touch()
            placed.setdefault(model.name, []).append(f"node-{node + 1}")
    return placed


def start_cluster(topology: Path, *, timeout: float = 180.0, env: dict[str, str] | None = None) -> LocalCluster:
    """``sllm up TOPOLOGY --headless`` in a process of its own; its output goes to a log beside the topology."""
    cli = REPO / "cli.py"
    cmd = [sys.executable, str(cli)] if cli.is_file() else [sys.executable, "-m", "cli"]
    log_path = topology.with_suffix(".log")
    proc = subprocess.Popen(
        [*cmd, "up", str(topology), "--headless"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=topology.parent, env={**os.environ, "SLLM_HOME": str(topology.parent / "home"), "SLLM_KEYS": str(keys_dir()),
             **(env or {})},  # the cluster's home moves; its keys stay where this process's clients look
    )
    ready: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        with open(log_path, "a") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if line.startswith("ready:"):
                    ready.put(line)

    threading.Thread(target=pump, name="replay-cluster-log", daemon=True).start()
    try:
        line = ready.get(timeout=timeout)
    except queue.Empty:
        proc.kill()
        proc.wait()
        tail = log_path.read_text()[-3000:] if log_path.exists() else ""
        raise RuntimeError(f"sllm up did not print ready within {timeout:.0f}s:\n{tail}") from None
    except BaseException:
        # Interrupted (Ctrl-C, a sweep's deadline) while it starts: the caller has no cluster to stop yet.
        stop_cluster(LocalCluster(proc, "", topology, log_path), timeout=15)
        raise
    words = line.split()
    return LocalCluster(proc, words[words.index("client") + 2], topology, log_path)


def stop_cluster(cluster: LocalCluster, timeout: float = 60.0) -> None:
    if cluster.proc.poll() is None:
        cluster.proc.send_signal(signal.SIGTERM)
        try:
            cluster.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            cluster.proc.kill()
            cluster.proc.wait()


WARMUP_MODEL = "warmup"


def make_warmup_model(dest_dir: str | os.PathLike[str]) -> Path:
    """A tiny llama (same architecture as the family) whose loads warm each node up before a replay."""
    from sllm_eval.tiny_models import make_tiny_model

    path = Path(dest_dir).expanduser() / "warmup-small-llama"
    if not (path / "config.json").is_file():
        # ~5 ms a token alone: 3500 tokens outlast a migration even on a busy machine.
        make_tiny_model(path, arch="llama", seed=123, hidden_size=256, layers=4)
    return path


def warm_up(endpoint: str, model: str = WARMUP_MODEL, *, max_tokens: int = 3500, timeout_s: float = 120.0,
            say: Callable[[str], None] | None = None) -> list[str]:
    """Load ``model`` once on every alive node, so that no replayed request pays a node's first load.

    A node process's first model load costs seconds more than later ones (code paths run for the first
    time, allocator growth); every policy would pay that on its first requests, which lands in the p99 of a
    short run. One long request for ``model`` starts on whatever node the policy picks, and is then
    migrated to each other node in turn (each migration loads the model there); then it is cancelled.
    Returns the nodes warmed; problems are reported through ``say`` and never raised.
    """
    from sllm_actors.client import Client, ClusterUnavailable, RequestError, TokenEvent

    say = say or (lambda text: None)
    warmed: list[str] = []
    deadline = time.monotonic() + timeout_s
    try:
        with Client(endpoint) as ctl, Client(endpoint, idle_timeout=timeout_s) as gen:
            nodes = [n["name"] for n in ctl.status()["nodes"] if n.get("alive")]
            for _attempt in range(3):
                missing = [n for n in nodes if n not in warmed]
                if not missing or time.monotonic() > deadline:
                    break
                stream = gen.generate(model, "warm up", max_tokens=max_tokens, temperature=0)
                try:
                    request_id = ""
                    for event in stream:
                        if isinstance(event, TokenEvent):
                            request_id = event.request_id
                            break
                    if not request_id:
                        say("  warm-up: the request ended before its first token")
                        continue
                    here = next((r["node"] for r in ctl.status()["requests"] if r["request_id"] == request_id), "")
                    if here and here not in warmed:
                        warmed.append(here)
                    for node in nodes:
                        if node in warmed or time.monotonic() > deadline:
                            continue
                        try:
                            ctl.migrate(request_id, node, timeout=max(1.0, deadline - time.monotonic()))
                            warmed.append(node)
                        except RequestError as exc:
                            say(f"  warm-up: migrating to {node} failed: {exc}")
                            break  # the request may be gone: start another
                finally:
                    stream.close()  # cancels the rest of the generation
    except (ClusterUnavailable, RequestError) as exc:
        say(f"  warm-up failed: {exc}")
    return warmed


# ---------------------------------------------------------------------------------------------- the bench


def build_workload(trace: str, *, models: Sequence[str], rps: float, cv: float, duration_s: float, seed: int,
                   prompt_range: tuple[int, int], output_range: tuple[int, int]) -> list[Any]:
    """The arrivals of ``trace``: ``gamma`` (per-model Gamma, ``cv``), or the Azure 2023 trace ``azure-conv`` /
    ``azure-code`` time-scaled to ``rps`` (its arrival shape kept). Azure lengths are scaled so that the
    trace's median lands in the middle of each range, then clipped to it (the length distribution's shape
    is kept as far as the range allows); gamma lengths are uniform in the ranges. ``models[0]`` is the
    most popular (Zipf, s = 1).
    """
    from sllm_eval import workload as wl

    if trace == "gamma":
        return wl.gamma_workload(list(models), rps=rps, cv=cv, duration_s=duration_s, seed=seed,
                                 prompt_tokens=prompt_range, output_tokens=output_range)
    if trace not in ("azure-conv", "azure-code"):
        raise ValueError(f"unknown trace {trace!r} (gamma, azure-conv or azure-code)")
    import numpy as np

    kind = trace.split("-", 1)[1]
    t, ctx, gen = wl.load_azure_trace(kind)
    trace_rps = (len(t) - 1) / float(t[-1]) if len(t) > 1 and t[-1] > 0 else 1.0
    raw = wl.azure_workload(kind, list(models), duration_s=duration_s, rps_scale=rps / trace_rps, seed=seed,
                            max_prompt=1 << 30, max_output=1 << 30)
    p_scale = (sum(prompt_range) / 2) / max(1.0, float(np.median(ctx)))
    o_scale = (sum(output_range) / 2) / max(1.0, float(np.median(gen)))

    def scaled(n: int, k: float, lo: int, hi: int) -> int:
        return int(min(max(round(n * k), lo), hi))

    return [wl.Arrival(a.time_s, a.model, scaled(a.prompt_tokens, p_scale, *prompt_range),
                       scaled(a.output_tokens, o_scale, *output_range)) for a in raw]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sllm bench replay", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--policy", default="all",
                   help=f"all (every placement policy: {', '.join(POLICIES)}), or a comma-separated list of those "
                        f"and the paper's baselines ({', '.join(BASELINES)})")
    p.add_argument("--trace", default="gamma", choices=("gamma", "azure-conv", "azure-code"))
    p.add_argument("--rps", type=float, default=0.4, help="mean requests per second, all models together")
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of inter-arrival times (gamma)")
    p.add_argument("--models", type=int, default=4, help="models in the family (sizes cycle 50,150,400,1000 MB)")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES_MB)), help="family sizes in MB")
    p.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals")
    p.add_argument("--seed", type=int, default=0, help="the model family's seed, and the workload's without --seeds")
    p.add_argument("--seeds", default=None,
                   help="comma-separated workload seeds: each seed's workload replays under every policy (paired), "
                        "and the report gives per-seed ratios over serverlessllm, their spread and wins")
    p.add_argument("--bootstrap", type=int, default=1000, help="resamples of a run's requests for its p99 interval")
    p.add_argument("--prompt-tokens", default="16,128", help="min,max prompt length")
    p.add_argument("--output-tokens", default="8,32", help="min,max generated tokens")
    p.add_argument("--concurrency", type=int, default=32, help="client threads")
    p.add_argument("--timeout", type=float, default=240.0, help="seconds after its arrival a request is given up")
    p.add_argument("--keep-alive", type=float, default=10.0, help="seconds an idle instance stays loaded")
    p.add_argument("--repository-bw", type=float, default=REPOSITORY_BW_MB_S,
                   help="the model repository's bandwidth, MB/s, for every policy and baseline alike "
                        "(default: a 10 Gbit/s link to an object store)")
    p.add_argument("--ssd-bw", type=float, default=SSD_BW_MB_S,
                   help="nodes' local SSD read limit, MB/s (default: one NVMe drive; our SSD tier and a baseline's "
                        "local copy alike)")
    p.add_argument("--target-concurrency", type=int, default=2, help="requests per instance before scaling out")
    p.add_argument("--max-instances", type=int, default=2, help="instances per model at most")
    p.add_argument("--no-warmup", action="store_true", help="skip loading a tiny model on every node first")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: node i's devices are the next CUDA devices in turn (wrapping if there are fewer)")
    p.add_argument("--nodes", type=int, default=2, help="nodes of the cluster started per policy")
    p.add_argument("--gpus-per-node", type=int, default=1, help="devices per node")
    p.add_argument("--gpu-memory", type=float, default=None,
                   help="each device's memory budget, MB (default: room for the two largest models side by side)")
    p.add_argument("--dram", type=float, default=None, help="each node's DRAM tier, MB (default: 60%% of the family)")
    p.add_argument("--ssd", type=float, default=None, help="each node's SSD tier, MB (default: 80%% of the family)")
    p.add_argument("--init-device", default="cpu",
                   help="where the family's random weights are drawn (cuda: seconds for a family of many GB)")
    p.add_argument("--prepare-only", action="store_true",
                   help="write the model family (and the baselines' safetensors copies) and exit: a sweep that runs "
                        "several replays side by side prepares it once first")
    p.add_argument("--ssd-seed", type=int, default=0,
                   help="copies of each checkpoint on nodes' SSD tiers at start (0: only the repository holds them)")
    p.add_argument("--family-dir", default=None, help="where the model family is cached ($SLLM_HOME/family)")
    p.add_argument("--work-dir", default=None, help="keep each cluster's topology, logs and tiers here")
    p.add_argument("--json", dest="json_out", default=None, help="write summaries and records here")
    p.add_argument("--png", dest="png_out", default=None, help="write the latency plot here")
    p.add_argument("--cluster", default=None, help="replay against this running cluster (tcp://HOST:PORT)")
    p.add_argument("--merge", default=None,
                   help="A.json,B.json,...: report replays run separately (same workload) as one, and run nothing")
    p.add_argument("--model-names", default=None,
                   help="with --cluster: comma-separated models to use (default: the cluster's own list)")
    args = p.parse_args(argv)
    chosen = [name for name in args.policy.split(",") if name]
    if args.policy != "all" and (not chosen or any(name not in CHOICES for name in chosen)):
        p.error(f"--policy: choose from {', '.join(CHOICES)} (several: comma-separated) or all")
    if args.cluster and (args.policy == "all" or len(chosen) > 1):
        p.error("--cluster runs one policy (the running cluster's); name it with --policy P")
    try:
        args.seed_list = [int(x) for x in (args.seeds or str(args.seed)).split(",") if x.strip()]
    except ValueError:
        p.error(f"--seeds: comma-separated integers, got {args.seeds!r}")
    if not args.seed_list or len(set(args.seed_list)) != len(args.seed_list):
        p.error(f"--seeds: distinct integers, got {args.seeds!r}")
    return args


def _devices(args: argparse.Namespace) -> list[list[str]]:
    if args.device == "cpu":
        return [["cpu"] * args.gpus_per_node for _ in range(args.nodes)]
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise SystemExit("--device cuda: torch sees no CUDA device here")
    return [[f"cuda:{(n * args.gpus_per_node + g) % count}" for g in range(args.gpus_per_node)]
            for n in range(args.nodes)]


def _mb(value: float | None) -> int | None:
    return None if value is None else int(value * 1e6)


def _range(text: str) -> tuple[int, int]:
    lo, _, hi = text.partition(",")
    a, b = int(lo), int(hi or lo)
    return min(a, b), max(a, b)


def _load_run_files(paths: Sequence[str | os.PathLike[str]]) -> tuple[dict[Any, dict[str, ReplayRecords]],
                                                                        dict[Any, dict[str, dict[str, Any]]],
                                                                        dict[str, Any]]:
    """(records, summaries) by seed and policy from replay JSON files, old (one seed, top-level ``records``) or
    new (``runs`` by seed); every policy of a seed must have replayed the same workload (checked)."""
    results: dict[Any, dict[str, ReplayRecords]] = {}
    summaries: dict[Any, dict[str, dict[str, Any]]] = {}
    references: dict[Any, list[tuple[Any, ...]]] = {}
    first: dict[str, Any] = {}
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
            if "runs" in data:
                runs = {_seed_key(k): v for k, v in data["runs"].items()}
            else:
                # One seed: the workload's (``seeds``); older files name only ``args.seed``.
                seeds = data.get("seeds") or [(data.get("args") or {}).get("seed")]
                runs = {_seed_key(seeds[0]): data}
            parts = {seed: (run["records"], run["summaries"], run.get("events", {})) for seed, run in runs.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: not a replay JSON ({type(exc).__name__}: {exc})") from None
        first = first or data
        for seed, (records_by_policy, summary_by_policy, events) in parts.items():
            for policy, recs in records_by_policy.items():
                rr = ReplayRecords(RequestRecord(**r) for r in recs)
                rr.events = events.get(policy, [])
                rr.label = policy
                shape = sorted((round(r.arrival_s, 3), r.model, r.prompt_tokens, r.output_tokens) for r in rr)
                reference = references.setdefault(seed, shape)
                if shape != reference:
                    raise ValueError(f"{path}: policy {policy} replayed another workload than the first file's"
                                     + (f" for seed {seed}" if seed is not None else ""))
                if policy in results.get(seed, {}):
                    raise ValueError(f"{path}: policy {policy} appears in two files"
                                     + (f" for seed {seed}" if seed is not None else ""))
                results.setdefault(seed, {})[policy] = rr
                summaries.setdefault(seed, {})[policy] = summary_by_policy[policy]
    return results, summaries, first


def _seed_key(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def merge_reports(paths: Sequence[str | os.PathLike[str]], *, json_out: str | None = None,
                  png_out: str | None = None, resamples: int = 1000) -> dict[str, Any]:
    """One report (tables, ratios, paired statistics, plot, JSON) from the JSON files of replays run separately.

    A per-call time limit can split a comparison over several runs (one seed or one policy set at a time);
    each seed's policies must have replayed the same workload (checked: the same arrivals, models and token
    counts), or the comparison means nothing.
    """
    results, summaries, first = _load_run_files(paths)
    payload = _report_payload(results, summaries, resamples=resamples, png_out=png_out)
    payload = {"args": first.get("args", {}), "merged_from": [str(p) for p in paths],
               "machine": first.get("machine", {}), "family": first.get("family", []),
               "setup": first.get("setup", {}), **payload}
    if json_out:
        Path(json_out).write_text(json.dumps(payload, indent=1, default=str))
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.merge:
        try:
            merge_reports([p for p in args.merge.split(",") if p], json_out=args.json_out, png_out=args.png_out,
                          resamples=args.bootstrap)
        except ValueError as exc:
            print(f"sllm bench replay --merge: {exc}", file=sys.stderr)
            return 2
        return 0

    def say(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    started = time.monotonic()
    # A sweep's deadline (`timeout`) sends SIGTERM: stop the cluster in hand as Ctrl-C does, keeping the JSON of
    # the policies already replayed (written after each one).
    signal.signal(signal.SIGTERM, _interrupt)
    policies = list(POLICIES) if args.policy == "all" else [p for p in args.policy.split(",") if p]
    prompt_range, output_range = _range(args.prompt_tokens), _range(args.output_tokens)
    tokenizer = None
    try:
        from sllm_actors.models import default_model_dir

        if (default_model_dir() / "tokenizer.json").is_file():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    except (ImportError, OSError, ValueError) as exc:
        say(f"(no tokenizer for exact prompt lengths: {exc})")
    prompts = PromptMaker(tokenizer)

    family: list[FamilyModel] = []
    warmup_path: Path | None = None
    hf_sources: dict[str, Path] = {}
    if args.cluster:
        from sllm_actors.client import Client

        if args.model_names:
            names = [n for n in args.model_names.split(",") if n]
        else:
            with Client(args.cluster) as c:
                names = [m["name"] for m in c.status().get("models", [])]
        if not names:
            say("the cluster lists no models; pass --model-names")
            return 2
    else:
        from sllm_actors.models import sllm_home

        sizes = [float(s) for s in args.sizes.split(",") if s]
        wanted = [sizes[i % len(sizes)] for i in range(args.models)]
        family_dir = Path(args.family_dir).expanduser() if args.family_dir else sllm_home() / "family"
        wants_hf = any(p in BASELINES for p in policies)
        family = make_model_family(family_dir, wanted, seed=args.seed, dtype=args.dtype, say=say,
                                   init_device=args.init_device,
                                   safetensors_dir=family_dir / "safetensors" if wants_hf else None)
        warmup_path = None if args.no_warmup else make_warmup_model(family_dir)
        names = [m.name for m in family]
        for m in family:
            say(f"model {m.name}: {m.bytes / 1e6:.0f} MB ({m.hidden_size} wide, {m.layers} layers)")
        if wants_hf:
            hf_sources = export_safetensors(family, family_dir / "safetensors", say=say)
        if args.prepare_only:
            say(f"family of {len(family)} models, {sum(m.bytes for m in family) / 1e9:.2f} GB, in {family_dir}")
            return 0

    results: dict[Any, dict[str, ReplayRecords]] = {}
    summaries: dict[Any, dict[str, dict[str, Any]]] = {}
    setup: dict[str, Any] = {"repository_bw_mb_s": args.repository_bw, "ssd_bw_mb_s": args.ssd_bw,
                             "policies": {p: dict(zip(("placement", "load_mode"), cluster_mode(p), strict=True))
                                          for p in policies}}
    try:
        for seed in args.seed_list:
            arrivals = build_workload(args.trace, models=names, rps=args.rps, cv=args.cv, duration_s=args.duration,
                                      seed=seed, prompt_range=prompt_range, output_range=output_range)
            per_model = Counter(a.model for a in arrivals)
            say(f"seed {seed}: workload {args.trace}: {len(arrivals)} requests over {args.duration:.0f}s "
                f"({', '.join(f'{m}: {n}' for m, n in per_model.most_common())})")
            results[seed], summaries[seed] = {}, {}
            _run_policies(args, policies, family, warmup_path, names, arrivals, prompts, results[seed],
                          summaries[seed], setup, say, seed=seed, hf_sources=hf_sources,
                          after_each=lambda: _write_partial(args, started, results, summaries, setup, family))
    except KeyboardInterrupt:
        # Each cluster started was stopped on the way out; requests still in flight hold threads that
        # would wait for their idle timeout, so leave without joining them.
        say("interrupted")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return _report(args, started, results, summaries, setup, family, say)


def _run_policies(args: argparse.Namespace, policies: list[str], family: list[FamilyModel], warmup_path: Path | None,
                  names: list[str], arrivals: list[Any], prompts: PromptMaker, results: dict[str, ReplayRecords],
                  summaries: dict[str, dict[str, Any]], setup: dict[str, Any], say: Callable[[str], None], *,
                  seed: int = 0, hf_sources: dict[str, Path] | None = None,
                  after_each: Callable[[], None] | None = None) -> None:
    several = len(args.seed_list) > 1
    for policy in policies:
        placement, load_mode = cluster_mode(policy)
        tag = f"{policy} seed {seed}" if several else policy
        t_policy = time.monotonic()
        load_before = os.getloadavg()[0]
        if args.cluster:
            say(f"[{tag}] replaying against {args.cluster}")
            records = replay(args.cluster, arrivals, concurrency_limit=args.concurrency, timeout_s=args.timeout,
                             prompt_maker=prompts, say=say, label=policy)
        else:
            run_name = f"{policy}-s{seed}" if several else policy
            base = Path(args.work_dir).expanduser() / run_name if args.work_dir else None
            if base is not None:
                if base.exists():
                    shutil.rmtree(base)
                base.mkdir(parents=True)
                work = base
            else:
                work = Path(tempfile.mkdtemp(prefix=f"sllm-replay-{run_name}-"))
            sources = hf_sources if load_mode != "serverlessllm" else None
            try:
                topo = write_bench_topology(
                    work / "topology.yaml", family, policy=placement, keep_alive_s=args.keep_alive,
                    repository_bw=args.repository_bw * 1e6, ssd_bw=args.ssd_bw * 1e6,
                    target_concurrency=args.target_concurrency, max_instances=args.max_instances, queue_timeout_s=max(60.0, args.timeout / 2),
                    warmup_model=warmup_path, nodes=args.nodes, devices=_devices(args), load_mode=load_mode,
                    sources=sources, gpu_bytes=_mb(args.gpu_memory), dram_bytes=_mb(args.dram),
                    ssd_bytes=_mb(args.ssd),
                )
                setup.setdefault("topology", {})[policy] = topo.read_text()
                if args.ssd_seed:
                    placed = seed_ssd_tiers(work, family, nodes=args.nodes, replicas=args.ssd_seed,
                                            load_mode=load_mode, sources=sources)
                    setup.setdefault("ssd_seed", {})[policy] = placed
                    say(f"[{tag}] checkpoints on SSD at start: "
                        + (", ".join(f"{m} on {'+'.join(n)}" for m, n in placed.items()) or "none (no disk cache)"))
                say(f"[{tag}] starting a cluster in {work}")
                cluster = start_cluster(topo)
                try:
                    if warmup_path is not None:
                        t_warm = time.monotonic()
                        warmed = warm_up(cluster.endpoint, say=say)
                        say(f"[{tag}] warmed up {', '.join(warmed) or 'no node'} in {time.monotonic() - t_warm:.1f}s")
                    records = replay(cluster.endpoint, arrivals, concurrency_limit=args.concurrency,
                                     timeout_s=args.timeout, prompt_maker=prompts, say=say, label=policy)
                finally:
                    stop_cluster(cluster)
                    if cluster.proc.returncode not in (0, None):
                        say(f"[{tag}] sllm up exited with {cluster.proc.returncode}; log: {cluster.log_path}")
            finally:
                if base is None:
                    shutil.rmtree(work, ignore_errors=True)
        results[policy] = records
        summaries[policy] = summarize(records)
        s = summaries[policy]
        # The machine's 1-minute load average before and after: other work on a shared host shows here.
        s["loadavg_1m"] = {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)}
        say(f"[{tag}] {s['completed']}/{s['requests']} done in {time.monotonic() - t_policy:.0f}s, "
            f"p50 {_fmt(s['latency_s']['p50'])}s p99 {_fmt(s['latency_s']['p99'])}s, errors {s['errors'] or 0}")
        if after_each is not None:
            after_each()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _write_partial(args: argparse.Namespace, started: float, results: dict[Any, dict[str, ReplayRecords]],
                   summaries: dict[Any, dict[str, dict[str, Any]]], setup: dict[str, Any],
                   family: list[FamilyModel]) -> None:
    """The JSON of the policies replayed so far (``"partial": true``; the final report replaces it), so that a run
    stopped at a deadline still gives its finished policies to ``--merge``."""
    if not args.json_out:
        return
    done = {seed: by_policy for seed, by_policy in results.items() if by_policy}
    with contextlib.redirect_stdout(io.StringIO()):  # the tables are printed once, at the end
        payload = _report_payload(done, {seed: summaries[seed] for seed in done},
                                  resamples=min(args.bootstrap, 200), png_out=None)
    payload = {"args": vars(args), "runtime_s": time.monotonic() - started, "machine": _machine(),
               "family": [{**asdict(f), "path": str(f.path)} for f in family], "setup": setup, "partial": True,
               **payload}
    tmp = Path(f"{args.json_out}.partial")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(args.json_out)


def _paired_values(results: dict[Any, dict[str, ReplayRecords]]) -> dict[Any, dict[str, dict[str, list[float]]]]:
    """What the paired comparison compares, per seed and policy: ``latency`` counts failed requests at their
    time to failure (as ``latency_all_s``: a policy that fails requests does not look faster for it), ``ttft``
    is over completed requests."""
    return {seed: {policy: {"latency": [r.latency_s for r in recs if r.latency_s is not None],
                            "ttft": [r.ttft_s for r in recs if r.ok and r.ttft_s is not None]}
                   for policy, recs in by_policy.items()}
            for seed, by_policy in results.items()}


def paired_report(paired: dict[str, Any]) -> list[str]:
    """Lines of a paired comparison: per policy and metric, the ratios over the base by seed and who wins."""
    lines: list[str] = []
    base = paired["base"]
    for policy, metrics in paired["ratios"].items():
        for metric, points in metrics.items():
            cells = []
            for point, r in points.items():
                if r["mean"] is None:
                    cells.append(f"{point} -")
                    continue
                spread = f" [{r['min']:.2f}-{r['max']:.2f}]" if r["seeds"] > 1 else ""
                verdict = f", {base} wins" if r["base_wins"] else f", {policy} wins" if r["other_wins"] else ""
                cells.append(f"{point} {r['mean']:.2f}x{spread}{verdict}")
            lines.append(f"{policy} / {base} {metric} over {len(paired['seeds'])} seed(s): " + "; ".join(cells))
    return lines


def _report_payload(results: dict[Any, dict[str, ReplayRecords]], summaries: dict[Any, dict[str, dict[str, Any]]],
                    *, resamples: int, png_out: str | None) -> dict[str, Any]:
    """Print the tables and the paired comparison; the JSON's figures (one seed: also at the top level, as
    single runs always were); the plot."""
    for seed, by_policy in summaries.items():
        if len(summaries) > 1:
            print(f"seed {seed}:")
        print_table(by_policy)
        for line in _ratios(by_policy)["lines"]:
            print(line)
    paired = paired_comparison(_paired_values(results), resamples=resamples) \
        if any("serverlessllm" in by_policy for by_policy in results.values()) else None
    if paired is not None:
        for line in paired_report(paired):
            print(line)
    if png_out:
        if len(results) > 1:
            plot_paired(results, paired, png_out)
        else:
            plot(next(iter(results.values()), {}), png_out)
    runs = {str(seed): {"summaries": summaries[seed], "ratios": _ratios(summaries[seed])["values"],
                        "records": {p: [asdict(r) for r in recs] for p, recs in by_policy.items()},
                        "events": {p: recs.events for p, recs in by_policy.items()}}
            for seed, by_policy in results.items()}
    payload: dict[str, Any] = {"seeds": list(results), "paired": paired}
    if len(runs) == 1:
        payload.update(next(iter(runs.values())))
    else:
        payload["runs"] = runs
    return payload


def _report(args: argparse.Namespace, started: float, results: dict[Any, dict[str, ReplayRecords]],
            summaries: dict[Any, dict[str, dict[str, Any]]], setup: dict[str, Any], family: list[FamilyModel],
            say: Callable[[str], None]) -> int:
    runtime = time.monotonic() - started
    payload = _report_payload(results, summaries, resamples=args.bootstrap, png_out=args.png_out)
    machine = _machine()
    print(f"runtime {runtime:.0f}s on {machine['host']} ({machine['cpus']} cpus, "
          f"{machine.get('cpu', platform.machine())}, {machine.get('memory_gib', '?')} GiB); 1-min load average per run (before/after): "
          + ", ".join(f"{p}{'' if len(summaries) == 1 else f'@{seed}'} {s['loadavg_1m']['before']}/{s['loadavg_1m']['after']}"
                      for seed, by_policy in summaries.items() for p, s in by_policy.items()))
    if args.png_out:
        say(f"plot: {args.png_out}")
    if args.json_out:
        payload = {"args": vars(args), "runtime_s": runtime, "machine": machine,
                   "family": [{**asdict(f), "path": str(f.path)} for f in family], "setup": setup, **payload}
        Path(args.json_out).write_text(json.dumps(payload, indent=1, default=str))
        say(f"json: {args.json_out}")
    return 0


def _ratios(summaries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """p99 latency and TTFT of every policy over serverlessllm's (higher: serverlessllm is better).

    Latency counts failed requests at their time to failure (``latency_all_s``), so a policy that fails
    requests does not look faster for it; TTFT is over completed requests.
    """
    base = summaries.get("serverlessllm")
    values: dict[str, dict[str, float | None]] = {}
    lines: list[str] = []
    if base is None:
        return {"values": values, "lines": lines}
    for policy, s in summaries.items():
        if policy == "serverlessllm":
            continue
        r = {}
        for metric, key in (("latency_all_s", "latency"), ("ttft_s", "ttft")):
            mine, theirs = base[metric]["p99"], s[metric]["p99"]
            r[f"{key}_p99_ratio"] = theirs / mine if mine and theirs is not None else None
        values[policy] = r
        lines.append(f"{policy} / serverlessllm p99: latency {_fmt(r['latency_p99_ratio'])}x, "
                     f"ttft {_fmt(r['ttft_p99_ratio'])}x" + (f" (errors: {s['errors']})" if s["errors"] else ""))
    return {"values": values, "lines": lines}


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
                            "platform": platform.platform()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3, 1)
    except (OSError, ValueError):
        pass
    return info


if __name__ == "__main__":
    raise SystemExit(main())
