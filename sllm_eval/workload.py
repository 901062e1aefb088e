"""Request workloads shared by the simulator (``sllm simulate``) and the real-cluster replay.

A workload is a list of :class:`Arrival`, sorted by time. Two generators:

* :func:`gamma_workload`: per-model Gamma arrivals (shape ``1/CV^2``, scale ``CV^2/lambda``; CV = 1 is
  Poisson) with model popularity ``∝ 1/rank^s`` (Zipf; ``models[0]`` is the most popular).
* :func:`azure_workload`: the arrival times and token counts of the Azure LLM inference trace 2023
  (``conv`` or ``code``), time compressed by ``rps_scale`` (the arrival shape is kept), lengths clipped to
  the models at hand, each request given a model by the same Zipf popularity.

* :func:`save_workload` / :func:`load_workload`: a workload as CSV (``time_s,model,prompt_tokens,
  output_tokens``), so a real replay and the simulator can run the very same arrivals.

Example::

    from sllm_eval.workload import gamma_workload, azure_workload
    w = gamma_workload(["a", "b", "c"], rps=5, cv=2, duration_s=60, seed=0, prompt_tokens=(16, 64))
    w = azure_workload("conv", ["a", "b"], duration_s=60, rps_scale=0.5, seed=0, max_prompt=256, max_output=64)
    for a in w:
        print(a.time_s, a.model, a.prompt_tokens, a.output_tokens)
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = [
    "Arrival",
    "TraceNotFound",
    "azure_workload",
    "gamma_workload",
    "load_azure_trace",
    "load_workload",
    "save_workload",
    "trace_dir",
    "zipf_weights",
]

TRACE_ENV = "SLLM_AZURE_TRACE_DIR"
"""Environment variable naming the folder with ``conv.csv`` and ``code.csv`` (else the default below)."""
_REPO_ROOT = Path(__file__).resolve().parents[1]

BURN_IN = 20
"""Mean inter-arrival gaps each model's process runs before time 0 (discarded)."""

Length = int | tuple[int, int] | Callable[[np.random.Generator], int]
"""A token count: a constant, an inclusive uniform range ``(lo, hi)``, or ``f(rng) -> int``."""


@dataclass(frozen=True)
class Arrival:
    """One request: when it arrives (seconds from the start), for which model, and its lengths."""

    time_s: float
    model: str
    prompt_tokens: int
    output_tokens: int


class TraceNotFound(FileNotFoundError):
    """The Azure trace CSV is not where it was looked for; the message says where and how to point at it."""


def zipf_weights(n: int, s: float = 1.0) -> np.ndarray:
    """Popularity of ranks 1..n, ``∝ 1/rank^s``, summing to 1."""
    if n < 1:
        raise ValueError("need at least one model")
    w = 1.0 / np.arange(1, n + 1, dtype=float) ** s
    return w / w.sum()


def _lengths(spec: Length, n: int, rng: np.random.Generator, what: str) -> np.ndarray:
    if callable(spec):
        out = np.array([int(spec(rng)) for _ in range(n)], dtype=np.int64)
    elif isinstance(spec, tuple):
        lo, hi = spec
        if not 1 <= lo <= hi:
            raise ValueError(f"{what}: need 1 <= lo <= hi, got {spec}")
        out = rng.integers(lo, hi + 1, size=n)
    else:
        out = np.full(n, int(spec), dtype=np.int64)
    if n and out.min() < 1:
        raise ValueError(f"{what}: token counts must be at least 1")
    return out


def gamma_workload(models: Sequence[str], rps: float, cv: float, duration_s: float, seed: int,
                   zipf_s: float = 1.0, prompt_tokens: Length = 256, output_tokens: Length = 64) -> list[Arrival]:
    """Per-model Gamma renewal arrivals over ``[0, duration_s)``, ``rps`` requests/s in all.

    Model ``models[k]`` gets the rate ``rps * zipf_weights(len(models), zipf_s)[k]``; its inter-arrival
    times are Gamma with shape ``1/cv^2`` and scale ``cv^2/rate`` (mean ``1/rate``, coefficient of
    variation ``cv``). The same arguments give the same list.
    """
    if rps <= 0 or cv <= 0 or duration_s <= 0:
        raise ValueError(f"rps, cv and duration_s must be positive, got {rps}, {cv}, {duration_s}")
    rng = np.random.default_rng(seed)
    rates = rps * zipf_weights(len(models), zipf_s)
    shape = 1.0 / cv**2
    times: list[np.ndarray] = []
    names: list[np.ndarray] = []
    for k, (model, rate) in enumerate(zip(models, rates)):
        scale = cv**2 / rate
        # Start BURN_IN mean gaps before 0 so the process is stationary at 0 (else a bursty process
        # front-loads about (cv^2 - 1)/2 extra arrivals per model).
        start = -BURN_IN / rate
        expected = rate * (duration_s - start)
        chunk = int(expected + 6 * np.sqrt(expected * max(cv, 1.0) ** 2) + 16)
        t = start + np.cumsum(rng.gamma(shape, scale, size=chunk))
        while t[-1] < duration_s:
            t = np.concatenate([t, t[-1] + np.cumsum(rng.gamma(shape, scale, size=chunk))])
        t = t[(t >= 0) & (t < duration_s)]
        times.append(t)
        names.append(np.full(len(t), k, dtype=np.int64))
    all_t = np.concatenate(times)
    all_k = np.concatenate(names)
    order = np.argsort(all_t, kind="stable")
    all_t, all_k = all_t[order], all_k[order]
    prompts = _lengths(prompt_tokens, len(all_t), rng, "prompt_tokens")
    outputs = _lengths(output_tokens, len(all_t), rng, "output_tokens")
    return [Arrival(float(t), models[int(k)], int(p), int(o)) for t, k, p, o in zip(all_t, all_k, prompts, outputs)]


