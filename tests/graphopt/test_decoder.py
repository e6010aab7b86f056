"""Decoders with a KV cache: built from Llama-family models, lowered, saved as folders, refused when they cannot be."""

import json
import os

import numpy as np
import onnx
import pytest
import torch
import transformers

import graphopt
from graphopt.errors import GraphoptError, ModelLoadError, OptionError, UnsafePathError, UnsupportedGraphError
from graphopt.evaluation.generation import Generator, SharedBufferCache, StaticCache
from graphopt.frontends.decoder import llama_decoder
from graphopt.frontends.decoder_folder import read_decoder_folder, save_decoder
from graphopt.ir.attention import ATTENTION_OP
from graphopt.ir.decoder import DecoderSpec, prefill_feeds
from graphopt.lowering.decoder import DecoderGraphs
from tests.decoding import (
    PROMPT,
    assert_steps_match,
    hf_greedy,
    hf_step_logits,
    smollm2_hf,
    tiny_decoder,
    tiny_generator,
    tiny_hf,
)

FORMS = ("ort", "portable")


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def reference():
    """transformers' logits for the prompt and six greedy decode steps."""
    return hf_step_logits(tiny_hf(), PROMPT, 6)


# ------------------------------------------------------------------------------------ building
@pytest.mark.parametrize("form", FORMS)
def test_parameters_keep_their_names_and_linears_stay_linears(form):
    model = tiny_decoder(form)
    hf_names = {n for n, _ in tiny_hf().named_parameters()}
    names = {n for n, _ in model.fx.named_parameters()}
    assert names == hf_names  # lm_head is tied to the embedding: one parameter, as in transformers
    linears = [n for n in model.fx.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.linear.default]
    assert len(linears) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    attention = [n for n in model.fx.graph.nodes if n.target is ATTENTION_OP]
    assert len(attention) == (2 if form == "ort" else 0)
    spec = DecoderSpec.of(model)
    assert (spec.layers, spec.heads, spec.kv_heads, spec.head_dim, spec.capacity) == (2, 4, 2, 16, 96)
    assert spec.tokenizer == "bytes" and spec.eos_token_ids == (2,)


def test_ort_form_lowers_to_group_query_attention():
    model = graphopt.lower(tiny_decoder("ort"), log=_quiet)
    proto = model.to_onnx()
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert len(gqa) == 2 and all(n.domain == "com.microsoft" for n in gqa)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in gqa[0].attribute}
    assert attrs["num_heads"] == 4 and attrs["kv_num_heads"] == 2 and attrs["do_rotary"] == 1
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(proto.graph.input) + list(proto.graph.output)}
    assert shapes["past_key_values.1.value"] == ["batch_size", 2, "past_sequence_length", 16]
    assert shapes["present.0.key"] == ["batch_size", 2, "total_sequence_length", 16]
    assert shapes["attention_mask"] == ["batch_size", "total_sequence_length"]
    matmul_weights = {n.input[1] for n in proto.graph.node if n.op_type == "MatMul"}
    assert "model.layers.1.self_attn.k_proj.weight" in matmul_weights and "lm_head.weight.T" in matmul_weights
    # the tied table is stored once: the embedding reads the transposed lm_head copy
    assert "model.embed_tokens.weight" not in {t.name for t in proto.graph.initializer}


