"""Round trips of real (tiny, random) transformers models through save_checkpoint / load_model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from torch.overrides import TorchFunctionMode

from sllm_actors import storage
from sllm_eval.tiny_configs import MODEL_KINDS, greedy, tiny_model

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 250]])


def _tied_pair(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is None or not model.config.tie_word_embeddings:
        return None
    return out.weight, inp.weight


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_model_round_trip(tmp_path: Path, kind: str, dtype: torch.dtype) -> None:
    source = tiny_model(kind, dtype)
    info = storage.save_checkpoint(source, tmp_path / "ckpt")
    assert info.architecture == type(source).__name__
    assert info.dtypes == {str(dtype).removeprefix("torch."): info.dtypes[str(dtype).removeprefix("torch.")]}

    loaded = storage.load_model(tmp_path / "ckpt")
    assert type(loaded) is type(source)
    assert not loaded.training
    assert loaded.dtype == dtype

    src_sd, new_sd = source.state_dict(), loaded.state_dict()
    assert src_sd.keys() == new_sd.keys()
    for name, tensor in src_sd.items():
        assert new_sd[name].dtype == tensor.dtype, name
        assert torch.equal(new_sd[name].view(torch.uint8), tensor.view(torch.uint8)), name
    # Non-persistent buffers (rotary inv_freq, masks) are recomputed, not left on meta or zeroed.
    src_buffers = dict(source.named_buffers())
    for name, buf in loaded.named_buffers():
        assert buf.device.type == "cpu", name
        assert torch.equal(buf, src_buffers[name]), name
    assert all(p.device.type == "cpu" for p in loaded.parameters())

    pair = _tied_pair(loaded)
    if kind in ("gpt2", "opt"):
        assert pair is not None
        assert pair[0].data_ptr() == pair[1].data_ptr()
        assert pair[0] is pair[1]
    else:
        assert pair is None
        assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()

    assert torch.equal(greedy(source, PROMPT), greedy(loaded, PROMPT))


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_tied_weights_are_stored_once(tmp_path: Path, kind: str) -> None:
    source = tiny_model(kind, torch.float16)
    info = storage.save_checkpoint(source, tmp_path / "ckpt")
    index = json.loads((tmp_path / "ckpt" / "index.json").read_text())
    aliases = {t["name"]: t["tied_to"] for t in index["tensors"] if "tied_to" in t}
    unique = {id(p.untyped_storage()): p for p in source.state_dict().values()}
    assert info.tensor_bytes == sum(t.untyped_storage().nbytes() for t in unique.values())
    if kind == "gpt2":
        assert aliases == {"lm_head.weight": "transformer.wte.weight"}
    elif kind == "opt":
        assert aliases == {"lm_head.weight": "model.decoder.embed_tokens.weight"}
    else:
        assert aliases == {}
    sd = storage.load_state_dict(tmp_path / "ckpt")
    for alias, target in aliases.items():
        assert sd[alias] is sd[target]


def test_llama_matches_transformers_from_pretrained(tmp_path: Path) -> None:
    """Our meta-device build must give the model transformers itself would load (rotary included)."""
    from transformers import AutoModelForCausalLM

    source = tiny_model("llama", torch.bfloat16, seed=3)
    source.save_pretrained(tmp_path / "hf")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16).eval()
    storage.save_checkpoint(source, tmp_path / "ckpt")
    ours = storage.load_model(tmp_path / "ckpt")
    ref_rope, our_rope = reference.model.rotary_emb, ours.model.rotary_emb
    assert our_rope.inv_freq.dtype == ref_rope.inv_freq.dtype == torch.float32
    assert torch.equal(our_rope.inv_freq, ref_rope.inv_freq)
    prompt = torch.tensor([[1, 5, 9, 33, 70, 2, 8]])
    with torch.no_grad():
        assert torch.equal(ours(prompt).logits, reference(prompt).logits)
    assert torch.equal(greedy(ours, prompt, 12), greedy(reference, prompt, 12))


class _RandomInitSpy(TorchFunctionMode):
    """Records in-place random fills of real (non-meta) tensors: what weight init does."""

    NAMES: ClassVar[set[str]] = {
        "normal_",
        "uniform_",
        "kaiming_uniform_",
        "trunc_normal_",
        "random_",
        "bernoulli_",
    }

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = args[0] if args else kwargs.get("tensor", kwargs.get("self"))
        if name in self.NAMES and isinstance(target, torch.Tensor) and not target.is_meta:
            self.calls.append(name)
        return func(*args, **kwargs)


def test_load_model_never_runs_random_init(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from sllm_eval.tiny_configs import tiny_config

    storage.save_checkpoint(tiny_model("llama"), tmp_path / "ckpt")
    with _RandomInitSpy() as control:
        AutoModelForCausalLM.from_config(tiny_config("llama"))
    assert control.calls, "the spy must see the random init of an ordinary construction"
    with _RandomInitSpy() as spy:
        storage.load_model(tmp_path / "ckpt")
    assert spy.calls == []


def test_load_model_dtype_override(tmp_path: Path) -> None:
    source = tiny_model("opt", torch.float32)
    storage.save_checkpoint(source, tmp_path / "ckpt")
    loaded = storage.load_model(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.lm_head.weight, source.lm_head.weight.to(torch.bfloat16))
    assert loaded.lm_head.weight is loaded.model.decoder.embed_tokens.weight


def test_generation_config_and_tokenizer_are_saved(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(300)}
    vocab.update({"<unk>": 300, "<s>": 1, "</s>": 2})
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    source = tiny_model("gpt2")
    source.generation_config.max_new_tokens = 7
    storage.save_checkpoint(source, tmp_path / "ckpt", tokenizer=tok)
    assert (tmp_path / "ckpt" / "generation_config.json").is_file()
    loaded_tok = storage.load_tokenizer(tmp_path / "ckpt")
    assert loaded_tok is not None
    assert loaded_tok("t5 t7 t9")["input_ids"] == tok("t5 t7 t9")["input_ids"]
    assert storage.load_model(tmp_path / "ckpt").generation_config.max_new_tokens == 7
    model_json = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    assert model_json["architecture"] == "GPT2LMHeadModel"
    assert model_json["dtype"] == "float32"
    assert model_json["total_bytes"] % 4096 == 0


def test_load_tokenizer_absent(tmp_path: Path) -> None:
    storage.save_checkpoint(tiny_model("llama"), tmp_path / "ckpt")
    assert storage.load_tokenizer(tmp_path / "ckpt") is None


def test_warm_imports_leaves_nothing_for_the_first_load_to_import(tiny_model: Path, tmp_path: Path) -> None:
    """A fresh node warms its imports before it reports ready; its first load then imports nothing."""
    import subprocess
    import sys

    from sllm_actors.storage import convert

    ckpt = tmp_path / "ckpt"
    convert(str(tiny_model), str(ckpt))
    code = (
        "import sys\n"
        "from sllm_actors.storage.model import warm_imports, load_model, load_tokenizer\n"
        "warm_imports()\n"
        "before = set(sys.modules)\n"
        f"load_model({str(ckpt)!r}, 'cpu'); load_tokenizer({str(ckpt)!r})\n"
        "new = sorted(m for m in set(sys.modules) - before if m.startswith(('transformers', 'tokenizers')))\n"
        "print(new)\n"
        "assert not new, new\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
