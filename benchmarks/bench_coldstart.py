"""The paper's headline: time to first token of a request to a model that is loaded nowhere.

    python benchmarks/bench_coldstart.py [--device cuda|cpu] [--small] [--json OUT] [--work DIR]

An 8B Llama-shape checkpoint (random bf16 weights; ``--small``: a 0.3 GB one for a CPU) is written in our
format (the repository) and as safetensors (the baselines'). In one run:

* ours, through a real one-node cluster (``sllm up --headless``, a client request, TTFT as the router
  measures it, with the load's parts): a cold start from the repository (page cache warm: the files were
  just written), from the DRAM tier, and from the SSD tier with the page cache dropped;
* baselines, each in a fresh Python process that loads and runs one forward pass (what a serverless
  platform without a checkpoint store does on every cold start): transformers ``from_pretrained``
  (safetensors) with the page cache warm and dropped; our ``load_model`` the same; our ``load_model`` from
  a host copy (the loader's own DRAM-tier figure);
* ceilings: pinned host->device copy (CUDA) or memcpy (CPU), disk read with the page cache dropped,
  page-cache read (16 threads).

Page cache: dropped with ``echo 1 > /proc/sys/vm/drop_caches`` where allowed (root on the GPU machine),
else per file with ``posix_fadvise(DONTNEED)``; the JSON says which. Writes a JSON and prints a table.
Built to run unattended on a bare GPU machine in under 8 minutes (``--budget-s``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PROMPT = "The capital of France is Paris. The capital of Italy is"
STARTED = time.monotonic()

SHAPES = {
    # Llama-3.1-8B: 8.03 B parameters, 16.1 GB in bf16.
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    # The same shape, small enough for a CPU run: 0.16 B parameters, 0.33 GB.
    "small": {"hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 8, "num_attention_heads": 16,
              "num_key_value_heads": 4, "vocab_size": 32000},
}


def say(msg: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- the checkpoint


def write_checkpoints(work: Path, shape: str) -> tuple[Path, Path, int]:
    """Our format (the repository) and safetensors (the baselines), same random bf16 weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sllm_actors.storage import checkpoint_size, save_checkpoint
    from sllm_actors.storage.model import parameters_on_meta
    from sllm_eval.tiny_models import make_tokenizer

    ours, hf = work / "repository" / "coldstart", work / "hf" / "coldstart"
    if (ours / "index.json").is_file() and (hf / "config.json").is_file():
        return ours, hf, checkpoint_size(ours)
    tokenizer = make_tokenizer()
    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         rope_theta=500000.0)
    config.architectures = ["LlamaForCausalLM"]
    with parameters_on_meta():
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    # Random weights, small enough that a forward pass stays finite; norms at 1 as trained models are.
    # Drawn once into a pool and copied out at shifting offsets: drawing 8 B normals one by one takes
    # minutes, and what is measured here does not depend on the values.
    pool = torch.empty(1 << 26, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
    offset = 0
    with torch.no_grad():
        for name, p in list(model.named_parameters()):
            real = torch.empty(p.shape, dtype=torch.bfloat16)
            if "norm" in name:
                real.fill_(1.0)
            else:
                flat, pos = real.view(-1), 0
                while pos < flat.numel():
                    offset = (offset + 7919) % (pool.numel() // 2)
                    k = min(flat.numel() - pos, pool.numel() - offset)
                    flat[pos:pos + k].copy_(pool[offset:offset + k])
                    pos += k
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, torch.nn.Parameter(real, requires_grad=False))
    model.eval()
    say(f"weights ready ({sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters)")
    save_checkpoint(model, ours, tokenizer=tokenizer)
    say(f"wrote {ours} ({checkpoint_size(ours) / 1e9:.2f} GB)")
    model.save_pretrained(hf, max_shard_size="5GB")
    tokenizer.save_pretrained(hf)
    say(f"wrote {hf}")
    del model
    return ours, hf, checkpoint_size(ours)


# ----------------------------------------------------------------------------- page cache


SYSTEM_DROP = [False]
"""Whether to drop the whole page cache (a machine of our own) or only our files' pages (a shared one)."""


def drop_cache(paths: list[Path]) -> str:
    """Drop these files from the page cache; returns how."""
    for p in paths:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    if SYSTEM_DROP[0]:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return "drop_caches"
        except OSError:
            pass
    from sllm_eval.storage_bench import _evict

    return "fadvise" if _evict(paths) else "fadvise (not verified)"


def files_of(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def warm_cache(paths: list[Path]) -> None:
    from sllm_eval.storage_bench import _warm

    _warm(paths)


# ----------------------------------------------------------------------------- ceilings


def ceilings(device: str, ours: Path, nbytes: int) -> dict[str, Any]:
    import torch

    from sllm_actors.storage import alloc_host_buffer
    from sllm_eval.storage_bench import _read_files

    out: dict[str, Any] = {}
    probe = min(nbytes, 4 << 30)
    src = alloc_host_buffer(probe, pinned=device.startswith("cuda"))
    src.fill_(1)
    if device.startswith("cuda"):
        dst = torch.empty(probe, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(3):
            t = time.perf_counter()
            dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out["pinned_h2d_gbs"] = probe / min(times) / 1e9
        del dst
    else:
        dst = alloc_host_buffer(probe)
        times = []
        for _ in range(3):
            t = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t)
        out["memcpy_gbs"] = probe / min(times) / 1e9
        del dst
    del src
    files = files_of(ours)
    data = [p for p in files if p.name.startswith("data_")]
    out["cache_drop"] = drop_cache(data)
    t = _read_files(data, direct=False, threads=16)
    out["disk_read_cold_gbs"] = nbytes / t / 1e9
    warm_cache(data)
    t = _read_files(data, direct=False, threads=16)
    out["page_cache_read_gbs"] = nbytes / t / 1e9
    # What the SSD tier's verified copy of a repository checkpoint costs alone (source in the page cache,
    # as in the repository cold start below): the "fetch" a pipelined cold start overlaps with its load.
    try:
        from sllm_actors.storage import copy_checkpoint
    except ImportError:  # code from before the pipelined fetch (a comparison run)
        return out
    dest = ours.parent.parent / "copy-probe"
    shutil.rmtree(dest, ignore_errors=True)
    t = time.perf_counter()
    copy_checkpoint(ours, dest)
    out["repository_copy_s"] = time.perf_counter() - t
    shutil.rmtree(dest, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------- fresh-process baselines

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
sys.path.insert(0, {repo!r})
import torch
mode, path, device = {mode!r}, {path!r}, {device!r}
if mode == "from_pretrained":
    from transformers import AutoModelForCausalLM, AutoTokenizer
else:
    from sllm_actors.storage import load_model, load_into_host
    from transformers import AutoTokenizer
t_import = time.perf_counter()
host_s = 0.0
host = None
if mode == "from_pretrained":
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
    except ImportError:  # no accelerate: what a user without it gets
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device)
elif mode == "load_model_host":
    t = time.perf_counter(); host = load_into_host(path); host_s = time.perf_counter() - t
    t_import = time.perf_counter()
    model = load_model(path, device, host=host)
else:
    model = load_model(path, device)
tok = AutoTokenizer.from_pretrained(path)
if device.startswith("cuda"):
    torch.cuda.synchronize()
t_loaded = time.perf_counter()
ids = torch.tensor([tok(PROMPT)["input_ids"]], device=device)
def first_token():
    with torch.inference_mode():
        nxt = model(input_ids=ids).logits[0, -1].argmax().item()
    return nxt
first = first_token()
t_first = time.perf_counter()
again = first_token()
prefill_s = time.perf_counter() - t_first
reload_s = 0.0
if mode != "from_pretrained":
    # The loader alone in a warm process (imports and lazy init paid by the first load): the figure a
    # cluster's load is held against.
    import gc
    del model
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache(); torch.cuda.synchronize()
    t = time.perf_counter()
    model = load_model(path, device, host=host) if mode == "load_model_host" else load_model(path, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    reload_s = time.perf_counter() - t
print(json.dumps({{"import_s": t_import - t0, "load_s": t_loaded - t_import, "first_forward_s": t_first - t_loaded,
                  "ttft_s": t_first - t_import, "process_s": t_first - t0, "prefill_s": prefill_s,
                  "host_copy_s": host_s, "reload_s": reload_s, "token": first}}))
"""


def fresh_process(mode: str, path: Path, device: str, timeout: float) -> dict[str, Any]:
    code = "PROMPT = " + repr(PROMPT) + "\n" + CHILD.format(repo=str(REPO), mode=mode, path=str(path), device=device)
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{mode}: exit {out.returncode}: {out.stderr[-1500:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["spawn_to_first_token_s"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------- ours, through a cluster


def cluster_topology(work: Path, name: str, repo: Path, device: str, nbytes: int, dram: bool) -> Path:
    import yaml

    gib = 1 << 30
    data = {
        "controller": {"host": "127.0.0.1", "client_port": 0, "cluster_port": 0, "state_port": 0, "http_port": 0},
        "nodes": [{
            "name": "node-1",
            "gpus": [{"device": device if device != "cuda" else "cuda:0",
                      "memory": f"{max(4, 3 * nbytes // gib + 2)}GiB"}],
            "dram": {"capacity": f"{(2 * nbytes // gib + 2) if dram else 0}GiB"},
            "ssd": {"path": str(work / "ssd"), "capacity": f"{3 * nbytes // gib + 4}GiB"},
        }],
        "models": [{"name": "coldstart", "source": str(repo), "keep_alive": "1s"}],
        "scheduler": {"queue_timeout": "10m"},
    }
    path = work / f"topology-{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def largest_parts(parts: dict[str, Any], minimum: float = 0.0) -> list[tuple[float, str]]:
    """A load's serial parts (those that add up), largest first, as (seconds, name)."""
    try:
        from sllm_actors.actors.node.storage_client import SERIAL_PARTS
    except ImportError:  # code from before loads reported their parts
        SERIAL_PARTS = ()
    return sorted(((v, k) for k, v in parts.items() if k in SERIAL_PARTS and isinstance(v, float) and v >= minimum),
                  reverse=True)


def parts_line(row: dict[str, Any]) -> str:
    """A cold start's wait and its largest serial parts, for the progress lines."""
    cs = row.get("cold_start") or {}
    parts = cs.get("parts", {})
    shown = ", ".join(f"{k} {v:.3f}" for v, k in largest_parts(parts, minimum=0.001))
    extra = f"; read {parts['read']:.3f} alongside" if isinstance(parts.get("read"), float) else ""
    return (f"wait {cs.get('wait_s', 0):.3f} = order->ready {cs.get('order_to_ready_s', 0):.3f} (load "
            f"{cs.get('load_s', 0):.3f}: {shown}{extra}); ready -> first token {row['ttft_s'] - cs.get('wait_s', 0):.3f}")


def request(endpoint: str) -> dict[str, Any]:
    from sllm_actors.client import Client

    t = time.perf_counter()
    with Client(endpoint, idle_timeout=900.0) as c:
        done = c.complete("coldstart", PROMPT, max_tokens=2, temperature=0.0)
    # getattr: the same benchmark runs against code from before cold starts reported their parts.
    return {"ttft_s": done.ttft_s, "client_s": time.perf_counter() - t, "cold_start": getattr(done, "cold_start", {}),
            "tokens": done.token_ids}


def status(endpoint: str) -> dict[str, Any]:
    from sllm_actors.client import Client

    with Client(endpoint) as c:
        return c.status()


def wait_for(endpoint: str, predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate(status(endpoint)):
            return
        time.sleep(0.2)  # polling a condition with a deadline
    raise TimeoutError(f"waited {timeout:.0f}s for {what}")


def unloaded(st: dict[str, Any]) -> bool:
    return not any(i["model"] == "coldstart" for i in st["instances"])


def in_tier(tier: str) -> Any:
    return lambda st: any(t["tier"] == tier and "coldstart" in t.get("models", []) for t in st["tiers"])


def ours_through_cluster(work: Path, repo: Path, device: str, nbytes: int, reps: int) -> dict[str, Any]:
    from sllm_eval.replay import start_cluster, stop_cluster

    out: dict[str, Any] = {}
    shutil.rmtree(work / "ssd", ignore_errors=True)
    # Cluster 1, with a DRAM tier: a repository cold start, then DRAM-tier cold starts.
    cluster = start_cluster(cluster_topology(work, "dram", repo, device, nbytes, dram=True), timeout=300)
    try:
        say("cluster up (DRAM tier on)")
        # The repository is cold, as a real one is: the fetch reads it from disk, at the disk's speed.
        out["repository_cache_drop"] = drop_cache([p for p in files_of(repo) if p.name.startswith("data_")])
        out["repository"] = [request(cluster.endpoint)]
        say(f"repository cold start (page cache dropped): TTFT {out['repository'][0]['ttft_s']:.2f}s; "
            + parts_line(out["repository"][0]))
        wait_for(cluster.endpoint, lambda st: unloaded(st) and in_tier("dram")(st), 600, "unload and DRAM copy")
        out["dram"] = []
        for _ in range(reps):
            out["dram"].append(request(cluster.endpoint))
            say(f"DRAM-tier cold start: TTFT {out['dram'][-1]['ttft_s']:.3f}s; " + parts_line(out["dram"][-1]))
            wait_for(cluster.endpoint, unloaded, 120, "unload")
        out["warm"] = None
    finally:
        stop_cluster(cluster)
    # Cluster 2, no DRAM tier, the SSD copy left by cluster 1: SSD-tier cold starts, page cache dropped.
    cluster = start_cluster(cluster_topology(work, "ssd", repo, device, nbytes, dram=False), timeout=300)
    try:
        say("cluster up (no DRAM tier)")
        out["ssd"] = []
        ssd_files = files_of(work / "ssd" / "coldstart")
        for _ in range(reps):
            out.setdefault("ssd_cache_drop", drop_cache([p for p in ssd_files if p.name.startswith("data_")]))
            out["ssd"].append(request(cluster.endpoint))
            say(f"SSD-tier cold start (cache dropped): TTFT {out['ssd'][-1]['ttft_s']:.2f}s; " + parts_line(out["ssd"][-1]))
            # A request to the loaded model: TTFT after a load, against the model's own prefill.
            if "warm" not in out or out["warm"] is None:
                out["warm"] = request(cluster.endpoint)
            wait_for(cluster.endpoint, unloaded, 120, "unload")
        out["ssd_warm"] = []
        for _ in range(reps):
            warm_cache([p for p in ssd_files if p.name.startswith("data_")])
            out["ssd_warm"].append(request(cluster.endpoint))
            say(f"SSD-tier cold start (page cache warm): TTFT {out['ssd_warm'][-1]['ttft_s']:.2f}s; "
                + parts_line(out["ssd_warm"][-1]))
            wait_for(cluster.endpoint, unloaded, 120, "unload")
    finally:
        stop_cluster(cluster)
    # Cluster 3: the repository cold start again, with the fetch stored first and loaded after (no pipeline),
    # on an empty SSD tier: the same-run comparison for the pipelined one above.
    shutil.rmtree(work / "ssd", ignore_errors=True)
    from sllm_eval.replay import start_cluster as start

    cluster = start(cluster_topology(work, "serial", repo, device, nbytes, dram=True), timeout=300,
                    env={"SLLM_PIPELINED_FETCH": "0"})
    try:
        drop_cache([p for p in files_of(repo) if p.name.startswith("data_")])
        out["repository_serial"] = [request(cluster.endpoint)]
        say(f"repository cold start, fetch then load (no pipeline; page cache dropped): "
            f"TTFT {out['repository_serial'][0]['ttft_s']:.2f}s; " + parts_line(out["repository_serial"][0]))
    finally:
        stop_cluster(cluster)
    return out


# ----------------------------------------------------------------------------- report


def med(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def table(res: dict[str, Any]) -> str:
    gb = res["checkpoint_bytes"] / 1e9
    c = res["ceilings"]
    lines = [f"cold start, {res['shape']} Llama shape, {gb:.2f} GB bf16, device {res['device']} "
             f"({res['machine']}, load average {res['loadavg_start'][0]:.1f} -> {res.get('loadavg_end', [0])[0]:.1f}); "
             f"seconds, median of {res['reps']}"]
    ours = res.get("ours", {})
    base = res.get("baselines", {})
    ref = base.get("from_pretrained_warm", {}).get("ttft_s")

    def row(label: str, ttft: float | None, note: str = "") -> None:
        if ttft is None:
            return
        ratio = f"{ref / ttft:6.1f}x" if ref else ""
        lines.append(f"  {label:52s} {ttft:8.3f}  {ratio:>8s}  {note}")

    lines.append(f"  {'':52s} {'TTFT':>8s}  {'vs fp warm':>8s}")
    for tier in ("dram", "ssd", "ssd_warm", "repository", "repository_serial"):
        rows = ours.get(tier) or []
        if rows:
            cs = rows[len(rows) // 2]["cold_start"]
            parts = cs.get("parts", {})
            top = largest_parts(parts)[:4]
            label = {"ssd_warm": "ssd tier, page cache warm",
                     "repository_serial": "repository, fetch then load (no pipeline)"}.get(tier, f"{tier} tier")
            row(f"ours, cluster, from the {label}", med(rows, "ttft_s"),
                f"load {cs.get('load_s', 0):.3f}: " + ", ".join(f"{k} {v:.3f}" for v, k in top))
    for key, label in (("from_pretrained_warm", "fresh process, from_pretrained, page cache warm"),
                       ("from_pretrained_cold", "fresh process, from_pretrained, page cache dropped"),
                       ("load_model_warm", "fresh process, our load_model, page cache warm"),
                       ("load_model_cold", "fresh process, our load_model, page cache dropped"),
                       ("load_model_host", "fresh process, our load_model from a host copy")):
        b = base.get(key)
        if b:
            row(label, b["ttft_s"], f"load {b['load_s']:.3f}, first forward {b['first_forward_s']:.3f}, "
                                    f"+ imports {b['import_s']:.1f}")
    lines.append("  ceilings: " + ", ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}"
                                            for k, v in c.items()))
    for k, v in res.get("derived", {}).items():
        lines.append(f"  {k}: {v:.3f}" if isinstance(v, float) else f"  {k}: {v}")
    return "\n".join(lines)


def derive(res: dict[str, Any]) -> dict[str, Any]:
    d: dict[str, Any] = {}
    n = res["checkpoint_bytes"]
    c, ours, base = res["ceilings"], res.get("ours", {}), res.get("baselines", {})
    h2d = c.get("pinned_h2d_gbs") or c.get("memcpy_gbs")
    prefill = (ours.get("warm") or {}).get("ttft_s") or base.get("load_model_warm", {}).get("prefill_s", 0.0)
    d["copy_ceiling_s"] = n / (h2d * 1e9)
    d["prefill_s (TTFT of a request to the loaded model)"] = prefill
    if ours.get("dram"):
        dram = med(ours["dram"], "ttft_s")
        d["dram TTFT / (copy ceiling + prefill)  [goal <= 1.2]"] = dram / (d["copy_ceiling_s"] + prefill)
        if base.get("from_pretrained_warm"):
            d["from_pretrained warm TTFT / dram TTFT  [goal >= 10]"] = base["from_pretrained_warm"]["ttft_s"] / dram
            d["from_pretrained warm, spawn to first token / dram TTFT"] = \
                base["from_pretrained_warm"]["spawn_to_first_token_s"] / dram
        loader = base.get("load_model_host", {}).get("reload_s")
        if loader:
            load = statistics.median(r["cold_start"]["load_s"] for r in ours["dram"])
            d["loader alone from a host copy, warm process (s)"] = loader
            d["dram load in cluster / loader alone  [goal <= 1.1]"] = load / loader
    if ours.get("repository") and ours.get("ssd"):
        # The repository is read cold, so its fetch alone is a read of its bytes from disk; the load alone is a
        # cold start from the SSD tier with the page cache dropped (the same bytes from the same kind of disk).
        rep = ours["repository"][0]["ttft_s"]
        fetch = n / (c["disk_read_cold_gbs"] * 1e9)
        load = med(ours["ssd"], "ttft_s")
        d["repository TTFT / max(fetch alone, load alone)  [goal <= 1.2]"] = rep / max(fetch, load)
        d["repository TTFT / (fetch + load): what a serial fetch-then-load would give"] = rep / (fetch + load)
    if ours.get("repository") and ours.get("repository_serial"):
        d["repository TTFT pipelined / fetch-then-load (same run)"] = \
            ours["repository"][0]["ttft_s"] / ours["repository_serial"][0]["ttft_s"]
    if ours.get("ssd"):
        load = statistics.median(r["cold_start"]["load_s"] for r in ours["ssd"])
        d["ssd (cache dropped) load GB/s / disk read cold GB/s"] = (n / load / 1e9) / c["disk_read_cold_gbs"]
    if ours.get("ssd_warm"):
        reads = [r["cold_start"].get("parts", {}).get("read") for r in ours["ssd_warm"]]
        if all(reads):
            d["ssd (cache warm) read GB/s / page-cache read GB/s  [goal >= 0.7]"] = \
                (n / statistics.median(reads) / 1e9) / c["page_cache_read_gbs"]
    if base.get("load_model_warm", {}).get("reload_s"):
        d["load_model from page cache, warm process, GB/s / page-cache read GB/s  [goal >= 0.7]"] = \
            (n / base["load_model_warm"]["reload_s"] / 1e9) / c["page_cache_read_gbs"]
    return d


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--small", action="store_true", help="a 0.33 GB model of the same shape family (CPU runs)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="where checkpoints and SSD tiers go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep --work afterwards")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--skip-baselines", action="store_true", help="ours through the cluster only (a trace run)")
    p.add_argument("--budget-s", type=float, default=460.0, help="skip the remaining baselines past this")
    args = p.parse_args()
    device = args.device
    if device == "cuda":
        device = "cuda:0"
    work = args.work or Path(tempfile.mkdtemp(prefix="sllm-coldstart-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("SLLM_HOME", str(work / "home"))
    import torch

    SYSTEM_DROP[0] = device.startswith("cuda")  # the GPU machine is ours alone; this CPU one is shared

    res: dict[str, Any] = {
        "shape": "small" if args.small else "8b", "device": device, "reps": args.reps,
        "machine": f"{platform.node()}, {os.cpu_count()} cores"
                   + (f", {torch.cuda.get_device_name(0)}" if device.startswith("cuda") else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "errors": {},
        "loadavg_start": os.getloadavg(),
    }
    try:
        ours, hf, nbytes = write_checkpoints(work, res["shape"])
        res["checkpoint_bytes"] = nbytes
        res["ceilings"] = ceilings(device, ours, nbytes)
        say(f"ceilings: {res['ceilings']}")
        try:
            res["ours"] = ours_through_cluster(work, ours, device, nbytes, args.reps)
        except Exception as exc:  # noqa: BLE001 - unattended: record and go on to the baselines
            res["errors"]["ours"] = f"{type(exc).__name__}: {exc}"
            say(f"ours failed: {exc}")
        res["baselines"] = {}
        timeout = 300.0
        plan = [("load_model_host", ours, None), ("load_model_warm", ours, "warm"),
                ("from_pretrained_warm", hf, "warm"), ("load_model_cold", ours, "cold"),
                ("from_pretrained_cold", hf, "cold")]
        for key, path, cache in ([] if args.skip_baselines else plan):
            if time.monotonic() - STARTED > args.budget_s:
                res["errors"][key] = "skipped: over the time budget"
                continue
            files = [f for f in files_of(path) if f.suffix in (".bin", ".safetensors")]
            if cache == "warm":
                warm_cache(files)
            elif cache == "cold":
                res["baselines"].setdefault("cache_drop", drop_cache(files))
            try:
                res["baselines"][key] = fresh_process(key.rsplit("_", 1)[0] if cache else key, path, device, timeout)
                say(f"{key}: {res['baselines'][key]}")
            except Exception as exc:  # noqa: BLE001
                res["errors"][key] = f"{type(exc).__name__}: {exc}"
                say(f"{key} failed: {exc}")
        res["derived"] = derive(res)
    finally:
        res["loadavg_end"] = os.getloadavg()
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(res, indent=2, default=str))
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(table(res))
    print(f"total {time.monotonic() - STARTED:.0f}s" + (f"; json {args.json}" if args.json else ""))
    return 1 if res["errors"] and "ours" in res["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
