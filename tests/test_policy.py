"""The Kontext policy: token/id layout, codecs, the velocity forward, loading from local folders."""

import os

import pytest
import torch

from refiner_rl.policies import KontextPolicy, PixelUnshuffleCodec, image_ids, pack_latents, unpack_latents
from tests.helpers import small_policy


def test_pack_unpack_round_trip_and_order():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    tokens = pack_latents(x)
    assert tokens.shape == (2, 2 * 3, 12)
    # token (row 0, col 1) holds the 2x2 patch at rows 0-1, cols 2-3 of every channel, channel-major
    expected = torch.stack([x[0, c, 0:2, 2:4].reshape(-1) for c in range(3)]).reshape(-1)
    assert torch.equal(tokens[0, 1], expected)
    assert torch.equal(unpack_latents(tokens, 4, 6), x)


def test_image_ids_layout():
    ids = image_ids(2, 3, index=2)
    assert ids.shape == (6, 3)
    assert torch.all(ids[:, 0] == 2)
    assert ids[:, 1].tolist() == [0, 0, 0, 1, 1, 1]
    assert ids[:, 2].tolist() == [0, 1, 2, 0, 1, 2]


def test_condition_token_layout_target_draft_reference():
    p = small_policy()
    draft, ref = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 16, 48)  # the reference keeps its own grid
    cond = p.encode_conditions(draft, ref, prompts=["a", "b"])
    n_target, n_draft, n_ref = 8 * 8, 8 * 8, 4 * 12
    assert cond.target_ids.shape == (n_target, 3) and torch.all(cond.target_ids[:, 0] == 0)
    assert cond.ids.shape == (n_draft + n_ref, 3)
    assert torch.all(cond.ids[:n_draft, 0] == 1) and torch.all(cond.ids[n_draft:, 0] == 2)
    # each image starts its own row/col grid at 0 (no spatial offset)
    assert cond.ids[n_draft, 1:].tolist() == [0, 0] and cond.ids[-1, 1:].tolist() == [3, 11]
    assert cond.tokens.shape == (2, n_draft + n_ref, 48)
    assert torch.allclose(cond.tokens[:, :n_draft], p.encode_images(draft))


def test_reference_id_is_configurable_and_validated():
    p = KontextPolicy.tiny(reference_id=5, num_layers=1, num_single_layers=1)
    cond = p.encode_conditions(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), prompts=["x"])
    assert torch.all(cond.ids[16:, 0] == 5)
    with pytest.raises(ValueError, match="reference_id"):
        KontextPolicy.tiny(reference_id=1)


def test_velocity_reads_target_tokens_and_depends_on_both_images():
    p = small_policy()
    draft, ref = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    cond = p.encode_conditions(draft, ref, prompts=["a", "a"])
    x, s = torch.randn(2, 64, 48), torch.tensor([0.3, 0.8])
    v = p.velocity(x, s, cond)
    assert v.shape == x.shape and v.dtype == torch.float32
    v_other_ref = p.velocity(x, s, p.encode_conditions(draft, torch.rand(2, 3, 32, 32), prompts=["a", "a"]))
    v_other_draft = p.velocity(x, s, p.encode_conditions(torch.rand(2, 3, 32, 32), ref, prompts=["a", "a"]))
    assert (v - v_other_ref).abs().max() > 1e-4 and (v - v_other_draft).abs().max() > 1e-4
    # the batch does not mix: sample 0 alone gives the same velocity
    v0 = p.velocity(x[:1], s[:1], cond.select(slice(0, 1)))
    assert torch.allclose(v0, v[:1], atol=1e-5)


def test_precomputed_text_embeddings_match_encoders_and_are_cached():
    p = small_policy()
    text = p.encode_prompts(["fix the logo", "fix the logo"])
    assert len(p._text_cache) == 1
    assert text.prompt_embeds.shape == (2, 32, 32) and text.pooled.shape == (2, 32)
    d, r = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    a = p.encode_conditions(d, r, prompts=["fix the logo"] * 2)
    b = p.encode_conditions(d, r, text=text)
    x = torch.randn(2, 16, 48)
    assert torch.equal(p.velocity(x, torch.tensor([0.5, 0.5]), a), p.velocity(x, torch.tensor([0.5, 0.5]), b))
    p_no_text = KontextPolicy(p.transformer, p.codec)
    with pytest.raises(ValueError, match="prompt_embeds"):
        p_no_text.encode_prompts(["x"])


def test_true_cfg_combines_conditional_and_unconditional():
    p = small_policy()
    d, r = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    cond = p.encode_conditions(d, r, prompts=["sharp"], negative_prompts=["blurry"])
    x, s = torch.randn(1, 16, 48), torch.tensor([0.5])
    v_c = p.velocity(x, s, cond)
    v_u = p.velocity(x, s, p.encode_conditions(d, r, prompts=["blurry"]))
    v = p.velocity(x, s, cond, true_cfg_scale=3.0)
    assert torch.allclose(v, v_u + 3.0 * (v_c - v_u), atol=1e-5)


def test_pixel_codec_is_lossless_and_frozen_parts_eval():
    codec = PixelUnshuffleCodec(2)
    img = torch.rand(2, 3, 16, 16)
    assert torch.allclose(codec.decode(codec.encode(img)), img, atol=1e-6)
    p = small_policy()
    assert not p.text_encoder.training and not p.text_encoder_2.training and not p.codec.training
    assert not any(q.requires_grad for q in p.text_encoder.parameters())


