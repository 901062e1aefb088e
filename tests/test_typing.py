"""The package ships ``py.typed``: type checkers take its annotations at their word. This holds the public API
(the modules ``sllm_actors/__init__.py`` exports from, as ``[tool.mypy]`` in pyproject.toml lists them) to
mypy's strict mode, so the marker promises something."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_package_is_marked_typed() -> None:
    assert (ROOT / "sllm_actors" / "py.typed").is_file()


def test_the_public_api_passes_mypy_strict() -> None:
    # A subprocess, with the files and settings from pyproject.toml: what a developer runs as plain ``mypy``.
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
