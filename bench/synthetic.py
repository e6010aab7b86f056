"""Synthetic models the bench generates on the machine: what a large model costs, without a large download.

`matmul_chain(layers, width)` is `layers` MatMuls of [width, width] float32 weights in a chain, the
weights in external data beside the model: five of width 11585 make a 2.68 GB model, the size of
a 0.7B-parameter LLM's fp32 weights, for the memory suite (peak RSS of `graphopt convert` against
the model's bytes). Files are cached under graphopt's cache folder by their parameters.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from graphopt.lowering import cache_dir

__all__ = ["synthetic_model"]


def synthetic_model(source: str) -> Path:
    """The file of `synthetic:matmul-chain:LAYERSxWIDTH`, made once."""
    kind, _, size = source.removeprefix("synthetic:").partition(":")
    if kind != "matmul-chain" or "x" not in size:
        raise ValueError(f"{source}: expected synthetic:matmul-chain:LAYERSxWIDTH")
    layers, width = (int(v) for v in size.split("x"))
    folder = cache_dir() / "bench" / f"matmul-chain-{layers}x{width}"
    path = folder / "model.onnx"
    if not path.is_file():
        _matmul_chain(folder, layers, width)
    return path


def _matmul_chain(folder: Path, layers: int, width: int, seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper

    from graphopt.files.writing import OutputSet

    rng = np.random.default_rng(seed)
    with OutputSet(folder, force=True, manifest=False) as out:
        data = out.path("model.onnx.data")
        nodes, inits, x = [], [], "x"
        with open(data, "wb") as fh:
            for i in range(layers):
                offset = fh.tell()
                for start in range(0, width, 1024):  # a block of rows at a time: no weight is held whole
                    rows = min(1024, width - start)
                    block = rng.standard_normal((rows, width), dtype=np.float32) / np.float32(np.sqrt(width))
                    fh.write(block.tobytes())
                weight = TensorProto(name=f"layer{i}.weight", dims=[width, width], data_type=TensorProto.FLOAT,
                                     data_location=TensorProto.EXTERNAL)
                for key, value in (("location", data.name), ("offset", str(offset)), ("length", str(width * width * 4))):
                    weight.external_data.add(key=key, value=value)
                inits.append(weight)
                nodes.append(helper.make_node("MatMul", [x, weight.name], [f"h{i}"], name=f"mm{i}"))
                x = f"h{i}"
        graph = helper.make_graph(nodes, "matmul_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
                                  [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", width])], inits)
        onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(out.path("model.onnx")))
