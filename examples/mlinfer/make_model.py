"""Writes ``model.onnx``: the example's tiny classifier, y = softmax(x @ W + b) with 16 inputs
and 3 classes, built with the ``onnx`` package's helper API (no download). The file is
shipped next to this script; run it again (``pip install onnx``) to rebuild it."""
import os
import sys

import numpy as np


def weights():
    """Fixed weights, so both runtimes and every rebuild give the same model."""
    w = np.linspace(-1.0, 1.0, 16 * 3, dtype=np.float32).reshape(16, 3)
    b = np.array([0.1, 0.0, -0.1], dtype=np.float32)
    return w, b


def build(path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, b = weights()
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]),
         helper.make_node("Add", ["xw", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["y"], axis=1)],
        "mlinfer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")])
    # IR 8 / opset 13: loadable by every onnxruntime that has a wheel for Python 3.9+
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)


if __name__ == "__main__":
    build(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.onnx"))