def test_portable_form_is_standard_ops_and_static_when_saved():
    graphs = DecoderGraphs.of(tiny_decoder("portable"), log=_quiet)
    assert list(graphs.graphs) == ["prefill.onnx", "decode.onnx"]
    for file, seq in (("prefill.onnx", 16), ("decode.onnx", 1)):
        proto = graphs.graphs[file]
        assert {n.domain for n in proto.graph.node} <= {""}
        assert "Shape" not in {n.op_type for n in proto.graph.node}  # the shape arithmetic folded
        dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in list(proto.graph.input) + list(proto.graph.output)}
        assert all(all(d > 0 for d in shape) for shape in dims.values())
        assert dims["attention_mask"] == [1, 1, seq, 96 + seq] and dims["past_key_values.0.key"] == [1, 2, 96, 16]
        assert dims["present.1.value"] == [1, 2, seq, 16] and dims["logits"] == [1, seq, 256]
    external = [{t.name for t in g.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
                for g in graphs.graphs.values()]
    assert external[0] == external[1] == set(graphs.weights)  # one set of weights (and encodings) for both


@pytest.mark.parametrize("form", FORMS)
def test_fx_and_onnx_prefill_agree(form):
    model = tiny_decoder(form)
    feeds = model.sample_inputs[0]
    lowered = graphopt.lower(model, log=_quiet)
    for got, expected in zip(lowered.run(feeds), model.run(feeds)):
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------- against transformers
@pytest.mark.parametrize("form,chunk", [("ort", None), ("ort", 8), ("portable", 16), ("portable", 8)])
def test_decode_steps_match_transformers(form, chunk, reference):
    logits, fed = reference
    assert_steps_match(tiny_generator(form, 96, chunk).start(64), PROMPT, fed, logits)


class _ShiftedPositions(StaticCache):
    """Broken: decode steps rotate at a position one ahead of their own (rotary sees relative
    positions only, so a shift of every position would change nothing)."""

    def inputs(self, seq):
        feeds = super().inputs(seq)
        return {**feeds, "position_ids": feeds["position_ids"] + (seq == 1)}


class _WrongSlot(StaticCache):
    """Broken: new rows land one slot after the slots the mask shows."""

    def write(self, presents, count):
        slots = self.slots(count)
        for name, rows in zip(self.spec.past_names, presents):
            self.past[name][:, :, slots + 1] = rows[:, :, :count]
        self.used[slots] = True
        self.position += count


class _LongMask(SharedBufferCache):
    """Broken: in decode steps the mask claims one token more, so the new token's row lands one slot
    late and rotates one position ahead."""

    def bind(self, io, seq):
        super().bind(io, seq)
        io.bind_cpu_input("attention_mask", np.ones((1, self.tokens + (seq == 1)), np.int64))


@pytest.mark.parametrize("form,broken", [("portable", _ShiftedPositions), ("portable", _WrongSlot), ("ort", _LongMask)])
def test_broken_caches_fail_the_same_check(form, broken, reference):
    logits, fed = reference
    decoding = tiny_generator(form).start(64)
    decoding.cache = broken(decoding.spec, 64) if broken is _LongMask else broken(decoding.spec)
    with pytest.raises(AssertionError, match="step logits off"):
        assert_steps_match(decoding, PROMPT, fed, logits)


@pytest.mark.parametrize("form", FORMS)
def test_greedy_tokens_equal_transformers(form):
    expected = hf_greedy(tiny_hf(), PROMPT, 40)
    result = tiny_generator(form).generate(PROMPT, max_new_tokens=40)
    assert result.tokens == expected and len(expected) == 40


@pytest.mark.real
@pytest.mark.parametrize("form", FORMS)
def test_smollm2_greedy_tokens_equal_transformers(form):
    hf, tokenizer = smollm2_hf()
    prompt = tokenizer("The three laws of thermodynamics say that")["input_ids"]
    model = llama_decoder(hf, tokenizer, {"attention": form, "capacity": 256}, name="smollm2", log=_quiet)
    result = Generator.load(model, threads=2, log=_quiet).generate(prompt, max_new_tokens=24)
    assert result.tokens == hf_greedy(hf, prompt, 24)


def _tiny_config(**changes):
    config = dict(vocab_size=64, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=64)
    config.update(changes)
    return config


@pytest.mark.parametrize("config_class,changes", [
    (transformers.LlamaConfig, {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}),
    (transformers.LlamaConfig, {"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 10000.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 16}}),
    (transformers.Qwen2Config, {}),  # q/k/v biases
    (transformers.MistralConfig, {"sliding_window": None}),
    (transformers.MistralConfig, {"sliding_window": 64}),  # a window no shorter than the capacity: no effect
    (transformers.LlamaConfig, {"head_dim": 32, "num_key_value_heads": 1, "tie_word_embeddings": False}),
])
def test_other_llama_family_models_match_transformers(config_class, changes):
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config_class(**_tiny_config(**changes))).eval()
    prompt = list(range(3, 40))
    logits, fed = hf_step_logits(hf, prompt, 3)
    portable = llama_decoder(hf, None, {"attention": "portable", "capacity": 64}, log=_quiet)
    assert_steps_match(Generator.load(portable, threads=1, log=_quiet).start(), prompt, fed, logits)
    # the ort form in its FX form (the attention op's reference; lowered, it is GroupQueryAttention)
    ort = llama_decoder(hf, None, {"attention": "ort", "capacity": 64}, log=_quiet)
    spec = DecoderSpec.of(ort)
    outputs = ort.run(prefill_feeds(spec, np.array([prompt])))
    errors = [np.abs(outputs[0][0] - logits[0]).max()]
    for step, token in enumerate(fed):
        mask = np.ones((1, len(prompt) + step + 1), np.int64)
        outputs = ort.run({"input_ids": np.array([[token]]), "attention_mask": mask,
                           **dict(zip(spec.past_names, outputs[1:]))})
        errors.append(np.abs(outputs[0][0] - logits[step + 1]).max())
    assert max(errors) <= 1e-4, errors


# ------------------------------------------------------------------------------------ refusals
def test_models_that_are_not_llama_decoders_are_refused(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedGraphError, match="not a Llama-family decoder.*'gpt2'"):
        graphopt.load(gpt2, decoder=True)
    dynamic = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_tiny_config(
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})))
    with pytest.raises(UnsupportedGraphError, match="rope type 'dynamic'"):
        graphopt.load(dynamic, decoder=True)
    narrow = transformers.LlamaForCausalLM(transformers.LlamaConfig(**_tiny_config(head_dim=8)))
    with pytest.raises(UnsupportedGraphError, match="head_dim 8 is not a multiple of 16.*attention: portable"):
        graphopt.load(narrow, decoder=True)
    windowed = transformers.MistralForCausalLM(transformers.MistralConfig(**_tiny_config(sliding_window=16)))
    with pytest.raises(UnsupportedGraphError, match="sliding-window attention \\(16 tokens\\) is shorter than the "
                                                    "decoder's capacity \\(64 tokens\\).*'capacity' to at most 16"):
        graphopt.load(windowed, decoder=True)
    assert DecoderSpec.of(graphopt.load(windowed, decoder={"capacity": 16}, log=_quiet)).capacity == 16
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**_tiny_config(
        use_sliding_window=True, sliding_window=16, max_window_layers=1)))  # layer 1 of 2 attends to 16 tokens
    with pytest.raises(UnsupportedGraphError, match="sliding-window attention \\(16 tokens\\)"):
        graphopt.load(qwen, decoder=True)
    onnx_file = tmp_path / "m.onnx"
    onnx_file.write_bytes(b"")
    with pytest.raises(UnsupportedGraphError, match="not from this file"):
        graphopt.load(str(onnx_file), decoder=True)
    with pytest.raises(OptionError, match="'attention'"):
        graphopt.load("sample:tiny-llama", decoder={"attention": "fast"})
    with pytest.raises(OptionError, match="'prefill_chunk'.*larger than the capacity"):
        graphopt.load("sample:tiny-llama", decoder={"capacity": 16, "prefill_chunk": 32}, log=_quiet)
    # a model that is not a decoder is refused before anything is written
    out = tmp_path / "out"
    with pytest.raises(UnsupportedGraphError, match="not a decoder"):
        save_decoder(graphopt.load("sample:tiny-llama", log=_quiet), out)
    assert not out.exists()