def test_size_not_multiple_is_a_clear_error():
    p = small_policy()
    with pytest.raises(ValueError, match="multiple of 4"):
        p.encode_images(torch.rand(1, 3, 18, 16))


def test_load_from_local_folder_in_kontext_layout(tmp_path):
    """The real loading path (from_pretrained on a diffusers-layout folder), on a tiny VAE-codec editor."""
    torch.manual_seed(0)
    src = KontextPolicy.tiny(codec="vae", num_layers=1, num_single_layers=1)
    src.save_pretrained_components(str(tmp_path))
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        assert os.path.isdir(tmp_path / sub), sub
    assert any(f.endswith(".safetensors") for f in os.listdir(tmp_path / "transformer"))
    loaded = KontextPolicy.from_pretrained(str(tmp_path), max_sequence_length=32)
    d, r = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    # VAE encode uses the posterior's mode: deterministic
    assert torch.equal(loaded.encode_images(d), loaded.encode_images(d))
    c1 = src.encode_conditions(d, r, prompts=["restore"])
    c2 = loaded.encode_conditions(d, r, prompts=["restore"])
    x = torch.randn(1, c1.num_target_tokens, c1.tokens.shape[-1])
    assert torch.allclose(
        src.velocity(x, torch.tensor([0.4]), c1), loaded.velocity(x, torch.tensor([0.4]), c2), atol=1e-5
    )


def test_missing_model_folder_parts_are_named(tmp_path):
    (tmp_path / "transformer").mkdir()
    with pytest.raises(FileNotFoundError, match="vae"):
        KontextPolicy.from_pretrained(str(tmp_path))


def test_lora_adapter_disable_gives_the_base_model():
    from tests.helpers import perturb_lora

    p = small_policy(lora=True)
    d, r = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    cond = p.encode_conditions(d, r, prompts=["x"])
    x, s = torch.randn(1, 16, 48), torch.tensor([0.5])
    base = p.velocity(x, s, cond)
    perturb_lora(p)
    tuned = p.velocity(x, s, cond)
    with p.adapter_disabled():
        ref = p.velocity(x, s, cond)
    assert torch.allclose(base, ref, atol=1e-6) and (tuned - base).abs().max() > 1e-3
    assert all("lora" in n for n, q in p.transformer.named_parameters() if q.requires_grad)


def test_add_lora_takes_a_peft_config_and_model_arguments_describe_one():
    from peft import LoraConfig

    from refiner_rl.configs import ModelArguments
    from refiner_rl.policies import DEFAULT_LORA_TARGETS

    p = small_policy()
    p.add_lora(LoraConfig(r=2, lora_alpha=4))  # no target_modules: the default attention + feed-forward set
    cfg = p.transformer.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, set(cfg.target_modules)) == (2, 4, set(DEFAULT_LORA_TARGETS))
    assert all("lora_" in n for n, q in p.transformer.named_parameters() if q.requires_grad)
    with pytest.raises(ValueError, match="already has a LoRA"):
        p.add_lora(LoraConfig(r=2))
    args = ModelArguments(lora_r=8, lora_target_modules=["to_q"], lora_dropout=0.1)
    lc = args.lora_config()
    assert (lc.r, lc.lora_alpha, lc.lora_dropout, set(lc.target_modules)) == (8, 8, 0.1, {"to_q"})
    assert ModelArguments(use_lora=False).lora_config() is None


@pytest.fixture
def restore_attention_backend():
    """``set_attention_backend`` also sets diffusers' process-wide active backend: put torch's default back."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    yield
    _AttentionBackendRegistry.set_active_backend(AttentionBackendName.NATIVE)


@pytest.mark.parametrize("name", ["native", "_native_math", "_native_flash"])
def test_each_attention_backend_is_honoured_through_the_dispatcher(name, monkeypatch, restore_attention_backend):
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    from refiner_rl.configs import ModelArguments, build_policy
    from refiner_rl.policies.attention import attention_backend

    tiny = dict(
        num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=[4, 6, 6]
    )
    default = build_policy(ModelArguments(model_name_or_path="tiny", tiny_model=tiny, use_lora=False))
    assert attention_backend(default.transformer).startswith("native (torch SDPA")  # auto on a CPU: left as it is
    cond = default.encode_conditions(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), prompts=["x"])
    x, s = torch.randn(1, 16, 48), torch.tensor([0.5])
    expected = default.velocity(x, s, cond)  # torch's own kernel choice
    policy = build_policy(
        ModelArguments(model_name_or_path="tiny", tiny_model=tiny, use_lora=False, attention_backend=name)
    )
    assert attention_backend(policy.transformer) == name
    calls = []
    kernel = _AttentionBackendRegistry._backends[AttentionBackendName(name)]
    monkeypatch.setitem(
        _AttentionBackendRegistry._backends,
        AttentionBackendName(name),
        lambda *a, **kw: calls.append(name) or kernel(*a, **kw),
    )
    v = policy.velocity(x, s, cond)
    assert len(calls) == 2  # one double-stream and one single-stream block, each through the chosen kernel
    torch.testing.assert_close(v, expected, rtol=1e-4, atol=1e-5)  # the same weights, another kernel


def test_unknown_attention_backend_is_a_config_error_listing_the_names():
    from refiner_rl.configs import ModelArguments
    from refiner_rl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"attention_backend 'cudnn': use auto or one of .*_native_efficient"):
        ModelArguments(model_name_or_path="tiny", attention_backend="cudnn")
    from refiner_rl.policies.attention import resolve_attention_backend

    assert resolve_attention_backend("auto", "cuda") == "_native_efficient"
    assert resolve_attention_backend("auto", "cpu") == "native"
