"""Summary figures of a list of latencies (mean, percentiles, max), one definition for the replay, the
simulator and the simulator's validation, so a real run and a simulated one are summarized alike."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["REPLAY_POINTS", "SIM_POINTS", "stats"]

SIM_POINTS = ("mean", "p50", "p99")
"""What the simulator and its validation report per figure."""
REPLAY_POINTS = ("mean", "p50", "p90", "p99", "max")
"""What a replay against a real cluster reports: the tail in more detail."""


def stats(values: Sequence[float], points: Sequence[str] = SIM_POINTS) -> dict[str, float | None]:
    """``points`` of ``values``: ``mean``, ``max`` or ``pN`` (the N-th percentile, linear interpolation
    between closest ranks: numpy's default, without importing numpy); every one None for no values."""
    if not values:
        return {p: None for p in points}
    ordered = sorted(float(v) for v in values)

    def percentile(q: float) -> float:
        k = (len(ordered) - 1) * q
        lo, hi = math.floor(k), math.ceil(k)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)

    out: dict[str, float | None] = {}
    for point in points:
        if point == "mean":
            out[point] = sum(ordered) / len(ordered)
        elif point == "max":
            out[point] = ordered[-1]
        elif point.startswith("p"):
            out[point] = percentile(float(point[1:]) / 100)
        else:
            raise ValueError(f"unknown summary point {point!r} (mean, max or pN)")
    return out
