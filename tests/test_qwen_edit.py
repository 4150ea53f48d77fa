"""Qwen-Image-Edit Plus behind the editor interface: built as diffusers' own QwenImageEditPlusPipeline from tiny random
configs (offline), our instruction embeddings, condition tokens, velocity and ODE sample equal the pipeline's, with one
and two condition images and with 2511's zero_cond_t on and off; a LoRA from `refiner-rl sft` loads with the
pipeline's load_lora_weights; `refiner-rl grpo` (GRPO and NFT objectives) runs on it with true CFG."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from refiner_rl.cli.main import main
from refiner_rl.policies import QwenEditPolicy, editor_kinds, policy_class
from refiner_rl.policies.qwen_edit import PROMPT_TEMPLATE, PROMPT_TEMPLATE_DROP, Instructions
from refiner_rl.rollout import rollout

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32


def _images(seed: int, n: int, size: int = SIZE) -> tuple[list[Image.Image], list[torch.Tensor]]:
    """``n`` random 8-bit images, as the PIL images the pipeline takes and as our ``[1, 3, H, W]`` tensors."""
    g = np.random.default_rng(seed)
    pils = [Image.fromarray(g.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    return pils, [torch.from_numpy(np.array(im)).permute(2, 0, 1)[None].float() / 255 for im in pils]


@pytest.fixture(scope="module")
def qwen():
    """The tiny editor, the same weights with 2511's zero_cond_t, and each as diffusers' QwenImageEditPlusPipeline. The
    pipeline resizes condition images to fixed pixel areas (module constants, 384^2 for the VL model and 1024^2 for
    the VAE); they are set to the tiny editor's areas for the module."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    policy = QwenEditPolicy.tiny()
    transformer = type(policy.transformer).from_config({**policy.transformer.config, "zero_cond_t": True})
    transformer.load_state_dict(policy.transformer.state_dict())
    options = policy.options()
    policy_2511 = QwenEditPolicy(transformer.eval(), policy.codec, policy.text_encoder, policy.processor, **options)
    saved = plus.CONDITION_IMAGE_SIZE, plus.VAE_IMAGE_SIZE
    plus.CONDITION_IMAGE_SIZE, plus.VAE_IMAGE_SIZE = policy.vl_condition_area, policy.vae_condition_area
    yield {False: (policy, policy.pipeline()), True: (policy_2511, policy_2511.pipeline())}
    plus.CONDITION_IMAGE_SIZE, plus.VAE_IMAGE_SIZE = saved