def test_prompts_longer_than_the_capacity_are_refused():
    spec = DecoderSpec.of(tiny_decoder("portable"))
    with pytest.raises(GraphoptError, match="97 tokens does not fit the decoder's capacity of 96"):
        prefill_feeds(spec, np.zeros(97, np.int64))
    for form in FORMS:
        with pytest.raises(GraphoptError, match="more than the decoder's capacity of 96"):
            tiny_generator(form).generate(list(range(97)), max_new_tokens=1)


# --------------------------------------------------------------------------------------- folders
@pytest.mark.parametrize("form", FORMS)
def test_folder_holds_what_generation_needs_and_reads_back(form, tmp_path, reference):
    files = save_decoder(tiny_decoder(form), tmp_path / "out", log=_quiet)
    names = sorted(p.name for p in files)
    expected = (["decoder.json", "genai_config.json", "model.onnx", "model.onnx.data"] if form == "ort"
                else ["decode.onnx", "decoder.json", "prefill.onnx", "weights.data"])
    assert names == expected
    folder = read_decoder_folder(tmp_path / "out")
    assert folder.spec == DecoderSpec.of(tiny_decoder(form)) and folder.tokenizer is None
    logits, fed = reference
    assert_steps_match(Generator(folder.spec, folder.graphs, threads=1).start(64), PROMPT, fed, logits)
    if form == "portable":  # both graphs read the one weights file at the same offsets
        refs = [{t.name: tuple(e.value for e in t.external_data)
                 for t in onnx.load(str(tmp_path / "out" / f), load_external_data=False).graph.initializer
                 if t.external_data} for f in ("prefill.onnx", "decode.onnx")]
        assert refs[0] == refs[1] and all(v[0] == "weights.data" for v in refs[0].values())
    else:
        config = json.loads((tmp_path / "out" / "genai_config.json").read_text())
        assert config["model"]["decoder"]["num_key_value_heads"] == 2 and config["model"]["eos_token_id"] == 2
        assert config["search"]["past_present_share_buffer"] is True and config["model"]["context_length"] == 96
        loaded = graphopt.load(str(tmp_path / "out"))
        assert DecoderSpec.of(loaded) == folder.spec and loaded.form == "onnx"


