"""Builds the tiny ONNX models the inference tests run (no model hub needed).

python3 tests/models/make_models.py OUT_DIR

- channel_mean.onnx: input "image" [1, 3, H, W] float -> output "mean" [1, 3], the
  mean of each channel (ReduceMean over H and W): easy to predict from a frame.
"""
import os
import sys

import onnx
from onnx import TensorProto, helper


def channel_mean(path):
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"])
    mean = helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    node = helper.make_node("ReduceMean", ["image", "axes"], ["mean"], keepdims=0)
    graph = helper.make_graph([node], "channel_mean", [image], [mean], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    channel_mean(os.path.join(out, "channel_mean.onnx"))
