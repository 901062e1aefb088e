"""``GET /metrics``: Prometheus text from prometheus-client, every name prefixed ``sllm_``.

Two sources, neither of which costs the controller anything extra:
- what this front end sees of its own requests (outcomes, TTFT, inter-token gaps, tokens, migrations and
  resumes with the pause its client saw), counted as they happen;
- what the controller already publishes on its state port: the latest snapshot (instances, requests in
  flight, queue, GPU memory, KV blocks when the engine reports them) read at scrape time, and the event stream
  (a ``load`` event per cold start, with its tier and seconds).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sllm_actors.messages import ClusterEvent
from sllm_actors.actors.node.storage_client import LOAD_PARTS

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_LOAD_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300)


class Metrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        # The *_created series double the output and no dashboard of ours reads them.
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("sllm_requests", "HTTP generation requests (one per choice) by model and outcome",
                                ["model", "outcome"], registry=r)
        self.ttft = Histogram("sllm_time_to_first_token_seconds", "time from the HTTP request to its first token",
                              ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("sllm_inter_token_latency_seconds", "gap between consecutive token chunks of a stream",
                             ["model"], buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.e2e = Histogram("sllm_request_duration_seconds", "time from the HTTP request to its last token",
                             ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.generation_tokens = Counter("sllm_generation_tokens", "tokens generated for HTTP requests", ["model"],
                                         registry=r)
        self.prompt_tokens = Counter("sllm_prompt_tokens", "prompt tokens of HTTP requests", ["model"], registry=r)
        self.migrations = Counter("sllm_request_migrations", "live migrations and resumes of HTTP requests, by "
                                  "kind (migration, resume, restart), transfer and outcome",
                                  ["kind", "transfer", "outcome"], registry=r)
        self.migration_pause = Histogram("sllm_migration_pause_seconds", "longest gap between tokens a client saw "
                                         "during a migration or resume of its request", ["kind"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.cold_starts = Counter("sllm_cold_starts", "model loads onto a GPU, by the tier they came from",
                                   ["model", "tier"], registry=r)
        self.cold_start_seconds = Histogram("sllm_cold_start_seconds", "load time of a model onto a GPU by tier",
                                            ["tier"], buckets=_LOAD_BUCKETS, registry=r)
        self.cold_start_parts = Counter("sllm_cold_start_part_seconds", "where model loads' time went, by tier and "
                                        "part (storage_client.LOAD_PARTS; overlapping parts such as read and build "
                                        "do not add up)", ["tier", "part"], registry=r)
        self.http_errors = Counter("sllm_http_errors", "HTTP answers with an error status", ["status"], registry=r)
        r.register(_SnapshotCollector(snapshot))

    def event(self, event: ClusterEvent) -> None:
        if event.kind == "load":
            tier = str(event.data.get("tier", "unknown"))
            self.cold_starts.labels(str(event.data.get("model", "")), tier).inc()
            seconds = event.data.get("seconds")
            if isinstance(seconds, (int, float)):
                self.cold_start_seconds.labels(tier).observe(float(seconds))
            parts = event.data.get("parts")
            for part, value in (parts.items() if isinstance(parts, dict) else ()):
                # Only the known parts: label values come from a node's event, and must stay a small set.
                if part in LOAD_PARTS and isinstance(value, (int, float)) and value > 0:
                    self.cold_start_parts.labels(tier, part).inc(float(value))

    def request_done(self, model: str, migrations: list[dict[str, Any]]) -> None:
        for m in migrations:
            kind = str(m.get("kind", "migration"))
            self.migrations.labels(kind, str(m.get("transfer", "")), str(m.get("outcome", ""))).inc()
            pause = m.get("pause_s")
            if isinstance(pause, (int, float)):
                self.migration_pause.labels(kind).observe(float(pause))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _SnapshotCollector(Collector):
    """Gauges from the controller's latest published snapshot, read at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        st = self.snapshot()
        up = GaugeMetricFamily("sllm_controller_up", "1 while the controller publishes fresh snapshots")
        up.add_metric([], 1.0 if st is not None else 0.0)
        yield up
        if st is None:
            return
        nodes = GaugeMetricFamily("sllm_nodes", "nodes by liveness", labels=["alive"])
        alive = sum(1 for n in st.get("nodes", []) if n.get("alive"))
        nodes.add_metric(["true"], alive)
        nodes.add_metric(["false"], len(st.get("nodes", [])) - alive)
        yield nodes
        instances = GaugeMetricFamily("sllm_instances", "model instances by model and state",
                                      labels=["model", "state"])
        counts: dict[tuple[str, str], int] = {}
        kv_used = GaugeMetricFamily("sllm_kv_blocks_used", "KV cache blocks in use per instance",
                                    labels=["model", "instance"])
        kv_total = GaugeMetricFamily("sllm_kv_blocks_total", "KV cache blocks per instance",
                                     labels=["model", "instance"])
        prefix_hits = CounterMetricFamily("sllm_prefix_cache_hit_tokens", "prompt tokens served from the prefix "
                                          "cache per instance", labels=["model", "instance"])
        prefix_queries = CounterMetricFamily("sllm_prefix_cache_query_tokens", "prompt tokens looked up in the "
                                             "prefix cache per instance", labels=["model", "instance"])
        prefix_ratio = GaugeMetricFamily("sllm_prefix_cache_hit_ratio", "share of looked-up prompt tokens served "
                                         "from the prefix cache, per instance", labels=["model", "instance"])
        has_kv = False
        for inst in st.get("instances", []):
            key = (str(inst.get("model", "")), str(inst.get("state", "")))
            counts[key] = counts.get(key, 0) + 1
            # Reported by the paged-KV engine once it lands; absent until then.
            if "kv_blocks_used" in inst:
                has_kv = True
                kv_used.add_metric([key[0], str(inst.get("instance_id", ""))], float(inst["kv_blocks_used"]))
                kv_total.add_metric([key[0], str(inst.get("instance_id", ""))], float(inst.get("kv_blocks_total", 0)))
                hits, queried = float(inst.get("prefix_hit_tokens", 0)), float(inst.get("prefix_query_tokens", 0))
                prefix_hits.add_metric([key[0], str(inst.get("instance_id", ""))], hits)
                prefix_queries.add_metric([key[0], str(inst.get("instance_id", ""))], queried)
                prefix_ratio.add_metric([key[0], str(inst.get("instance_id", ""))], hits / queried if queried else 0.0)
        for (model, state), count in counts.items():
            instances.add_metric([model, state], count)
        yield instances
        if has_kv:
            yield kv_used
            yield kv_total
            yield prefix_hits
            yield prefix_queries
            yield prefix_ratio
        used = GaugeMetricFamily("sllm_gpu_memory_used_bytes", "GPU memory held by instances",
                                 labels=["node", "gpu", "device"])
        total = GaugeMetricFamily("sllm_gpu_memory_total_bytes", "GPU memory budget from the topology",
                                  labels=["node", "gpu", "device"])
        for g in st.get("gpus", []):
            labels = [str(g.get("node", "")), str(g.get("index", "")), str(g.get("device", ""))]
            used.add_metric(labels, float(g.get("memory_used", 0)))
            total.add_metric(labels, float(g.get("memory_total", 0)))
        yield used
        yield total
        # What keeps work off a GPU (policy/health.py): one series per GPU, its state and why, value 1; the reason
        # is cut short so a long CUDA error does not make a label of kilobytes.
        health = GaugeMetricFamily("sllm_gpu_health", "1 for each GPU's health state (healthy, breaker open, "
                                   "breaker half-open, unhealthy, cordoned, draining), with the reason",
                                   labels=["node", "gpu", "state", "reason"])
        failures = GaugeMetricFamily("sllm_gpu_load_failures", "loads that failed in a row on the GPU (its breaker "
                                     "opens at 3)", labels=["node", "gpu"])
        for g in st.get("gpus", []):
            where = [str(g.get("node", "")), str(g.get("index", ""))]
            health.add_metric([*where, str(g.get("health", "healthy")), str(g.get("health_reason", ""))[:120]], 1)
            failures.add_metric(where, float(g.get("breaker_failures", 0)))
        yield health
        yield failures
        cordoned = GaugeMetricFamily("sllm_node_cordoned", "1 while a node is cordoned or draining", labels=["node"])
        for n in st.get("nodes", []):
            cordoned.add_metric([str(n.get("name", ""))], 1 if n.get("cordoned") else 0)
        yield cordoned
        held = GaugeMetricFamily("sllm_model_load_held", "1 while a model's loads are held off everywhere: they failed "
                                 "on several GPUs, so the model, not the GPUs, is the suspect (policy/health.py)",
                                 labels=["model", "state"])
        for m in st.get("models", []):
            state = str(m.get("health", "healthy"))
            held.add_metric([str(m.get("name", "")), state], 1 if state in ("held", "trial") else 0)
        yield held
        running = GaugeMetricFamily("sllm_requests_in_flight", "requests the router holds, by model and state",
                                    labels=["model", "state"])
        by: dict[tuple[str, str], int] = {}
        for req in st.get("requests", []):
            key = (str(req.get("model", "")), str(req.get("state", "")))
            by[key] = by.get(key, 0) + 1
        for (model, state), count in by.items():
            running.add_metric([model, state], count)
        yield running
        queue = GaugeMetricFamily("sllm_queue_length", "requests waiting for an instance, by model", labels=["model"])
        q: dict[str, int] = {str(m.get("name", "")): 0 for m in st.get("models", [])}
        for w in st.get("queue", []):
            q[str(w.get("model", ""))] = q.get(str(w.get("model", "")), 0) + 1
        for model, count in q.items():
            queue.add_metric([model], count)
        yield queue
        migrating = GaugeMetricFamily("sllm_migrations_in_progress", "live migrations under way")
        migrating.add_metric([], len(st.get("migrations", [])))
        yield migrating
