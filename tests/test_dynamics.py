"""Sampling dynamics: schedules vs diffusers, steps vs hand-computed numbers, marginals, the SDE window."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux_kontext import calculate_shift as kontext_calculate_shift
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from refiner_rl.dynamics import (
    WindowSchedule,
    calculate_shift,
    kl_same_std,
    log_prob,
    loss_weighting,
    ode_step,
    sample_training_sigmas,
    sde_step,
    sde_window,
    sigma_schedule,
    step_mean_std,
)

LOG_SQRT_2PI = math.log(math.sqrt(2 * math.pi))
# FLUX.1-Kontext-dev's scheduler/scheduler_config.json.
KONTEXT = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256)


def kontext_scheduler(num_steps, seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, max_image_seq_len=4096, **KONTEXT)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=kontext_calculate_shift(seq_len))
    return scheduler


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("num_steps", [1, 2, 4, 10, 28, 50])
@pytest.mark.parametrize("seq_len", [16, 256, 1024, 4096])
def test_sigma_schedule_equals_the_kontext_scheduler(num_steps, seq_len):
    assert calculate_shift(seq_len) == kontext_calculate_shift(seq_len)
    ours = sigma_schedule(num_steps, image_seq_len=seq_len)
    assert ours.dtype == torch.float32 and torch.equal(ours, kontext_scheduler(num_steps, seq_len).sigmas)
    assert ours[-1].item() == 0.0 and bool((ours[1:] < ours[:-1]).all())


@pytest.mark.parametrize("shift", [None, 3.0])
def test_sigma_schedule_static_shift_equals_the_scheduler(shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0 if shift is None else shift)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8))
    ours = sigma_schedule(8, shift=shift, use_dynamic_shifting=False)
    assert torch.equal(ours, scheduler.sigmas)
    # Linear: s = 0.5 at step 4; shifted by 3: 3 * 0.5 / (1 + 2 * 0.5) = 0.75.
    assert ours[4].item() == pytest.approx(0.5 if shift is None else 0.75)


def test_schedule_errors_name_the_argument():
    with pytest.raises(ValueError, match="image_seq_len"):
        sigma_schedule(4)
    with pytest.raises(ValueError, match="use_dynamic_shifting=False"):
        sigma_schedule(4, image_seq_len=256, shift=3.0)
    with pytest.raises(ValueError, match="logit_normal, uniform, mode"):
        sample_training_sigmas(4, "lognorm")
    with pytest.raises(ValueError, match="none, sigma_sqrt, cosmap"):
        loss_weighting(torch.rand(4), "cos")


@pytest.mark.parametrize("scheme", ["logit_normal", "uniform", "mode"])
def test_training_sigmas_are_diffusers_draws(scheme):
    kwargs = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    ours = sample_training_sigmas(64, scheme, generator=torch.Generator().manual_seed(3), **kwargs)
    ref = compute_density_for_timestep_sampling(scheme, 64, generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(ours, ref) and bool(((ours >= 0) & (ours <= 1)).all())
    shifted = sample_training_sigmas(64, scheme, generator=torch.Generator().manual_seed(3), shift=3.0, **kwargs)
    assert torch.allclose(shifted, 3 * ref / (1 + 2 * ref))


@pytest.mark.parametrize(
    "scheme,expected",
    [("none", [1, 1]), ("sigma_sqrt", [100, 4]), ("cosmap", [2 / (math.pi * 0.82), 4 / math.pi])],
)
def test_loss_weighting_equals_diffusers(scheme, expected):
    sigmas = torch.tensor([0.1, 0.5, 0.9])  # cosmap: 1 - 2 s + 2 s^2 is 0.82 at 0.1 and 0.5 at 0.5
    assert torch.equal(loss_weighting(sigmas, scheme), compute_loss_weighting_for_sd3(scheme, sigmas))
    assert loss_weighting(sigmas, scheme)[:2].tolist() == pytest.approx(expected)


# ---------------------------------------------------------------- steps


@pytest.mark.parametrize("as_float", [True, False])
def test_ode_step_equals_the_scheduler_step(as_float):
    scheduler, sigmas = kontext_scheduler(6, 64), sigma_schedule(6, image_seq_len=64)
    g = torch.Generator().manual_seed(0)
    x_ref = x_ours = torch.randn(2, 64, 16, generator=g)
    for i, t in enumerate(scheduler.timesteps):
        v = torch.randn(2, 64, 16, generator=g)
        x_ref = scheduler.step(model_output=v, timestep=t, sample=x_ref).prev_sample
        s, s_next = (sigmas[i].item(), sigmas[i + 1].item()) if as_float else (sigmas[i], sigmas[i + 1])
        mean, std = step_mean_std("ode", x_ours, v, s, s_next, noise_level=0.9)
        x_ours = ode_step(x_ours, v, s, s_next)
        assert torch.equal(x_ours, x_ref) and torch.equal(mean, x_ours) and float(std) == 0.0, f"step {i}"
    # Per-sample sigmas [B] and bf16 inputs: each row as its own fp32 step.
    x, v, s, s_next = (
        torch.randn(3, 4, 2).bfloat16(),
        torch.randn(3, 4, 2).bfloat16(),
        [0.9, 0.5, 0.2],
        [0.8, 0.2, 0],
    )
    out = ode_step(x, v, torch.tensor(s), torch.tensor(s_next))
    assert out.dtype == torch.float32
    assert all(torch.equal(out[b], ode_step(x[b : b + 1], v[b : b + 1], s[b], s_next[b])[0]) for b in range(3))


def test_each_rule_on_one_element_by_hand():
    # s = 0.5, s' = 0.25, x = 1, v = 2: dt = -0.25, x0_hat = 1 - 0.5 * 2 = 0, eps_hat = 1 + 0.5 * 2 = 2.
    x, v = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    # flow_sde, a = 1: g = sqrt(0.5 / 0.5) = 1; mu = 1 + (2 + 1 / 1 * 2) * -0.25 = 0; std = sqrt(0.25) = 0.5.
    mean, std = step_mean_std("flow_sde", x, v, 0.5, 0.25, noise_level=1.0)
    assert mean.item() == pytest.approx(0.0, abs=1e-7) and std.item() == pytest.approx(0.5)
    # dance, a = 0.5: g^2 = 0.25; mu = 1 + (2 + 0.25 / 1 * 2) * -0.25 = 0.375; std = 0.5 * sqrt(0.25) = 0.25.
    mean, std = step_mean_std("dance", x, v, 0.5, 0.25, noise_level=0.5)
    assert mean.item() == pytest.approx(0.375) and std.item() == pytest.approx(0.25)
    # cps, a = 1/3: std = 0.25 * sin(pi / 6) = 0.125; mu = 0.75 * 0 + sqrt(0.0625 - 0.015625) * 2.
    mean, std = step_mean_std("cps", x, v, 0.5, 0.25, noise_level=1 / 3)
    assert std.item() == pytest.approx(0.125) and mean.item() == pytest.approx(0.4330127, abs=1e-6)
    # flow_sde at s = 1 with sigma_max = 0.9: g = 0.9 sqrt(1 / 0.1); std = g sqrt(0.1) = 0.9; mu = x + v dt
    # - 0.9^2 / 2 * eps_hat with eps_hat = x: 1 - 0.2 - 0.405 = 0.395. sigma_max defaults to sigma_next.
    for sigma_max in (0.9, None):
        mean, std = step_mean_std("flow_sde", x, v, 1.0, 0.9, noise_level=0.9, sigma_max=sigma_max)
        assert mean.item() == pytest.approx(0.395) and std.item() == pytest.approx(0.9)
    # log N(0.5; 0, 0.5^2) = -0.25 / 0.5 - log 0.5 - log sqrt(2 pi) = -0.7257914.
    assert log_prob(torch.tensor([[0.5]]), torch.tensor([[0.0]]), 0.5)[0].item() == pytest.approx(-0.7257914)


def expected_mean_std(rule, x, v, s, sn, a, sigma_max):
    """The step formulas, element by element in python floats."""
    if rule == "cps":
        std = sn * math.sin(a * math.pi / 2)
        return (1 - sn) * (x - s * v) + math.sqrt(sn**2 - std**2) * (x + (1 - s) * v), std
    g2 = a * a * s / (1 - (sigma_max if s == 1 else s)) if rule == "flow_sde" else a * a
    return x + (v + g2 / (2 * s) * (x + (1 - s) * v)) * (sn - s), math.sqrt(g2 * (s - sn))


@pytest.mark.parametrize("rule,a", [("flow_sde", 0.9), ("dance", 0.3), ("cps", 0.7)])
def test_sde_step_per_element_with_per_sample_sigmas(rule, a):
    g = torch.Generator().manual_seed(1)
    x, v, z = (torch.randn(3, 2, 2, generator=g) for _ in range(3))
    s, s_next = [1.0, 0.7, 0.4], [0.9, 0.5, 0.1]  # sample 0 starts at s = 1 (flow_sde uses sigma_max)
    out = sde_step(rule, x, v, torch.tensor(s), torch.tensor(s_next), a, noise=z, sigma_max=0.9)
    lp_tokens = torch.zeros(3, 2)
    for b, n, c in np.ndindex(3, 2, 2):
        m, sd = expected_mean_std(rule, x[b, n, c].item(), v[b, n, c].item(), s[b], s_next[b], a, 0.9)
        xn = m + sd * z[b, n, c].item()
        assert out.mean[b, n, c].item() == pytest.approx(m, rel=1e-5, abs=1e-6)
        assert out.std.flatten()[b].item() == pytest.approx(sd, rel=1e-5)
        assert out.next_sample[b, n, c].item() == pytest.approx(xn, rel=1e-5, abs=1e-6)
        lp_tokens[b, n] += (-((xn - m) ** 2) / (2 * sd * sd) - math.log(sd) - LOG_SQRT_2PI) / 2  # mean of 2
    assert out.log_prob_tokens.shape == (3, 2) and out.log_prob.shape == (3,)
    assert torch.allclose(out.log_prob_tokens, lp_tokens, atol=1e-5)
    assert torch.allclose(out.log_prob, lp_tokens.mean(dim=1), atol=1e-5)


@pytest.mark.parametrize("rule", ["flow_sde", "dance", "cps"])
def test_zero_noise_is_ode_euler(rule):
    x, v = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    mean, std = step_mean_std(rule, x, v, 0.8, 0.55, noise_level=0.0)
    assert torch.allclose(mean, ode_step(x, v, 0.8, 0.55), atol=1e-6) and float(std) == 0.0


def test_log_prob_and_kl_by_hand_on_a_token_grid():
    x_next = torch.tensor([[[0.5, -1.0, 0.0], [2.0, 0.25, 1.0]]])  # [B=1, N=2, C=3]
    mean = torch.tensor([[[0.0, -0.5, 0.5], [1.0, 0.25, 0.0]]])
    lp, lp_tokens = log_prob(x_next, mean, 0.5)
    kl, kl_tokens = kl_same_std(x_next, mean, 0.5)
    sq = [[0.25, 0.25, 0.25], [1.0, 0.0, 1.0]]  # (x' - mu)^2; 2 std^2 = 0.5
    for n in range(2):
        assert lp_tokens[0, n].item() == pytest.approx(sum(-d / 0.5 for d in sq[n]) / 3 - math.log(0.5) - LOG_SQRT_2PI)
        assert kl_tokens[0, n].item() == pytest.approx(sum(d / 0.5 for d in sq[n]) / 3)
    assert lp.item() == pytest.approx(-(0.75 + 2.0) / 0.5 / 6 - math.log(0.5) - LOG_SQRT_2PI)
    assert kl.item() == pytest.approx((0.75 + 2.0) / 0.5 / 6)
    normal = torch.distributions.Normal  # the exact Gaussian KL, averaged over latent dims
    assert kl.item() == pytest.approx(torch.distributions.kl_divergence(normal(x_next, 0.5), normal(mean, 0.5)).mean())
    # Any [B, ...]: tokens reduce the last dim, the scalar is the mean over all latent dims.
    x_next, mean, std = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5), torch.tensor([0.3, 0.7])
    lp, lp_tokens = log_prob(x_next, mean, std)
    assert lp_tokens.shape == (2, 3, 4)
    assert torch.allclose(lp, normal(mean, std.view(2, 1, 1, 1)).log_prob(x_next).flatten(1).mean(1), atol=1e-5)


def test_bad_step_inputs_are_explained():
    x = torch.zeros(1, 2, 2)
    cases = [
        (lambda: log_prob(torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0.5, 0.0])), "SDE window"),
        (lambda: sde_step("cps", x, x, 0.2, 0.0, 0.7), "SDE window"),  # cps to s' = 0: std 0
        (lambda: log_prob(torch.zeros(3), torch.zeros(3), 1.0), "at least 2 dims"),
        (lambda: step_mean_std("ddim", x, x, 0.5, 0.4, 0.5), "ode, flow_sde, dance, cps"),
        (lambda: step_mean_std("cps", x, x, 0.5, 0.4, 1.5), r"noise_level in \[0, 1\]"),
        (lambda: step_mean_std("flow_sde", x, x, 0.4, 0.5, 0.5), "sigma > sigma_next"),
        (lambda: sde_step("dance", x, x, 0.5, 0.4, 0.5, noise=torch.zeros(1, 4)), "noise has shape"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


@pytest.mark.parametrize("rule", ["flow_sde", "dance", "cps"])
def test_recomputed_log_prob_equals_the_rollouts_exactly(rule):
    x, v = torch.randn(4, 16, 8), torch.randn(4, 16, 8, requires_grad=True)
    s, s_next = torch.tensor([1.0, 0.9, 0.6, 0.3]), torch.tensor([0.9, 0.8, 0.4, 0.2])
    out = sde_step(rule, x, v, s, s_next, 0.9, generator=torch.Generator().manual_seed(0), sigma_max=0.9)
    lp, lp_tokens = log_prob(out.next_sample, *step_mean_std(rule, x, v, s, s_next, 0.9, sigma_max=0.9))
    assert torch.equal(lp, out.log_prob) and torch.equal(lp_tokens, out.log_prob_tokens)
    assert out.next_sample.dtype == out.log_prob.dtype == torch.float32
    out.log_prob.sum().backward()  # the sample is data: the gradient flows through the mean
    assert v.grad.abs().sum().item() > 0


def test_sde_step_is_deterministic_given_a_seed():
    x, v = torch.randn(2, 8, 4), torch.randn(2, 8, 4)

    def run(seed):
        return sde_step("flow_sde", x, v, 0.7, 0.6, 0.9, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a.next_sample, b.next_sample) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.next_sample, c.next_sample)
    noise = torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.next_sample, sde_step("flow_sde", x, v, 0.7, 0.6, 0.9, noise=noise).next_sample)
    ode = sde_step("ode", x, v, 0.7, 0.6, 0.9)
    assert ode.log_prob is None and torch.equal(ode.next_sample, ode_step(x, v, 0.7, 0.6))


# ---------------------------------------------------------------- marginals of Gaussian data
# x0 ~ N(m, c^2) per element: x_s ~ N((1 - s) m, (1 - s)^2 c^2 + s^2) and the true velocity is affine in x, so
# one step maps N(mean, var) to N(alpha mean + beta, alpha^2 var + std^2) exactly, without sampling noise.

DATA_MEAN, DATA_STD = 0.7, 0.5


def true_var(s):
    return (1 - s) ** 2 * DATA_STD**2 + s**2


def gaussian_velocity(x, s):
    """E[eps - x0 | x_s = x] = E[eps | x] - E[x0 | x]."""
    m, c2, mu, var = DATA_MEAN, DATA_STD**2, (1 - s) * DATA_MEAN, true_var(s)
    return s * (x - mu) / var - (m + (1 - s) * c2 * (x - mu) / var)


def propagate_moments(rule, noise_level, sigmas, flip_correction=False):
    """Push the exact mean and variance of x_{sigmas[0]} through the steps; {sigma_next: (mean, var)}."""
    mean, var, out = (1 - sigmas[0]) * DATA_MEAN, true_var(sigmas[0]), {}
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        points = torch.tensor([[0.0], [1.0]])
        v = gaussian_velocity(points, s)
        step_mean, std = step_mean_std(rule, points, v, s, s_next, noise_level)
        if flip_correction:  # the score term with the wrong sign: a control that the checks can fail
            step_mean = 2 * ode_step(points, v, s, s_next) - step_mean
        beta, alpha = step_mean[0, 0].item(), (step_mean[1, 0] - step_mean[0, 0]).item()
        mean, var = alpha * mean + beta, alpha**2 * var + std.item() ** 2
        out[s_next] = (mean, var)
    return out


@pytest.mark.parametrize("rule,noise_level", [("flow_sde", 0.9), ("flow_sde", 0.7), ("dance", 1.0), ("dance", 0.3)])
def test_one_sde_step_keeps_gaussian_marginals_to_second_order(rule, noise_level):
    # From the exact marginal at s = 0.6, one Euler-Maruyama step's variance error is O(dt^2) with the right
    # drift (a quarter when dt halves) and O(dt) with the score term's sign flipped (a half).
    def error(dt, flip=False):
        mean, var = propagate_moments(rule, noise_level, [0.6, 0.6 - dt], flip)[0.6 - dt]
        assert mean == pytest.approx((0.4 + dt) * DATA_MEAN, abs=1e-4)
        return abs(var / true_var(0.6 - dt) - 1)

    assert error(1e-2) < 1e-3 and 3.5 < error(1e-2) / error(5e-3) < 4.5
    assert error(1e-2, True) > 10 * error(1e-2) and 1.8 < error(1e-2, True) / error(5e-3, True) < 2.2


@pytest.mark.parametrize("rule,noise_level", [("flow_sde", 0.9), ("dance", 1.0)])
def test_sde_sampling_from_noise_reaches_the_data_distribution(rule, noise_level):
    # Exact moments over 1000 steps from s = 1 (where flow_sde puts sigma_max = sigmas[1] in g).
    moments = propagate_moments(rule, noise_level, sigma_schedule(1000, use_dynamic_shifting=False).tolist())
    for s in (0.5, 0.0):
        assert moments[s][0] == pytest.approx((1 - s) * DATA_MEAN, abs=1e-4)
        assert moments[s][1] == pytest.approx(true_var(s), rel=0.01)
    # Particles over 100 steps must match the moments of that discretisation. (Flow-GRPO's
    # g^2 = a^2 s / (1 - s) is stiff near s = 1: the midpoint variance is 27%, 3.2%, 0.5% high at 10, 100,
    # 1000 steps.)
    sigmas = sigma_schedule(100, use_dynamic_shifting=False).tolist()
    moments, g = propagate_moments(rule, noise_level, sigmas), torch.Generator().manual_seed(1)
    x = torch.randn(1024, 64, generator=g)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        x = sde_step(rule, x, gaussian_velocity(x, s), s, s_next, noise_level, g).next_sample
        if s_next in (0.5, 0.0):
            assert x.mean().item() == pytest.approx(moments[s_next][0], abs=0.01)
            assert x.var().item() == pytest.approx(moments[s_next][1], rel=0.02)
    assert x.var().item() == pytest.approx(DATA_STD**2, rel=0.02)
    assert abs(propagate_moments(rule, noise_level, sigmas, True)[0.0][1] / DATA_STD**2 - 1) > 0.3


# ---------------------------------------------------------------- SDE window


def test_fixed_and_sliding_windows():
    assert sde_window(10, 3) == [0, 1, 2] and sde_window(10, 2, start=4, iteration=7) == [4, 5]
    assert sde_window(10, 9) == list(range(9)) and sde_window(10, 2, start=7) == [7, 8]  # last step: never
    slide = [sde_window(6, 2, mode="sliding", iteration=k)[0] for k in range(8)]
    assert slide == [0, 1, 2, 3, 0, 1, 2, 3]  # max_start = 6 - 1 - 2 = 3
    assert [sde_window(10, 2, mode="sliding", iteration=k, stride=3)[0] for k in range(4)] == [0, 3, 6, 0]
    slide = [sde_window(10, 1, start=2, mode="sliding", iteration=k, stride=2, max_start=5)[0] for k in range(4)]
    assert slide == [2, 4, 2, 4]
    schedule = WindowSchedule(num_steps=10, size=2, mode="sliding", stride=2)
    assert [schedule.steps(k) for k in range(5)] == [[0, 1], [2, 3], [4, 5], [6, 7], [0, 1]]


def test_random_window_is_seeded_and_covers_its_range():
    def draws(seed, **kwargs):
        g = torch.Generator().manual_seed(seed)
        return [sde_window(8, 2, mode="random", iteration=k, generator=g, **kwargs)[0] for k in range(200)]

    assert draws(0) == draws(0) and draws(0) != draws(1) and set(draws(0)) == set(range(6))
    assert set(draws(0, start=1, max_start=3)) == {1, 2, 3}
    schedule = WindowSchedule(num_steps=10, size=3, mode="random")
    assert schedule.steps(0, torch.Generator().manual_seed(4)) == schedule.steps(5, torch.Generator().manual_seed(4))


@pytest.mark.parametrize("mode", ["fixed", "sliding", "random"])
def test_last_step_is_never_in_the_window(mode):
    for num_steps, k in np.ndindex(12, 14):
        for size in range(1, num_steps):
            steps = sde_window(num_steps, size, mode=mode, iteration=k, generator=torch.Generator().manual_seed(k))
            assert len(steps) == size and 0 <= steps[0] and steps[-1] < num_steps - 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_steps=4, size=4), r"size=4 .*num_steps=4.*Lower `size`"),
        (dict(num_steps=4, size=0), r"size=0.*Lower `size`"),
        (dict(num_steps=6, size=2, mode="sliding", max_start=5), r"max_start=5 .*Lower `max_start`"),
        (dict(num_steps=6, size=2, start=3, mode="sliding", max_start=2), r"start=3 .*Lower `start`"),
        (dict(num_steps=6, size=2, start=4), r"start=4 .*Lower `start`"),
        (dict(num_steps=6, size=2, mode="sliding", stride=0), "Set `stride`"),
        (dict(num_steps=6, size=2, mode="slide"), "fixed, sliding, random"),
        (dict(num_steps=1, size=1), "num_steps=1"),
    ],
)
def test_window_errors_name_the_field_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sde_window(**kwargs)
    with pytest.raises(ValueError, match=message):  # the schedule checks once, when it is built
        WindowSchedule(**kwargs)


def test_coarse_tail_thins_only_the_steps_after_the_window():
    from refiner_rl.rollout import coarse_tail

    sigmas = torch.linspace(1.0, 0.0, 11)  # 10 steps
    out = coarse_tail(sigmas, end=3, tail_steps=2)  # 7 remaining steps -> sigmas[7], sigmas[10]
    assert torch.allclose(out, torch.tensor([1.0, 0.9, 0.8, 0.7, 0.3, 0.0]))
    assert torch.equal(coarse_tail(sigmas, end=3, tail_steps=None), sigmas)
    assert torch.equal(coarse_tail(sigmas, end=8, tail_steps=5), sigmas)  # 2 remaining: already short enough
    assert torch.allclose(coarse_tail(sigmas, end=9, tail_steps=1), sigmas)
