"""Every decoder-only causal-LM architecture transformers ships, from a tiny config on the CPU, through
the store: save_pretrained -> convert -> load_model, against what transformers loads from the same
directory (bit-equal state dicts, the same ties, the same greedy tokens). ``pytest -rs`` lists what is
skipped and why (a tiny config that cannot be built, or transformers' own model failing on a CPU)."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from sllm_eval.arch_sweep import Skip, causal_lm_architectures, sweep_one, tiny_model

ARCHITECTURES = causal_lm_architectures()
MUST_SWEEP = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "phi3", "gpt2", "opt",
              "gpt_neox", "falcon", "bloom", "olmoe", "starcoder2", "granitemoe"}
"""Architectures people serve most, and ones whose files use other names: a skip of these is a failure."""


@pytest.fixture(autouse=True)
def _quiet() -> None:
    # Hundreds of tiny models: transformers' per-model warnings about random configs drown the report.
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")


@pytest.mark.parametrize(("model_type", "class_name"), ARCHITECTURES, ids=[m for m, _ in ARCHITECTURES])
def test_an_architecture_round_trips_through_the_store(model_type: str, class_name: str, tmp_path: Path) -> None:
    try:
        sweep_one(model_type, class_name, tmp_path)
    except Skip as exc:
        if model_type in MUST_SWEEP:
            pytest.fail(f"{model_type} must be swept but was skipped: {exc}")
        pytest.skip(f"{model_type}: {exc}")


def test_the_sweep_covers_architectures_whose_files_use_other_names(tmp_path: Path) -> None:
    """The case this exists for: ``save_pretrained`` writes Mixtral's experts one by one while the model
    holds them fused, so the files' names are not the parameters' names; the conversion must still load."""

    model = tiny_model("mixtral", "MixtralForCausalLM")
    model.save_pretrained(tmp_path / "hf")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    from safetensors import safe_open

    files = [tmp_path / "hf" / f for f in set(json.loads(index.read_text())["weight_map"].values())] \
        if index.is_file() else [tmp_path / "hf" / "model.safetensors"]
    stored: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            stored |= set(h.keys())
    assert stored != set(model.state_dict()), "this transformers saves Mixtral under its own names: pick another"
    result = sweep_one("mixtral", "MixtralForCausalLM", tmp_path / "sweep")
    assert result["tensors"] == len(model.state_dict())
