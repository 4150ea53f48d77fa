"""``face_identity``: ArcFace cosine similarity between the face in the target and the same face in the output (↑).

    value = cos(ArcFace(align(x, kps)), ArcFace(align(x_target, kps)))      (1 for identical faces)

OmniRefiner (arXiv 2511.19990) reports an ArcFace identity score on faces. The face is detected in the *target*
(insightface's SCRFD detector; the detection overlapping the mask most, else the largest); both images are aligned
on that face's five keypoints (insightface's ``norm_crop``, 112 x 112) and embedded by its ArcFace recognizer in
one batched call for all records. A record whose target shows no face is skipped with the note
``no face detected``: counted, never scored 0.

Models: an insightface model pack folder (``model_dir``, default ``~/.insightface/models/buffalo_l``: a detector
``det_*.onnx`` and a recognizer ``w600k_*.onnx``), loaded by ``insightface.app.FaceAnalysis`` with onnxruntime on
the CPU. Nothing is downloaded: a missing folder fails at once naming this metric and how to fetch the pack.
Needs the ``eval`` extra (``pip install refiner-rl[eval]``: insightface, onnxruntime).
"""

from __future__ import annotations

import glob
import math
import os
import warnings

import numpy as np
import torch

from refiner_rl.errors import CheckpointError
from refiner_rl.metrics.base import Metric, Scored, register_metric
from refiner_rl.scoring.patches import mask_bbox

DEFAULT_MODEL_DIR = "~/.insightface/models/buffalo_l"


def to_bgr_uint8(image: torch.Tensor) -> np.ndarray:
    """``[3, H, W]`` in [0, 1] -> ``H x W x 3`` uint8 BGR, insightface's (OpenCV's) image format."""
    rgb = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return np.ascontiguousarray(rgb[:, :, ::-1])


def load_face_analysis(model_dir: str, det_size: int, det_thresh: float, name: str = "face_identity"):
    """insightface's ``FaceAnalysis`` over a local model pack (detection + recognition), CPU, no download."""
    folder = os.path.abspath(os.path.expanduser(model_dir))
    if not glob.glob(os.path.join(folder, "*.onnx")):
        raise CheckpointError(
            f"metric {name}: no insightface model pack in model_dir={folder!r} (expected det_*.onnx and w600k_*.onnx). "
            'Fetch one once on a machine with internet, e.g. `python -c "from insightface.app import FaceAnalysis; '
            "FaceAnalysis(name='buffalo_l')\"` (writes ~/.insightface/models/buffalo_l), copy the folder here and set "
            "`model_dir` in the metric entry"
        )
    try:
        from insightface.app import FaceAnalysis
    except ImportError as err:
        raise CheckpointError(
            f"metric {name} needs insightface and onnxruntime: pip install 'refiner-rl[eval]' ({err})"
        ) from err
    try:
        app = FaceAnalysis(
            name=folder, allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"]
        )
    except (AssertionError, RuntimeError, ValueError, OSError) as err:
        raise CheckpointError(
            f"metric {name}: cannot load the insightface pack in {folder!r} ({type(err).__name__}: {err}); it needs a "
            "detector (det_*.onnx) and a recognizer (w600k_*.onnx)"
        ) from err
    if "recognition" not in app.models:
        raise CheckpointError(f"metric {name}: the insightface pack in {folder!r} has no recognition model")
    app.prepare(ctx_id=-1, det_thresh=float(det_thresh), det_size=(int(det_size), int(det_size)))
    return app


@register_metric
class FaceIdentity(Metric):
    kind = "face_identity"
    higher_is_better = True
    required_fields = ("target",)

    def __init__(
        self,
        model_dir: str = DEFAULT_MODEL_DIR,
        det_size: int = 640,
        det_thresh: float = 0.5,
        label: str | None = None,
    ):
        self.name = label or "face_identity"
        self.app = load_face_analysis(model_dir, det_size, det_thresh, self.name)
        self.recognizer = self.app.models["recognition"]

    def _pick(self, faces: list, mask: torch.Tensor | None):
        """The detection that overlaps the mask's box most (ties and no mask: the largest)."""
        box = mask_bbox(mask) if mask is not None else None

        def key(face):
            x0, y0, x1, y1 = (float(v) for v in face.bbox[:4])
            area = max(0.0, x1 - x0) * max(0.0, y1 - y0)
            if box is None:
                return (0.0, area)
            by0, by1, bx0, bx1 = box
            inter = max(0.0, min(x1, bx1) - max(x0, bx0)) * max(0.0, min(y1, by1) - max(y0, by0))
            return (inter, area)

        return max(faces, key=key)

    def compute(self, outputs: torch.Tensor, records: dict) -> Scored:
        from insightface.app.common import Face
        from insightface.utils import face_align

        size = self.recognizer.input_size[0]
        crops, scored, notes = [], [], []
        for i in range(outputs.shape[0]):
            target = to_bgr_uint8(records["target"][i])
            dets, kpss = self.app.det_model.detect(target, max_num=0)
            if dets.shape[0] == 0 or kpss is None:
                notes.append("no face detected")
                continue
            mask = records["mask"][i] if records.get("mask") is not None else None
            face = self._pick([Face(bbox=d[:4], kps=k, det_score=d[4]) for d, k in zip(dets, kpss)], mask)
            with warnings.catch_warnings():  # scikit-image deprecations inside insightface's alignment
                warnings.simplefilter("ignore", FutureWarning)
                crops += [
                    face_align.norm_crop(to_bgr_uint8(outputs[i]), landmark=face.kps, image_size=size),
                    face_align.norm_crop(target, landmark=face.kps, image_size=size),
                ]
            scored.append(i)
            notes.append(None)
        values = torch.full((outputs.shape[0],), math.nan, dtype=torch.float64)
        if scored:
            emb = torch.from_numpy(np.asarray(self.recognizer.get_feat(crops), dtype=np.float64))
            emb = emb.reshape(len(scored), 2, -1)
            values[scored] = torch.nn.functional.cosine_similarity(emb[:, 0], emb[:, 1], dim=-1)
        return Scored(values, notes)
