"""store_half: float32 constants whose every value is a float16 stored as float16, cast back at load."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import OptionError
from graphopt.ir import Model, consumers
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant.numerics import is_half

__all__ = ["StoreHalf"]


@register_pass
@dataclass(frozen=True)
class StoreHalf(Pass):
    """Store every float32 constant of at least `min_elements` values that float16 holds exactly
    (all of its values) as float16, read through a Cast back to float32 under its old name.

    For the scales and offsets of `quantize: half_scales` (and of weights read from GGUF, whose
    scales are float16 already) once `use_ort_kernels` and `fuse_ort_ops` have laid them out: the
    file holds them at half the bytes, and onnxruntime folds each Cast into a float32 initializer
    when it loads the model, so the kernels compute the same numbers as before.
    Does NOT fire on constants with a value float16 rounds, overflows or flushes (a float model's
    weights, as a rule), on other dtypes, on graph outputs, or below `min_elements`: `changed` is
    False when none qualifies. Guarantees: outputs equal the input model's bit for bit.
    """

    name: ClassVar[str] = "store_half"
    mutates_input: ClassVar[bool] = True

    min_elements: int = field(default=1024, metadata={
        "help": "smallest constant (values) worth a Cast node: smaller ones stay float32"})

    def check(self) -> None:
        if self.min_elements < 1:
            raise OptionError(f"'store_half': option 'min_elements' must be >= 1, got {self.min_elements}")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        readers = consumers(graph)
        outputs = {t.name for t in graph.outputs}
        stored, saved = 0, 0
        for name, tensor in list(graph.tensors().items()):
            if not isinstance(tensor, gs.Constant) or name in outputs or id(tensor) not in readers:
                continue
            values = np.asarray(tensor.values)
            if values.dtype != np.float32 or values.size < self.min_elements or not is_half(values):
                continue
            half = gs.Constant(f"{name}_float16", values.astype(np.float16))
            cast = gs.Variable(name, dtype=np.float32, shape=list(values.shape))
            for node in readers[id(tensor)]:
                for index, read in enumerate(node.inputs):
                    if read is tensor:
                        node.inputs[index] = cast
            graph.nodes.append(gs.Node("Cast", name=f"{name}_Cast", inputs=[half], outputs=[cast],
                                       attrs={"to": 1}))
            stored += 1
            saved += values.nbytes // 2
        if not stored:
            return PassResult(model, False, {"reason": "no float32 constant float16 holds exactly"})
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        return PassResult(model, True, {"constants": stored, "bytes_saved": saved})
