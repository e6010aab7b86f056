"""Hugging Face folders and GGUF files through the reading boundary (issue 18): safetensors only,
config sizes bounded and checked against the weights, corrupt headers named, before transformers runs."""

import json
import os
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.numpy import save_file

import graphopt
from graphopt.errors import GraphoptError, ModelLoadError, UnsafePathError

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "num_hidden_layers": 2,
          "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 16, "vocab_size": 4}


def _weights(layers: int = 2) -> dict[str, np.ndarray]:
    found = {"model.embed_tokens.weight": np.zeros((4, 8), np.float32)}
    for i in range(layers):
        found[f"model.layers.{i}.self_attn.q_proj.weight"] = np.zeros((8, 8), np.float32)
    return found


def _folder(root: Path, config: dict | None = None, **files) -> Path:
    folder = root / "hf"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(CONFIG if config is None else config))
    save_file(_weights(), str(folder / "model.safetensors"))
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    return folder


def _refused(source, error, *words):
    """graphopt.load refuses `source` with `error` naming every word; nothing is written beside it."""
    folder = Path(source) if Path(source).is_dir() else Path(source).parent
    before = sorted(os.listdir(folder))
    with pytest.raises(error) as info:
        graphopt.load(source, log=lambda *a: None)
    message = str(info.value)
    for word in words:
        assert word in message, message
    assert len(message) < 600 and sorted(os.listdir(folder)) == before
    return message


@pytest.fixture
def no_unpickling(monkeypatch):
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load ran")

    monkeypatch.setattr(torch, "load", refuse)


def test_index_mapping_a_weight_to_a_bin_shard_is_refused(tmp_path, no_unpickling):
    folder = _folder(tmp_path)
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "pytorch_model-00002-of-00002.bin").write_bytes(b"a pickle would run code here")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "pytorch_model-00002-of-00002.bin"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(folder, UnsafePathError, "model.safetensors.index.json", "'lm_head.weight'", "never unpickles")


@pytest.mark.parametrize("shard, error", [("../other/model.safetensors", UnsafePathError),
                                          ("/etc/model.safetensors", UnsafePathError),
                                          ("missing.safetensors", ModelLoadError)])
