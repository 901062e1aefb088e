"""Summary figures of a list of latencies (mean, percentiles, max), one definition for the replay, the
simulator and the simulator's validation, so a real run and a simulated one are summarized alike; and the
paired comparison of policies over seeds (per-seed ratios, a bootstrap interval of p99 within a run, wins)
that tells a policy's effect from run-to-run noise. Pure functions."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["PAIRED_POINTS", "REPLAY_POINTS", "SIM_POINTS", "bootstrap_interval", "paired_comparison", "percentile",
           "ratio_summary", "stats"]

SIM_POINTS = ("mean", "p50", "p99")
"""What the simulator and its validation report per figure."""
REPLAY_POINTS = ("mean", "p50", "p90", "p99", "max")
"""What a replay against a real cluster reports: the tail in more detail."""


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, linear interpolation between closest ranks (numpy's default);
    NaN for no values."""
    ordered = sorted(float(v) for v in values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def stats(values: Sequence[float], points: Sequence[str] = SIM_POINTS) -> dict[str, float | None]:
    """``points`` of ``values``: ``mean``, ``max`` or ``pN`` (the N-th percentile, linear interpolation
    between closest ranks: numpy's default, without importing numpy); every one None for no values."""
    if not values:
        return {p: None for p in points}
    ordered = sorted(float(v) for v in values)

    out: dict[str, float | None] = {}
    for point in points:
        if point == "mean":
            out[point] = sum(ordered) / len(ordered)
        elif point == "max":
            out[point] = ordered[-1]
        elif point.startswith("p"):
            out[point] = percentile(ordered, float(point[1:]) / 100)
        else:
            raise ValueError(f"unknown summary point {point!r} (mean, max or pN)")
    return out


# ---------------------------------------------------------------------------------------------- paired comparison

PAIRED_POINTS = ("mean", "p50", "p99")
"""What a paired comparison of policies reports per metric, seed by seed."""


def bootstrap_interval(values: Sequence[float], point: str = "p99", *, resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float] | None:
    """A percentile bootstrap interval of ``point`` of ``values``: the requests resampled with replacement
    ``resamples`` times (a seeded generator, so the same values always give the same interval); None for
    no values."""
    import random

    if not values:
        return None
    rng = random.Random(seed)
    data = [float(v) for v in values]
    n = len(data)
    estimates = sorted(float(stats([data[rng.randrange(n)] for _ in range(n)], (point,))[point] or 0.0)
                       for _ in range(resamples))
    tail = (1 - level) / 2
    lo = stats(estimates, (f"p{100 * tail}",))[f"p{100 * tail}"]
    hi = stats(estimates, (f"p{100 * (1 - tail)}",))[f"p{100 * (1 - tail)}"]
    assert lo is not None and hi is not None
    return lo, hi


def paired_comparison(runs: Mapping[Any, Mapping[str, Mapping[str, Sequence[float]]]], *,
                      base: str = "serverlessllm", points: Sequence[str] = PAIRED_POINTS,
                      resamples: int = 1000, level: float = 0.95) -> dict[str, Any]:
    """Policies compared on the same workloads, paired by seed.

    ``runs[seed][policy][metric]`` holds one run's values of ``metric`` (e.g. ``latency``, ``ttft``), every
    policy of a seed having replayed that seed's workload. Returns

    * ``per_seed[seed][policy][metric]``: ``points`` of the values, and ``p99_interval`` (a bootstrap over
      the run's requests, ``level``), ``n``;
    * ``ratios[policy][metric][point]``: ``per_seed`` (other / ``base``: above 1, ``base`` is better), their
      ``mean``, ``min`` and ``max`` over seeds, ``seeds`` (how many had both figures), ``base_wins`` (``base``
      better on every seed) and ``other_wins`` (the other better on every seed). A seed where either figure
      is missing or ``base``'s is 0 has no ratio, and no policy wins on it.
    """
    seeds = list(runs)
    per_seed: dict[Any, dict[str, dict[str, dict[str, Any]]]] = {}
    for seed in seeds:
        per_seed[seed] = {}
        for policy, metrics in runs[seed].items():
            per_seed[seed][policy] = {}
            for metric, values in metrics.items():
                figures: dict[str, Any] = dict(stats(values, points))
                interval = bootstrap_interval(values, "p99", resamples=resamples, level=level, seed=0)
                figures["p99_interval"] = list(interval) if interval is not None else None
                figures["n"] = len(values)
                per_seed[seed][policy][metric] = figures
    policies = sorted({p for seed in seeds for p in runs[seed]} - {base})
    metrics_seen = sorted({m for seed in seeds for p in runs[seed].values() for m in p})
    ratios: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
    for policy in policies:
        ratios[policy] = {}
        for metric in metrics_seen:
            ratios[policy][metric] = {}
            for point in points:
                by_seed: dict[Any, float | None] = {}
                for seed in seeds:
                    mine = per_seed[seed].get(base, {}).get(metric, {}).get(point)
                    theirs = per_seed[seed].get(policy, {}).get(metric, {}).get(point)
                    by_seed[seed] = theirs / mine if mine and theirs is not None else None
                ratios[policy][metric][point] = ratio_summary(by_seed)
    return {"base": base, "seeds": seeds, "level": level, "per_seed": per_seed, "ratios": ratios}


def ratio_summary(by_seed: Mapping[Any, float | None]) -> dict[str, Any]:
    """Per-seed ratios (other / base) summarized: mean, min, max over the seeds that have one; ``base_wins``
    where every seed has a ratio above 1, ``other_wins`` where every seed has one below 1."""
    known = [r for r in by_seed.values() if r is not None]
    complete = bool(by_seed) and len(known) == len(by_seed)
    return {
        "per_seed": dict(by_seed),
        "mean": sum(known) / len(known) if known else None,
        "min": min(known, default=None),
        "max": max(known, default=None),
        "seeds": len(known),
        "base_wins": complete and all(r > 1 for r in known),
        "other_wins": complete and all(r < 1 for r in known),
    }
