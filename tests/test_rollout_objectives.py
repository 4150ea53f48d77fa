"""Losses for objectives that reuse GRPO's rollouts (DiffusionNFT, Advantage Weighted Matching) and GRPO-Guard's
ratio normalisation, checked on hand-computed values."""

import math

import pytest
import torch

from refiner_rl.dynamics import log_prob
from refiner_rl.trainers.losses import awm_loss, guard_log_ratio, nft_loss


def _t(*values) -> torch.Tensor:  # one sample, one token, len(values) channels
    return torch.tensor(values, dtype=torch.float32).reshape(1, 1, -1)


# ------------------------------------------------------------------------------------------- DiffusionNFT
def test_nft_by_hand():
    # x0 = 0, eps = 1, t = 0.5 -> x_t = 0.5; v_old = 0.5, v_theta = 1.5, beta = 0.5:
    # v+ = 0.25 + 0.75 = 1 -> x0_hat = 0 (error 0); v- = 0.75 - 0.75 = 0 -> x0_hat = 0.5 (error 0.25)
    args = dict(v_theta=_t(1.5), v_old=_t(0.5), x_t=_t(0.5), x0=_t(0.0), t=torch.tensor([0.5]), beta=0.5)
    # A = 1, A_max = 2: r = 1/4 + 1/2 = 0.75 -> 0.75 * 0 + 0.25 * 0.25
    assert nft_loss(**args, advantages=torch.tensor([1.0]), adv_clip_max=2.0).item() == pytest.approx(0.0625)
    # A = -4 is clamped to r = 0: only the negative policy's error
    assert nft_loss(**args, advantages=torch.tensor([-4.0]), adv_clip_max=2.0).item() == pytest.approx(0.25)
    with pytest.raises(ValueError, match="adv_clip_max must be > 0"):
        nft_loss(**args, advantages=torch.tensor([1.0]), adv_clip_max=0.0)


def test_nft_with_beta_one_and_full_weight_is_flow_matching_weighted_by_t_squared():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, generator=g), torch.randn(3, 4, 2, generator=g)
    t = torch.tensor([0.2, 0.5, 0.9])
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    v_old = torch.randn(3, 4, 2, generator=g)
    v_theta = torch.randn(3, 4, 2, generator=g, requires_grad=True)
    a_max = 5.0
    loss = nft_loss(v_theta, v_old, x_t, x0, t, torch.full((3,), a_max), beta=1.0, adv_clip_max=a_max)
    fm = t**2 * (v_theta - (eps - x0)).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(loss, fm)
    (g_nft,) = torch.autograd.grad(loss.sum(), v_theta)
    (g_fm,) = torch.autograd.grad(fm.sum(), v_theta)
    torch.testing.assert_close(g_nft, g_fm)


def test_nft_at_the_rollout_policy_does_not_depend_on_the_advantage():
    # v_theta = v_old: v+ = v- = v_old, whatever the weight r
    x, v = _t(0.3, -0.2), _t(1.0, 2.0)
    losses = [
        nft_loss(v, v, x, _t(0.0, 0.0), torch.tensor([0.4]), torch.tensor([a]), 0.7, 1.0).item()
        for a in (-3.0, 0.0, 0.5)
    ]
    assert losses[0] == losses[1] == losses[2] == pytest.approx(((0.3 - 0.4) ** 2 + (-0.2 - 0.8) ** 2) / 2)


# ------------------------------------------------------------------------------- Advantage Weighted Matching
def test_awm_ratio_is_exactly_one_when_the_policy_is_the_old_one():
    g = torch.Generator().manual_seed(1)
    v = torch.randn(4, 8, 3, generator=g)
    target = torch.randn(4, 8, 3, generator=g)
    adv = torch.tensor([1.0, -0.5, 0.0, 2.0])
    loss, clip = awm_loss(v.clone().requires_grad_(), v, target, adv, 1e-3, 1e-3, scale=7.0)
    assert torch.equal(clip["ratio"], torch.ones(4))
    assert torch.equal(loss, -adv)
    assert clip["region"].sum() == 0


def test_awm_by_hand():
    # v_target = 0, v_old = 1 (e_old = 1), v_theta = 0.5 (e_theta = 0.25): ratio = exp(0.75)
    v_theta = _t(0.5).requires_grad_()
    loss, clip = awm_loss(v_theta, _t(1.0), _t(0.0), torch.tensor([1.0]), 10.0, 10.0)
    assert clip["ratio"].item() == pytest.approx(math.exp(0.75))
    assert loss.item() == pytest.approx(-math.exp(0.75))
    # d/dv [-A exp(-(v^2 - 1))] = 2 v A exp(-(v^2 - 1)) = exp(0.75) at v = 0.5, A = 1
    (grad,) = torch.autograd.grad(loss.sum(), v_theta)
    assert grad.item() == pytest.approx(math.exp(0.75))
    # a clip range of 0.2: the ratio is above 1.2 with A > 0, so the loss is -1.2 and carries no gradient
    loss, clip = awm_loss(v_theta, _t(1.0), _t(0.0), torch.tensor([1.0]), 0.2, 0.2)
    assert loss.item() == pytest.approx(-1.2) and clip["high"].item() == 1.0
    assert torch.autograd.grad(loss.sum(), v_theta)[0].item() == 0.0


# -------------------------------------------------------------------------------------------- GRPO-Guard
def test_guard_log_ratio_by_hand():
    # x' = 1, mu_old = 0, mu_theta = 0.5: (log r + b) s = z (mu_theta - mu_old) with z = x' / s
    for s, expected in ((1.0, 0.5), (2.0, 0.25)):
        x, mu, mu_old = _t(1.0), _t(0.5), _t(0.0)
        lp, lp_old = log_prob(x, mu, s)[0], log_prob(x, mu_old, s)[0]
        assert guard_log_ratio(lp, lp_old, mu, mu_old, s).item() == pytest.approx(expected)


def test_guard_log_ratio_is_zero_at_the_old_policy_and_the_same_at_every_noise_level():
    g = torch.Generator().manual_seed(2)
    mu_old = torch.randn(16, 6, 4, generator=g)
    delta = 0.01 * torch.randn(16, 6, 4, generator=g)
    z = torch.randn(16, 6, 4, generator=g)
    normalised, raw = [], []
    for s in (0.05, 0.5):  # the same rollout noise z at two noise levels
        x = mu_old + s * z
        lp_old = log_prob(x, mu_old, s)[0]
        assert torch.equal(guard_log_ratio(lp_old, lp_old, mu_old, mu_old, s), torch.zeros(16))
        lp = log_prob(x, mu_old + delta, s)[0]
        normalised.append(guard_log_ratio(lp, lp_old, mu_old + delta, mu_old, s))
        raw.append(lp - lp_old)
    torch.testing.assert_close(normalised[0], normalised[1], rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(normalised[0], (z * delta).flatten(1).mean(1), rtol=1e-3, atol=1e-6)
    assert raw[0].std() > 5 * raw[1].std()  # the raw log-ratio spreads as 1 / s: clipping would act unevenly
