"""use_ort_kernels: QDQ weights as the com.microsoft kernels onnxruntime's CPU runs fastest, same codes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from graphopt.errors import OptionError
from graphopt.ir import Model, consumers
from graphopt.pipeline.passes import Pass, PassContext, PassResult, register_pass
from graphopt.quant.ort_layouts import NBITS, nbits_weight

__all__ = ["UseOrtKernels"]

MS = "com.microsoft"
_CODES = {"int4": (4, True), "uint4": (4, False), "int8": (8, True), "uint8": (8, False)}
_ACCURACY = (0, 4)


def _weight_dq(tensor: gs.Tensor) -> gs.Node | None:
    """The DequantizeLinear making `tensor` from constant codes, scale and zero point, or None."""
    node = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if node is None or node.op != "DequantizeLinear" or not all(isinstance(t, gs.Constant) for t in node.inputs):
        return None
    return node


def _codes_kind(dq: gs.Node) -> tuple[int, bool] | None:
    """(bits, signed) of a weight DequantizeLinear's codes, None for widths no kernel here takes."""
    return _CODES.get(np.dtype(dq.inputs[0].values.dtype).name)


def _params(dq: gs.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    codes = np.asarray(dq.inputs[0].values).astype(np.int32)
    scale = np.asarray(dq.inputs[1].values, np.float32)
    zero = np.asarray(dq.inputs[2].values).astype(np.int32) if len(dq.inputs) > 2 else None
    return codes, scale, zero


def _static_int8_input(tensor: gs.Tensor) -> tuple[gs.Tensor, gs.Constant, gs.Constant] | None:
    """(codes, scale, zero point) when `tensor` is DequantizeLinear(QuantizeLinear(x)) to 8 bits,
    per tensor: the integer activation a MatMulIntegerToFloat can read instead."""
    dq = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if dq is None or dq.op != "DequantizeLinear" or len(dq.inputs) < 3 or not dq.inputs[0].inputs:
        return None
    q = dq.inputs[0].inputs[0]
    scale, zero = dq.inputs[1], dq.inputs[2]
    if q.op != "QuantizeLinear" or not isinstance(scale, gs.Constant) or not isinstance(zero, gs.Constant):
        return None
    if np.asarray(scale.values).size != 1 or np.dtype(zero.values.dtype).name not in ("int8", "uint8"):
        return None
    return dq.inputs[0], scale, zero


def _per_channel(dq: gs.Node, codes: np.ndarray) -> bool:
    """Scales per tensor or per output channel of a [K, N] MatMul weight (not per block)."""
    size = np.asarray(dq.inputs[1].values).size
    return "block_size" not in dq.attrs and (size == 1 or dq.attrs.get("axis", 1) % 2 == 1 and size == codes.shape[1])


@register_pass
@dataclass(frozen=True)
class UseOrtKernels(Pass):
    """Rewrite QDQ weights into the com.microsoft kernels onnxruntime's CPU runs fastest.

    Reads the QDQ form `quantize` / `fold_encodings` write; no calibration. Rules, for each MatMul
    whose weight is DequantizeLinear(constant codes [K, N], scale, zero point):
    1. 8-bit codes per channel or per tensor, read through a static 8-bit per-tensor activation
       (DequantizeLinear(QuantizeLinear(x))): MatMulIntegerToFloat on the activation's codes and
       the weight's codes, scales and zero points. The integer products are exact: the QDQ
       form's math.
    2. 4- or 8-bit codes read by any other input: MatMulNBits (graphopt.quant.ort_layouts: the
       same codes shifted to unsigned, blocks along K, per-channel scales repeated over the
       widest block `_channel_block` allows), `accuracy_level_4bit` / `accuracy_level_8bit`
       (0: float activations, the QDQ form's math; 4: onnxruntime quantizes the activation to int8
       per block inside the kernel, faster and slightly off; 8-bit codes at 0 run slower than float weights).
    3. A weight table whose DequantizeLinear a Gather also reads (an embedding, tied or not) is
       gathered as codes, then dequantized row by row (Gather -> Cast -> Sub -> Mul, Transpose
       back to the lookup's layout); an 8-bit table whose MatMul became MatMulNBits is gathered
       from that kernel's codes, so the file holds the table once.
    Does NOT fire on: 16-bit codes, per-block scales along another axis than K, weights a
    non-MatMul op reads, MatMuls with a weight of another rank; those stay QDQ, and `changed`
    is False when nothing matched. Weight encodings moved into kernels leave `model.meta.encodings`
    (the kernels' inputs hold them); activation Q/DQ pairs stay as they are.

    Guarantees: with both accuracy levels 0, outputs equal the QDQ model's within float
    accumulation order; every weight kept its codes (`dequantize_nbits` of a kernel's inputs is the
    DequantizeLinear's output, bit for bit). The QDQ form (before this pass) is what NPU backends
    read; this pass is for onnxruntime CPU.
    """

    name: ClassVar[str] = "use_ort_kernels"
    mutates_input: ClassVar[bool] = True

    accuracy_level_4bit: int = field(default=0, metadata={
        "help": "MatMulNBits accuracy_level of 4-bit weights: 0 float activations (exact), 4 int8 activations"})
    accuracy_level_8bit: int = field(default=4, metadata={
        "help": "MatMulNBits accuracy_level of 8-bit weights not read through a static 8-bit activation"})
    integer_matmul: bool = field(default=True, metadata={
        "help": "8-bit weights read through static 8-bit activations run as MatMulIntegerToFloat"})

    def check(self) -> None:
        for option in ("accuracy_level_4bit", "accuracy_level_8bit"):
            if getattr(self, option) not in _ACCURACY:
                raise OptionError(f"'{self.name}': option '{option}' must be 0 or 4, got {getattr(self, option)!r}")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        users = consumers(graph)
        stats = {"MatMulIntegerToFloat": 0, "MatMulNBits": 0, "gathered_tables": 0}
        nbits_of: dict[int, tuple] = {}  # id(weight DQ) -> (B, per-row scale, per-row zero point)
        moved: set[str] = set()
        for node in [n for n in graph.nodes if n.op == "MatMul" and len(n.inputs) == 2]:
            dq = _weight_dq(node.inputs[1])
            kind = _codes_kind(dq) if dq is not None else None
            if kind is None or dq.inputs[0].values.ndim != 2:
                continue
            readers = users.get(id(dq.outputs[0]), [])
            if any(r.op not in ("MatMul", "Gather") or r.op == "MatMul" and r.inputs[1] is not dq.outputs[0]
                   for r in readers):
                continue
            made = self._integer_matmul(node, dq, kind) or self._nbits_matmul(node, dq, kind, readers, nbits_of)
            if made is None:
                continue
            graph.nodes.append(made)
            stats[made.op] += 1
            moved.add(dq.outputs[0].name)
        users = consumers(graph)
        for gather in [n for n in graph.nodes if n.op == "Gather"]:
            dq = _weight_dq(gather.inputs[0])
            if dq is None or _codes_kind(dq) is None or dq.inputs[0].values.ndim != 2:
                continue
            nodes = _gather_rows(gather, dq, nbits_of.get(id(dq)))
            if nodes:
                graph.nodes.extend(nodes)
                stats["gathered_tables"] += 1
                moved.add(dq.outputs[0].name)
        changed = any(stats.values())
        if not changed:
            return PassResult(model, False, {"reason": "no MatMul or Gather reads a 4- or 8-bit QDQ weight"})
        _import_domain(graph)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        still = {n.outputs[0].name for n in graph.nodes if n.op == "DequantizeLinear"}
        model.meta.encodings = {k: v for k, v in model.meta.encodings.items() if k not in moved - still}
        return PassResult(model, True, stats)

    # ------------------------------------------------------------------------------ rules
    def _integer_matmul(self, node: gs.Node, dq: gs.Node, kind: tuple[int, bool]) -> gs.Node | None:
        """Rule 1."""
        activation = _static_int8_input(node.inputs[0])
        if not self.integer_matmul or kind[0] != 8 or activation is None or len(dq.inputs) < 3:
            return None
        codes, scale, zero = dq.inputs
        if not _per_channel(dq, codes.values):
            return None
        x_codes, x_scale, x_zero = activation
        output = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        return gs.Node("MatMulIntegerToFloat", name=f"{node.name}_integer", domain=MS,
                       inputs=[x_codes, codes, x_scale, scale, x_zero, zero], outputs=[output])

    def _nbits_matmul(self, node: gs.Node, dq: gs.Node, kind: tuple[int, bool], readers: list[gs.Node],
                      nbits_of: dict) -> gs.Node | None:
        """Rule 2."""
        bits, signed = kind
        codes, scale, zero = _params(dq)
        gathered = any(r.op == "Gather" for r in readers)
        if bits not in NBITS or gathered and bits != 8:  # a 4-bit table stays whole for its lookups
            return None
        block = dq.attrs.get("block_size")
        if block is not None and dq.attrs.get("axis", 0) % 2 != 0:
            return None
        if block is None and not _per_channel(dq, codes):
            return None
        name = dq.outputs[0].name
        weight = nbits_weight(codes, scale, zero, bits=bits, signed=signed, block_size=block,
                              channel_block=_channel_block(codes.shape[0]), where=f"weight '{name}'")
        packed = gs.Constant(f"{name}_nbits", weight.packed)
        inputs = [node.inputs[0], packed, gs.Constant(f"{name}_nbits_scales", weight.scales)]
        if weight.zero_points is not None:
            inputs.append(gs.Constant(f"{name}_nbits_zero_points", weight.zero_points))
        if gathered:
            if block is not None:
                return None
            rows = np.broadcast_to(scale.reshape(-1), (weight.N,)).astype(np.float32)
            offset = (0 if zero is None else zero) + (128 if signed else 0)
            nbits_of[id(dq)] = (packed, rows, np.broadcast_to(offset, (weight.N,)).astype(np.float32))
        level = self.accuracy_level_4bit if bits == 4 else self.accuracy_level_8bit
        output = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        return gs.Node("MatMulNBits", name=f"{node.name}_nbits", domain=MS, inputs=inputs, outputs=[output],
                       attrs={"K": weight.K, "N": weight.N, "bits": bits, "block_size": weight.block_size,
                              "accuracy_level": level})


def _channel_block(k: int) -> int:
    """MatMulNBits block for a weight with one scale per output channel: the largest power of two
    in [16, 256] dividing K (fewest repeated scales, no padding; 256 is the widest block the CPU
    kernels serve), else 64 with K padded."""
    block = 256
    while block >= 16 and k % block:
        block //= 2
    return block if block >= 16 else 64


def _import_domain(graph: gs.Graph) -> None:
    import onnx

    domains = {d.domain: d for d in graph.import_domains or []}
    if MS not in domains:
        graph.import_domains = [*(graph.import_domains or []), onnx.helper.make_opsetid(MS, 1)]


def _gather_rows(gather: gs.Node, dq: gs.Node, nbits: tuple[gs.Constant, np.ndarray, np.ndarray] | None) -> list[gs.Node]:
    """Rule 3: Gather(DequantizeLinear(table), ids) as the dequantized rows of gathered codes."""
    table, ids, out = dq.outputs[0], gather.inputs[1], gather.outputs[0]
    axis = gather.attrs.get("axis", 0) % 2
    codes, scale, zero = dq.inputs[0], np.asarray(dq.inputs[1].values, np.float32), dq.inputs[2:]
    if "block_size" in dq.attrs or ids.shape is None:
        return []
    channel = dq.attrs.get("axis", 1) % 2
    if nbits is None and scale.size > 1 and channel != axis:
        return []  # scales across the looked-up rows: not an embedding layout graphopt writes
    base = f"{table.name}_rows_{gather.name}"
    nodes: list[gs.Node] = []

    def var(suffix: str, dtype=np.float32) -> gs.Variable:
        return gs.Variable(f"{base}_{suffix}", dtype=dtype)

    def node(op: str, inputs: list, suffix: str, dtype=np.float32, **attrs) -> gs.Variable:
        result = var(suffix, dtype)
        nodes.append(gs.Node(op, name=f"{base}_{op}_{suffix}", inputs=inputs, outputs=[result], attrs=attrs))
        return result

    if nbits is not None:  # an 8-bit table [K, N] looked up along N from MatMulNBits codes [N, blocks, block]
        if axis != 1:
            return []
        packed, rows, offsets = nbits
        k = table.shape[0] if table.shape else codes.values.shape[0]
        picked = node("Gather", [packed, ids], "codes", np.uint8, axis=0)
        shape = gs.Constant(f"{base}_shape", np.array([0] * len(ids.shape) + [-1], np.int64))
        flat = node("Reshape", [picked, shape], "flat", np.uint8)
        cut = node("Slice", [flat, gs.Constant(f"{base}_start", np.array([0], np.int64)),
                             gs.Constant(f"{base}_end", np.array([k], np.int64)),
                             gs.Constant(f"{base}_axes", np.array([-1], np.int64))], "cut", np.uint8)
        values = node("Cast", [cut], "float", to=1)
        row_offset = gs.Constant(f"{base}_row_offset", offsets.reshape(-1, 1))
        centred = node("Sub", [values, node("Gather", [row_offset, ids], "offset", axis=0)], "centred")
        row_scale = gs.Constant(f"{base}_row_scale", rows.reshape(-1, 1))
        scaled = node("Mul", [centred, node("Gather", [row_scale, ids], "scale", axis=0)], "scaled")
        rank = len(ids.shape)
        nodes.append(gs.Node("Transpose", name=f"{base}_Transpose", inputs=[scaled], outputs=[out],
                             attrs={"perm": [rank, *range(rank)]}))
    else:
        picked = node("Gather", [codes, ids], "codes", codes.values.dtype, axis=axis)
        values = node("Cast", [picked], "float", to=1)
        shaped = [1, 1]
        if scale.size > 1 and channel == axis:  # a scale per looked-up row: looked up with it
            shaped[axis] = -1
            params = [gs.Constant(f"{base}_row_scale", scale.reshape(shaped))]
            if zero:
                params.append(gs.Constant(f"{base}_row_zero", np.asarray(zero[0].values, np.float32).reshape(shaped)))
            params = [node("Gather", [p, ids], f"param{i}", axis=axis) for i, p in enumerate(params)]
        else:
            params = [gs.Constant(f"{base}_scale", scale.reshape(()))]
            if zero:
                params.append(gs.Constant(f"{base}_zero", np.asarray(zero[0].values, np.float32).reshape(())))
        centred = node("Sub", [values, params[1]], "centred") if len(params) > 1 else values
        nodes.append(gs.Node("Mul", name=f"{base}_Mul", inputs=[centred, params[0]], outputs=[out]))
    gather.outputs.clear()
    gather.inputs.clear()
    return nodes
