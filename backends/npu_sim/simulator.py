"""Executes an npu-sim program with numpy: integer kernels for "npu" ops, onnxruntime for "host" ops.

Every npu op is a call into `kernels.py`; host ops are single ONNX nodes run in onnxruntime
(sessions are built once per simulator). Tensors are freed after their last use, so a SmolLM2
prefill holds only the live activations.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
import onnx

from graphopt.backends.npu_sim import kernels
from graphopt.backends.npu_sim.program import Op, Program
from graphopt.errors import BackendError
from graphopt.files.reading import shown

__all__ = ["Simulator", "run_op", "check_feeds", "MOVE_KINDS"]

MOVE_KINDS = {"reshape", "transpose", "slice", "gather", "concat", "expand", "where"}


def _move(kind: str, args: list[np.ndarray], attrs: dict) -> np.ndarray:
    """Data movement on integer tensors: no arithmetic, values copied as they are."""
    if kind == "reshape":
        return args[0].reshape(attrs["shape"])
    if kind == "transpose":
        return np.transpose(args[0], attrs["perm"])
    if kind == "slice":
        return args[0][tuple(slice(*s) for s in attrs["slices"])]
    if kind == "gather":
        return np.take(args[0], args[1].astype(np.int64), axis=attrs["axis"])
    if kind == "concat":
        return np.concatenate(args, axis=attrs["axis"])
    if kind == "expand":
        return np.ascontiguousarray(np.broadcast_to(args[0], attrs["shape"]))
    if kind == "where":
        return np.where(args[0], args[1], args[2])
    raise BackendError(f"npu-sim: no data-movement kernel '{kind}'")


def _npu(op: Op, args: list[np.ndarray], params: dict[str, np.ndarray]) -> list[np.ndarray]:
    kw = {**op.attrs, **params}
    kind = op.kind
    if kind in MOVE_KINDS:
        return [_move(kind, args, op.attrs)]
    if kind == "matmul":
        return [kernels.matmul(args[0], args[1], kw["a_zp"], kw["b_zp"], kw["m0"], kw["shift"], kw["out_zp"],
                               kw["out_dtype"], kw.get("bias"))]
    if kind == "matmul_acc":
        return [kernels.matmul_accumulate(args[0], args[1], kw["a_zp"], kw["b_zp"]).astype(kw["out_dtype"])]
    if kind in ("add", "sub"):
        return [kernels.add(args[0], args[1], kw["a_zp"], kw["b_zp"], kw["a_m0"], kw["a_shift"], kw["b_m0"],
                            kw["b_shift"], kw["left_shift"], kw["out_m0"], kw["out_shift"], kw["out_zp"],
                            kw["out_dtype"], sign=-1 if kind == "sub" else 1)]
    if kind == "mul":
        return [kernels.mul(args[0], args[1], kw["a_zp"], kw["b_zp"], kw["m0"], kw["shift"], kw["out_zp"],
                            kw["out_dtype"])]
    if kind == "lut":
        return [kernels.lut(args[0], kw["table"], kw["offset"])]
    if kind == "softmax":
        return [kernels.softmax(args[0], kw["exp_table"], kw["out_multiplier"], kw["out_zp"], kw["out_dtype"],
                                kw.get("mask"))]
    if kind == "norm":
        return [kernels.norm(args[0], kw["x_zp"], kw["center"], kw["eps_q"], kw["gamma_q"], kw["beta_q"], kw["out_zp"],
                             kw["out_dtype"])]
    if kind == "requantize":
        return [kernels.requantize(args[0], kw["in_zp"], kw["m0"], kw["shift"], kw["out_zp"], kw["out_dtype"])]
    if kind == "quantize":
        return [kernels.quantize(args[0], kw["scale"], kw["zero_point"], kw["out_dtype"], kw.get("axis"))]
    if kind == "gather_dequantize":
        return [kernels.gather_dequantize(args[0], args[1], kw["scale"], kw["zero_point"], kw["axis"],
                                          kw["channel_axis"])]
    if kind == "dequantize":
        return [kernels.dequantize(args[0], kw["scale"], kw["zero_point"], kw.get("axis"))]
    raise BackendError(f"npu-sim: op '{op.node}' asks for unknown kernel '{kind}'")


class _HostOp:
    """One ONNX node in its own onnxruntime session (built on first use, typed from the arrays)."""

    def __init__(self, op: Op):
        self.op = op
        self.session = None

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        if self.session is None:
            self.session = self._build(args)
        feeds = {f"in{i}": a for i, a in enumerate(args) if a is not None}
        return self.session.run(None, feeds)

    def _build(self, args):
        import onnxruntime as ort

        op = self.op
        names = [f"in{i}" if a is not None else "" for i, a in enumerate(args)]
        outs = [f"out{i}" for i in range(len(op.outputs))]
        node = onnx.helper.make_node(op.attrs["op_type"], names, outs, domain=op.attrs.get("domain", ""),
                                     **op.attrs.get("attributes", {}))
        inputs = [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                  for n, a in zip(names, args) if a is not None]
        outputs = [onnx.helper.make_empty_tensor_value_info(n) for n in outs]
        graph = onnx.helper.make_graph([node], "host", inputs, outputs)
        opsets = [onnx.helper.make_opsetid("", 21)]
        if op.attrs.get("domain"):
            opsets.append(onnx.helper.make_opsetid(op.attrs["domain"], 1))
        model = onnx.helper.make_model(graph, opset_imports=opsets)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = 1
        try:
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"npu-sim: host op '{op.node}' ({op.attrs['op_type']}) cannot run: {exc}") from exc


def run_op(op: Op, env: dict[str, np.ndarray], constants: dict[str, np.ndarray], host: Callable | None = None):
    """Execute one op, reading inputs from `env` and writing its outputs there."""
    args = [env[name] if name else None for name in op.inputs]
    if op.unit == "host" and op.kind == "host":
        results = (host or _HostOp(op))(args)
    else:
        results = _npu(op, args, {k: constants[v] for k, v in op.params.items()})
    for name, value in zip(op.outputs, results):
        env[name] = value


def check_feeds(program: Program, feeds) -> dict[str, np.ndarray]:
    """`feeds` as the program's input arrays: every input given, no unknown name, the compiled
    shape, numbers that the input's dtype holds exactly (a float 2.5 or 300 for int8 is refused,
    never truncated or wrapped)."""
    if not isinstance(feeds, dict):
        raise BackendError(f"npu-sim: feeds must map input names to arrays, got {type(feeds).__name__}")
    unknown = sorted(set(feeds) - set(program.inputs))
    if unknown:
        raise BackendError(f"npu-sim: no program input {shown(unknown[0])} (inputs: {', '.join(program.inputs)})")
    out = {}
    for name in program.inputs:
        if name not in feeds:
            raise BackendError(f"npu-sim: input '{name}' missing (program inputs: {', '.join(program.inputs)})")
        try:
            value = np.asarray(feeds[name])
        except (ValueError, TypeError):
            raise BackendError(f"npu-sim: input '{name}' is not a rectangular array of numbers") from None
        info = program.tensors[name]
        if value.shape != tuple(info.shape):
            raise BackendError(
                f"npu-sim: input '{name}' has shape {list(value.shape)}, the program was compiled for "
                f"{list(info.shape)} (recompile with the backend's batch/seq_len options)")
        if value.dtype.kind not in "biuf":
            raise BackendError(f"npu-sim: input '{name}' holds {value.dtype.name}, not numbers")
        target = np.dtype(info.dtype)
        converted = value.astype(target)
        if value.size and target.kind in "biu" and not np.array_equal(converted, value):
            raise BackendError(f"npu-sim: input '{name}' holds values {info.dtype} cannot represent exactly "
                               "(fractions, or outside its range)")
        out[name] = converted
    return out


class Simulator:
    """Runs a Program on feeds; `run` returns the outputs in the program's output order.

    `timings` (op index -> seconds) is filled when `profile=True`.
    """

    def __init__(self, program: Program):
        self.program = program
        self.host = {i: _HostOp(op) for i, op in enumerate(program.ops) if op.kind == "host"}
        last_use: dict[str, int] = {}
        for i, op in enumerate(program.ops):
            for name in op.inputs:
                last_use[name] = i
        keep = set(program.outputs) | set(program.constants)
        self.free_after: dict[int, list[str]] = {}
        for name, i in last_use.items():
            if name not in keep:
                self.free_after.setdefault(i, []).append(name)
        self.timings: dict[int, float] = {}

    def run(self, feeds: dict[str, np.ndarray], *, profile: bool = False) -> list[np.ndarray]:
        """Outputs for `feeds` (checked by `check_feeds`); an op that fails on a malformed program
        is a BackendError naming the op."""
        program = self.program
        env: dict[str, np.ndarray] = dict(program.constants)
        env.update(check_feeds(program, feeds))
        for i, op in enumerate(program.ops):
            start = time.perf_counter() if profile else 0.0
            try:
                run_op(op, env, program.constants, self.host.get(i))
            except BackendError:
                raise
            except Exception as exc:  # noqa: BLE001 - a kernel fed a malformed program: name the op
                raise BackendError(f"npu-sim: op #{i} {shown(op.node)} ({op.kind}) failed: {type(exc).__name__}: "
                                   f"{shown(str(exc), 200)}") from exc
            if profile:
                self.timings[i] = time.perf_counter() - start
            for name in self.free_after.get(i, ()):
                env.pop(name, None)
        return [env[name] for name in program.outputs]
