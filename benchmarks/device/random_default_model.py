"""Write a random-weight SmolLM2-135M as ``$SLLM_HOME/models/smollm2-135m``, for the GPU device machine.

That machine reaches no network, and the default model's GGUF (98 MB) is over what a call can carry, so
the runs there use the real config and tokenizer (``$SLLM_DEVICE_KIT/smol``, default ``.gpu/smol``) with
random weights: the same shapes and so the same speed; the token-for-token checks hold for any weights.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from sllm_actors.storage import save_checkpoint  # noqa: E402


def main() -> None:
    kit = Path(os.environ.get("SLLM_DEVICE_KIT", ".gpu")) / "smol"
    dest = Path(os.environ["SLLM_HOME"]) / "models" / "smollm2-135m"
    if (dest / "index.json").is_file():
        print("model already there:", dest)
        return
    started = time.time()
    fields = {k: v for k, v in json.loads((kit / "config.json").read_text()).items()
              if k not in ("architectures", "transformers_version") and not k.startswith("_")}
    config = LlamaConfig(**fields)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    template = kit / "chat_template.jinja"
    save_checkpoint(model, dest, tokenizer=AutoTokenizer.from_pretrained(kit),
                    extra_files={template.name: template} if template.is_file() else None)
    print(f"wrote {dest} in {time.time() - started:.1f}s")


if __name__ == "__main__":
    main()
