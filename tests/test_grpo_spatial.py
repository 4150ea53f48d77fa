"""Spatial credit: with per-patch reward maps, the per-token advantage is ``(1 - mix) A + mix A_patch``, and the
policy gradient goes to the tokens of the region whose quality varied across the group."""

import pytest
import torch
import torch.nn.functional as F

from refiner_rl.rewards.masked_pixel import MaskedPixel
from refiner_rl.scoring import spatial_advantages
from refiner_rl.trainers.grpo_config import FlowGRPOConfig
from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer
from tests.helpers import perturb_lora, small_policy, synthetic_dataset

SIZE, PATCH = 16, 4  # 16 px images: a 4 x 4 token grid (pixel codec 2x, 2x2 packing) and a 4 x 4 reward map

pytestmark = pytest.mark.usefixtures("one_thread")


class LeftHalfPixel(MaskedPixel):
    """masked_pixel over the whole image, after putting the target into every sample's right half: only the
    left half's quality can differ within a group, so the right half's patch advantages are 0."""

    name = "left_half_pixel"

    def score_maps(self, prompts, completions, **columns):
        fixed = []
        for c, t in zip(completions, columns["target"]):
            c = c.clone()
            c[..., SIZE // 2 :] = t[..., SIZE // 2 :]
            fixed.append(c)
        return super().score_maps(prompts, fixed, target=columns["target"])


def _trainer(tmp_path, reward, mix: float, **kw) -> FlowGRPOTrainer:
    policy = small_policy(lora=True)
    perturb_lora(policy)
    args = FlowGRPOConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        num_inference_steps=4,
        sde_window_size=2,
        beta=0.0,
        spatial_advantage_mix=mix,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        **kw,
    )
    return FlowGRPOTrainer(policy, reward, args=args, train_dataset=synthetic_dataset(4, size=SIZE))


def _rollout(trainer):
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _left_tokens(grid: int = SIZE // 4) -> torch.Tensor:
    return (torch.arange(grid * grid) % grid) < grid // 2  # packed tokens are row-major over the token grid


def test_token_advantage_is_the_mix_of_scalar_and_patch_advantages(tmp_path):
    reward = LeftHalfPixel(patch_size=PATCH)
    trainer = _trainer(tmp_path, reward, mix=0.5)
    inputs = _rollout(trainer)
    s = trainer._last_samples
    # by hand: re-score the rollout's images, normalise each patch within the group
    _, maps = reward.score_maps(s["batch"]["prompt"], list(s["images"]), target=list(s["batch"]["target"]))
    a_patch = spatial_advantages(torch.stack(maps), s["batch"]["index"]).flatten(1)  # 4 x 4 map = token grid
    a = inputs["advantages"]
    expected = 0.5 * a[:, None] + 0.5 * a_patch
    assert torch.allclose(inputs["token_advantages"], expected, atol=1e-5)
    left = _left_tokens()
    assert a_patch[:, ~left].abs().max() == 0  # the right half is equal across the group
    assert a_patch[:, left].abs().max() > 0.5


def test_patches_without_a_score_fall_back_to_the_image_advantage(tmp_path):
    # masked_pixel maps are NaN outside the mask: those tokens take the scalar advantage A
    trainer = _trainer(tmp_path, MaskedPixel(patch_size=PATCH), mix=1.0)
    inputs = _rollout(trainer)
    mask = trainer._last_samples["batch"]["mask"]
    covered = F.avg_pool2d(mask, PATCH).flatten(1) > 0  # [B, 16] cells holding mask pixels
    tok, a = inputs["token_advantages"], inputs["advantages"]
    assert (~covered).any() and covered.any()
    assert torch.allclose(tok[~covered], a[:, None].expand_as(tok)[~covered])
    assert not torch.allclose(tok[covered], a[:, None].expand_as(tok)[covered])


def _velocity_grad_mass(trainer, inputs) -> torch.Tensor:
    """Squared gradient of the loss w.r.t. the predicted velocity, per token ``[B, N]``, summed over steps."""
    policy, grads = trainer.policy, []
    original = policy.velocity

    def velocity(*a, **k):
        v = original(*a, **k)
        if v.requires_grad:
            v.retain_grad()
            grads.append(v)
        return v

    policy.velocity = velocity
    try:
        trainer.model.zero_grad()
        trainer.compute_loss(trainer.model, inputs).backward()
    finally:
        policy.velocity = original
    assert len(grads) == trainer.args.sde_window_size
    return sum(v.grad.pow(2).sum(-1) for v in grads)


def test_gradient_concentrates_on_the_region_that_varied(tmp_path):
    left = _left_tokens()
    fractions = {}
    for mix in (1.0, 0.0):
        trainer = _trainer(tmp_path / str(mix), LeftHalfPixel(patch_size=PATCH), mix=mix)
        mass = _velocity_grad_mass(trainer, _rollout(trainer))
        fractions[mix] = (mass[:, left].sum() / mass.sum()).item()
    assert fractions[1.0] > 0.9, fractions  # per-patch credit: the right half has advantage 0
    assert 0.25 < fractions[0.0] < 0.75, fractions  # one advantage per image: spread over the whole image
