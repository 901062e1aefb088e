"""The scheduler in a real cluster: queueing with a timeout, scale to zero and back, decisions logged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sllm_actors.client import RequestError

PROMPT = "The capital of France is"


def test_a_request_with_no_capacity_times_out_with_a_clear_error(cluster_factory: Any, tiny_model: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model}, memory="100KiB", nodes=1,
                              extra={"scheduler": {"queue_timeout": "2s"}})
    with cluster.client() as c:
        with pytest.raises(RequestError) as info:
            c.complete("tiny", PROMPT, max_tokens=4)
    assert info.value.code == "no_capacity"
    assert "no GPU could serve tiny within 2s" in info.value.message


def test_decisions_are_logged_with_estimates_and_scale_to_zero_and_back(cluster_factory: Any,
                                                                        tiny_model: Path) -> None:
    cluster = cluster_factory({"tiny": tiny_model}, keep_alive="1s")
    with cluster.client() as c:
        first = c.complete("tiny", PROMPT, max_tokens=4).token_ids
    cluster.wait_for(lambda st: not st["instances"], 30, "scale to zero")
    with cluster.client() as c:
        assert c.complete("tiny", PROMPT, max_tokens=4).token_ids == first
        events = c.status()["events"]
    decisions = [e for e in events if e["kind"] == "schedule" and "decision" in e.get("data", {})]
    assert len(decisions) == 2
    assert all(e["data"]["decision"] == "load" and e["data"]["considered"] for e in decisions)
    estimates = [e for e in events if e["kind"] == "estimate"]
    assert estimates and all(e["data"]["measured_s"] > 0 for e in estimates)
    assert any("scale down" in e["text"] for e in events)


def test_policy_can_be_chosen_on_the_command_line(cluster_factory: Any, tiny_model: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from .conftest import REPO, write_topology

    topo = write_topology(tmp_path / "t.yaml", {"tiny": tiny_model})
    run = subprocess.run([sys.executable, str(REPO / "cli.py"), "up", str(topo), "--headless", "--policy", "best"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "unknown policy 'best'" in run.stderr
