"""Builds the tiny ONNX models the inference tests run (no model hub needed).

python3 tests/models/make_models.py OUT_DIR

- channel_mean.onnx: input "image" [1, 3, H, W] float -> output "mean" [1, 3], the
  mean of each channel (ReduceMean over H and W): easy to predict from a frame.
- endless.onnx: the same input and output, but the mean goes through a Loop of
  2^62 iterations: a model that never returns, which the host must stop at the
  call's deadline.
- bright_grid.onnx: the area-intrusion plugin's "grid" detector head. Input
  "image" [N, 3, 144, 256] float (pixels / 255) -> output "heatmap" [N, 1, 36, 64]
  (N: a dynamic batch),
  the brightness of each 4x4 cell (mean over channels, then AveragePool): it finds
  bright objects on a dark background, with a confidence of 1.0 for cells a white
  object covers.
- conv_grid.onnx: input [N, 3, 288, 512] -> "heatmap" [N, 1, 36, 64] through three
  strided convolutions with fixed weights: the batching benchmark's model.
- yolo_known.onnx: a YOLOv8-shaped detect head with known outputs. Input "images"
  [1, 3, 64, 64] -> output "output0" [1, 6, 4] (cx, cy, w, h in input pixels, then
  two class scores, for 4 candidates), the same whatever the input: two overlapping
  boxes of class 0 (NMS keeps the stronger), one of class 1, one under threshold.
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


def bright_grid(path):
    # A dynamic batch, as detectors exported for serving have: runs from several
    # streams can go as one.
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 144, 256])
    heatmap = helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["batch", 1, 36, 64])
    axes = helper.make_tensor("channel_axis", TensorProto.INT64, [1], [1])
    nodes = [
        helper.make_node("ReduceMean", ["image", "channel_axis"], ["gray"], keepdims=1),
        helper.make_node("AveragePool", ["gray"], ["heatmap"], kernel_shape=[4, 4], strides=[4, 4]),
    ]
    graph = helper.make_graph(nodes, "bright_grid", [image], [heatmap], initializer=[axes])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)


def conv_grid(path):
    """bright_grid's input and output with the compute of a small convolutional
    detector (three strided 3x3 convolutions, fixed pseudo-random weights): what the
    batching benchmark runs, where the work per run is not negligible."""
    import random

    rng = random.Random(7)
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 288, 512])
    heatmap = helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, ["batch", 1, 36, 64])
    channels = [3, 16, 32, 1]
    weights, nodes, last = [], [], "image"
    for i in range(3):
        cin, cout = channels[i], channels[i + 1]
        w = helper.make_tensor(
            f"w{i}", TensorProto.FLOAT, [cout, cin, 3, 3],
            [rng.uniform(-0.2, 0.2) for _ in range(cout * cin * 9)],
        )
        weights.append(w)
        out = "heatmap" if i == 2 else f"c{i}"
        nodes.append(helper.make_node("Conv", [last, f"w{i}"], [f"{out}_pre" if i < 2 else out],
                                      kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"{out}_pre"], [out]))
        last = out
    graph = helper.make_graph(nodes, "conv_grid", [image], [heatmap], initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, path)


# [cx, cy, w, h, score class 0, score class 1] of each candidate, in input pixels.
YOLO_CANDIDATES = [
    [20.0, 20.0, 10.0, 10.0, 0.90, 0.05],
    [21.0, 21.0, 10.0, 10.0, 0.80, 0.05],
    [48.0, 40.0, 8.0, 16.0, 0.10, 0.70],
    [10.0, 50.0, 6.0, 6.0, 0.20, 0.10],
]


def yolo_known(path):
    images = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    output = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 6, 4])
    # Transposed to YOLOv8's [1, 4 + classes, candidates].
    values = [YOLO_CANDIDATES[n][row] for row in range(6) for n in range(4)]
    known = helper.make_tensor("known", TensorProto.FLOAT, [1, 6, 4], values)
    axes = helper.make_tensor("all_axes", TensorProto.INT64, [4], [0, 1, 2, 3])
    zero = helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])
    # known + 0 * mean(images): the input is read, the output does not depend on it.
    nodes = [
        helper.make_node("ReduceMean", ["images", "all_axes"], ["m"], keepdims=0),
        helper.make_node("Mul", ["m", "zero"], ["nothing"]),
        helper.make_node("Add", ["known", "nothing"], ["output0"]),
    ]
    graph = helper.make_graph(
        nodes, "yolo_known", [images], [output], initializer=[known, axes, zero]
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
    bright_grid(os.path.join(out, "bright_grid.onnx"))
    conv_grid(os.path.join(out, "conv_grid.onnx"))
    yolo_known(os.path.join(out, "yolo_known.onnx"))
