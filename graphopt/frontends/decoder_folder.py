"""Decoder folders: everything generation needs, written as one output set and read back checked.

A decoder folder holds
- the graphs (`graphopt.lowering.decoder.graph_files`): `model.onnx` for the ort form,
  `prefill.onnx` + `decode.onnx` for the portable form, and one weights file they share
  (`model.onnx.data` / `weights.data`);
- `decoder.json`: {"format": "graphopt-decoder", "version": 1, "spec": the DecoderSpec};
- the tokenizer's files (tokenizer.save_pretrained, chat template included) unless the model
  reads bytes; generation reads them back without transformers (`graphopt.frontends.tokenizer`);
- for the ort form, `genai_config.json`, the file onnxruntime-genai reads (the builder's fields;
  past and present share one buffer), so that runtime runs the folder as it is.

`read_decoder_folder` reads it back through the reading boundary: the config bounded and every
field checked, the graphs through `load_onnx` (their weights' locations confined to the folder and
sized), the files matching the folder's manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from graphopt.errors import GraphoptError, ModelLoadError
from graphopt.files.reading import confined_path, read_json, shown, want_dict, want_int
from graphopt.files.writing import OutputSet, check_manifest
from graphopt.frontends.tokenizer import Tokenizer
from graphopt.ir import Model
from graphopt.ir.decoder import DecoderSpec
from graphopt.ir.onnx_files import load_onnx, load_onnx_mapped
from graphopt.lowering.decoder import DecoderGraphs, graph_files, weights_file

__all__ = ["CONFIG", "DecoderFolder", "write_decoder", "save_decoder", "read_decoder_folder", "is_decoder_folder",
           "genai_config"]

CONFIG = "decoder.json"
FORMAT, VERSION = "graphopt-decoder", 1
MAX_CONFIG_BYTES = 1 << 20


@dataclass
class DecoderFolder:
    """A decoder ready to run: its spec, graphs with their shared weights, and tokenizer (None: bytes)."""

    spec: DecoderSpec
    graphs: DecoderGraphs
    tokenizer: Tokenizer | None = None
    path: Path | None = None


def genai_config(spec: DecoderSpec) -> dict:
    """onnxruntime-genai's genai_config.json for an ort-form decoder, with the fields its model
    builder writes (0.18): sizes, the cache's names, end-of-sequence ids, and search defaults with
    past and present sharing one buffer of `capacity` tokens."""
    eos = list(spec.eos_token_ids)
    pad = spec.pad_token_id if spec.pad_token_id is not None else (eos[0] if eos else 0)
    decoder = {
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
        "filename": "model.onnx", "head_size": spec.head_dim, "hidden_size": spec.hidden,
        "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                   "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
        "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value"},
        "num_attention_heads": spec.heads, "num_hidden_layers": spec.layers, "num_key_value_heads": spec.kv_heads,
    }
    model = {"bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else pad,
             "context_length": spec.capacity, "decoder": decoder,
             "eos_token_id": eos[0] if len(eos) == 1 else eos, "pad_token_id": pad,
             "type": spec.architecture, "vocab_size": spec.vocab}
    search = {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
              "max_length": spec.capacity, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
              "num_return_sequences": 1, "past_present_share_buffer": True, "repetition_penalty": 1.0,
              "temperature": 1.0, "top_k": 50, "top_p": 1.0}
    return {"model": model, "search": search}


def write_decoder(graphs: DecoderGraphs, tokenizer, output: OutputSet) -> list[Path]:
    """Write a decoder's graphs (see `DecoderGraphs.of`) and `tokenizer` (None: bytes) into the open
    output set; returns the files staged. The graphs pass onnx.checker before they are staged."""
    spec = graphs.spec
    staged = graphs.write(output.staging)
    for file in graph_files(spec):
        onnx.checker.check_model(str(output.staging / file))
    config = {"format": FORMAT, "version": VERSION, "spec": spec.to_json()}
    _write_text(output.path(CONFIG), json.dumps(config, indent=1) + "\n")
    staged.append(output.staging / CONFIG)
    if spec.form == "ort":
        _write_text(output.path("genai_config.json"), json.dumps(genai_config(spec), indent=4) + "\n")
        staged.append(output.staging / "genai_config.json")
    if tokenizer is not None:
        before = set(output.staging.iterdir())
        tokenizer.save_pretrained(str(output.staging))
        staged += sorted(set(output.staging.iterdir()) - before)
    return staged


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def save_decoder(model: Model, folder: str | Path, *, inputs: list[Path] = (), force: bool = False,
                 log=print) -> list[Path]:
    """Write decoder `model` as a decoder folder (one output set: all files appear together, or
    none; a model that is not a decoder is refused before the folder is touched); returns the
    files written."""
    graphs = DecoderGraphs.of(model, log=log)
    with OutputSet(folder, inputs=inputs, force=force) as output:
        staged = write_decoder(graphs, model.tokenizer, output)
    return [Path(folder) / p.name for p in staged]


def is_decoder_folder(path: Path) -> bool:
    """Whether `path` is a folder holding a decoder.json (of any kind: reading it says what is wrong with it)."""
    return path.is_dir() and os.path.lexists(path / CONFIG)


def _read_config(folder: Path) -> DecoderSpec:
    where = str(folder / CONFIG)
    path = confined_path(folder, CONFIG, who=str(folder), missing=ModelLoadError)
    data = want_dict(read_json(path, max_bytes=MAX_CONFIG_BYTES, error=ModelLoadError, what=CONFIG), where,
                     ModelLoadError)
    if data.get("format") != FORMAT:
        raise ModelLoadError(f"{where}: 'format' must be '{FORMAT}', got {shown(data.get('format'))}")
    version = want_int(data.get("version"), f"{where}: 'version'", ModelLoadError)
    if version != VERSION:
        raise ModelLoadError(f"{where}: version {version} is not one this graphopt reads ({VERSION})")
    return DecoderSpec.from_json(data.get("spec"), f"{where}: 'spec'")


def read_decoder_folder(folder: str | Path) -> DecoderFolder:
    """A decoder folder read back (see the module docstring); ModelLoadError naming the file on
    anything missing, malformed or from another run."""
    folder = Path(folder)
    spec = _read_config(folder)
    files = list(graph_files(spec))
    check_manifest(folder, [CONFIG, weights_file(spec), *files])
    protos, weights = {}, {}
    for file, seq in graph_files(spec).items():
        path = confined_path(folder, file, who=str(folder), missing=ModelLoadError)
        proto, mapped = load_onnx_mapped(path)
        names = [v.name for v in proto.graph.input if v.name not in {t.name for t in proto.graph.initializer}]
        if names != spec.input_names or [o.name for o in proto.graph.output] != spec.output_names:
            raise ModelLoadError(f"{folder / file}: its inputs and outputs are not those {CONFIG} describes "
                                 f"(inputs {names[:3]}..., outputs {[o.name for o in proto.graph.output][:3]}...)")
        _check_io_types(proto, spec, seq, folder / file)
        _check_rotary_tables(proto, spec, folder / file)
        protos[file] = proto
        weights = {**mapped, **weights}  # a weight both graphs read is mapped once more, not copied
    tokenizer = Tokenizer.read(folder) if spec.tokenizer == "hf" else None
    return DecoderFolder(spec, DecoderGraphs(spec, protos, weights), tokenizer, folder)


def _check_io_types(proto, spec: DecoderSpec, seq: int | None, path: Path) -> None:
    """Every input and output of a graph has the element type and the fixed sizes `spec` gives it
    (a hand-edited decoder.json whose heads or sizes are not the graph's is refused here, not by
    the runtime mid-generation)."""
    seq = "sequence_length" if seq is None else seq
    shapes = {**spec.input_shapes(seq), **spec.output_shapes(seq)}
    dtypes = {**spec.input_dtypes(), **spec.output_dtypes()}
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name not in shapes:
            continue
        tensor = value.type.tensor_type
        if tensor.elem_type != onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtypes[value.name])):
            raise ModelLoadError(f"{path}: '{value.name}' is {onnx.TensorProto.DataType.Name(tensor.elem_type).lower()}, "
                                 f"where {CONFIG} describes {dtypes[value.name]}")
        if not tensor.HasField("shape"):
            continue
        got = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in tensor.shape.dim)
        want = shapes[value.name]
        if len(got) != len(want) or any(isinstance(w, int) and isinstance(g, int) and g != w for g, w in zip(got, want)):
            raise ModelLoadError(f"{path}: '{value.name}' has shape {list(got)}, where {CONFIG} describes {list(want)}")


def _check_rotary_tables(proto, spec: DecoderSpec, path: Path) -> None:
    """The rotary tables (those the spec names, and GroupQueryAttention's cos/sin caches) hold a row
    for every position of the capacity (a capacity raised by hand would otherwise fail inside
    attention once the context passes the table)."""
    tables = set(spec.rope.get("tables", ()))
    tables |= {name for node in proto.graph.node if node.op_type == "GroupQueryAttention" for name in node.input[7:9]}
    for tensor in proto.graph.initializer:
        if tensor.name in tables and (len(tensor.dims) != 2 or tensor.dims[0] < spec.capacity):
            raise ModelLoadError(f"{path}: rotary table '{tensor.name}' has shape {list(tensor.dims)}: positions for "
                                 f"fewer tokens than the capacity of {spec.capacity} {CONFIG} describes")


def _read_hf_tokenizer(folder: Path):
    """transformers' tokenizer of a folder, for a Model that may be written again (save_pretrained)."""
    import transformers

    from graphopt.frontends.huggingface import check_tokenizer_files

    check_tokenizer_files(folder)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - tokenizers raise many types; name the folder
        raise ModelLoadError(f"{folder}: the tokenizer files do not load: {type(exc).__name__}: "
                             f"{shown(str(exc), 200)}") from exc


def load_decoder_model(folder: Path) -> Model:
    """The ort-form decoder of a folder as a Model (ONNX form, weights loaded); a portable folder
    holds static graphs only and is refused (run it with graphopt.generate)."""
    spec = _read_config(folder)
    if spec.form != "ort":
        raise GraphoptError(f"{folder}: a portable decoder folder holds two static graphs; run it with "
                            "graphopt.generate, or build the decoder again from its source model")
    check_manifest(folder, [CONFIG, weights_file(spec), "model.onnx"])
    model = Model.from_onnx(load_onnx(folder / "model.onnx"), source=folder / "model.onnx", name=folder.name)
    model.task = "causal-lm"
    model.meta.extra["decoder"] = spec.to_json()
    model.tokenizer = _read_hf_tokenizer(folder) if spec.tokenizer == "hf" else None
    return model
