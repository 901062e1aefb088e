"""Workload generation: Gamma arrivals with Zipf popularity, and the Azure trace loader."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sllm_eval.workload import (
    Arrival,
    TraceNotFound,
    azure_workload,
    gamma_workload,
    load_azure_trace,
    trace_dir,
    zipf_weights,
)


def _gaps(arrivals: list[Arrival]) -> np.ndarray:
    return np.diff([a.time_s for a in arrivals])


@pytest.mark.parametrize("cv", [1.0, 2.0, 4.0])
def test_gamma_arrivals_have_the_asked_rate_and_cv(cv: float) -> None:
    w = gamma_workload(["m"], rps=10, cv=cv, duration_s=20_000, seed=1)
    gaps = _gaps(w)
    assert len(w) / 20_000 == pytest.approx(10, rel=0.04)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)
    assert all(0 <= a.time_s < 20_000 for a in w)
    assert all(x.time_s <= y.time_s for x, y in itertools.pairwise(w))


def test_many_bursty_models_still_sum_to_the_asked_rate() -> None:
    # Each model's process is stationary at time 0 (no burst of first arrivals per model).
    models = [f"m{i}" for i in range(500)]
    w = gamma_workload(models, rps=20, cv=4, duration_s=2_000, seed=2)
    assert len(w) / 2_000 == pytest.approx(20, rel=0.06)


def test_popularity_follows_zipf_by_rank() -> None:
    models = [f"m{i}" for i in range(20)]
    w = gamma_workload(models, rps=50, cv=1, duration_s=2_000, seed=3)
    counts = Counter(a.model for a in w)
    top = [counts[m] for m in models[:5]]
    assert top == sorted(top, reverse=True)
    assert counts["m0"] / counts["m1"] == pytest.approx(2.0, rel=0.1)
    assert counts["m0"] / len(w) == pytest.approx(zipf_weights(20)[0], rel=0.05)
    assert zipf_weights(3, 0).tolist() == pytest.approx([1 / 3] * 3)


def test_gamma_workload_is_seeded_and_lengths_follow_the_spec() -> None:
    a = gamma_workload(["x", "y"], 5, 2, 100, seed=4, prompt_tokens=(10, 20), output_tokens=7)
    b = gamma_workload(["x", "y"], 5, 2, 100, seed=4, prompt_tokens=(10, 20), output_tokens=7)
    c = gamma_workload(["x", "y"], 5, 2, 100, seed=5, prompt_tokens=(10, 20), output_tokens=7)
    assert a == b and a != c
    assert all(10 <= r.prompt_tokens <= 20 and r.output_tokens == 7 for r in a)
    d = gamma_workload(["x"], 5, 1, 50, seed=0, prompt_tokens=lambda rng: int(rng.integers(1, 4)))
    assert {r.prompt_tokens for r in d} <= {1, 2, 3}
    with pytest.raises(ValueError):
        gamma_workload(["x"], 0, 1, 10, seed=0)


def _write_trace(folder: Path, kind: str = "conv") -> None:
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    # 10 requests, one a second; lengths grow so clipping shows.
    for i in range(10):
        rows.append(f"2023-11-16 18:15:{10 + i:02d}.2500000,{100 * (i + 1)},{10 * (i + 1)}")
    rows.insert(3, "2023-11-16 18:15:09.2500000,5,1")  # out of order: the loader sorts by time
    (folder / f"{kind}.csv").write_text("\n".join(rows) + "\n")


def test_azure_loader_scales_time_and_clips_lengths(tmp_path: Path) -> None:
    _write_trace(tmp_path)
    t, ctx, _ = load_azure_trace("conv", tmp_path)
    assert t[0] == 0 and t[1] == pytest.approx(1.0) and ctx[0] == 5 and len(t) == 11
    w = azure_workload("conv", ["a", "b"], duration_s=100, rps_scale=2.0, seed=0, max_prompt=300, max_output=50,
                       path=tmp_path)
    # Time halved; one pass lasts 11 trace-seconds / 2; the trace repeats to fill 100 s.
    assert [a.time_s for a in w[:3]] == pytest.approx([0.0, 0.5, 1.0])
    assert len(w) == pytest.approx(100 / 5.5 * 11, abs=11)
    assert max(a.prompt_tokens for a in w) == 300 and min(a.prompt_tokens for a in w) == 5
    assert max(a.output_tokens for a in w) == 50
    assert all(a.time_s < 100 for a in w)
    assert {a.model for a in w} <= {"a", "b"}
    again = azure_workload("conv", ["a", "b"], 100, 2.0, 0, 300, 50, path=tmp_path)
    assert w == again


def test_azure_loader_names_the_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TraceNotFound, match=r"code\.csv not found.*path="):
        azure_workload("code", ["a"], 10, path=tmp_path)
    with pytest.raises(ValueError, match="conv.*code"):
        load_azure_trace("chat", tmp_path)


def test_default_trace_folder_is_beside_the_repository(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLLM_AZURE_TRACE_DIR", raising=False)
    assert trace_dir().parts[-3:] == ("shared", "data", "azure-llm-2023")
    monkeypatch.setenv("SLLM_AZURE_TRACE_DIR", "/x/y")
    assert trace_dir() == Path("/x/y")


@pytest.mark.skipif(not (trace_dir() / "conv.csv").is_file(), reason="Azure trace not present")
def test_the_real_azure_traces_match_their_readme() -> None:
    for kind, rows, rate, p50_ctx, p50_gen in (("conv", 19_366, 5.5, 1020, 129), ("code", 8_819, 2.6, 1469, 13)):
        t, ctx, gen = load_azure_trace(kind)
        assert len(t) == rows
        assert (len(t) - 1) / t[-1] == pytest.approx(rate, rel=0.05)
        assert np.median(ctx) == pytest.approx(p50_ctx, rel=0.02)
        assert np.median(gen) == pytest.approx(p50_gen, rel=0.02)
    w = azure_workload("conv", [f"m{i}" for i in range(10)], duration_s=600, rps_scale=0.5, seed=0,
                       max_prompt=512, max_output=64)
    assert len(w) / 600 == pytest.approx(5.5 * 0.5, rel=0.25)
    assert max(a.prompt_tokens for a in w) <= 512 and max(a.output_tokens for a in w) <= 64


def test_a_workload_round_trips_through_csv(tmp_path: Path) -> None:
    from sllm_eval.workload import load_workload, save_workload

    w = gamma_workload(["x", "y"], 3, 2, 60, seed=9, prompt_tokens=(1, 99), output_tokens=(1, 9))
    save_workload(tmp_path / "w.csv", w)
    assert load_workload(tmp_path / "w.csv") == w
    (tmp_path / "bad.csv").write_text("t,model\n1,x\n")
    with pytest.raises(ValueError, match="expected columns"):
        load_workload(tmp_path / "bad.csv")
