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
from graphopt.quant.plan import weight_matches

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
       looked up as codes and dequantized row by row: the lookup reads the looked-up rows, never
       the whole table, and they are the DequantizeLinear's bit for bit.
       - A 4- or 8-bit table [K, N] (per channel, or in blocks along K) looked up along N whose
         MatMul became MatMulNBits: com.microsoft GatherBlockQuantized on that kernel's B,
         scales and zero points (Transpose back to the lookup's layout), so the file holds the
         table once.
       - A table in blocks along the other axis than the lookup's (an untied embedding [V, H] in
         blocks along H): 4-bit codes through GatherBlockQuantized; 8-bit codes gathered with
         their rows' block scales (and zero points), which a Gather of each element's block index
         spreads over the rows' elements (a shorter last block too).
       - Per channel or per tensor, 8 bits: Gather -> Cast -> Sub -> Mul. Other 4-bit tables
         stay in QDQ form (onnxruntime's Gather takes no 4-bit type).
    4. `split_inputs`: a MatMulNBits at accuracy level 4 whose weight matches (one at level 0 reads
       float inputs already, and is left as it is: an untied lm_head in 4 bits) reads, instead of x
       [..., K], x and x - q concatenated along the leading axis, and the two halves of its output
       are added (Split -> Add), q being x rounded as the kernel rounds it (int8 per block of its
       block_size along K, symmetric, scale max|x| / 127). The kernel's int8 rounding of x then
       cancels but for the rounding of x - q: about 15-bit activations, one kernel call of twice the rows.
       When the block does not divide K, the last block is shorter, as in the kernel (x padded with
       zeros to whole blocks for the rounding, which leaves each block's max |x| its own).
    Does NOT fire on: 16-bit codes, per-block scales along another axis than K, weights a
    non-MatMul op reads, MatMuls with a weight of another rank; those stay QDQ, and `changed`
    is False when nothing matched. Weight encodings moved into kernels leave `model.meta.encodings`
    (the kernels' inputs hold them); activation Q/DQ pairs stay as they are.

    Guarantees: with both accuracy levels 0, outputs equal the QDQ model's within float
    accumulation order; every weight kept its codes (`dequantize_nbits` of a kernel's inputs is the
    DequantizeLinear's output, bit for bit, and so is every lookup of rule 3). The QDQ form
    (before this pass) is what NPU backends read; this pass is for onnxruntime CPU. OptionError
    when a `split_inputs` pattern matches no weight that became a MatMulNBits.
    """

    name: ClassVar[str] = "use_ort_kernels"
    mutates_input: ClassVar[bool] = True

    accuracy_level_4bit: int = field(default=0, metadata={
        "help": "MatMulNBits accuracy_level of 4-bit weights: 0 float activations (exact), 4 int8 activations"})
    accuracy_level_8bit: int = field(default=4, metadata={
        "help": "MatMulNBits accuracy_level of 8-bit weights not read through a static 8-bit activation"})
    integer_matmul: bool = field(default=True, metadata={
        "help": "8-bit weights read through static 8-bit activations run as MatMulIntegerToFloat"})

    split_inputs: tuple[str, ...] = field(default=(), metadata={
        "help": "weights (names, globs, 're:...') of accuracy-level-4 MatMulNBits that read their input as "
                "int8 plus its int8 residual (two rows, one call)"})

    def check(self) -> None:
        for option in ("accuracy_level_4bit", "accuracy_level_8bit"):
            if getattr(self, option) not in _ACCURACY:
                raise OptionError(f"'{self.name}': option '{option}' must be 0 or 4, got {getattr(self, option)!r}")

    def run_onnx(self, model: Model, ctx: PassContext) -> PassResult:
        graph = model.graph
        users = consumers(graph)
        stats = {"MatMulIntegerToFloat": 0, "MatMulNBits": 0, "gathered_tables": 0, "split_inputs": 0}
        nbits_of: dict[int, list[gs.Constant]] = {}  # id(weight DQ) -> its MatMulNBits' B, scales[, zero points]
        moved: set[str] = set()
        split: list[str] = []
        exact: list[str] = []  # MatMulNBits weights at accuracy level 0: float inputs, no rounding to cancel
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
            if made.op != "MatMulNBits" or not weight_matches(dq.outputs[0].name, self.split_inputs):
                continue
            if made.attrs["accuracy_level"] == 4:
                graph.nodes.extend(_split_input(made))
                split.append(dq.outputs[0].name)
            else:
                exact.append(dq.outputs[0].name)
        for pattern in self.split_inputs:
            if not any(weight_matches(name, (pattern,)) for name in split + exact):
                raise OptionError(f"'{self.name}': option 'split_inputs': '{pattern}' matches no weight that became "
                                  "a MatMulNBits")
        stats["split_inputs"] = len(split)
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
        if bits not in NBITS:
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
        if gathered:  # the lookups read the kernel's codes, scales and zero points: the table is held once
            nbits_of[id(dq)] = inputs[1:]
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


def _builder(base: str, nodes: list[gs.Node]):
    """`make(op, inputs, suffix, dtype, **attrs)`: appends a node named after `base` to `nodes` and
    returns its new output."""
    def make(op: str, inputs: list, suffix: str, dtype=np.float32, **attrs) -> gs.Variable:
        result = gs.Variable(f"{base}_{suffix}", dtype=dtype)
        nodes.append(gs.Node(op, name=f"{base}_{op}_{suffix}", inputs=inputs, outputs=[result], attrs=attrs))
        return result
    return make


def _gather_rows(gather: gs.Node, dq: gs.Node, nbits: list[gs.Constant] | None) -> list[gs.Node]:
    """Rule 3: Gather(DequantizeLinear(table), ids) as the dequantized rows of gathered codes."""
    table, ids, out = dq.outputs[0], gather.inputs[1], gather.outputs[0]
    axis = gather.attrs.get("axis", 0) % 2
    codes, scale, zero = dq.inputs[0], np.asarray(dq.inputs[1].values, np.float32), dq.inputs[2:]
    channel = dq.attrs.get("axis", 1) % 2
    blocked = nbits is None and "block_size" in dq.attrs
    bits = _codes_kind(dq)[0]
    if ids.shape is None or blocked and channel == axis:
        return []
    if nbits is None and bits == 4 and not (blocked and _kernel_block(int(dq.attrs["block_size"]))):
        return []  # (onnxruntime's Gather takes no 4-bit codes)
    if nbits is None and not blocked and scale.size > 1 and channel != axis:
        return []  # scales across the looked-up rows: not an embedding layout graphopt writes
    if nbits is not None and axis != 1:
        return []
    base = f"{table.name}_rows_{gather.name}"
    nodes: list[gs.Node] = []
    node = _builder(base, nodes)
    if nbits is not None:  # table [K, N] looked up along N from MatMulNBits' B [N, blocks, block · bits / 8]
        packed, block_scales, *block_zeros = nbits
        rank, k = len(ids.shape), codes.values.shape[0]
        n, blocks, width = packed.values.shape
        flat = node("Reshape", [packed, gs.Constant(f"{base}_table_shape", np.array([n, blocks * width], np.int64))],
                    "table", np.uint8)
        rows = _gather_blocks(base, nodes, [flat, ids, block_scales, *block_zeros], width * 8 // bits, bits)
        if blocks * width * 8 // bits != k:  # K padded to whole blocks
            rows = node("Slice", [rows, gs.Constant(f"{base}_start", np.array([0], np.int64)),
                                  gs.Constant(f"{base}_end", np.array([k], np.int64)),
                                  gs.Constant(f"{base}_last", np.array([-1], np.int64))], "cut")
        nodes.append(gs.Node("Transpose", name=f"{base}_Transpose", inputs=[rows], outputs=[out],
                             attrs={"perm": [rank, *range(rank)]}))
    elif blocked and bits == 4:  # blocks along the other axis, 4-bit: the kernel reads int4 / uint4 codes itself
        inputs = [codes, ids, gs.Constant(f"{base}_block_scale", scale), *zero]
        _gather_blocks(base, nodes, inputs, int(dq.attrs["block_size"]), axes=(axis, channel), out=out)
    elif blocked:  # blocks along the other axis: each looked-up row's block parameters, spread over its elements
        values = node("Cast", [node("Gather", [codes, ids], "codes", codes.values.dtype, axis=axis)], "float", to=1)
        spread_axis = 0 if axis == 1 else len(ids.shape)  # where the block axis lands in the lookup's output
        index = gs.Constant(f"{base}_element_blocks",
                            np.arange(codes.values.shape[channel], dtype=np.int64) // int(dq.attrs["block_size"]))
        params = [gs.Constant(f"{base}_block_scale", scale)]
        if zero:
            params.append(gs.Constant(f"{base}_block_zero", np.asarray(zero[0].values, np.float32)))
        params = [node("Gather", [node("Gather", [p, ids], f"rows{i}", axis=axis), index], f"param{i}", axis=spread_axis)
                  for i, p in enumerate(params)]
        centred = node("Sub", [values, params[1]], "centred") if len(params) > 1 else values
        nodes.append(gs.Node("Mul", name=f"{base}_Mul", inputs=[centred, params[0]], outputs=[out]))
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


def _kernel_block(block: int) -> bool:
    """Whether the com.microsoft block kernels take blocks of `block`: a power of two >= 16."""
    return block >= 16 and not block & (block - 1)


def _gather_blocks(base: str, nodes: list[gs.Node], inputs: list, block: int, bits: int | None = None,
                   axes: tuple[int, int] = (0, 1), out: gs.Variable | None = None) -> gs.Variable:
    """Appends com.microsoft GatherBlockQuantized(table, ids, scales[, zero points]) to `nodes`: the
    slices of `ids` along axes[0], dequantized by blocks of `block` along axes[1] (a shorter last
    block too; with `bits`, codes packed in uint8, MatMulNBits' layout and default zero point, else
    int4 / uint4 codes); returns its output."""
    out = out if out is not None else gs.Variable(f"{base}_rows", dtype=np.float32)
    attrs = {"gather_axis": axes[0], "quantize_axis": axes[1], "block_size": block, **({"bits": bits} if bits else {})}
    nodes.append(gs.Node("GatherBlockQuantized", name=f"{base}_GatherBlockQuantized", domain=MS, inputs=inputs,
                         outputs=[out], attrs=attrs))
    return out


def _split_input(kernel: gs.Node) -> list[gs.Node]:
    """Rule 4: the MatMulNBits `kernel` (accuracy level 4) reads x and x - q concatenated along the
    leading axis and its two halves of products are added, q being x rounded as the kernel rounds it
    (int8 per block of its block_size along K, a shorter last block when the block does not divide K,
    scale max|x| / 127, codes round(x · (1 / scale)), half to even)."""
    x, out, block, base = kernel.inputs[0], kernel.outputs[0], kernel.attrs["block_size"], f"{kernel.name}_split"
    extra = -kernel.attrs["K"] % block
    nodes: list[gs.Node] = []
    node = _builder(base, nodes)

    def const(suffix: str, values, dtype=np.float32) -> gs.Constant:
        return gs.Constant(f"{base}_{suffix}", np.array(values, dtype))

    last = const("last", [-1], np.int64)
    whole = x if not extra else node("Pad", [x, const("pads", [0, extra], np.int64), const("pad_value", 0.0), last],
                                     "padded")  # zeros change no block's max |x|
    blocks = node("Reshape", [whole, const("blocks_shape", [-1, block], np.int64)], "blocks")
    amax = node("ReduceMax", [node("Abs", [blocks], "abs"), last], "amax", keepdims=1)
    scale = node("Div", [node("Max", [amax, const("tiny", 1e-30)], "guarded"), const("int8_max", 127.0)], "scale")
    codes = node("Round", [node("Mul", [blocks, node("Reciprocal", [scale], "inverse")], "scaled")], "codes")
    rounded = node("Reshape", [node("Mul", [codes, scale], "q"), node("Shape", [whole], "shape", np.int64)], "rounded")
    if extra:
        rounded = node("Slice", [rounded, const("start", [0], np.int64), const("end", [kernel.attrs["K"]], np.int64),
                                 last], "cut")
    kernel.inputs[0] = node("Concat", [x, node("Sub", [x, rounded], "rest")], "stacked", axis=0)
    products = gs.Variable(f"{base}_products", dtype=np.float32)
    kernel.outputs[0] = products
    halves = [gs.Variable(f"{base}_{half}", dtype=np.float32) for half in ("of_x", "of_rest")]
    nodes.append(gs.Node("Split", name=f"{base}_Split", inputs=[products], outputs=halves,
                         attrs={"axis": 0, "num_outputs": 2}))
    nodes.append(gs.Node("Add", name=f"{base}_Add", inputs=halves, outputs=[out]))
    return nodes