def _pipeline_inputs(pipe, pils, prompt, negative, height, width):
    """What QwenImageEditPlusPipeline.__call__ computes before its loop (steps 3 and 4), from its own methods."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus

    vl, vae, shapes = [], [], []
    for im in pils:
        cw, ch = plus.calculate_dimensions(plus.CONDITION_IMAGE_SIZE, im.width / im.height)
        vw, vh = plus.calculate_dimensions(plus.VAE_IMAGE_SIZE, im.width / im.height)
        vl.append(pipe.image_processor.resize(im, ch, cw))
        vae.append(pipe.image_processor.preprocess(im, vh, vw).unsqueeze(2))
        shapes.append((1, vh // pipe.vae_scale_factor // 2, vw // pipe.vae_scale_factor // 2))
    embeds, mask = pipe.encode_prompt(prompt, image=vl)
    neg, neg_mask = pipe.encode_prompt(negative, image=vl)
    c = pipe.transformer.config.in_channels // 4
    _, tokens = pipe.prepare_latents(vae, 1, c, height, width, torch.float32, "cpu", None, torch.zeros(1))
    f = pipe.vae_scale_factor
    img_shapes = [[(1, height // f // 2, width // f // 2), *shapes]]
    return (embeds, mask), (neg, neg_mask), tokens, img_shapes


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["2509", "2511"])
@pytest.mark.parametrize("n_images", [1, 2])
def test_conditions_and_velocity_equal_the_pipeline_s(qwen, n_images, zero_cond_t):
    policy, pipe = qwen[zero_cond_t]
    assert pipe.transformer.config.zero_cond_t is zero_cond_t
    # one condition image: a 16 px draft, which the VAE side upsamples to 32 px (its own frame in img_shapes)
    size = 16 if n_images == 1 else SIZE
    pils, images = _images(n_images, n_images, size)
    (embeds, mask), (neg, neg_mask), tokens, img_shapes = _pipeline_inputs(pipe, pils, "fix the logo", " ", size, size)
    cond = policy.encode_conditions(*images, prompts=["fix the logo"], negative_prompts=[" "])
    assert [list(cond.img_shapes)] == img_shapes and len(img_shapes[0]) == n_images + 1
    assert mask is None and (cond.text.embeds - embeds).abs().max() == 0.0  # same tokens, same images, same model
    assert (cond.negative.embeds - neg).abs().max() == 0.0
    assert cond.tokens.shape == tokens.shape and (cond.tokens - tokens).abs().max() <= 1e-6
    x = torch.randn(1, cond.num_target_tokens, policy.latent_channels, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7])

    def theirs(e, m):
        out = pipe.transformer(
            hidden_states=torch.cat([x, tokens], dim=1),
            timestep=sigma,
            encoder_hidden_states=e,
            encoder_hidden_states_mask=m,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        return out[:, : x.shape[1]]

    with torch.no_grad():
        v_c, v_u = theirs(embeds, mask), theirs(neg, neg_mask)
        v = policy.velocity(x, sigma, cond)
        guided = v_u + 4.0 * (v_c - v_u)  # the pipeline's true CFG with its norm rescale
        guided = guided * (v_c.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))
        v_cfg = policy.velocity(x, sigma, cond, true_cfg_scale=4.0)
    assert (v - v_c).abs().max() <= 1e-6
    assert (v_cfg - guided).abs().max() <= 1e-6
    assert (v_cfg - v).abs().max() > 1e-3  # the negative pass is used
    if n_images == 2:  # the second condition image (the reference) reaches the target tokens
        swapped = policy.encode_conditions(images[0], images[0], prompts=["fix the logo"])
        with torch.no_grad():
            assert (policy.velocity(x, sigma, swapped) - v).abs().max() > 1e-4
    if zero_cond_t:  # the same weights without zero_cond_t give another velocity: the flag is read
        other, _ = qwen[False]
        with torch.no_grad():
            assert (other.velocity(x, sigma, cond) - v).abs().max() > 1e-4


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["2509", "2511"])
def test_ode_sample_equals_the_pipeline_s(qwen, zero_cond_t):
    policy, pipe = qwen[zero_cond_t]
    pils, images = _images(7, 2)
    steps = 4
    cond = policy.encode_conditions(*images, prompts=["a red roof"], negative_prompts=["blurry"])
    x = torch.randn(1, cond.num_target_tokens, policy.latent_channels, generator=torch.Generator().manual_seed(3))
    sigmas = policy.sigmas(steps, cond.num_target_tokens)
    ours = policy.decode(rollout(policy, cond, sigmas, x=x, true_cfg_scale=4.0).latents, cond.grid)
    theirs = pipe(
        image=pils,
        prompt="a red roof",
        negative_prompt="blurry",
        true_cfg_scale=4.0,
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        latents=x.clone(),
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (1, 3, SIZE, SIZE)
    assert (ours - theirs).abs().max() <= 1e-4
    # the schedule is the model's scheduler config: dynamic shift over 8192 tokens, ending at shift_terminal
    assert torch.equal(sigmas, pipe.scheduler.sigmas.float())
    assert abs(float(sigmas[-2]) - 0.02) < 1e-6 and sigmas[-1] == 0.0


def test_instruction_is_encoded_with_the_images_and_cached_per_record(qwen):
    policy, pipe = qwen[False]
    assert (
        PROMPT_TEMPLATE == pipe.prompt_template_encode and PROMPT_TEMPLATE_DROP == pipe.prompt_template_encode_start_idx
    )
    calls = []
    hook = policy.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        policy._text_cache.clear()
        _, (draft, ref) = _images(11, 2)
        _, (other,) = _images(12, 1)
        text = policy.encode_prompts(["fix it", "fix it"])
        assert isinstance(text, Instructions) and text.select(torch.tensor([1])).prompts == ["fix it"]
        a = policy.encode_conditions(torch.cat([draft, draft]), torch.cat([ref, other]), text=text)
        assert len(calls) == 2  # same instruction, another reference: another embedding
        assert (a.text.embeds[0] - a.text.embeds[1]).abs().max() > 1e-4
        b = policy.encode_conditions(draft, ref, prompts=["fix it"])
        assert len(calls) == 2 and torch.equal(b.text.embeds[0], a.text.embeds[0])  # from the cache
        c = policy.encode_conditions(draft, ref, prompts=["fix it now"])
        now = len(policy.processor.tokenizer(" now")["input_ids"])
        assert len(calls) == 3 and c.text.embeds.shape[1] == a.text.embeds.shape[1] + now
    finally:
        hook.remove()
    from refiner_rl.policies.flux import TextEmbeds

    with pytest.raises(ValueError, match="encodes the instruction together with the condition images"):
        policy.encode_conditions(draft, ref, text=TextEmbeds(torch.zeros(1, 4, 16), torch.zeros(1, 16)))


def test_batches_pad_text_and_take_any_number_of_condition_images(qwen):
    policy, _ = qwen[True]
    _, imgs = _images(21, 6)
    draft, ref, ref2 = (torch.cat(imgs[i : i + 2]) for i in (0, 2, 4))
    cond = policy.encode_conditions(draft, ref, ref2, prompts=["short", "a much longer instruction"])
    assert len(cond.img_shapes) == 4 and cond.tokens.shape == (2, 3 * 16, policy.latent_channels)
    assert cond.text.mask[0].sum() < cond.text.mask[1].sum() == cond.text.mask.shape[1]  # row 0 padded
    x = torch.randn(2, cond.num_target_tokens, policy.latent_channels, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.4, 0.9])
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        alone = policy.encode_conditions(draft[:1], ref[:1], ref2[:1], prompts=["short"])
        v0 = policy.velocity(x[:1], sigma[:1], alone)  # unpadded, one record
        v_sel = policy.velocity(x[1:], sigma[1:], cond.select(slice(1, 2)))
    assert (v[:1] - v0).abs().max() <= 1e-5  # padding is masked out
    assert (v[1:] - v_sel).abs().max() <= 1e-5


def test_registry_picks_the_editor_from_its_folder_and_the_tiny_name(qwen, tmp_path):
    policy, _ = qwen[False]
    assert policy_class("tiny-qwen-edit") is QwenEditPolicy and editor_kinds()["qwen_edit"] is QwenEditPolicy
    folder = str(tmp_path / "qwen")
    policy.save_pretrained_components(folder)
    with open(f"{folder}/model_index.json") as f:
        assert json.load(f)["_class_name"] == "QwenImageEditPlusPipeline"
    assert policy_class(folder) is QwenEditPolicy
    loaded = QwenEditPolicy.from_pretrained(folder, **policy.options())
    assert loaded.scheduler_config["shift_terminal"] == 0.02
    _, images = _images(3, 2)
    x = torch.randn(1, 16, policy.latent_channels)
    with torch.no_grad():
        v = policy.velocity(x, torch.tensor([0.5]), policy.encode_conditions(*images, prompts=["x"]))
        w = loaded.velocity(x, torch.tensor([0.5]), loaded.encode_conditions(*images, prompts=["x"]))
    assert (v - w).abs().max() <= 1e-6
    full_ft = QwenEditPolicy.tiny(seed=1)  # other random weights, then the saved transformer's
    full_ft.load_transformer(f"{folder}/transformer")
    with torch.no_grad():
        assert torch.equal(
            full_ft.velocity(x, torch.tensor([0.5]), policy.encode_conditions(*images, prompts=["x"])), v
        )


@pytest.fixture(scope="module")
def sft_lora(tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen") / "sft"
    cmd = ["sft", "--model_name_or_path", "tiny-qwen-edit", "--synthetic_records", "4", "--synthetic_eval_records", "2"]
    cmd += ["--synthetic_size", str(SIZE), "--lora_r", "4", "--max_steps", "2", "--per_device_train_batch_size", "2"]
    cmd += ["--learning_rate", "1e-2", "--output_dir", str(out), "--report_to", "none", "--use_cpu", "true"]
    cmd += ["--save_steps", "100", "--sample_steps", "0", "--logging_steps", "1"]
    assert main(cmd) == 0
    return out


def test_lora_from_the_sft_cli_loads_in_qwen_image_edit_plus_pipeline(qwen, sft_lora):
    from refiner_rl import model_settings
    from refiner_rl.evaluation.candidates import lora_settings

    targets = lora_settings(str(sft_lora))["lora_target_modules"]
    assert {"img_mlp.net.0.proj", "txt_mlp.net.2", "to_q", "add_k_proj"} <= set(targets)  # attention and MLPs
    ours = QwenEditPolicy.tiny()
    ours.add_lora(4, target_modules=targets)
    ours.load_lora(str(sft_lora))
    pipe = QwenEditPolicy.tiny().pipeline()
    pipe.load_lora_weights(str(sft_lora))
    assert len(pipe.transformer.peft_config) == 1
    (name,) = pipe.transformer.peft_config  # the pipeline names its adapter itself
    loaded = {k.replace(f".{name}.", ".default.") for k in pipe.transformer.state_dict() if "lora_" in k}
    saved = {k for k in ours.transformer.state_dict() if "lora_" in k}
    assert loaded == saved and len(saved) > 0  # no missing and no unexpected keys
    base, _ = qwen[False]
    _, images = _images(5, 2)
    cond = ours.encode_conditions(*images, prompts=["fix it"])
    x = torch.randn(1, cond.num_target_tokens, ours.latent_channels)
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        v_ours = ours.velocity(x, sigma, cond)
        v_pipe = ours.velocity(x, sigma, cond, transformer=pipe.transformer)
        v_base = base.velocity(x, sigma, cond)
    assert (v_ours - v_pipe).abs().max() <= 1e-6
    assert (v_ours - v_base).abs().max() > 1e-4  # the adapter trained
    assert model_settings.load(str(sft_lora)).kind == "qwen_edit"


@pytest.mark.parametrize("objective", ["grpo", "nft"])
def test_grpo_and_nft_run_on_the_sft_lora_with_true_cfg(sft_lora, tmp_path, objective):
    out = tmp_path / objective
    cmd = [
        "grpo",
        "--objective",
        objective,
        "--model_name_or_path",
        "tiny-qwen-edit",
        "--init_lora_path",
        str(sft_lora),
    ]
    cmd += ["--lora_r", "4"]
    cmd += ["--synthetic_records", "2", "--synthetic_eval_records", "2", "--synthetic_size", str(SIZE)]
    cmd += ["--max_steps", "2", "--per_device_train_batch_size", "4", "--num_generations", "2"]
    cmd += ["--num_inference_steps", "3", "--sde_window_size", "1", "--true_cfg_scale", "2.0", "--negative_prompt", " "]
    cmd += ["--rewards", '[{"name": "masked_pixel", "weight": 1.0}]', "--beta", "0.01", "--learning_rate", "1e-3"]
    cmd += ["--output_dir", str(out), "--report_to", "none", "--use_cpu", "true", "--save_steps", "100"]
    cmd += ["--logging_steps", "1"]
    assert main(cmd) == 0
    logs = [h for h in json.load(open(out / "trainer_state.json"))["log_history"] if "reward" in h]
    assert len(logs) == 2 and all(np.isfinite(h["reward"]) for h in logs)
    if objective == "grpo":  # one forward for rollout and training (ratio 1 before an update); KL to the base model
        assert logs[0]["ratio"] == 1.0 and logs[0]["kl"] > 0.0
    assert (out / "pytorch_lora_weights.safetensors").is_file()


TRAINED_OPTIONS = {"vl_condition_area": 32 * 32, "vae_condition_area": None}  # not the tiny editor's defaults


@pytest.fixture(scope="module")
def trained_with_options(tmp_path_factory):
    """One SFT step of the tiny editor with its own condition areas (a checkpoint at step 1)."""
    out = tmp_path_factory.mktemp("qwen") / "options"
    cmd = ["sft", "--model_name_or_path", "tiny-qwen-edit", "--editor_options", json.dumps(TRAINED_OPTIONS)]
    cmd += ["--synthetic_records", "2", "--synthetic_eval_records", "1", "--synthetic_size", "16"]
    cmd += ["--lora_r", "4", "--max_steps", "1", "--per_device_train_batch_size", "2", "--save_steps", "1"]
    cmd += ["--output_dir", str(out), "--report_to", "none", "--use_cpu", "true", "--sample_steps", "0"]
    assert main(cmd) == 0
    return out


def test_the_editor_options_travel_with_the_trained_model(trained_with_options, capsys):
    from refiner_rl import model_settings
    from refiner_rl.agents.editor import load_editor
    from refiner_rl.cli.train import _apply_saved_settings
    from refiner_rl.configs import DataArguments, ModelArguments
    from refiner_rl.errors import ConfigError
    from refiner_rl.evaluation.candidates import Candidate, load_candidate

    out = trained_with_options
    for folder in (out, out / "checkpoint-1"):
        assert model_settings.load(str(folder)).editor_options == TRAINED_OPTIONS
    assert QwenEditPolicy.tiny().options() != TRAINED_OPTIONS
    # edit and eval serve it with its own options, without being told
    assert load_editor(str(out)).options() == TRAINED_OPTIONS
    base = ModelArguments(model_name_or_path="tiny-qwen-edit")
    assert load_candidate(Candidate("sft", str(out)), base, "cpu").options() == TRAINED_OPTIONS
    # a resume takes them too; an explicit option that disagrees is a one-line error naming both and the file
    model_args, data_args = ModelArguments(model_name_or_path="tiny-qwen-edit"), DataArguments()
    _apply_saved_settings(str(out / "checkpoint-1"), model_args, data_args)
    assert model_args.editor_options == TRAINED_OPTIONS
    with pytest.raises(ConfigError, match=r"editor_options vae_condition_area 1024 disagrees with None"):
        _apply_saved_settings(
            str(out / "checkpoint-1"), ModelArguments(editor_options={"vae_condition_area": 1024}), data_args
        )
    with pytest.raises(ConfigError, match=r"editor_options \['reference_id'\] are not options of QwenEditPolicy"):
        from refiner_rl.configs import build_policy

        build_policy(ModelArguments(model_name_or_path="tiny-qwen-edit", editor_options={"reference_id": 3}))


# The learning test's tiny editor: wider than the default shape (inner width 128 > the 48 channels of a packed pixel
# token, so it can copy a token), one block, lossless pixel codec, condition images at their own 16 px size.
LEARNER = dict(codec="pixel", num_layers=1, num_attention_heads=4, attention_head_dim=32, axes_dims_rope=(8, 12, 12))
TWO_REFS = dict(size=16, num_references=2)  # the region's detail only in the second reference, the first a distractor
LEARN_STEPS, LEARN_BATCH, LEARN_LR = 800, 8, 2e-3
# Measured (REFINER_RL_LEARNING_SEED 0-3; in-mask MSE of held-out 8-step samples, own / draft and second reference
# swapped / own): 0.54 / 2.57, 0.76 / 1.80, 0.81 / 1.59, 0.65 / 1.98. At 500 steps: 0.67 / 2.14, 0.83 / 1.71,
# 0.91 / 1.50 (seeds 0-2), hence 800. The swap threshold is the 1.5 (worst seed 1.59).
LEARN_BEATS_DRAFT = 0.95


def _two_refs(n: int, seed: int):
    from refiner_rl.data import TripletDataset, synthetic_records

    return TripletDataset(synthetic_records(n, seed=seed, **TWO_REFS), None, multiple=4)


def test_the_second_reference_is_used(tmp_path):
    from refiner_rl.data import collate_triplets
    from refiner_rl.evaluation import masked_mse
    from refiner_rl.sampling import sample_images
    from refiner_rl.trainers import FlowSFTConfig, FlowSFTTrainer
    from tests.helpers import LEARNING, LEARNING_SEED, data_seeds, learning_figure

    torch.manual_seed(LEARNING_SEED)
    policy = QwenEditPolicy.tiny(vae_condition_area=None, seed=LEARNING_SEED, **LEARNER)
    args = FlowSFTConfig(
        output_dir=str(tmp_path),
        **{**LEARNING, "logging_steps": 100},
        max_steps=LEARN_STEPS,
        per_device_train_batch_size=LEARN_BATCH,
        learning_rate=LEARN_LR,
        lr_scheduler_type="constant",
        caption_dropout=0.0,
        sample_steps=0,
    )
    FlowSFTTrainer(policy, args, _two_refs(64, data_seeds()[0])).train()
    policy.transformer.eval()
    held = _two_refs(16, data_seeds()[1])
    batch = collate_triplets([held[i] for i in range(16)])
    swapped = {**batch, "reference_2": batch["reference_2"].roll(1, dims=0)}  # another record's detail reference
    own = sample_images(policy, batch, num_steps=8, seed=LEARNING_SEED)
    other = sample_images(policy, swapped, num_steps=8, seed=LEARNING_SEED)
    err_own, err_other, err_draft = (
        masked_mse(x, batch["target"], batch["mask"]).mean().item() for x in (own, other, batch["draft"])
    )
    print(f"in-mask MSE: own references {err_own:.5f}, second swapped {err_other:.5f}, draft {err_draft:.5f}")
    learning_figure("two references: in-mask error, own / draft", err_own / err_draft, "<", LEARN_BEATS_DRAFT)
    learning_figure("two references: in-mask error, second swapped / own", err_other / err_own, ">", 1.5)
