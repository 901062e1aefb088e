"""The summary figures and the paired comparison of policies over seeds (``sllm_eval/stats.py``)."""

from __future__ import annotations

import pytest

from sllm_eval.stats import bootstrap_interval, paired_comparison, ratio_summary, stats


def test_stats_points() -> None:
    assert stats([3.0, 1.0, 2.0], ("mean", "p50", "max")) == {"mean": 2.0, "p50": 2.0, "max": 3.0}
    assert stats([0.0, 10.0], ("p99",)) == {"p99": pytest.approx(9.9)}
    assert stats([], ("mean",)) == {"mean": None}
    with pytest.raises(ValueError, match="unknown summary point"):
        stats([1.0], ("median",))


def test_bootstrap_interval_brackets_the_point_and_is_reproducible() -> None:
    values = [float(i) for i in range(200)]
    lo, hi = bootstrap_interval(values, "p99", resamples=300)
    p99 = stats(values, ("p99",))["p99"]
    assert lo <= p99 <= hi <= max(values)
    assert lo < hi
    assert bootstrap_interval(values, "p99", resamples=300) == (lo, hi)  # seeded: the same values, same interval
    assert bootstrap_interval([5.0] * 10, "p99", resamples=50) == (5.0, 5.0)
    assert bootstrap_interval([], "p99") is None
    narrow = bootstrap_interval(values, "p99", resamples=300, level=0.5)
    assert lo <= narrow[0] <= narrow[1] <= hi


def test_paired_comparison_ratios_spread_and_wins() -> None:
    # Seed 1: random is twice as slow everywhere; seed 2: 1.5x on latency, but faster on TTFT.
    runs = {
        1: {"serverlessllm": {"latency": [1.0, 2.0, 3.0], "ttft": [0.1, 0.2, 0.3]},
            "random": {"latency": [2.0, 4.0, 6.0], "ttft": [0.2, 0.4, 0.6]}},
        2: {"serverlessllm": {"latency": [2.0, 2.0, 2.0], "ttft": [0.4, 0.4, 0.4]},
            "random": {"latency": [3.0, 3.0, 3.0], "ttft": [0.2, 0.2, 0.2]}},
    }
    out = paired_comparison(runs, resamples=50)
    assert out["base"] == "serverlessllm" and out["seeds"] == [1, 2]
    lat = out["ratios"]["random"]["latency"]
    assert lat["mean"]["per_seed"] == {1: pytest.approx(2.0), 2: pytest.approx(1.5)}
    assert lat["p50"]["mean"] == pytest.approx(1.75)
    assert lat["p99"]["min"] == pytest.approx(1.5) and lat["p99"]["max"] == pytest.approx(2.0)
    assert lat["p99"]["base_wins"] and not lat["p99"]["other_wins"]
    ttft = out["ratios"]["random"]["ttft"]["p50"]
    assert ttft["per_seed"] == {1: pytest.approx(2.0), 2: pytest.approx(0.5)}
    assert not ttft["base_wins"] and not ttft["other_wins"]  # better on one seed only: no win either way
    figures = out["per_seed"][1]["random"]["latency"]
    assert figures["n"] == 3 and figures["p50"] == 4.0
    lo, hi = figures["p99_interval"]
    assert 2.0 <= lo <= hi <= 6.0
    assert "serverlessllm" not in out["ratios"]


def test_a_seed_without_a_figure_gives_no_ratio_and_no_win() -> None:
    runs = {
        1: {"serverlessllm": {"latency": [1.0]}, "kserve": {"latency": [5.0]}},
        2: {"serverlessllm": {"latency": []}, "kserve": {"latency": [5.0]}},
    }
    r = paired_comparison(runs, resamples=10)["ratios"]["kserve"]["latency"]["p99"]
    assert r["per_seed"] == {1: 5.0, 2: None} and r["seeds"] == 1 and r["mean"] == 5.0
    assert not r["base_wins"]  # one seed is no evidence for "every seed"
    assert ratio_summary({}) == {"per_seed": {}, "mean": None, "min": None, "max": None, "seeds": 0,
                                 "base_wins": False, "other_wins": False}
    assert ratio_summary({1: 0.5, 2: 0.9})["other_wins"]
