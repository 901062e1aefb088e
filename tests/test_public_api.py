"""The public API in ``sllm_actors/__init__.py``: every name it exports resolves, and importing the package,
the client, the controller process or the HTTP front end does not import torch (those processes start
often and never run a model; torch costs them seconds and hundreds of MB)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import sllm_actors

TORCH_FREE = [
    "sllm_actors",
    "sllm_actors.client",
    "sllm_actors.actors.controller.process",
    "sllm_actors.http.app",
]


def test_controller_client_and_http_do_not_import_torch() -> None:
    # A fresh interpreter: this one may have imported torch for another test already.
    code = "\n".join([
        "import sys",
        *(f"import {module}" for module in TORCH_FREE),
        "import sllm_actors",
        "for name in ('Client', 'Completion', 'Controller', 'load_topology', 'messages'):",
        "    getattr(sllm_actors, name)",
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))",
    ])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"torch was imported: {done.stdout.strip()}"


def test_every_exported_name_resolves() -> None:
    for name in sllm_actors.__all__:
        assert getattr(sllm_actors, name) is not None, name
    assert set(sllm_actors.__all__) <= set(dir(sllm_actors))


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchName"):
        sllm_actors.NoSuchName  # noqa: B018 (the lookup is the test)
