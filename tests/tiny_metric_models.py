"""Tiny stand-ins for the metrics' models, written to local folders in the real formats, for the tests.

- :func:`build_tiny_face_pack`: an insightface model pack (``det_tiny.onnx``: SCRFD's interface, 3 strides x 2
  anchors with keypoints, 9 outputs; ``w600k_tiny.onnx``: ArcFace's, ``[N, 3, 112, 112] -> [N, D]``), read by
  ``insightface.app.FaceAnalysis`` exactly as a downloaded ``buffalo_l``. The detector's weights are set by hand so
  that what it calls a face is known: a region whose red channel exceeds its green one by more than ~0.25 (a "face"
  in the tests is a red square); the recognizer's weights are random.
- :func:`build_tiny_dinov2`: a random ``Dinov2Model`` saved with ``save_pretrained``.

The scores of these models mean nothing; they exercise the loading and scoring code offline.
"""

from __future__ import annotations

import os

import numpy as np

# ArcFace's 112 x 112 five-point template (insightface ``face_align.arcface_dst``)
ARCFACE_TEMPLATE = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]
)


def build_tiny_face_pack(folder: str | os.PathLike, *, embed_dim: int = 32, seed: int = 0) -> str:
    """Write ``det_tiny.onnx`` and ``w600k_tiny.onnx`` to ``folder`` (see the module docstring); returns it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)

    # -- detector: per stride, average-pool the normalised RGB blob, 1x1 convolutions to 2 anchors' score,
    # box distances and keypoints (constant: a box 4 strides wide centred on the anchor, template keypoints).
    nodes, inits, outputs = [], [], {"score": [], "bbox": [], "kps": []}
    score_w = np.zeros((2, 3, 1, 1), np.float32)
    score_w[:, 0], score_w[:, 1] = 24.0, -24.0  # logit = 24 (r - g) - 6 on blob values in [-1, 1]
    kps = ((ARCFACE_TEMPLATE - 56.0) / 112.0 * 4.0).reshape(-1).astype(np.float32)
    heads = {
        "score": (score_w, np.full(2, -6.0, np.float32), 1),
        "bbox": (np.zeros((8, 3, 1, 1), np.float32), np.full(8, 2.0, np.float32), 4),
        "kps": (np.zeros((20, 3, 1, 1), np.float32), np.tile(kps, 2), 10),
    }
    inits.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "shape_1"))
    for width in (4, 10):
        inits.append(numpy_helper.from_array(np.array([-1, width], np.int64), f"shape_{width}"))
    for stride in (8, 16, 32):
        pooled = f"pool{stride}"
        nodes.append(
            helper.make_node("AveragePool", ["input.1"], [pooled], kernel_shape=[stride] * 2, strides=[stride] * 2)
        )
        for head, (w, b, width) in heads.items():
            wn, bn = f"{head}{stride}_w", f"{head}{stride}_b"
            inits += [numpy_helper.from_array(w, wn), numpy_helper.from_array(b.astype(np.float32), bn)]
            conv = f"{head}{stride}_conv"
            nodes.append(helper.make_node("Conv", [pooled, wn, bn], [conv]))
            if head == "score":
                nodes.append(helper.make_node("Sigmoid", [conv], [conv + "_sig"]))
                conv += "_sig"
            nodes.append(helper.make_node("Transpose", [conv], [conv + "_t"], perm=[0, 2, 3, 1]))
            out = f"{head}_{stride}"
            nodes.append(helper.make_node("Reshape", [conv + "_t", f"shape_{width}"], [out]))
            outputs[head].append(helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", width]))
    graph = helper.make_graph(
        nodes,
        "scrfd_tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
        outputs["score"] + outputs["bbox"] + outputs["kps"],
        inits,
    )
    _save(onnx, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), folder, "det_tiny.onnx")

    # -- recognizer: conv 8x8/8 -> ReLU -> flatten -> linear, random weights
    conv_w = rng.normal(0, 0.2, (8, 3, 8, 8)).astype(np.float32)
    fc_w = rng.normal(0, 0.05, (8 * 14 * 14, embed_dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["input.1", "conv_w"], ["c"], strides=[8, 8], name="conv_0"),
            helper.make_node("Relu", ["c"], ["r"], name="relu_0"),
            helper.make_node("Flatten", ["r"], ["f"], name="flatten_0"),
            helper.make_node("MatMul", ["f", "fc_w"], ["fc1"], name="fc_0"),
        ],
        "arcface_tiny",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["None", embed_dim])],
        [numpy_helper.from_array(conv_w, "conv_w"), numpy_helper.from_array(fc_w, "fc_w")],
    )
    _save(onnx, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), folder, "w600k_tiny.onnx")
    return os.fspath(folder)


def _save(onnx, model, folder, name: str) -> None:
    model.ir_version = 8  # readable by older onnxruntime builds too
    onnx.checker.check_model(model)
    onnx.save(model, os.path.join(folder, name))


def build_tiny_dinov2(folder: str | os.PathLike, *, image_size: int = 56, seed: int = 0) -> str:
    """A random two-layer ``Dinov2Model`` (width 32, 14 px patches) saved with ``save_pretrained``."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, image_size=image_size, patch_size=14
    )
    torch.manual_seed(seed)
    Dinov2Model(cfg).save_pretrained(folder)
    return os.fspath(folder)