def test_index_shards_stay_inside_the_folder(tmp_path, shard, error):
    folder = _folder(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": shard}}))
    _refused(folder, error, "model.safetensors.index.json", "'w'")


def test_config_claiming_100000_layers_fails_fast(tmp_path):
    start = time.perf_counter()
    _refused(_folder(tmp_path, {**CONFIG, "num_hidden_layers": 100000}), ModelLoadError, "config.json",
             "'num_hidden_layers' must be in [1, 512]")
    assert time.perf_counter() - start < 5


def test_config_layers_must_match_the_weights(tmp_path):
    _refused(_folder(tmp_path, {**CONFIG, "num_hidden_layers": 3}), ModelLoadError, "config.json",
             "claims 3 layers, the weights hold 2")


@pytest.mark.parametrize("change, words", [
    ({"num_attention_heads": 0}, ["'num_attention_heads' must be in [1, 1024], got 0"]),
    ({"num_attention_heads": 3}, ["not a multiple of 3 heads"]),
    ({"num_key_value_heads": 0}, ["'num_key_value_heads'"]),
    ({"hidden_size": 16}, ["hidden size 16", "token embedding"]),
    ({"num_hidden_layers": "2"}, ["'num_hidden_layers' must be an integer, got '2'"]),
    ({"num_hidden_layers": True}, ["must be an integer, got True"]),
    ({"hidden_size": 8.5}, ["'hidden_size' must be an integer, got 8.5"]),
])
def test_config_sizes_are_strict(tmp_path, change, words):
    _refused(_folder(tmp_path, {**CONFIG, **change}), ModelLoadError, "config.json", *words)


@pytest.mark.parametrize("text, words", [
    ("[" * 100000, ["nested more than"]),
    ('{"hidden_size": 8, "hidden_size": 9}', ["'hidden_size' is given twice"]),
    ('{"vocab_size": NaN}', ["NaN is not JSON"]),
    ("[1, 2]", ["must be an object"]),
])
def test_malformed_config_json_is_named(tmp_path, text, words):
    folder = _folder(tmp_path)
    (folder / "config.json").write_text(text)
    _refused(folder, ModelLoadError, "config.json", *words)


def test_huge_config_json_is_refused_before_reading(tmp_path):
    folder = _folder(tmp_path)
    with open(folder / "config.json", "wb") as fh:
        fh.truncate(1 << 30)
    _refused(folder, ModelLoadError, "config.json", "more than")


def test_deeply_nested_tokenizer_json_is_refused(tmp_path):
    _refused(_folder(tmp_path, tokenizer__json="[" * 50000 + "]" * 50000), ModelLoadError, "tokenizer.json", "nested")


def test_truncated_and_corrupt_safetensors_name_file_and_tensor(tmp_path):
    folder = _folder(tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    _refused(folder, ModelLoadError, "model.safetensors", "truncated")
    weights.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    _refused(folder, ModelLoadError, "model.safetensors", "header claims")
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    name = "model.layers.1.self_attn.q_proj.weight"
    header[name]["data_offsets"] = [0, 256]  # overlaps the tensor at 0
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    _refused(folder, ModelLoadError, "model.safetensors")
    header = json.loads(data[8:8 + length])
    header[name]["dtype"] = "F16"
    text = json.dumps(header).encode()
    weights.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    _refused(folder, ModelLoadError, f"tensor '{name}'", "needs 128")


def test_a_well_formed_folder_passes_the_checks(tmp_path):
    from graphopt.frontends.huggingface import check_hf_folder

    assert check_hf_folder(_folder(tmp_path))["num_hidden_layers"] == 2


# ----------------------------------------------------------------------------------- GGUF
def _gguf(path: Path, *, blocks: int = 2, heads: int = 2, tokens=("a", "b", "c")) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(blocks)
    writer.add_embedding_length(8)
    writer.add_head_count(heads)
    writer.add_head_count_kv(1)
    writer.add_feed_forward_length(16)
    writer.add_array("tokenizer.ggml.tokens", list(tokens))
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    for i in range(2):
        writer.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((8, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_block_count_100000_fails_fast(tmp_path):
    start = time.perf_counter()
    _refused(_gguf(tmp_path / "m.gguf", blocks=100000), ModelLoadError, "m.gguf", "'llama.block_count'")
    assert time.perf_counter() - start < 5


def test_gguf_zero_heads_is_an_error_not_a_division(tmp_path):
    _refused(_gguf(tmp_path / "m.gguf", heads=0), ModelLoadError, "'llama.attention.head_count'", "got 0")


def test_truncated_gguf_headers_are_named(tmp_path):
    data = _gguf(tmp_path / "m.gguf").read_bytes()
    for cut in (10, 30, 100, 200, 400):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        _refused(tmp_path / "cut.gguf", ModelLoadError, "cut.gguf")


def test_gguf_array_claiming_2_to_the_60_items_is_refused_fast(tmp_path):
    data = bytearray(_gguf(tmp_path / "m.gguf").read_bytes())
    at = data.index(b"tokenizer.ggml.tokens") + len(b"tokenizer.ggml.tokens") + 4 + 4  # key, value type, item type
    assert struct.unpack_from("<Q", data, at)[0] == 3
    struct.pack_into("<Q", data, at, 1 << 60)
    (tmp_path / "huge.gguf").write_bytes(bytes(data))
    start = time.perf_counter()
    _refused(tmp_path / "huge.gguf", ModelLoadError, "huge.gguf", "'tokenizer.ggml.tokens'", "claims")
    assert time.perf_counter() - start < 2


def test_gguf_tensor_data_past_the_end_is_named(tmp_path):
    data = _gguf(tmp_path / "m.gguf").read_bytes()
    (tmp_path / "short.gguf").write_bytes(data[:-64])
    _refused(tmp_path / "short.gguf", ModelLoadError, "tensor 'blk.1.attn_q.weight'", "past the")


def test_a_well_formed_gguf_passes_the_checks(tmp_path):
    from graphopt.frontends.huggingface import check_gguf

    header = check_gguf(_gguf(tmp_path / "m.gguf"))
    assert header.metadata["llama.block_count"] == 2 and set(header.tensors) >= {"token_embd.weight"}
    assert issubclass(ModelLoadError, GraphoptError)
