"""Peer tools a row can be built with, measured beside graphopt's rows in the same run.

Each peer is a function (float ONNX file, output path, calibration feeds, options) that writes
the peer's model, and the Python package it needs: a peer whose package is not importable here
is skipped with that reason (`make bench-env` installs the peers the main environment must not
carry). Options are the peer's own keyword arguments, as the suites declare them.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bench.spec import SuiteError

__all__ = ["PEERS", "Peer", "missing_package"]


@dataclass(frozen=True)
class Peer:
    package: str  # the importable module the peer needs
    write: Callable[[Path, Path, list[dict[str, np.ndarray]], dict], None]
    about: str


def missing_package(package: str) -> str | None:
    """Why a peer cannot run here, or None when its package imports."""
    if importlib.util.find_spec(package) is None:
        return f"'{package}' is not importable in this environment (make bench-env, then .venv-bench/bin/python)"
    return None


def _table_gathers(src: Path) -> list[str]:
    """Gathers reading a weight table. quantize_static(per_channel=True) gives their output the
    table's per-axis scale, which onnxruntime then refuses to run ("scale must be 1D tensor with
    size 1"); excluded, the table is still quantized as the tied lm_head's MatMul weight."""
    import onnx

    graph = onnx.load(str(src), load_external_data=False).graph
    tables = {t.name for t in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "Gather" and n.input[0] in tables]


def _ort_static(src: Path, out: Path, feeds: list, options: dict) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # the protocol's calibration feeds, one at a time
        def __init__(self):
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    op_types = options.get("op_types")
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                    activation_type=QuantType[options.get("activation_type", "QUInt8")],
                    weight_type=QuantType[options.get("weight_type", "QInt8")],
                    nodes_to_exclude=_table_gathers(src), **({"op_types_to_quantize": op_types} if op_types else {}))


def _ort_dynamic(src: Path, out: Path, _feeds: list, options: dict) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(out), op_types_to_quantize=options.get("op_types", ["MatMul"]),
                     weight_type=QuantType[options.get("weight_type", "QInt8")], use_external_data_format=True)


def _ort_matmulnbits(src: Path, out: Path, _feeds: list, options: dict) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), bits=options.get("bits", 4),
                                     block_size=options.get("block_size", 32),
                                     is_symmetric=options.get("symmetric", True))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=True)


def _nncf_weights(src: Path, out: Path, _feeds: list, options: dict) -> None:
    import nncf
    import onnx

    mode = getattr(nncf.CompressWeightsMode, options.get("mode", "INT8_ASYM"))
    model = nncf.compress_weights(onnx.load(str(src)), mode=mode)
    onnx.save(model, str(out), save_as_external_data=True, location=out.name + ".data")


PEERS: dict[str, Peer] = {
    "ort-quantize-static": Peer("onnxruntime.quantization", _ort_static,
                                "onnxruntime quantize_static: QDQ, per-channel weights, MinMax ranges"),
    "ort-quantize-dynamic": Peer("onnxruntime.quantization", _ort_dynamic,
                                 "onnxruntime quantize_dynamic: int8 weights, activations quantized at run time"),
    "ort-matmulnbits": Peer("onnxruntime.quantization", _ort_matmulnbits,
                            "onnxruntime MatMulNBitsQuantizer: blocked int4 weights (MatMulNBits)"),
    "nncf-compress-weights": Peer("nncf", _nncf_weights, "NNCF compress_weights: weight-only quantization"),
}


def peer(name: str, where: str) -> Peer:
    if name not in PEERS:
        raise SuiteError(f"{where}: unknown peer '{name}' (peers: {', '.join(PEERS)})")
    return PEERS[name]
