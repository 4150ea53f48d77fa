"""FLUX.1-Fill behind the editor interface: built as diffusers' own FluxFillPipeline from a tiny random config, our
conditions, velocity and ODE sample equal the pipeline's; a LoRA from `refiner-rl sft` loads with the pipeline's
load_lora_weights; the registry picks the editor from model_index.json; mask-guided task records load."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from refiner_rl import model_settings
from refiner_rl.agents.editor import load_editor
from refiner_rl.data import TripletDataset, collate_triplets, mask_task_records
from refiner_rl.data.records import extend_mask
from refiner_rl.errors import ConfigError, DataError
from refiner_rl.policies import FillPolicy, KontextPolicy, pack_latents, policy_class
from refiner_rl.policies.fill import fold_mask
from refiner_rl.rollout import rollout

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16


def _inputs(seed=0, b=2):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(b, 3, SIZE, SIZE, generator=g)
    mask = torch.zeros(b, 1, SIZE, SIZE)
    mask[0, :, 4:12, 2:10] = 1.0
    mask[1:, :, :6, :] = 1.0
    return image, mask


@pytest.fixture(scope="module")
def fill():
    """The tiny Fill editor and the same components as diffusers' FluxFillPipeline. The pipeline encodes the masked
    image with a posterior *sample*, our codec with its mode (as for Kontext); FLUX's VAE posterior is nearly a point,
    a random tiny VAE's is not, so the pipeline's posterior is made a point here (std 0) to compare the rest exactly."""
    policy = FillPolicy.tiny(codec="vae", guidance_embeds=True)
    pipe = policy.pipeline()
    encode = pipe.vae.encode

    def point_posterior(x, return_dict=True):
        out = encode(x, return_dict=return_dict)
        dist = out.latent_dist if return_dict else out[0]
        dist.std = torch.zeros_like(dist.std)
        return out

    pipe.vae.encode = point_posterior
    return policy, pipe


def test_fold_mask_by_hand():
    m = torch.arange(16.0).reshape(1, 1, 4, 4)
    folded = fold_mask(m, 2)  # each 2x2 block's pixels, row-major, become the channels of its latent pixel
    assert folded.shape == (1, 4, 2, 2)
    assert folded[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    assert folded[0, :, 1, 1].tolist() == [10.0, 11.0, 14.0, 15.0]


def test_conditions_and_velocity_equal_the_pipeline_s(fill):
    policy, pipe = fill
    image, mask = _inputs()
    cond = policy.encode_conditions(image, mask, prompts=["fill it", "fill that"])
    # the pipeline's own preprocessing and mask latents
    init = pipe.image_processor.preprocess(image, height=SIZE, width=SIZE)
    m = pipe.mask_processor.preprocess(mask, height=SIZE, width=SIZE)
    m_lat, img_lat = pipe.prepare_mask_latents(
        m, init * (1 - m), 2, pipe.vae.config.latent_channels, 1, SIZE, SIZE, torch.float32, "cpu", None
    )
    theirs = torch.cat([img_lat, m_lat], dim=-1)
    assert cond.channels.shape == theirs.shape == (2, 16, policy.latent_channels + policy.mask_channels)
    assert (cond.channels - theirs).abs().max() <= 1e-6
    x = torch.randn(2, cond.num_target_tokens, policy.latent_channels)
    sigma = torch.tensor([0.7, 0.3])
    embeds, pooled, text_ids = pipe.encode_prompt(["fill it", "fill that"], None, max_sequence_length=32)
    ids = pipe._prepare_latent_image_ids(2, SIZE // 4, SIZE // 4, "cpu", torch.float32)
    with torch.no_grad():
        v_pipe = pipe.transformer(
            hidden_states=torch.cat([x, theirs], dim=2),
            timestep=sigma,
            guidance=torch.full((2,), policy.guidance_scale),
            pooled_projections=pooled,
            encoder_hidden_states=embeds,
            txt_ids=text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        v = policy.velocity(x, sigma, cond)
    assert policy.guidance_scale == 30.0  # FLUX.1-Fill-dev's default
    assert (v - v_pipe).abs().max() <= 1e-6


def test_ode_sample_equals_the_pipeline_s(fill):
    policy, pipe = fill
    image, mask = _inputs(1)
    image, mask = image[:1], mask[:1]
    steps = 4
    cond = policy.encode_conditions(image, mask, prompts=["a red roof"])
    x = torch.randn(1, cond.num_target_tokens, policy.latent_channels, generator=torch.Generator().manual_seed(3))
    sigmas = policy.sigmas(steps, cond.num_target_tokens)
    ours = policy.decode(rollout(policy, cond, sigmas, x=x).latents, cond.grid)
    theirs = pipe(
        prompt="a red roof",
        image=image,
        mask_image=mask,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=policy.guidance_scale,
        latents=x.clone(),
        max_sequence_length=32,
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-4


def test_sigmas_follow_the_model_s_scheduler_config():
    p = FillPolicy.tiny()
    default = p.sigmas(4, 64)
    p.scheduler_config = {**p.scheduler_config, "use_dynamic_shifting": False, "shift": 3.0}
    static = p.sigmas(4, 64)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    assert torch.allclose(static[:-1], 3 * t / (1 + 2 * t))  # SD3's static shift, not FLUX's dynamic one
    assert not torch.allclose(default, static)


def test_registry_reads_model_index_and_tiny_names(tmp_path):
    assert policy_class("tiny") is KontextPolicy and policy_class("tiny-kontext") is KontextPolicy
    assert policy_class("tiny-fill") is FillPolicy
    folder = str(tmp_path / "fill")
    FillPolicy.tiny(codec="vae").save_pretrained_components(folder)
    with open(os.path.join(folder, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "FluxFillPipeline"
    assert policy_class(folder) is FillPolicy
    loaded = FillPolicy.from_pretrained(folder)
    assert loaded.scheduler_config["base_shift"] == 0.5
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ConfigError, match="StableDiffusionPipeline.*supported: FluxKontextPipeline, FluxFillPipeline"):
        policy_class(str(tmp_path / "odd"))


def test_mask_task_records_load_as_items(tmp_path):
    recs = mask_task_records(8, seed=0, size=SIZE)
    assert sorted(r["task"] for r in recs) == ["extend"] * 2 + ["fill"] * 4 + ["removal"] * 2
    ds = TripletDataset(recs, None, multiple=4)
    assert ds.has_field("task") and ds.has_field("target") and not ds.has_field("reference")
    batch = collate_triplets([ds[i] for i in range(8)])
    for i, r in enumerate(recs):
        assert batch["task"][i] == r["task"]
        if r["task"] == "extend":  # built from the margin: a 4-pixel band of a 16-pixel image
            assert torch.equal(batch["mask"][i], extend_mask(SIZE, SIZE, 0.25))
            assert batch["mask"][i].sum() == SIZE * SIZE - 8 * 8
        else:
            assert torch.equal(batch["mask"][i][0], torch.from_numpy(np.asarray(r["mask"]) >= 128).float())
        if r["task"] == "removal":
            assert batch["prompt"][i] == "remove"
    image = Image.new("RGB", (SIZE, SIZE))
    bad = [{"task": "fill", "image": image, "mask": Image.new("L", (SIZE, SIZE), 255)}]
    with pytest.raises(DataError, match="record 0: a 'fill' record needs field 'prompt'"):
        TripletDataset(bad, None, multiple=4)
    with pytest.raises(DataError, match="'task': 'inpaint' is not one of fill, extend, removal"):
        TripletDataset([{"task": "inpaint", "image": image}], None, multiple=4)
    mixed = recs[:2] + [
        {"prompt": "p", "draft": image, "reference": image, "target": image, "mask": Image.new("L", (SIZE, SIZE), 255)}
    ]
    with pytest.raises(DataError, match="mixes triplet records"):
        TripletDataset(mixed, None, multiple=4)


def test_fill_conditions_hide_the_masked_pixels():
    p = FillPolicy.tiny()
    image, mask = _inputs()
    other = image.clone()
    other[mask.expand_as(other) > 0] = torch.rand(int(mask.sum().item() * 3))
    a = p.encode_conditions(image, mask, prompts=["x", "x"])
    b = p.encode_conditions(other, mask, prompts=["x", "x"])
    assert torch.equal(a.channels, b.channels)  # what is under the mask never reaches the editor
    c = p.encode_conditions(image, 1 - mask, prompts=["x", "x"])
    assert not torch.equal(a.channels, c.channels)
    assert torch.equal(a.channels[..., -p.mask_channels :], pack_latents(fold_mask(mask, 2)))


def test_lora_from_the_sft_cli_loads_in_flux_fill_pipeline(tmp_path):
    out = tmp_path / "sft"
    cmd = [sys.executable, "-m", "refiner_rl", "sft", "--model_name_or_path", "tiny-fill"]
    cmd += ["--tiny_model", '{"codec": "vae", "guidance_embeds": true}', "--synthetic_tasks", '{"fill": 1}']
    cmd += ["--synthetic_records", "8", "--synthetic_eval_records", "2", "--synthetic_size", str(SIZE)]
    cmd += ["--lora_r", "4", "--max_steps", "2", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2"]
    cmd += ["--output_dir", str(out), "--report_to", "none", "--use_cpu", "true", "--save_steps", "100"]
    cmd += ["--sample_steps", "0", "--logging_steps", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours = FillPolicy.tiny(codec="vae", guidance_embeds=True)
    ours.add_lora(4, target_modules=_lora_targets(out))
    ours.load_lora(str(out))
    pipe = FillPolicy.tiny(codec="vae", guidance_embeds=True).pipeline()
    pipe.load_lora_weights(str(out))
    adapters = pipe.transformer.peft_config
    assert len(adapters) == 1
    loaded = {k for k in pipe.transformer.state_dict() if "lora_" in k}
    saved = {k for k in ours.transformer.state_dict() if "lora_" in k}
    assert len(loaded) == len(saved) > 0  # no missing and no unexpected keys
    image, mask = _inputs()
    cond = ours.encode_conditions(image, mask, prompts=["a", "b"])
    x = torch.randn(2, cond.num_target_tokens, ours.latent_channels)
    sigma = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        v_ours = ours.velocity(x, sigma, cond)
        v_pipe = ours.velocity(x, sigma, cond, transformer=pipe.transformer)
        v_base = FillPolicy.tiny(codec="vae", guidance_embeds=True).velocity(x, sigma, cond)
    assert (v_ours - v_pipe).abs().max() <= 1e-6
    assert (v_ours - v_base).abs().max() > 1e-4  # the adapter trained
    # the saved kind travels with the model: over a Kontext base it is refused before any weight loads
    assert model_settings.load(str(out)).kind == "fill"
    with pytest.raises(ConfigError, match="trained as a 'fill' editor .* base model 'tiny' is a 'kontext' editor"):
        load_editor(str(out), base="tiny")


def _lora_targets(folder) -> list[str]:
    from refiner_rl.evaluation.candidates import lora_settings

    return list(lora_settings(str(folder))["lora_target_modules"])
