"""Builds the tiny ONNX models the inference tests run (no model hub needed).

python3 tests/models/make_models.py OUT_DIR

- channel_mean.onnx: input "image" [1, 3, H, W] float -> output "mean" [1, 3], the
  mean of each channel (ReduceMean over H and W): easy to predict from a frame.
- endless.onnx: the same input and output, but the mean goes through a Loop of
  2^62 iterations: a model that never returns, which the host must stop at the
  call's deadline.
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


def endless(path):
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "height", "width"])
    mean = helper.make_tensor_value_info("mean", TensorProto.FLOAT, [1, 3])
    axes = helper.make_tensor("axes", TensorProto.INT64, [2], [2, 3])
    trips = helper.make_tensor("trips", TensorProto.INT64, [], [1 << 62])
    keep_going = helper.make_tensor("keep_going", TensorProto.BOOL, [], [True])
    # Loop body: (iteration, condition, value) -> (condition, value + 0).
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "zero"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 3]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 3]),
        ],
        initializer=[helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    nodes = [
        helper.make_node("ReduceMean", ["image", "axes"], ["first"], keepdims=0),
        helper.make_node("Loop", ["trips", "keep_going", "first"], ["mean"], body=body),
    ]
    graph = helper.make_graph(
        nodes, "endless", [image], [mean], initializer=[axes, trips, keep_going]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    channel_mean(os.path.join(out, "channel_mean.onnx"))
    endless(os.path.join(out, "endless.onnx"))
