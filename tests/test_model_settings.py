"""Settings that belong to a trained model travel with it: the trainers write ``refiner_rl_model.json`` next to the
weights, and ``edit``, ``eval`` and a resume serve the model as it was trained (registered references, its
reference positions) without the flags; a disagreeing flag is a one-line error (exit code 2); a folder without the
file behaves as before."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from refiner_rl import model_settings
from refiner_rl.cli.main import main as cli
from refiner_rl.data.registration import register_reference, warp_reference
from refiner_rl.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

DATA = ["--dataset", "synthetic", "--synthetic_size", "32", "--synthetic_geometry", "shifted"]
DATA += ["--synthetic_records", "4", "--synthetic_eval_records", "2"]
TRAIN = ["--use_lora", "false", "--per_device_train_batch_size", "2", "--logging_steps", "1", "--save_steps", "1"]
TRAIN += ["--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--sample_steps", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two SFT steps of the tiny editor with registered references and content-only reference positions; and a
    copy of its output without the settings file (a model from before it)."""
    root = tmp_path_factory.mktemp("settings")
    out = root / "sft"
    argv = ["sft", *DATA, *TRAIN, "--max_steps", "2", "--output_dir", str(out)]
    assert cli([*argv, "--reference_alignment", "register", "--reference_positions", "none"]) == 0
    old = root / "old"
    shutil.copytree(out / "transformer", old / "transformer")
    return out, old


