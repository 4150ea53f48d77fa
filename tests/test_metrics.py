"""Evaluation metrics on hand-computed values: the pure masked pixel metrics, and each plug-in on tiny inputs with
tiny models built like the real ones and loaded through the real loaders from local files (DreamSim cache folder,
DINOv2 ``save_pretrained`` folder, insightface model pack of ONNX files, a Qwen2.5-VL judge folder)."""

from __future__ import annotations

import math

import pytest
import torch

from refiner_rl.errors import CheckpointError, ConfigError
from refiner_rl.metrics.base import build_metrics
from refiner_rl.metrics.masked import change_outside, masked_mae, masked_mse, masked_psnr, psnr_from_mse

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair():
    """a = 0 everywhere; b = 0.1 in the top half (the mask) of image 0, equal to a elsewhere; image 1 identical."""
    a = torch.zeros(2, 3, 8, 8)
    b = a.clone()
    b[0, :, :4] = 0.1
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1.0
    return a, b, mask


def test_masked_pixel_functions_by_hand():
    a, b, mask = _pair()
    assert masked_mse(a, b, mask).tolist() == pytest.approx([0.01, 0.0])
    assert masked_mse(a, b, 1 - mask).tolist() == [0.0, 0.0]
    assert masked_mse(a, b).tolist() == pytest.approx([0.005, 0.0])  # whole image: half the pixels differ
    assert masked_mae(a, b, mask).tolist() == pytest.approx([0.1, 0.0])
    psnr = masked_psnr(a, b, mask)
    assert float(psnr[0]) == pytest.approx(20.0)  # 10 log10(1 / 0.01)
    assert math.isinf(float(psnr[1]))
    assert float(psnr_from_mse(torch.tensor(0.001))) == pytest.approx(30.0)
    assert torch.isnan(masked_mse(a, b, torch.zeros_like(mask))).all()  # empty region: not scored
    c = b.clone()
    c[0, :, 6:] = 0.3  # changed outside the mask: rows 6-7 of the 4 outside rows, all channels
    assert change_outside(c, b, mask).tolist() == pytest.approx([0.15, 0.0])
    from refiner_rl.evaluation import masked_mse as old_path

    assert old_path is masked_mse


def test_pixel_metric_plugins_and_their_notes():
    a, b, mask = _pair()
    records = {"target": b, "mask": mask, "draft": b, "prompt": ["", ""], "index": torch.arange(2)}
    metrics = build_metrics(
        ["masked_mse", {"name": "masked_mse", "region": "outside"}, "masked_psnr", {"name": "change_outside"}]
    )
    assert [m.columns for m in metrics] == [
        [("mse_in", False)],
        [("mse_out", False)],
        [("psnr_in", True)],
        [("change_out", False)],
    ]
    assert metrics[0](a, records).values.tolist() == pytest.approx([0.01, 0.0])
    assert metrics[2](a, records).values.tolist() == pytest.approx([20.0, 100.0])  # exact match capped at max_db
    assert metrics[3](a, records).values.tolist() == pytest.approx([0.0, 0.0])
    empty = dict(records, mask=torch.zeros_like(mask))
    scored = metrics[0](a, empty)
    assert torch.isnan(scored.values).all() and scored.notes == ["empty region"] * 2
    no_target = metrics[0](a, dict(records, target=None))
    assert no_target.notes == ["no target"] * 2
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):
        build_metrics(["nope"])
    with pytest.raises(ConfigError, match="masked_mse.*region"):
        build_metrics([{"name": "masked_mse", "region": "everywhere"}])
    with pytest.raises(ConfigError, match="same column"):
        build_metrics(["masked_mse", "masked_mse"])


# -- DreamSim and DINOv2 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dreamsim_dir(tmp_path_factory):
    from tests.dreamsim_cache import make_random_dreamsim_cache

    return make_random_dreamsim_cache(tmp_path_factory.mktemp("dreamsim"))


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    from tests.tiny_metric_models import build_tiny_dinov2

    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


def _images(seed=0, n=3, size=32):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(n, 3, size, size, generator=g)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 8:20, 4:24] = 1.0
    mask[-1] = 0.0  # the last record has an empty mask: crops skip it
    draft = target.clone()
    return {
        "target": target,
        "mask": mask,
        "draft": draft,
        "reference": target.flip(-1),
        "prompt": [""] * n,
        "index": torch.arange(n),
    }


