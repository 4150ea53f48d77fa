"""``refiner-rl refine``, ``RefinerPipeline`` and ``refiner-rl edit --mask`` apply a trained refiner as it was trained.

- refine of the session's GRPO checkpoint (tests/trained_checkpoints.py) over its held-out records gives ``eval``'s
  in-mask MSE, with no sampling flag (the sampler is read from the model folder);
- the pipeline gives refine's images for the same seed; ``edit --mask`` too;
- a model trained with registration is served registered without the flag, and ``--reference_alignment none``
  changes the output;
- bad input: one line, exit code 2, naming the file or record; ``--skip_invalid_records`` skips and counts; what was
  written before a failing record stays.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from refiner_rl import model_settings
from refiner_rl.cli.main import main as cli
from tests.helpers import SMALL
from tests.trained_checkpoints import RECORDS, SIZE

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the session's checkpoints sit on the small tiny editor and were trained by the Python API (no base_model saved)
BASE = ["--base_model", "tiny", "--tiny_model", json.dumps(SMALL)]


def grpo_args(trained) -> list[str]:
    return ["--model", trained["grpo"], *BASE, "--transformer_path", os.path.join(trained["sft"], "transformer")]


def records(folder) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(folder, "records.jsonl"))]


def one_set(held_out, i: int = 0) -> list[str]:
    r = records(held_out)[i]
    files = {k: os.path.join(held_out, r[k]) for k in ("draft", "reference", "mask")}
    return [
        "--draft",
        files["draft"],
        "--reference",
        files["reference"],
        "--mask",
        files["mask"],
        "--prompt",
        r["prompt"],
    ]


def png(path) -> np.ndarray:
    return np.array(Image.open(path).convert("RGB"))


def expect_line(capsys, *parts: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert all(p in err[0] for p in parts), err[0]
    return err[0]


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    """A full fine-tune output written as the trainers write one (transformer/ + refiner_rl_model.json from
    ``model_settings.of_run``), of a policy built by ``build_policy``: its base model is saved with it."""
    from types import SimpleNamespace

    from refiner_rl.configs import ModelArguments, build_policy

    out = tmp_path_factory.mktemp("own") / "model"
    policy = build_policy(ModelArguments(tiny_model=dict(SMALL), use_lora=False))
    policy.transformer.save_pretrained(out / "transformer")
    run = SimpleNamespace(num_inference_steps=3, start_sigma=0.7, paste_back=True, true_cfg_scale=1.0)
    model_settings.save(model_settings.of_run(policy, None, run), str(out))
    return str(out)


def test_refine_reproduces_eval_with_the_saved_sampler(trained, held_out, tmp_path):
    saved = model_settings.load(trained["grpo"]).sampler
    assert saved == {"num_inference_steps": 4, "start_sigma": 0.5, "paste_back": True, "true_cfg_scale": 1.0}
    cand = [{"name": "GRPO", "checkpoint": trained["grpo"], "transformer_path": f"{trained['sft']}/transformer"}]
    sampler = ["--num_inference_steps", "4", "--start_sigma", "0.5", "--paste_back", "true", "--seed", "0"]
    argv = ["eval", "--config", os.path.join(ROOT, "recipes", "eval", "tiny.yaml"), "--tiny_model", json.dumps(SMALL)]
    argv += ["--dataset", held_out, "--output_dir", str(tmp_path / "eval"), "--candidates", json.dumps(cand)]
    assert cli([*argv, "--disable_tqdm", "true", *sampler]) == 0
    result = json.load(open(tmp_path / "eval" / "results.json"))

    out = tmp_path / "refine"
    assert cli(["refine", *grpo_args(trained), "--records", held_out, "--output_dir", str(out), "--disable_tqdm"]) == 0
    summary = json.load(open(out / "refined.json"))
    rows = [json.loads(line) for line in open(out / "refined.jsonl")]
    want = result["summary"]["GRPO"]["mse_in"]["mean"]
    print(f"in-mask MSE: eval {want:.6f}, refine {summary['mse_in']:.6f}")
    assert f"{summary['mse_in']:.4f}" == f"{want:.4f}" and summary["scored"] == RECORDS
    for row, expected in zip(rows, result["records"]):
        assert row["mse_in"] == pytest.approx(expected["values"]["GRPO"]["mse_in"], abs=1e-6)
    assert summary["served"]["num_inference_steps"] == 4 and summary["served"]["paste_back"] is True
    assert summary["served"]["lora"] is True
    # every record written: the refined image and its grid (draft | reference | refined)
    assert sorted(os.listdir(out / "refined")) == [f"{i:05d}-{r['id']}.png" for i, r in enumerate(records(held_out))]
    assert Image.open(out / "grids" / os.listdir(out / "grids")[0]).size == (3 * SIZE * 16, SIZE * 16)
    assert not [n for n in os.listdir(out) if n.startswith((".", "refined.partial"))]


def test_the_pipeline_gives_refines_images(trained, held_out, tmp_path):
    from refiner_rl import RefinerPipeline
    from refiner_rl.distributed import keyed_generator

    out = tmp_path / "one"
    assert cli(["refine", *grpo_args(trained), *one_set(held_out), "--seed", "3", "--output_dir", str(out)]) == 0
    name = os.path.splitext(os.path.basename(one_set(held_out)[1]))[0]
    want = png(out / "refined" / f"{name}.png")

    pipe = RefinerPipeline.from_pretrained(
        trained["grpo"], base_model="tiny", tiny_model=dict(SMALL), transformer_path=f"{trained['sft']}/transformer"
    )
    assert {"transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "scheduler"} <= set(pipe.components)
    r = records(held_out)[0]
    draft, reference, mask = (Image.open(os.path.join(held_out, r[k])) for k in ("draft", "reference", "mask"))
    got = pipe(draft=draft, reference=reference, mask=mask, prompt=r["prompt"], seed=3)
    delta = np.abs(np.asarray(got.images[0], dtype=np.float64) - want).max() / 255
    print(f"pipeline vs refine: max |delta| {delta:.2e}")
    assert delta <= 1e-5
    # the float output is the PNG's before 8-bit rounding; a generator in the diffusers way gives the same
    pt = pipe(draft=draft, reference=reference, mask=mask, prompt=r["prompt"], generator=keyed_generator(3, 0),
              output_type="pt").images  # fmt: skip
    assert pt.shape == (1, 3, SIZE, SIZE)
    assert (pt[0].permute(1, 2, 0) * 255 - torch.from_numpy(want).float()).abs().max() <= 0.5 + 1e-3
    # the components move as in any diffusers pipeline
    assert pipe.to("cpu") is pipe and pipe.device.type == "cpu"


def test_a_saved_base_model_and_sampler_need_no_flag_and_edit_mask_is_refine(own_model, held_out, tmp_path, capsys):
    out = tmp_path / "refine"
    assert cli(["refine", "--model", own_model, *one_set(held_out, 1), "--output_dir", str(out)]) == 0
    served = json.load(open(out / "refined.json"))["served"]
    assert served["base_model"] == "tiny" and served["lora"] is False
    assert (served["num_inference_steps"], served["start_sigma"], served["paste_back"]) == (3, 0.7, True)
    name = os.path.splitext(os.path.basename(one_set(held_out, 1)[1]))[0]
    refined = png(out / "refined" / f"{name}.png")
    r = records(held_out)[1]
    draft, mask = (png(os.path.join(held_out, r[k])) for k in ("draft", "mask"))
    outside = mask[..., 0] < 128
    assert (refined[outside] == draft[outside]).all() and (refined[~outside] != draft[~outside]).any()  # paste-back

    def edit(mask, folder) -> int:
        argv = ["edit", "--editor", own_model, "--image", one_set(held_out, 1)[1]]
        argv += ["--reference", one_set(held_out, 1)[3], "--mask", mask, "--instruction", r["prompt"]]
        return cli([*argv, "--device", "cpu", "--output_dir", str(tmp_path / folder)])

    assert edit(one_set(held_out, 1)[5], "edit") == 0
    assert np.array_equal(png(tmp_path / "edit" / "final.png"), refined)
    small = tmp_path / "small_mask.png"
    Image.new("L", (SIZE // 2, SIZE // 2), 255).save(small)
    capsys.readouterr()
    assert edit(str(small), "bad") == 2
    expect_line(capsys, "--mask", str(small), f"{SIZE // 2}x{SIZE // 2}")


def test_a_model_trained_with_registration_is_served_registered(trained, tmp_path):
    from refiner_rl.data import write_synthetic_dataset
    from refiner_rl.data.registration import register_reference, warp_reference
    from refiner_rl.refine import load_refiner, refine_dataset

    model = tmp_path / "registered"  # the session's SFT output, as if trained with reference_alignment: register
    shutil.copytree(trained["sft"], model)
    saved = model_settings.load(str(model))
    saved.reference_alignment, saved.registration_scale_range = "register", [0.5, 3.0]
    model_settings.save(saved, str(model))
    data = write_synthetic_dataset(str(tmp_path / "shifted"), 2, seed=3, size=SIZE, geometry="shifted", shift_step=4)

    base = ["refine", "--model", str(model), *BASE, "--records", data, "--disable_tqdm"]
    assert cli([*base, "--output_dir", str(tmp_path / "as_trained")]) == 0
    assert cli([*base, "--output_dir", str(tmp_path / "forced"), "--reference_alignment", "none"]) == 0
    served = [json.load(open(tmp_path / d / "refined.json"))["served"] for d in ("as_trained", "forced")]
    assert [s["reference_alignment"] for s in served] == ["register", "none"]
    names = sorted(os.listdir(tmp_path / "as_trained" / "refined"))
    diff = max(
        np.abs(
            png(tmp_path / "as_trained" / "refined" / n).astype(int) - png(tmp_path / "forced" / "refined" / n)
        ).max()
        for n in names
    )
    print(f"registered vs forced none: max |delta| {diff}/255")
    assert diff > 10

    # what the editor is given: the reference registered to the draft inside the mask, warped into its frame
    refiner = load_refiner(str(model), device="cpu", base_model="tiny", tiny_model=dict(SMALL))
    item, raw = refine_dataset(refiner, data)[0], refine_dataset(refiner, data, reference_alignment="none")[0]
    s, ox, oy, _ = register_reference(raw["draft"], raw["reference"], raw["mask"], scale_range=(0.5, 3.0))
    want = warp_reference(raw["reference"], (s, ox, oy), (SIZE, SIZE), "bilinear").clamp(0, 1)
    assert torch.allclose(item["reference"], want) and not torch.allclose(item["reference"], raw["reference"])


def test_bad_input_is_one_line_and_written_outputs_stay(own_model, held_out, tmp_path, capsys):
    def run(*argv) -> int:
        return cli(["refine", "--model", own_model, "--output_dir", str(tmp_path / "out"), *argv])

    good = one_set(held_out)
    missing = str(tmp_path / "nowhere.png")
    assert run(*good[:2], "--reference", missing, *good[4:]) == 2
    expect_line(capsys, "--reference", missing, "not found")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert run("--draft", str(broken), *good[2:]) == 2
    expect_line(capsys, "'draft'", "unreadable image")
    small = tmp_path / "small_mask.png"
    Image.new("L", (SIZE // 2, SIZE // 2), 255).save(small)
    assert run(*good[:4], "--mask", str(small), *good[6:]) == 2
    expect_line(capsys, "'mask' is 8x8 but 'draft' is 16x16")

    # records: the fourth one's draft is missing
    rows = records(held_out)
    for r in rows:
        r.pop("target")  # refine needs no target
        for k in ("draft", "reference", "mask"):
            r[k] = os.path.join(held_out, r[k])
    rows[3]["draft"] = missing
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    shutil.rmtree(out, ignore_errors=True)
    assert run("--records", str(path), "--disable_tqdm") == 2
    expect_line(capsys, "record 3", "'draft'", missing, "--skip_invalid_records")
    written = sorted(os.listdir(out / "refined"))
    assert written == [f"{i:05d}-{rows[i]['id']}.png" for i in range(3)]
    assert all(png(out / "refined" / n).shape == (SIZE, SIZE, 3) for n in written)  # whole files
    assert len(open(out / "refined.partial-0.jsonl").read().splitlines()) == 3  # and listed

    assert run("--records", str(path), "--disable_tqdm", "--skip_invalid_records") == 0
    summary = json.load(open(out / "refined.json"))
    assert (summary["records"], summary["skipped"]) == (RECORDS - 1, 1) and "record 3" in summary["skipped_records"][0]
    assert "mse_in" not in summary  # no target: nothing to score
    assert "1 invalid record(s) skipped" in capsys.readouterr().out
