"""Fault injection for tests and drills: make this node's loads fail, in the real load path.

``SLLM_FAULT_LOAD_FAIL`` makes a load raise before it reads the checkpoint, as a broken device or store would;
``SLLM_FAULT_LOAD_POISON`` makes it raise the CUDA error of a poisoned device context (the scheduler marks the
GPU unhealthy and restarts the node, policy/health.py). Each holds comma-separated rules, ``NODE=MODEL`` or
``MODEL`` (every node), with shell wildcards in both: ``node-2=*`` fails every load on node-2. The node process
reads them when a load starts; local nodes inherit ``sllm up``'s environment, so a test sets them there.
"""

from __future__ import annotations

import fnmatch
import os

__all__ = ["LOAD_FAIL_ENV", "LOAD_POISON_ENV", "injected_load_failure", "matches"]

LOAD_FAIL_ENV = "SLLM_FAULT_LOAD_FAIL"
LOAD_POISON_ENV = "SLLM_FAULT_LOAD_POISON"
POISON_TEXT = "CUDA error: operation not permitted when stream is capturing"
"""What the injected poison says: the error of issue 21's incident, which policy/health.py recognises."""


def matches(rules: str, node: str, model: str) -> bool:
    """Whether any ``NODE=MODEL`` / ``MODEL`` rule of ``rules`` names ``model`` on ``node``."""
    for rule in filter(None, (r.strip() for r in rules.split(","))):
        node_glob, _, model_glob = rule.rpartition("=")
        if fnmatch.fnmatchcase(node, node_glob or "*") and fnmatch.fnmatchcase(model, model_glob):
            return True
    return False


def injected_load_failure(node: str, model: str) -> str:
    """The error a load of ``model`` on ``node`` must fail with ('' for none), from the environment."""
    if matches(os.environ.get(LOAD_POISON_ENV, ""), node, model):
        return f"{POISON_TEXT} (injected by {LOAD_POISON_ENV})"
    if matches(os.environ.get(LOAD_FAIL_ENV, ""), node, model):
        return f"injected load failure ({LOAD_FAIL_ENV})"
    return ""