def expect_line(capsys, *parts: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert all(p in err[0] for p in parts), err[0]
    return err[0]


def test_outputs_and_checkpoints_carry_the_settings(trained):
    out, _ = trained
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        saved = model_settings.load(str(folder))
        assert saved is not None, folder
        assert (saved.kind, saved.reference_alignment, saved.reference_positions) == ("kontext", "register", "none")
        assert (
            saved.reference_id == 2 and saved.guidance_scale is not None and saved.registration_scale_range == [0.5, 3]
        )
        assert saved.sampler["num_inference_steps"] == 10  # SFT's sample grids
        assert not [n for n in os.listdir(folder) if n.startswith(".")]  # no temporary file left behind


def test_load_and_merge(tmp_path):
    assert model_settings.load(str(tmp_path)) is None
    saved = model_settings.ModelSettings(reference_alignment="register")
    model_settings.save(saved, str(tmp_path))
    saved = model_settings.load(str(tmp_path))
    unset = {"reference_alignment": None, "reference_positions": None}
    assert model_settings.merge(saved, unset) == {"reference_alignment": "register", "reference_positions": "grid"}
    assert model_settings.merge(None, unset) == model_settings.DEFAULTS
    with pytest.raises(ConfigError, match=r"reference_alignment 'none' disagrees with 'register'.*refiner_rl_model"):
        model_settings.merge(saved, {"reference_alignment": "none"})
    (tmp_path / model_settings.SETTINGS_FILE).write_text('{"reference_alignment": "warp"}')
    with pytest.raises(CheckpointError, match="reference_alignment must be one of"):
        model_settings.load(str(tmp_path))


# ------------------------------------------------------------------------------------------------------------ edit
@pytest.fixture(scope="module")
def edit_inputs(tmp_path_factory):
    from refiner_rl.data import synthetic_records

    rec = synthetic_records(1, seed=5, size=32, geometry="shifted")[0]
    root = tmp_path_factory.mktemp("edit_inputs")
    rec["draft"].save(root / "image.png")
    rec["reference"].save(root / "reference.png")
    return root


def run_edit(monkeypatch, edit_inputs, out_dir, editor, *flags) -> tuple[int, dict]:
    """``refiner-rl edit`` with the sampler spied: returns the exit code and what the editor received."""
    import refiner_rl.agents.editor as editor_module

    seen = {}

    def spy(policy, batch, *, num_steps, seed):
        seen.update(reference=batch["reference"][0].clone(), draft=batch["draft"][0].clone(), policy=policy)
        return batch["draft"]

    monkeypatch.setattr(editor_module, "sample_edit", spy)
    argv = ["edit", "--editor", str(editor), "--image", str(edit_inputs / "image.png"), "--instruction", "restore"]
    argv += ["--reference", str(edit_inputs / "reference.png"), "--output_dir", str(out_dir), "--device", "cpu"]
    return cli([*argv, "--num_steps", "1", *flags]), seen


def _tensor(path) -> torch.Tensor:
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    return pil_to_tensor(Image.open(path).convert("RGB")).float() / 255.0


def test_edit_serves_the_model_registered_references(trained, edit_inputs, tmp_path, monkeypatch, capsys):
    out, old = trained
    code, seen = run_edit(monkeypatch, edit_inputs, tmp_path / "e", out)
    assert code == 0
    draft, reference = _tensor(edit_inputs / "image.png"), _tensor(edit_inputs / "reference.png")
    s, ox, oy, _ = register_reference(draft, reference, torch.ones(1, *draft.shape[-2:]))
    registered = warp_reference(reference, (s, ox, oy), tuple(draft.shape[-2:]), "bilinear").clamp(0, 1)
    assert torch.equal(seen["draft"], draft)
    assert torch.allclose(seen["reference"], registered)
    assert not torch.allclose(reference, registered, atol=0.05)  # the shifted reference really moved
    assert seen["policy"].reference_positions == "none"

    # an explicit flag that disagrees: one line, exit code 2, naming both values and the file
    code, _ = run_edit(monkeypatch, edit_inputs, tmp_path / "bad", out, "--reference_alignment", "none")
    assert code == 2
    expect_line(capsys, "'none'", "'register'", os.path.join(str(out), model_settings.SETTINGS_FILE))

    # without the file: as before (the reference as it is, grid positions)
    code, seen = run_edit(monkeypatch, edit_inputs, tmp_path / "old", old)
    assert code == 0
    assert torch.allclose(seen["reference"], reference) and seen["policy"].reference_positions == "grid"


# ------------------------------------------------------------------------------------------------------------ eval
def run_eval(monkeypatch, checkpoint, out_dir, *flags) -> tuple[int, list]:
    """``refiner-rl eval`` of one checkpoint with the sampler spied: the exit code and every batch it sampled."""
    import refiner_rl.evaluation.loop as loop

    seen = []

    def spy(policy, batch, **kwargs):
        seen.append((policy.reference_positions, batch["index"].tolist(), batch["reference"].clone()))
        return batch["draft"]

    monkeypatch.setattr(loop, "sample_images", spy)
    cand = json.dumps([{"name": "sft", "checkpoint": str(checkpoint)}])
    argv = ["eval", *DATA, "--candidates", cand, "--output_dir", str(out_dir), "--disable_tqdm", "true"]
    return cli([*argv, "--num_inference_steps", "1", *flags]), seen


def held_out(alignment: str):
    from refiner_rl.configs import DataArguments

    args = DataArguments(
        synthetic_size=32, synthetic_geometry="shifted", synthetic_eval_records=2, reference_alignment=alignment
    )
    return args.build(multiple=16, eval=True)


def test_eval_serves_the_model_registered_references(trained, tmp_path, monkeypatch, capsys):
    out, old = trained
    code, seen = run_eval(monkeypatch, out, tmp_path / "e")
    assert code == 0
    registered, plain = held_out("register"), held_out("none")
    for positions, index, refs in seen:
        assert positions == "none"
        for i, ref in zip(index, refs):
            assert torch.allclose(ref, registered[i]["reference"])
            assert not torch.allclose(ref, plain[i]["reference"], atol=0.05)
    assert sum(len(index) for _, index, _ in seen) == 2
    settings = json.loads((tmp_path / "e" / "results.json").read_text())["settings"]
    assert settings["serving"]["sft"] == {"reference_alignment": "register", "reference_positions": "none"}

    capsys.readouterr()
    code, _ = run_eval(monkeypatch, out, tmp_path / "bad", "--reference_positions", "grid")
    assert code == 2
    expect_line(capsys, "candidate 'sft'", "'grid'", "'none'", model_settings.SETTINGS_FILE)

    code, seen = run_eval(monkeypatch, old, tmp_path / "old")
    assert code == 0 and seen
    for positions, index, refs in seen:
        assert positions == "grid"
        for i, ref in zip(index, refs):
            assert torch.allclose(ref, plain[i]["reference"])


# ---------------------------------------------------------------------------------------------------------- resume
def test_resume_reads_the_settings_and_refuses_a_disagreeing_flag(trained, tmp_path, capsys):
    out, _ = trained
    argv = ["sft", *DATA, *TRAIN, "--max_steps", "2", "--output_dir", str(tmp_path / "r")]
    argv += ["--resume_from_checkpoint", str(out / "checkpoint-1")]
    assert cli([*argv, "--reference_alignment", "none"]) == 2
    expect_line(capsys, "reference_alignment 'none' disagrees with 'register'", "checkpoint-1")
    assert cli(argv) == 0  # unset: the checkpoint's settings
    saved = model_settings.load(str(tmp_path / "r"))
    assert (saved.reference_alignment, saved.reference_positions) == ("register", "none")