def test_dreamsim_is_zero_for_identical_images_and_one_minus_cosine_otherwise(dreamsim_dir):
    import torch.nn.functional as F

    records = _images()
    whole, crop = build_metrics(
        [
            {"name": "dreamsim", "cache_dir": dreamsim_dir, "batch_size": 4},
            {"name": "dreamsim", "region": "crop", "dilation": 0, "cache_dir": dreamsim_dir},
        ]
    )
    assert (whole.name, crop.name, whole.higher_is_better) == ("dreamsim", "dreamsim_crop", False)
    assert whole(records["target"], records).values.abs().max() < 1e-5
    c = crop(records["target"], records)
    assert c.values[:2].abs().max() < 1e-5 and math.isnan(c.values[2]) and c.notes[2] == "empty region"
    # by hand: the mask's box (rows 8-20, columns 4-24) of both images resized to 224, 1 - cos of DreamSim embeddings
    outputs = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    def embed(x):
        x = F.interpolate(x[:, :, 8:20, 4:24], size=(224, 224), mode="bicubic", align_corners=False, antialias=True)
        return crop.scorer.model.embed(x.clamp(0, 1)).reshape(x.shape[0], -1)

    with torch.no_grad():
        want = 1 - F.cosine_similarity(embed(outputs[:2]), embed(records["target"][:2]), dim=-1)
    assert crop(outputs, records).values[:2].tolist() == pytest.approx(want.tolist(), abs=1e-5)


def test_dreamsim_without_weights_names_the_metric(tmp_path):
    with pytest.raises(CheckpointError, match=r"metric dreamsim_crop: patch_dreamsim: DreamSim weights .*missing"):
        build_metrics([{"name": "dreamsim", "region": "crop", "cache_dir": str(tmp_path)}])


def test_dino_is_one_for_identical_images_and_the_cls_cosine_otherwise(dino_dir):
    import torch.nn.functional as F
    from transformers import Dinov2Model

    records = _images()
    whole, crop = build_metrics(
        [
            {"name": "dino", "model_name_or_path": dino_dir, "image_size": 56},
            {"name": "dino", "region": "crop", "model_name_or_path": dino_dir, "image_size": 56},
        ]
    )
    assert whole(records["target"], records).values.tolist() == pytest.approx([1.0] * 3, abs=1e-5)
    c = crop(records["target"], records)
    assert c.values[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-5) and c.notes[2] == "empty region"
    # by hand: both whole images resized to 56, ImageNet-normalised, cosine of the final CLS tokens
    outputs = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    model = Dinov2Model.from_pretrained(dino_dir).eval()
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1),
        torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1),
    )

    def cls(x):
        x = F.interpolate(x, size=(56, 56), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        return model(pixel_values=(x - mean) / std).last_hidden_state[:, 0]

    with torch.no_grad():
        want = F.cosine_similarity(cls(outputs), cls(records["target"]), dim=-1)
    assert whole(outputs, records).values.tolist() == pytest.approx(want.tolist(), abs=1e-5)
    with pytest.raises(CheckpointError, match="metric dino: dino_similarity: cannot load DINOv2"):
        build_metrics([{"name": "dino", "model_name_or_path": str(dino_dir) + "-missing"}])


# -- faces ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def face_dir(tmp_path_factory):
    from tests.tiny_metric_models import build_tiny_face_pack

    return build_tiny_face_pack(tmp_path_factory.mktemp("buffalo_tiny"))


def test_face_identity_scores_faces_and_skips_records_without_one(face_dir):
    (metric,) = build_metrics([{"name": "face_identity", "model_dir": face_dir, "det_size": 64}])
    n, size = 3, 64
    target = torch.full((n, 3, size, size), 0.3)
    target[0, 0, 16:48, 16:48] = 0.9  # a "face" for the tiny detector: red exceeds green
    target[1, 0, 8:40, 20:52] = 0.9
    target[2] = 0.5  # no face
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, 16:48, 16:48] = 1.0
    records = {"target": target, "mask": mask, "draft": target, "prompt": [""] * n, "index": torch.arange(n)}
    same = metric(target, records)
    assert same.values[:2].tolist() == pytest.approx([1.0, 1.0], abs=1e-6)
    assert math.isnan(same.values[2]) and same.notes == [None, None, "no face detected"]
    changed = target.clone()
    changed[1] = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    values = metric(changed, records).values
    assert values[0] == pytest.approx(1.0, abs=1e-6) and values[1] < 0.99


