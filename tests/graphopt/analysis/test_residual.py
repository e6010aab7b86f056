"""The residual stream finder: what reads and writes a Llama's stream, and refusals naming the node."""

import onnx_graphsurgeon as gs
import pytest

from graphopt.analysis.residual import find_residual_stream
from graphopt.errors import UnsupportedGraphError


def test_tiny_llama_stream(tiny_onnx):
    stream = find_residual_stream(tiny_onnx)
    assert stream.width == 64
    assert [(e.table, e.axis) for e in stream.embeddings] == [("lm_head.weight.T", 1)]
    # 2 layers: o_proj and down_proj write; input, post-attention and the final norm read
    assert len(stream.writers) == 4 and all("o_proj" in w or "down_proj" in w for w in stream.writers)
    assert len(stream.norms) == 5 and all(n.gamma for n in stream.norms)
    assert stream.norms[-1].readers == ["lm_head.weight.T"]
    assert sorted(len(n.readers) for n in stream.norms) == [1, 2, 2, 3, 3]  # lm_head, gate/up, q/k/v


def test_a_stream_tensor_as_graph_output_is_refused(tiny_onnx):
    model = tiny_onnx.copy()
    stream = find_residual_stream(model)
    model.graph.outputs.append(model.graph.tensors()[stream.tensors[1]])
    with pytest.raises(UnsupportedGraphError, match=f"'{stream.tensors[1]}' is a graph output"):
        find_residual_stream(model)


def test_any_other_reader_is_refused_by_name(tiny_onnx):
    model = tiny_onnx.copy()
    graph = model.graph
    first = graph.tensors()[find_residual_stream(model).tensors[0]]
    out = gs.Variable("probe_out", dtype=first.dtype)
    graph.nodes.append(gs.Node("Relu", name="probe_relu", inputs=[first], outputs=[out]))
    graph.outputs.append(out)
    with pytest.raises(UnsupportedGraphError, match="Relu 'probe_relu' reads stream tensor"):
        find_residual_stream(model)


@pytest.mark.real
def test_minilm_layernorm_is_not_a_rotatable_stream(minilm_onnx):
    with pytest.raises(UnsupportedGraphError, match="residual stream"):
        find_residual_stream(minilm_onnx)
