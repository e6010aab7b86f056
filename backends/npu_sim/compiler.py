"""QDQ ONNX graph -> npu-sim Program, compiled for one fixed input shape.

The compiler walks the graph in topological order and gives every ONNX tensor a *value*:

1. const   — known at compile time (initializers, and anything computed only from constants and
             shapes: the input shape is fixed, so Shape/Range/mask subgraphs fold away).
2. qconst  — a constant integer tensor with scale/zero point (a DequantizeLinear of a weight).
3. quant   — a program integer tensor with per-tensor scale/zero point (a Q->DQ activation).
4. float / index — a program float tensor / integer-or-bool data tensor, living on the host.
5. masked  — a quant value plus a constant additive mask of 0 / very negative (attention mask).

Rules, tried per node (the first that fits wins):
1. QuantizeLinear of a quant value with the same parameters is an alias; with other parameters a
   `requantize`; of a float value a `quantize` (host -> NPU); DequantizeLinear is an alias.
2. All inputs constant: evaluated now (onnxruntime), the result is a const.
3. MatMul / Add / Sub / Mul / Softmax / any elementwise op of one quantized input, whose output
   feeds only QuantizeLinear nodes of one per-tensor encoding: an integer kernel (`matmul` with
   per-channel fixed-point requantization, TFLite-style `add`/`sub`, `mul`, a 256- or
   65536-entry `lut`, integer `softmax`).
4. Data movement (Reshape, Transpose, Slice, Gather, Concat, Expand, Squeeze, Unsqueeze, Flatten,
   Where) of per-tensor quantized values moves the integers; the encoding is unchanged.
5. Anything else runs on the host in float (its quantized inputs are dequantized there), and is
   recorded in the host partition with the reason the NPU could not take it.

The compiler executes each op as it emits it (on the example feeds), so every tensor has a
concrete shape: that is how Shape nodes fold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphopt.backends.npu_sim import kernels
from graphopt.backends.npu_sim.program import Op, Program, TensorInfo
from graphopt.backends.npu_sim.simulator import _HostOp, run_op
from graphopt.errors import BackendError, UnsupportedGraphError
from graphopt.sparsity.patterns import is_n_m

__all__ = ["compile_model", "MASK_THRESHOLD"]

MASK_THRESHOLD = -1e4  # an additive mask entry at or below this excludes the position
UNARY_OPS = {
    "Sigmoid", "Tanh", "Gelu", "Erf", "Exp", "Log", "Neg", "Sqrt", "Reciprocal", "Relu", "Abs", "Pow", "Clip",
    "LeakyRelu", "HardSigmoid", "HardSwish", "Softplus", "Elu", "Cos", "Sin", "Identity", "Div", "Mul", "Add",
    "Sub", "Mish", "Celu", "Selu", "Floor", "Ceil", "Round", "Sign",
}
MOVE_OPS = {"Reshape", "Transpose", "Slice", "Gather", "Concat", "Expand", "Squeeze", "Unsqueeze", "Flatten",
            "Where", "Identity"}
ARITH_BITS_MAX = 8  # add/mul/matmul take 8-bit operands (16-bit would need 48-bit accumulators)


@dataclass
class Value:
    kind: str  # const | qconst | quant | float | index | masked
    name: str | None = None  # program tensor (quant / float / index / masked)
    array: np.ndarray | None = None  # const values, qconst integers, masked: the boolean keep-mask
    scale: np.ndarray | None = None
    zp: np.ndarray | None = None
    axis: int | None = None
    dtype: str | None = None  # integer dtype of quant / qconst

    @property
    def per_tensor(self) -> bool:
        return self.scale is not None and self.scale.size == 1

    def params(self) -> tuple[float, int, str]:
        return float(self.scale.reshape(-1)[0]), int(self.zp.reshape(-1)[0]), self.dtype


def _int_dtype(array: np.ndarray) -> str:
    name = np.asarray(array).dtype.name
    return name if name in kernels.INT_RANGES else str(array.dtype)


def _bits(dtype: str) -> int:
    lo, hi = kernels.INT_RANGES[dtype]
    return int(math.log2(hi - lo + 1))


class _Compiler:
    def __init__(self, graph: gs.Graph, feeds: dict[str, np.ndarray], name: str, masks: dict):
        self.graph = graph
        self.masks = masks
        self.program = Program(name=name, inputs=[], outputs=[], output_names=[])
        self.values: dict[str, Value] = {}
        self.env: dict[str, np.ndarray] = {}
        self.floats: dict[int, str] = {}  # id(Value) -> program float tensor holding it
        self.consumers: dict[str, list[gs.Node]] = {}
        self.used_names: set[str] = set()
        self.feeds = feeds
        self.absorbed: set[str] = set()  # nodes folded into a fused kernel (RMSNorm chain)
        for node in graph.nodes:
            for t in node.inputs:
                self.consumers.setdefault(t.name, []).append(node)

    # ------------------------------------------------------------------ naming / emitting
    def _fresh(self, base: str) -> str:
        base = base or "t"
        name, i = base, 1
        while name in self.used_names:
            name, i = f"{base}.{i}", i + 1
        self.used_names.add(name)
        return name

    def constant(self, array: np.ndarray, base: str) -> str:
        name = self._fresh(base)
        array = np.asarray(array)
        if array.dtype.name in ("int4", "uint4") or array.dtype.kind == "V":
            array = array.astype(np.int8 if "u" not in array.dtype.name else np.uint8)
        self.program.constants[name] = array
        self.env[name] = array
        self.program.tensors[name] = TensorInfo(name, array.dtype.name, list(array.shape), const=True)
        return name

    def emit(self, kind: str, unit: str, node: str, inputs: list[str], outputs: list[str], attrs=None,
             params: dict[str, np.ndarray] | None = None, quant: tuple | None = None) -> list[str]:
        names = {k: self.constant(v, f"{node}.{k}") for k, v in (params or {}).items()}
        outputs = [self._fresh(o) for o in outputs]
        op = Op(kind, unit, node, inputs, outputs, _jsonable(attrs or {}), names)
        host = _HostOp(op) if kind == "host" else None
        try:
            run_op(op, self.env, self.program.constants, host)
        except BackendError:
            raise
        except Exception as exc:  # a kernel fed shapes it cannot take: report the node, not a numpy trace
            raise BackendError(f"npu-sim: op '{kind}' for node '{node}' failed at compile time: {exc}") from exc
        self.program.ops.append(op)
        for i, o in enumerate(outputs):
            value = self.env[o]
            info = TensorInfo(o, value.dtype.name, list(value.shape))
            if quant is not None and i == 0:
                info.scale = float(np.asarray(quant[0]).reshape(-1)[0])
                info.zero_point = int(np.asarray(quant[1]).reshape(-1)[0])
            self.program.tensors[o] = info
        return outputs

    def host(self, node: gs.Node, reason: str) -> None:
        args = [self.as_host_input(t) if t.name else "" for t in node.inputs]
        attrs = {"op_type": node.op, "domain": node.domain or "", "attributes": _attrs(node)}
        outs = self.emit("host", "host", node.name, args, [t.name for t in node.outputs], attrs)
        for t, o in zip(node.outputs, outs):
            value = self.env[o]
            self.values[t.name] = Value("float" if value.dtype.kind == "f" else "index", o)
        self.program.host_partition.append({"op": node.op, "node": node.name, "reason": reason})

    # ------------------------------------------------------------------ materialising values
    def as_host_input(self, tensor) -> str:
        """A program tensor holding `tensor` in float (or its own integer type for index data)."""
        value = self.values[tensor.name]
        key = id(value)
        if key in self.floats:
            return self.floats[key]
        if value.kind in ("float", "index"):
            name = value.name
        elif value.kind == "const":
            name = self.constant(value.array, tensor.name)
        elif value.kind == "qconst":
            # dequantize on the host at run time: a float copy of a weight would double weights.npz
            q = self.constant(value.array, tensor.name + ".q")
            attrs = {"scale": value.scale.astype(np.float32), "zero_point": value.zp.astype(np.int64)}
            name = self.emit("dequantize", "host", tensor.name, [q], [tensor.name + ".f"],
                             {"axis": value.axis}, attrs)[0]
        elif value.kind == "quant":
            scale, zp, _ = value.params()
            name = self.emit("dequantize", "host", tensor.name, [value.name], [tensor.name + ".f"], {},
                             {"scale": np.float32(scale), "zero_point": np.int64(zp)})[0]
        else:  # masked: x + mask on the host
            scale, zp, _ = value.params()
            x = self.emit("dequantize", "host", tensor.name, [value.name], [tensor.name + ".f"], {},
                          {"scale": np.float32(scale), "zero_point": np.int64(zp)})[0]
            bias = self.constant(np.where(value.array, 0.0, np.finfo(np.float32).min).astype(np.float32),
                                 tensor.name + ".mask")
            name = self.emit("host", "host", tensor.name, [x, bias], [tensor.name + ".masked"],
                             {"op_type": "Add", "domain": "", "attributes": {}})[0]
        self.floats[key] = name
        return name

    def as_int(self, value: Value, base: str) -> str:
        """The program tensor of a per-tensor quantized value (a constant for a qconst)."""
        if value.kind == "qconst":
            return self.constant(value.array, base + ".q")
        return value.name

    # ------------------------------------------------------------------ the walk
    def run(self, model) -> Program:
        for spec in model.inputs:
            tensor = self.graph.tensors()[spec.name]
            if spec.name not in self.feeds:
                raise BackendError(f"npu-sim: no example input for '{spec.name}'")
            value = np.asarray(self.feeds[spec.name])
            name = self._fresh(spec.name)
            self.env[name] = value
            self.program.tensors[name] = TensorInfo(name, value.dtype.name, list(value.shape))
            self.program.inputs.append(name)
            self.values[tensor.name] = Value("float" if value.dtype.kind == "f" else "index", name)
        for tensor in self.graph.tensors().values():
            if isinstance(tensor, gs.Constant):
                self.values[tensor.name] = Value("const", array=np.asarray(tensor.values))
        self.graph.toposort()
        for node in self.graph.nodes:
            self.visit(node)
        for tensor in self.graph.outputs:
            value = self.values[tensor.name]
            name = self.as_host_input(tensor) if value.kind != "index" else value.name
            self.program.outputs.append(name)
            self.program.output_names.append(tensor.name)
        return self.program

    def visit(self, node: gs.Node) -> None:
        op = node.op
        if node.name in self.absorbed:
            return None
        if op == "QuantizeLinear":
            return self.visit_q(node)
        if op == "DequantizeLinear":
            return self.visit_dq(node)
        inputs = [self.values[t.name] if t.name else None for t in node.inputs]
        present = [v for v in inputs if v is not None]
        if all(v.kind in ("const", "qconst") for v in present):
            return self.fold(node, inputs)
        if op == "Shape":
            return self.set_const(node, self.shape_of(node))
        if op == "Size":
            return self.set_const(node, np.array(self.env_of(inputs[0]).size, dtype=np.int64))
        if op == "IsNaN" and inputs[0].kind in ("quant", "qconst"):
            return self.set_const(node, np.zeros(self.env_of(inputs[0]).shape, dtype=bool))
        if op == "Where" and inputs[0].kind == "const" and (inputs[0].array.all() or not inputs[0].array.any()):
            picked = inputs[1] if inputs[0].array.all() else inputs[2]
            shape = np.broadcast_shapes(*(self.env_of(v).shape for v in inputs))
            if picked.kind != "const" and self.env_of(picked).shape == shape:
                self.values[node.outputs[0].name] = picked
                return None
        reason = self.try_npu(node, inputs)
        if reason is not None:
            self.host(node, reason)
        return None

    # ------------------------------------------------------------------ Q / DQ
    def visit_q(self, node: gs.Node) -> None:
        x = self.values[node.inputs[0].name]
        scale, zp, axis = self.qparams(node)
        dtype = _int_dtype(zp)
        out = node.outputs[0].name
        if x.kind in ("const", "qconst"):
            real = self.real(x)
            q = kernels.quantize(real, scale, zp, dtype, axis)
            self.values[out] = Value("qconst", array=q, scale=scale, zp=zp, axis=axis, dtype=dtype)
            return
        if scale.size != 1:
            return self.host(node, "per-channel activation quantization")
        if x.kind == "quant" and x.per_tensor:
            s_in, z_in, d_in = x.params()
            if s_in == float(scale) and z_in == int(zp) and d_in == dtype:
                self.values[out] = Value("quant", x.name, scale=scale, zp=zp, dtype=dtype)
                return
            m0, shift = kernels.quantize_multiplier(s_in / float(scale))
            name = self.emit("requantize", "npu", node.name, [x.name], [out], {
                "in_zp": z_in, "m0": int(m0[0]), "shift": int(shift[0]), "out_zp": int(zp), "out_dtype": dtype},
                quant=(scale, zp))[0]
            self.values[out] = Value("quant", name, scale=scale, zp=zp, dtype=dtype)
            return
        src = self.as_host_input(node.inputs[0])
        name = self.emit("quantize", "npu", node.name, [src], [out], {"out_dtype": dtype},
                         {"scale": scale.astype(np.float32).reshape(()), "zero_point": zp.astype(np.int64).reshape(())},
                         quant=(scale, zp))[0]
        self.values[out] = Value("quant", name, scale=scale, zp=zp, dtype=dtype)

    def visit_dq(self, node: gs.Node) -> None:
        x = self.values[node.inputs[0].name]
        scale, zp, axis = self.qparams(node)
        out = node.outputs[0].name
        if "block_size" in node.attrs and node.attrs.get("block_size"):
            if x.kind in ("const", "qconst"):
                return self.fold(node, [x] + [self.values[t.name] for t in node.inputs[1:]])
            return self.host(node, "blocked dequantization of an activation")
        if x.kind == "const":
            self.values[out] = Value("qconst", array=np.asarray(x.array), scale=scale, zp=zp, axis=axis,
                                     dtype=_int_dtype(x.array))
            return
        if x.kind == "quant" and scale.size == 1:
            self.values[out] = Value("quant", x.name, scale=scale, zp=zp, dtype=x.dtype)
            return
        if x.kind == "qconst":
            self.values[out] = Value("qconst", array=x.array, scale=scale, zp=zp, axis=axis, dtype=x.dtype)
            return
        self.host(node, "dequantization of a tensor that is not a quantized activation")

    def qparams(self, node: gs.Node):
        scale = self.values[node.inputs[1].name]
        if scale.kind != "const":
            raise UnsupportedGraphError(f"npu-sim: node '{node.name}': scale '{node.inputs[1].name}' is not a constant")
        scale = np.asarray(scale.array, dtype=np.float32)
        if len(node.inputs) > 2 and node.inputs[2].name:
            zp = np.asarray(self.values[node.inputs[2].name].array)
        else:
            zp = np.zeros(scale.shape, dtype=np.uint8)
        if zp.dtype.name in ("int4", "uint4"):
            zp = zp.astype(np.int8)
        axis = node.attrs.get("axis", 1) if scale.size > 1 else None
        return scale, zp, axis

    # ------------------------------------------------------------------ folding
    def real(self, value: Value) -> np.ndarray:
        if value.kind == "const":
            return value.array
        return kernels.dequantize(value.array, value.scale, value.zp, value.axis)

    def fold(self, node: gs.Node, inputs: list) -> None:
        args = [None if v is None else np.asarray(self.real(v)) for v in inputs]
        op = Op("host", "host", node.name, [], [t.name for t in node.outputs],
                {"op_type": node.op, "domain": node.domain or "", "attributes": _attrs(node)})
        try:
            results = _HostOp(op)(args)
        except BackendError as exc:
            raise BackendError(f"npu-sim: cannot fold constant node '{node.name}' ({node.op}): {exc}") from exc
        for t, r in zip(node.outputs, results):
            self.values[t.name] = Value("const", array=np.asarray(r))

    def set_const(self, node: gs.Node, array: np.ndarray) -> None:
        self.values[node.outputs[0].name] = Value("const", array=np.asarray(array))

    def env_of(self, value: Value) -> np.ndarray:
        if value.kind in ("const", "qconst"):
            return value.array
        return self.env[value.name]

    def shape_of(self, node: gs.Node) -> np.ndarray:
        shape = np.array(self.env_of(self.values[node.inputs[0].name]).shape, dtype=np.int64)
        start = node.attrs.get("start", 0)
        end = node.attrs.get("end", None)
        return shape[start:end]

    # ------------------------------------------------------------------ integer kernels
    def out_encoding(self, node: gs.Node):
        """(scale, zp, dtype) when every consumer of the node's output is a per-tensor QuantizeLinear."""
        if len(node.outputs) != 1:
            return None
        tensor = node.outputs[0]
        quantizers = self._quantizers(tensor)
        if not quantizers or tensor in self.graph.outputs or any(u.op != "QuantizeLinear" for u in quantizers):
            return None
        encodings = set()
        for u in quantizers:
            scale, zp, _ = self.qparams(u)
            if scale.size != 1:
                return None
            encodings.add((float(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]), _int_dtype(zp)))
        return encodings.pop() if len(encodings) == 1 else None

    def _quantizers(self, tensor) -> list[gs.Node]:
        """Consumers of `tensor`, looking through NaN guards: IsNaN of a quantized value folds to False,
        so `Where(IsNaN(x), c, x)` is `x` and its own consumers count."""
        found = []
        for user in self.consumers.get(tensor.name, []):
            if user.op == "IsNaN":
                continue
            guard = user.inputs[0].inputs[0] if user.op == "Where" and user.inputs[0].inputs else None
            if guard is not None and guard.op == "IsNaN" and guard.inputs[0] is tensor and user.inputs[2] is tensor:
                found += self._quantizers(user.outputs[0])
                continue
            found.append(user)
        return found

    def try_npu(self, node: gs.Node, inputs: list[Value | None]) -> str | None:
        """Emit an integer kernel for `node`; return None when done, else why the NPU cannot run it."""
        op = node.op
        present = [v for v in inputs if v is not None]
        if op in MOVE_OPS and present and present[0].kind == "quant" and present[0].per_tensor:
            reason = self.move(node, inputs)
            if reason is None:
                return None
            if op not in UNARY_OPS:
                return reason
        if op in ("Add", "Sub") and len(present) == 2:
            masked = self.try_mask(node, inputs)
            if masked:
                return None
        if op == "Pow" and self.try_rmsnorm(node, inputs):
            return None
        encoding = self.out_encoding(node)
        if encoding is None and op == "Gather" and present[0].kind == "qconst" and present[1].kind in ("index", "const"):
            self.gather_dequantize(node, inputs)
            return None
        if encoding is None and op == "MatMul":
            return self.matmul_to_float(node, inputs)
        if encoding is None:
            return "output is not quantized (no QuantizeLinear after it)"
        quantized = [v for v in present if v.kind in ("quant", "qconst")]
        if op == "MatMul":
            return self.matmul(node, inputs, encoding)
        if op in ("Add", "Sub", "Mul") and len(quantized) == 2 and all(v.per_tensor for v in quantized):
            return self.binary(node, inputs, encoding)
        if op == "Softmax":
            return self.softmax(node, inputs, encoding)
        if op == "LayerNormalization":
            return self.layernorm(node, inputs, encoding)
        if op in UNARY_OPS:
            return self.unary(node, inputs, encoding)
        kinds = ", ".join(sorted({v.kind for v in present}))
        return f"no integer kernel for {op} with {kinds} inputs"

    def gather_dequantize(self, node, inputs) -> None:
        """Embedding lookup into a quantized table whose result stays float: rows are gathered as
        integers and only they are dequantized (with their own per-channel scales), on the host."""
        table, idx = inputs[0], inputs[1]
        axis = node.attrs.get("axis", 0) % table.array.ndim
        q = self.constant(table.array, node.inputs[0].name + ".q")
        ids = idx.name if idx.kind == "index" else self.constant(np.asarray(idx.array, np.int64), node.inputs[1].name)
        params = {"scale": np.asarray(table.scale, np.float32), "zero_point": np.asarray(table.zp, np.int64)}
        attrs = {"axis": axis, "channel_axis": None if table.scale.size == 1 else table.axis % table.array.ndim}
        out = self.emit("gather_dequantize", "host", node.name, [q, ids], [node.outputs[0].name], attrs, params)[0]
        self.values[node.outputs[0].name] = Value("float", out)
        self.program.host_partition.append(
            {"op": node.op, "node": node.name, "reason": "output is not quantized: int8 rows gathered, dequantized on the host"})

    def _operands_8bit(self, values: list[Value]) -> str | None:
        for v in values:
            if v.kind not in ("quant", "qconst"):
                return f"operand is {v.kind}, not quantized"
            if _bits(v.dtype) > ARITH_BITS_MAX:
                return f"{v.dtype} operand: arithmetic kernels take 8-bit (16-bit needs a 48-bit accumulator)"
        return None

    def matmul(self, node, inputs, encoding) -> str | None:
        found = self._matmul_operands(node, inputs, ARITH_BITS_MAX)
        if isinstance(found, str):
            return found
        a, b, attrs = found
        out_scale, out_zp, out_dtype = encoding
        sa, za, _ = a.params()
        m0, shift = kernels.quantize_multiplier(sa * np.atleast_1d(b.scale).astype(np.float64) / out_scale)
        params = {"m0": m0.astype(np.int64), "shift": shift.astype(np.int64), "b_zp": np.atleast_1d(b.zp).astype(np.int64)}
        attrs.update(a_zp=za, out_zp=out_zp, out_dtype=out_dtype)
        names = [self.as_int(a, node.inputs[0].name), self.as_int(b, node.inputs[1].name)]
        self.finish(node, "matmul", names, attrs, params, encoding)
        return None

    def _matmul_operands(self, node, inputs, max_bits: int):
        """(a, b, params, attrs) of a quantized MatMul, or a reason string."""
        a, b = inputs[0], inputs[1]
        for v in (a, b):
            if v.kind not in ("quant", "qconst"):
                return f"operand is {v.kind}, not quantized"
            if _bits(v.dtype) > max_bits:
                return f"{v.dtype} operand: this matmul form takes at most {max_bits}-bit operands"
        if not a.per_tensor:
            return "activation operand quantized per channel"
        if np.atleast_1d(b.scale).size > 1:
            ndim = b.array.ndim if b.kind == "qconst" else self.env[b.name].ndim
            if b.axis is None or b.axis % ndim != ndim - 1:
                return f"weight quantized per channel along axis {b.axis}, not the output axis"
        attrs = {}
        if b.kind == "qconst":
            attrs["weight"] = node.inputs[1].name
            pattern = self.masks.get(node.inputs[1].name, {}).get("pattern")
            attrs["sparsity"] = pattern or _detect_nm(b.array, b.zp)
        return a, b, attrs

    def matmul_to_float(self, node, inputs) -> str | None:
        """A quantized MatMul whose output stays float: integer MACs on the NPU into a wide accumulator
        (int32 for 8-bit operands, 48-bit held in int64 when an operand is 16-bit), dequantized by
        s_a * s_b[c] on the host."""
        found = self._matmul_operands(node, inputs, 16)
        if isinstance(found, str):
            return found
        a, b, attrs = found
        sa, za, _ = a.params()
        wide = max(_bits(a.dtype), _bits(b.dtype)) > ARITH_BITS_MAX
        attrs.update(a_zp=za, out_dtype="int64" if wide else "int32")
        names = [self.as_int(a, node.inputs[0].name), self.as_int(b, node.inputs[1].name)]
        acc = self.emit("matmul_acc", "npu", node.name, names, [node.outputs[0].name + ".acc"], attrs,
                        {"b_zp": np.atleast_1d(b.zp).astype(np.int64)})[0]
        scale = (np.float64(sa) * np.atleast_1d(b.scale).astype(np.float64)).astype(np.float32)
        out = self.emit("dequantize", "host", node.name, [acc], [node.outputs[0].name],
                        {"axis": -1 if scale.size > 1 else None},
                        {"scale": scale if scale.size > 1 else scale.reshape(()), "zero_point": np.int64(0)})[0]
        self.values[node.outputs[0].name] = Value("float", out)
        return None

    def binary(self, node, inputs, encoding) -> str | None:
        a, b = inputs
        reason = self._operands_8bit([a, b])
        if reason:
            return reason
        sa, za, _ = a.params()
        sb, zb, _ = b.params()
        out_scale, out_zp, out_dtype = encoding
        names = [self.as_int(a, node.inputs[0].name), self.as_int(b, node.inputs[1].name)]
        if node.op == "Mul":
            m0, shift = kernels.quantize_multiplier(sa * sb / out_scale)
            attrs = {"a_zp": za, "b_zp": zb, "m0": int(m0[0]), "shift": int(shift[0]), "out_zp": out_zp,
                     "out_dtype": out_dtype}
            self.finish(node, "mul", names, attrs, {}, encoding)
            return None
        left = kernels.ADD_LEFT_SHIFT[8]
        twice_max = 2.0 * max(sa, sb)
        am, ash = kernels.quantize_multiplier(sa / twice_max)
        bm, bsh = kernels.quantize_multiplier(sb / twice_max)
        om, osh = kernels.quantize_multiplier(twice_max / ((1 << left) * out_scale))
        attrs = {"a_zp": za, "b_zp": zb, "a_m0": int(am[0]), "a_shift": int(ash[0]), "b_m0": int(bm[0]),
                 "b_shift": int(bsh[0]), "left_shift": left, "out_m0": int(om[0]), "out_shift": int(osh[0]),
                 "out_zp": out_zp, "out_dtype": out_dtype}
        self.finish(node, "add" if node.op == "Add" else "sub", names, attrs, {}, encoding)
        return None

    def softmax(self, node, inputs, encoding) -> str | None:
        x = inputs[0]
        axis = node.attrs.get("axis", -1)
        if x.kind not in ("quant", "masked") or not x.per_tensor:
            return f"input is {x.kind}, not a per-tensor quantized activation"
        ndim = self.env[x.name].ndim
        if axis % ndim != ndim - 1:
            return f"softmax over axis {axis}, the kernel reduces the last axis"
        s_in, _, dtype = x.params()
        out_scale, out_zp, out_dtype = encoding
        lo, hi = kernels.INT_RANGES[dtype]
        steps = np.arange(hi - lo + 1, dtype=np.float64)
        exp_table = np.round(np.exp(-steps * s_in) * (1 << kernels.EXP_FRACTION_BITS)).astype(np.int64)
        params = {"exp_table": exp_table}
        if x.kind == "masked":
            params["mask"] = x.array
        attrs = {"out_multiplier": int(round((1 << kernels.SOFTMAX_OUT_BITS) / out_scale)), "out_zp": out_zp,
                 "out_dtype": out_dtype}
        self.finish(node, "softmax", [x.name], attrs, params, encoding)
        return None

    def unary(self, node, inputs, encoding) -> str | None:
        live = [i for i, v in enumerate(inputs) if v is not None and v.kind not in ("const", "qconst")]
        if len(live) != 1:
            return f"{node.op} of {len(live)} activations has no integer kernel"
        index = live[0]
        x = inputs[index]
        if x.kind != "quant" or not x.per_tensor:
            return f"input is {x.kind}, not a per-tensor quantized activation"
        for i, v in enumerate(inputs):
            if i != index and v is not None and np.asarray(self.real(v)).size != 1:
                return f"{node.op} with a non-scalar constant operand has no table form"
        s_in, z_in, dtype = x.params()
        out_scale, out_zp, out_dtype = encoding
        lo, hi = kernels.INT_RANGES[dtype]
        grid = np.arange(lo, hi + 1, dtype=np.int64)
        real = kernels.dequantize(grid, s_in, z_in)
        args = [real if i == index else (None if v is None else np.asarray(self.real(v)))
                for i, v in enumerate(inputs)]
        op = Op("host", "host", node.name, [], ["y"], {"op_type": node.op, "domain": node.domain or "",
                                                       "attributes": _attrs(node)})
        values = _HostOp(op)(args)[0]
        table = kernels.quantize(values, out_scale, out_zp, out_dtype)
        self.finish(node, "lut", [x.name], {"offset": lo, "function": node.op}, {"table": table}, encoding)
        return None

    def _sole_user(self, tensor, op_type: str):
        users = self.consumers.get(tensor.name, [])
        if len(users) != 1 or users[0].op != op_type or tensor in self.graph.outputs:
            return None
        return users[0]

    def try_rmsnorm(self, node, inputs) -> bool:
        """x^2 -> ReduceMean(last axis) -> + eps -> Sqrt -> Reciprocal -> x * r, x quantized: one `norm` kernel."""
        x, exponent = inputs[0], inputs[1]
        if x.kind != "quant" or not x.per_tensor or exponent.kind != "const" or float(exponent.array) != 2.0:
            return False
        mean = self._sole_user(node.outputs[0], "ReduceMean")
        add = mean and self._sole_user(mean.outputs[0], "Add")
        sqrt = add and self._sole_user(add.outputs[0], "Sqrt")
        recip = sqrt and self._sole_user(sqrt.outputs[0], "Reciprocal")
        mul = recip and self._sole_user(recip.outputs[0], "Mul")
        if mul is None:
            return False
        ndim = self.env[x.name].ndim
        axes = mean.attrs.get("axes") if len(mean.inputs) < 2 else self.values[mean.inputs[1].name].array
        if axes is None or [int(a) % ndim for a in np.atleast_1d(axes)] != [ndim - 1] or not mean.attrs.get("keepdims", 1):
            return False
        eps = [self.values[t.name] for t in add.inputs if t is not mean.outputs[0]]
        other = [t for t in mul.inputs if t is not recip.outputs[0]]
        if len(eps) != 1 or eps[0].kind not in ("const", "qconst") or len(other) != 1:
            return False
        if self.values.get(other[0].name) is None or self.values[other[0].name].name != x.name:
            return False
        encoding = self.out_encoding(mul)
        if encoding is None:
            return False
        self.absorbed |= {mean.name, add.name, sqrt.name, recip.name, mul.name}
        self.emit_norm(mul, x, False, float(np.asarray(self.real(eps[0])).reshape(-1)[0]), 1.0, 0.0, encoding)
        return True

    def layernorm(self, node, inputs, encoding) -> str | None:
        x = inputs[0]
        if x.kind != "quant" or not x.per_tensor:
            return f"input is {x.kind}, not a per-tensor quantized activation"
        ndim = self.env[x.name].ndim
        if node.attrs.get("axis", -1) % ndim != ndim - 1:
            return "layer norm over more than the last axis"
        gamma = np.asarray(self.real(inputs[1]), np.float64)
        beta = np.asarray(self.real(inputs[2]), np.float64) if len(inputs) > 2 and inputs[2] is not None else 0.0
        if any(v is not None and v.kind not in ("const", "qconst") for v in inputs[1:]):
            return "scale or bias is not constant"
        self.emit_norm(node, x, True, float(node.attrs.get("epsilon", 1e-5)), gamma, beta, encoding)
        return None

    def emit_norm(self, node, x: Value, center: bool, eps: float, gamma, beta, encoding) -> None:
        s_x, z_x, _ = x.params()
        out_scale, out_zp, out_dtype = encoding
        n = self.env[x.name].shape[-1]
        frac, gbits = kernels.NORM_FRACTION_BITS, kernels.NORM_GAMMA_BITS
        params = {
            "gamma_q": np.round(np.atleast_1d(np.asarray(gamma, np.float64)) / out_scale * 2.0**gbits).astype(np.int64),
            "beta_q": np.round(np.atleast_1d(np.asarray(beta, np.float64)) / out_scale * 2.0**(frac + gbits)).astype(np.int64),
        }
        attrs = {"x_zp": z_x, "center": center, "eps_q": int(round(n * n * eps / (s_x * s_x))), "out_zp": out_zp,
                 "out_dtype": out_dtype}
        self.finish(node, "norm", [x.name], attrs, params, encoding)

    def try_mask(self, node, inputs) -> bool:
        """Add(quantized scores, constant 0/-inf mask) -> a masked value the softmax kernel honours."""
        if node.op != "Add":
            return False
        pair = [(inputs[0], inputs[1]), (inputs[1], inputs[0])]
        for x, m in pair:
            if x.kind == "quant" and x.per_tensor and m.kind == "const":
                mask = np.asarray(m.array, dtype=np.float64)
                if not np.all((mask == 0) | (mask <= MASK_THRESHOLD)):
                    continue
                shape = self.env[x.name].shape
                if np.broadcast_shapes(shape, mask.shape) != shape:
                    continue
                keep = np.broadcast_to(mask == 0, shape).copy()
                self.values[node.outputs[0].name] = Value("masked", x.name, keep, x.scale, x.zp, None, x.dtype)
                return True
        return False

    def move(self, node, inputs) -> str | None:
        x = inputs[0]
        data = self.env[x.name]
        out_shape = None
        op = node.op
        if op in ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"):
            out_shape = self._fold_shape(node, inputs)
            if out_shape is None:
                return "shape operand is not constant"
            return self.finish_move(node, "reshape", [x.name], {"shape": list(out_shape)}, x)
        if op == "Transpose":
            perm = node.attrs.get("perm", list(reversed(range(data.ndim))))
            return self.finish_move(node, "transpose", [x.name], {"perm": list(perm)}, x)
        if op == "Slice":
            if any(v is not None and v.kind != "const" for v in inputs[1:]):
                return "slice bounds are not constant"
            return self.finish_move(node, "slice", [x.name], {"slices": self._slices(data, inputs)}, x)
        if op == "Gather":
            idx = inputs[1]
            if idx.kind == "const":
                name = self.constant(np.asarray(idx.array, dtype=np.int64), node.inputs[1].name)
            elif idx.kind == "index":
                name = idx.name
            else:
                return "gather indices are not integers"
            return self.finish_move(node, "gather", [x.name, name], {"axis": node.attrs.get("axis", 0)}, x)
        if op == "Expand":
            if inputs[1].kind != "const":
                return "expand shape is not constant"
            shape = np.broadcast_shapes(data.shape, tuple(int(s) for s in inputs[1].array))
            return self.finish_move(node, "expand", [x.name], {"shape": list(shape)}, x)
        if op == "Concat":
            return self.concat(node, inputs)
        return f"{op} moves data this NPU does not move"

    def concat(self, node, inputs) -> str | None:
        """Concat of quantized inputs; inputs whose encoding differs from the output's are requantized first."""
        if not all(v.kind in ("quant", "qconst") and v.per_tensor for v in inputs):
            return "concat of values that are not all per-tensor quantized"
        encoding = self.out_encoding(node) or inputs[0].params()
        scale, zp, dtype = encoding
        names = []
        for t, v in zip(node.inputs, inputs):
            name = self.as_int(v, t.name)
            s_in, z_in, d_in = v.params()
            if (s_in, z_in, d_in) != (scale, zp, dtype):
                m0, shift = kernels.quantize_multiplier(s_in / scale)
                name = self.emit("requantize", "npu", node.name, [name], [t.name + ".rq"], {
                    "in_zp": z_in, "m0": int(m0[0]), "shift": int(shift[0]), "out_zp": zp, "out_dtype": dtype},
                    quant=(scale, zp))[0]
            names.append(name)
        self.finish(node, "concat", names, {"axis": node.attrs["axis"]}, {}, encoding)
        return None

    def _fold_shape(self, node, inputs):
        """The output shape of a reshape-like node, evaluated on a stand-in array of the input's shape."""
        if any(v is not None and v.kind != "const" for v in inputs[1:]):
            return None
        stand_in = np.zeros(self.env[inputs[0].name].shape, dtype=np.float32)
        args = [stand_in] + [None if v is None else v.array for v in inputs[1:]]
        op = Op("host", "host", node.name, [], ["y"], {"op_type": node.op, "domain": node.domain or "",
                                                       "attributes": _attrs(node)})
        return _HostOp(op)(args)[0].shape

    def _slices(self, data, inputs):
        starts = np.asarray(inputs[1].array, np.int64)
        ends = np.asarray(inputs[2].array, np.int64)
        axes = np.asarray(inputs[3].array, np.int64) if len(inputs) > 3 and inputs[3] is not None else \
            np.arange(len(starts))
        steps = np.asarray(inputs[4].array, np.int64) if len(inputs) > 4 and inputs[4] is not None else \
            np.ones(len(starts), np.int64)
        slices = [[None, None, None] for _ in range(data.ndim)]
        for start, end, axis, step in zip(starts, ends, axes, steps):
            dim = data.shape[axis]
            s = slice(int(start), int(end), int(step)).indices(dim)
            stop = s[1] if s[1] >= 0 else None
            slices[int(axis) % data.ndim] = [s[0], stop, s[2]]
        return slices

    def finish_move(self, node, kind, names, attrs, x: Value) -> None:
        scale, zp, dtype = x.params()
        out = self.emit(kind, "npu", node.name, names, [node.outputs[0].name], attrs, quant=(scale, zp))[0]
        self.values[node.outputs[0].name] = Value("quant", out, scale=x.scale, zp=x.zp, dtype=dtype)
        return None

    def finish(self, node, kind, names, attrs, params, encoding) -> None:
        scale, zp, dtype = encoding
        out = self.emit(kind, "npu", node.name, names, [node.outputs[0].name], attrs, params, quant=(scale, zp))[0]
        self.values[node.outputs[0].name] = Value(
            "quant", out, scale=np.float32(scale).reshape(1), zp=np.array([zp], dtype=np.dtype(dtype)), dtype=dtype)