def test_quantized_portable_graphs_share_one_set_of_codes(tmp_path):
    from graphopt.frontends.corpora import lm_windows
    from graphopt.frontends.decoder import decoder_feeds
    from graphopt.passes import Quantize

    decoder = tiny_decoder("portable")
    calib = decoder_feeds(decoder, lm_windows(None, "calib", 2, 32))
    quantize = Quantize(weight_bits=4, weight_granularity="block", weight_block_size=16, activation_bits=16,
                        exclude=["rotary_cos", "rotary_sin"])
    model = graphopt.Pipeline([quantize], log=_quiet).run(decoder, calib=calib).model
    graphs = DecoderGraphs.of(model, log=_quiet)
    assert graphs.packed  # the 4-bit codes, outside both graphs
    save_decoder(model, tmp_path / "w4", log=_quiet)
    protos = [onnx.load(str(tmp_path / "w4" / f), load_external_data=False) for f in ("prefill.onnx", "decode.onnx")]
    four_bit = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    codes = [{t.name: [e.value for e in t.external_data] for t in p.graph.initializer if t.data_type in four_bit and t.external_data}
             for p in protos]
    assert codes[0] == codes[1] and set(codes[0]) == set(graphs.packed)
    quantized = Generator.load(tmp_path / "w4", threads=1).generate(PROMPT, max_new_tokens=16)
    in_memory = Generator.load(model, threads=1, log=_quiet).generate(PROMPT, max_new_tokens=16)
    assert quantized.tokens == in_memory.tokens


def test_damaged_folders_are_refused(tmp_path):
    out = tmp_path / "out"
    save_decoder(tiny_decoder("portable"), out, log=_quiet)
    config = json.loads((out / "decoder.json").read_text())
    config["spec"]["kv_heads"] = 3
    (out / "decoder.json").write_text(json.dumps(config))
    with pytest.raises(GraphoptError, match="decoder.json"):
        read_decoder_folder(out)
    os.remove(out / "decoder.json")
    with pytest.raises(GraphoptError, match="not a decoder folder"):
        Generator.load(out)
    with pytest.raises(ModelLoadError, match="unknown field 'colour'"):
        DecoderSpec.from_json({**DecoderSpec.of(tiny_decoder("portable")).to_json(), "colour": 1})