def trace_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the Azure trace: ``path``, else ``$SLLM_AZURE_TRACE_DIR``, else
    ``<repository root>/../shared/data/azure-llm-2023`` (or ``<repository root>/shared/...``)."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(TRACE_ENV):
        return Path(os.environ[TRACE_ENV]).expanduser()
    candidates = [_REPO_ROOT.parent / "shared" / "data" / "azure-llm-2023",
                  _REPO_ROOT / "shared" / "data" / "azure-llm-2023"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def _seconds(stamp: str) -> float:
    """'2023-11-16 18:15:46.6805900' -> seconds since 1970-01-01 (any number of fraction digits)."""
    day, _, clock = stamp.strip().partition(" ")
    h, m, s = clock.split(":")
    return date.fromisoformat(day).toordinal() * 86400.0 + int(h) * 3600 + int(m) * 60 + float(s)


@lru_cache(maxsize=8)
def _read_trace(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    times, ctx, gen = [], [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
        if not reader.fieldnames or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns {sorted(need)}, got {reader.fieldnames}")
        for row in reader:
            times.append(_seconds(row["TIMESTAMP"]))
            ctx.append(int(row["ContextTokens"]))
            gen.append(int(row["GeneratedTokens"]))
    t = np.array(times)
    order = np.argsort(t, kind="stable")
    t = t[order] - t[order][0]
    return t, np.array(ctx)[order], np.array(gen)[order]


def load_azure_trace(kind: str = "conv", path: str | os.PathLike[str] | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds from the first arrival, context tokens, generated tokens) of ``<kind>.csv``, by time."""
    if kind not in ("conv", "code"):
        raise ValueError(f"trace kind must be 'conv' or 'code', got {kind!r}")
    folder = trace_dir(path)
    file = folder / f"{kind}.csv"
    if not file.is_file():
        raise TraceNotFound(
            f"Azure LLM trace {file} not found; pass path=<folder with conv.csv and code.csv> "
            f"(--trace-dir on the command line) or set ${TRACE_ENV}"
        )
    return _read_trace(str(file.resolve()))


def azure_workload(kind: str, models: Sequence[str], duration_s: float, rps_scale: float = 1.0, seed: int = 0,
                   max_prompt: int = 2048, max_output: int = 512, path: str | os.PathLike[str] | None = None,
                   zipf_s: float = 1.0, min_tokens: int = 1) -> list[Arrival]:
    """The Azure trace ``kind`` ('conv' or 'code') replayed for ``duration_s`` seconds.

    Time: trace second ``t`` becomes ``t / rps_scale`` (``rps_scale`` 2 doubles the request rate, the
    arrival shape is kept); the trace repeats end to end if ``duration_s`` needs more than one pass.
    Lengths: ``ContextTokens`` clipped to ``[min_tokens, max_prompt]``, ``GeneratedTokens`` to
    ``[min_tokens, max_output]``. Models: drawn per request with popularity ``∝ 1/rank^zipf_s``
    (``models[0]`` most popular), seeded by ``seed``.
    """
    if rps_scale <= 0 or duration_s <= 0:
        raise ValueError(f"rps_scale and duration_s must be positive, got {rps_scale}, {duration_s}")
    t, ctx, gen = load_azure_trace(kind, path)
    t = t / rps_scale
    # One pass lasts until the last arrival plus the mean gap, so repeats keep the rate.
    period = t[-1] + (t[-1] / max(len(t) - 1, 1))
    reps = int(np.ceil(duration_s / period))
    all_t = np.concatenate([t + r * period for r in range(reps)])
    keep = all_t < duration_s
    all_t = all_t[keep]
    all_c = np.tile(ctx, reps)[keep]
    all_g = np.tile(gen, reps)[keep]
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(models), size=len(all_t), p=zipf_weights(len(models), zipf_s))
    prompts = np.clip(all_c, min_tokens, max_prompt)
    outputs = np.clip(all_g, min_tokens, max_output)
    return [Arrival(float(a), models[int(k)], int(p), int(o)) for a, k, p, o in zip(all_t, picks, prompts, outputs)]


_WORKLOAD_COLUMNS = ["time_s", "model", "prompt_tokens", "output_tokens"]


def save_workload(path: str | os.PathLike[str], arrivals: Sequence[Arrival]) -> None:
    """Write ``arrivals`` as CSV with the header ``time_s,model,prompt_tokens,output_tokens``."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(_WORKLOAD_COLUMNS)
        for a in arrivals:
            w.writerow([repr(float(a.time_s)), a.model, int(a.prompt_tokens), int(a.output_tokens)])


def load_workload(path: str | os.PathLike[str]) -> list[Arrival]:
    """Read a CSV written by :func:`save_workload` (extra columns are ignored), sorted by time."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not set(_WORKLOAD_COLUMNS) <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected columns {_WORKLOAD_COLUMNS}, got {reader.fieldnames}")
        out = [Arrival(float(r["time_s"]), r["model"], int(r["prompt_tokens"]), int(r["output_tokens"]))
               for r in reader]
    return sorted(out, key=lambda a: a.time_s)