def _detect_nm(q: np.ndarray, zp: np.ndarray, n: int = 2, m: int = 4) -> str | None:
    """'2:4' when every group of 4 consecutive weights along the input axis (0) holds at least 2 zeros."""
    centred = np.asarray(q, np.int64) - np.asarray(zp, np.int64).reshape(1, -1)
    return f"{n}:{m}" if q.ndim == 2 and is_n_m(centred, 0, n, m) else None


def _attrs(node: gs.Node) -> dict:
    out = {}
    for key, value in node.attrs.items():
        if isinstance(value, gs.Tensor) or isinstance(value, np.ndarray) and value.ndim > 0:
            raise BackendError(f"npu-sim: node '{node.name}' has tensor attribute '{key}' it cannot serialise")
        if isinstance(value, type) or (hasattr(value, "dtype") and not isinstance(value, np.ndarray)):
            value = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(value))
        out[key] = value
    return out


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def is_quantized(model) -> bool:
    return any(node.op in ("QuantizeLinear", "DequantizeLinear") for node in model.graph.nodes)


def compile_model(model, feeds: dict[str, np.ndarray], *, masks: dict | None = None) -> Program:
    """Compile the QDQ ONNX form of `model` for the shapes of `feeds` (which also serve as example data)."""
    model.require("onnx", "npu-sim")
    if not is_quantized(model):
        raise UnsupportedGraphError(
            f"npu-sim: '{model.name}' has no QuantizeLinear/DequantizeLinear nodes; the NPU runs integer "
            "programs only: quantize it first (e.g. a 'quantize' pass in the recipe)")
    graph = model.graph.copy()
    compiler = _Compiler(graph, feeds, model.name, masks if masks is not None else dict(model.meta.masks))
    program = compiler.run(model)
    program.meta.update({"compiled_for": {k: list(np.asarray(v).shape) for k, v in feeds.items()},
                         "npu_ops": program.count("npu"), "host_ops": program.count("host")})
    return program
