"""A small vision model at an old opset and folders of images, made on the spot for calibration tests."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def tiny_vision_model(path: Path, *, opset: int = 13, size: int | None = 32, seed: int = 0) -> Path:
    """A CNN classifier y = Gemm(flatten(GAP(relu(conv(relu(conv(x))))))) with 10 outputs, saved at
    `opset`; input x [N, 3, size, size] float32 (height and width dynamic when `size` is None).
    Weights are seeded, scaled so activations stay O(1)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 3, 3, 3)) * 0.4).astype(np.float32)
    w2 = (rng.standard_normal((16, 16, 3, 3)) * 0.15).astype(np.float32)
    w3 = (rng.standard_normal((10, 16)) * 0.5).astype(np.float32)
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"),
                                                          (rng.standard_normal(16).astype(np.float32) * 0.1, "b1"),
                                                          (rng.standard_normal(10).astype(np.float32) * 0.1, "b3"))]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], name="fc", transB=1),
    ]
    dims = [1, 3, size, size] if size else ["N", 3, "H", "W"]
    graph = helper.make_graph(nodes, "tiny_vision", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=7)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def write_images(folder: Path, count: int, *, seed: int = 0, size: tuple[int, int] = (40, 56)) -> list[Path]:
    """`count` PNG images (height, width = `size`): smooth colour gradients with a bright and a
    dark rectangle at seeded places, so every image differs and spans most of [0, 255]."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(count):
        a, b, c = rng.uniform(0.2, 1.0, 3)
        image = np.stack([a * xx / w, b * yy / h, c * (xx + yy) / (w + h)], axis=-1) * 200
        for value in (250, 5):
            top, left = rng.integers(0, h // 2), rng.integers(0, w // 2)
            image[top:top + h // 3, left:left + w // 3] = value
        path = folder / f"img{i:02d}.png"
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths
