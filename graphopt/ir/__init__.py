"""The IR: one `Model` handle (FX or ONNX form), graph helpers for each form, serialization."""

from graphopt.ir.model import MIN_OPSET, Form, Model, ModelMeta, TensorSpec, is_parameter_dtype
from graphopt.ir.onnx_graph import consumers, graph_opset

__all__ = ["Model", "ModelMeta", "TensorSpec", "Form", "MIN_OPSET", "is_parameter_dtype", "consumers", "graph_opset"]