@pytest.mark.parametrize("form, field, value, tensor", [
    ("ort", "head_dim", 8, "past_key_values.0.key"), ("ort", "vocab", 100, "logits"),
    ("portable", "head_dim", 8, "past_key_values.0.key"), ("portable", "vocab", 100, "logits"),
    ("portable", "capacity", 200, "attention_mask")])  # the ort form's cache is dynamic: no capacity in its shapes
def test_a_config_that_contradicts_its_graphs_is_refused_before_they_run(form, field, value, tensor, tmp_path):
    """decoder.json edited by hand (and its manifest with it): sizes the graphs do not have are
    refused on reading, naming the graph and the tensor, instead of failing inside onnxruntime."""
    out = tmp_path / "out"
    save_decoder(tiny_decoder(form), out, log=_quiet)
    config = json.loads((out / "decoder.json").read_text())
    config["spec"][field] = value
    (out / "decoder.json").write_text(json.dumps(config))
    os.remove(out / ".graphopt-manifest.json")
    graph = "model.onnx" if form == "ort" else "prefill.onnx"
    with pytest.raises(ModelLoadError, match=rf"{graph}: '{tensor}' has shape .* where decoder.json describes"):
        read_decoder_folder(out)


def test_a_graph_whose_cache_type_is_not_the_configs_is_refused(tmp_path):
    out = tmp_path / "out"
    save_decoder(tiny_decoder("ort"), out, log=_quiet)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    proto.graph.input[2].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(proto, str(out / "model.onnx"))
    os.remove(out / ".graphopt-manifest.json")
    with pytest.raises(ModelLoadError, match="'past_key_values.0.key' is float16, where decoder.json describes float32"):
        read_decoder_folder(out)


def test_a_capacity_past_the_rotary_table_is_refused_naming_the_table(tmp_path):
    """The ort form's shapes leave the capacity open: a capacity raised by hand is measured against the
    rotary table GroupQueryAttention reads (even when the spec names no tables), not left to fail mid-generation."""
    out = tmp_path / "out"
    save_decoder(tiny_decoder("ort"), out, log=_quiet)
    os.remove(out / ".graphopt-manifest.json")
    config = json.loads((out / "decoder.json").read_text())
    config["spec"].update(capacity=200)
    config["spec"]["rope"]["tables"] = []
    (out / "decoder.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"model.onnx: rotary table 'rotary_cos' has shape \[96, 8\].*capacity of 200"):
        read_decoder_folder(out)
    config["spec"].update(capacity=48)  # a smaller capacity uses part of the table
    (out / "decoder.json").write_text(json.dumps(config))
    assert Generator.load(out, threads=1).generate(PROMPT, max_new_tokens=40).stop == "capacity"


@pytest.mark.parametrize("field, value, message", [
    ("mask_value", 5.0, r"'mask_value' must be in \[-65504, -1000\]"), ("mask_value", -1.0, "'mask_value' must be in"),
    ("rope", {"tables": [["rotary_cos"]]}, "'rope': 'tables' must be a string"),
    ("rope", {"tables": "rotary_cos"}, "'rope': 'tables' must be a list")])
def test_spec_fields_that_would_mislead_generation_are_refused(field, value, message):
    """A positive or small mask would let the portable form attend to empty slots (wrong tokens, no error);
    tables that are not names would fail inside the passes that look them up."""
    data = {**DecoderSpec.of(tiny_decoder("portable")).to_json(), field: value}
    with pytest.raises(ModelLoadError, match=message):
        DecoderSpec.from_json(data)


@pytest.mark.parametrize("name", ["decoder.json", "prefill.onnx"])
def test_files_of_a_folder_that_lead_outside_it_are_refused(name, tmp_path):
    out, outside = tmp_path / "out", tmp_path / "elsewhere"
    save_decoder(tiny_decoder("portable"), out, log=_quiet)
    outside.mkdir()
    os.replace(out / name, outside / name)
    os.symlink(outside / name, out / name)
    with pytest.raises(UnsafePathError, match=f"'{name}' resolves to .*, outside the folder"):
        Generator.load(out)
    os.remove(out / name)
    os.mkdir(out / name)
    with pytest.raises(ModelLoadError, match=f"'{name}' is a folder, not a file"):
        Generator.load(out)