def test_face_identity_without_a_model_pack_names_the_metric(tmp_path):
    with pytest.raises(CheckpointError, match="metric face_identity: no insightface model pack"):
        build_metrics([{"name": "face_identity", "model_dir": str(tmp_path)}])


# -- VLM judges ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    from refiner_rl.vlm.questions import DIMENSIONS, TASKS
    from refiner_rl.vlm.tiny import build_tiny_vlm

    folder = tmp_path_factory.mktemp("tiny_judge")
    corpus = ["Yes No Yes. No. 0 1 2 3 4 5 6 7 8 9"] * 200 + [" ".join(TASKS.values()) + " ".join(DIMENSIONS.values())]
    return build_tiny_vlm(folder, corpus, vocab_size=300, added_tokens=["10"], max_positions=512, seed=7)


def _judge_options(judge_dir):
    from refiner_rl.vlm.tiny import PIXELS

    return {"backend": "local", "model_name_or_path": judge_dir, "min_pixels": PIXELS, "max_pixels": PIXELS}


def test_vlm_score_is_the_vlm_judge_reward(judge_dir):
    from refiner_rl.rewards.vlm_judge import VLMJudge

    records = _images(n=2)
    outputs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    (metric,) = build_metrics([{"name": "vlm_score", **_judge_options(judge_dir)}])
    got = metric(outputs, records)
    want = VLMJudge(**_judge_options(judge_dir)).score([""] * 2, list(outputs), draft=list(records["draft"]))
    assert got.values.tolist() == pytest.approx(want)
    assert 0 < min(want) and max(want) < 1
    assert judge_dir in metric.describe()


def test_viescore_ratings_by_hand():
    from refiner_rl.metrics.viescore import expected_rating, expected_rating_from_top_logprobs

    logits = torch.full((2, 12), -1e9)
    logits[0, [3, 9]] = 0.0  # tokens 3 and 9 stand for ratings 0 and 10, equally likely
    logits[1, 5] = 0.0  # rating 4 only
    assert expected_rating(logits, {0: 3, 4: 5, 10: 9}).tolist() == pytest.approx([5.0, 4.0])
    top = [
        {"token": "Yes", "logprob": -0.1},
        {"token": " 3", "logprob": math.log(0.2)},
        {"token": "7", "logprob": math.log(0.2)},
    ]
    assert expected_rating_from_top_logprobs(top) == pytest.approx(5.0)
    assert expected_rating_from_top_logprobs([{"token": "Yes", "logprob": 0.0}]) is None


def test_viescore_parts_follow_the_formula_and_name_the_judge(judge_dir):
    from refiner_rl.metrics.viescore import QUESTIONS

    records = _images(n=2)
    outputs = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    (metric,) = build_metrics([{"name": "viescore", **_judge_options(judge_dir)}])
    assert [c for c, _ in metric.columns] == ["viescore/SC", "viescore/PQ", "viescore/overall"]
    assert len(metric.ids) == 11  # 0..9 and the added "10" are single tokens
    values = metric(outputs, records).values
    # the four ratings of record 0, asked one by one
    from refiner_rl.scoring.base import to_pil
    from refiner_rl.vlm.questions import build_conversation

    shown = {"output": outputs[0], "draft": records["draft"][0], "reference": records["reference"][0]}
    chats = [build_conversation(q, [to_pil(shown[k]) for k in keys]) for keys, q in QUESTIONS.values()]
    success, overediting, natural, artifacts = metric._ratings(chats)
    sc, pq = min(success, overediting), min(natural, artifacts)
    assert values[0].tolist() == pytest.approx([sc, pq, math.sqrt(sc * pq)], abs=1e-4)
    assert ((values >= 0) & (values <= 10)).all()
    assert "VIEScore" in metric.describe() and judge_dir in metric.describe()


def test_a_judge_server_that_times_out_counts_failed_records():
    import socket

    with socket.socket() as s:  # a listening socket that never answers: every request times out
        s.bind(("127.0.0.1", 0))
        s.listen()
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
        (metric,) = build_metrics(
            [
                {
                    "name": "vlm_score",
                    "backend": "server",
                    "base_url": url,
                    "model": "m",
                    "timeout": 0.3,
                    "max_retries": 0,
                }
            ]
        )
        records = _images(n=2)
        scored = metric(records["target"], records)
    assert torch.isnan(scored.values).all() and scored.notes == ["judge gave no answer"] * 2
