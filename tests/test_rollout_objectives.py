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


def test_nft_adaptive_weight_by_hand():
    # x0 = 0, x_t = (3, 1), t = 0.5, beta = 1. A = A_max (r = 1), v_theta = 0: d = x_t - t v_theta - x0 = (3, 1),
    # mean d^2 = 5 over sg(mean |d|) = 2 -> 2.5 (5 without the weight); the gradient is 2 d (-t) / 2 / 2 per dim.
    # A = -A_max (r = 0), v_old = (1, 1): v- = 2 v_old - v_theta = (2, 2), d = (2, 0): 2 / 1 = 2.
    x0, x_t, t, v_old = _t(0.0, 0.0), _t(3.0, 1.0), torch.tensor([0.5]), _t(1.0, 1.0)
    v = _t(0.0, 0.0).requires_grad_()
    loss = nft_loss(v, v_old, x_t, x0, t, torch.tensor([2.0]), 1.0, 2.0, adaptive=True)
    torch.testing.assert_close(loss, torch.tensor([2.5]))
    (grad,) = torch.autograd.grad(loss.sum(), v)
    torch.testing.assert_close(grad, _t(-0.75, -0.25))
    torch.testing.assert_close(nft_loss(v, v_old, x_t, x0, t, torch.tensor([2.0]), 1.0, 2.0), torch.tensor([5.0]))
    neg = nft_loss(v, v_old, x_t, x0, t, torch.tensor([-2.0]), 1.0, 2.0, adaptive=True)
    torch.testing.assert_close(neg, torch.tensor([2.0]))


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


def test_nft_at_the_rollout_policy_is_flow_matching_weighted_by_the_advantage():
    # v_theta = v_old makes v+ = v- (= v_old): there the gradient is beta (2r - 1) times plain flow matching's
    # gradient t^2 ||v - (eps - x0)||^2, i.e. flow matching towards the sample weighted by A / A_max
    g = torch.Generator().manual_seed(3)
    x0, eps, v_old = (torch.randn(3, 4, 2, generator=g) for _ in range(3))
    t = torch.tensor([0.1, 0.4, 0.6])
    x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * eps
    adv, a_max, beta = torch.tensor([2.0, -1.0, 0.0]), 4.0, 0.3
    v = v_old.clone().requires_grad_()
    (g_nft,) = torch.autograd.grad(nft_loss(v, v_old, x_t, x0, t, adv, beta, a_max).sum(), v)
    v_fm = v_old.clone().requires_grad_()
    (g_fm,) = torch.autograd.grad((t**2 * (v_fm - (eps - x0)).pow(2).mean(dim=(1, 2))).sum(), v_fm)
    r = adv / (2 * a_max) + 0.5
    torch.testing.assert_close(g_nft, beta * (2 * r - 1)[:, None, None] * g_fm)
    assert g_nft[2].abs().max() < 1e-7  # A = 0: no pull either way (round-off only)


def test_per_token_advantages_give_per_token_losses():
    g = torch.Generator().manual_seed(4)
    v, v_old, target = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    tok_adv = torch.tensor([[1.0, -1.0, 0.5], [0.0, 2.0, -2.0]])
    loss, clip = awm_loss(v, v_old, target, tok_adv, 10.0, 10.0)
    e = (v - target).pow(2).mean(-1)
    e_old = (v_old - target).pow(2).mean(-1)
    torch.testing.assert_close(loss, -tok_adv * torch.exp(-(e - e_old)))
    x_t, x0, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g), torch.tensor([0.3, 0.5])
    per_tok = nft_loss(v, v_old, x_t, x0, t, tok_adv, 0.5, 2.0)
    assert per_tok.shape == (2, 3)
    # a token's loss depends only on its own advantage: equal advantages reproduce the per-sample loss
    same = nft_loss(v, v_old, x_t, x0, t, torch.ones(2, 3), 0.5, 2.0).mean(1)
    torch.testing.assert_close(same, nft_loss(v, v_old, x_t, x0, t, torch.ones(2), 0.5, 2.0))


# ---------------------------------------------------------------------------------------------- in the trainer
def _trainer(tmp_path, **kw):
    """tests/test_grpo_invariant.py's trainer (a perturbed LoRA, two groups of 2, beta 0.01) from the noised draft."""
    from tests.test_grpo_invariant import _trainer as invariant_trainer

    return invariant_trainer(tmp_path, True, start_sigma=0.6, num_inference_steps=3, **kw)


@pytest.mark.parametrize("objective", ["nft", "awm"])
@pytest.mark.parametrize("sampling", ["uniform", "schedule"])
def test_renoised_inputs_hold_the_old_velocity_with_the_rollout_conditions(tmp_path, objective, sampling):
    trainer = _trainer(tmp_path, objective=objective, train_timesteps=3, train_timestep_sampling=sampling)
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(batch)
    assert "old_log_probs" not in inputs and trainer.num_terms(inputs) == 3
    t = inputs["timesteps"]
    assert t.shape == (2, 3) and bool((t >= 0).all()) and bool((t <= 0.6 + 1e-6).all())
    if sampling == "schedule":  # distinct noise levels of the rollout's own schedule
        assert all(len(set(row.tolist())) == 3 and set(row.tolist()) <= set(inputs["sigmas"].tolist()) for row in t)
    # the group's samples differ (each its own noise), and v_old is the rollout policy's velocity on x_t
    assert (inputs["x0"][0] - inputs["x0"][1]).abs().max() > 1e-4
    from refiner_rl.trainers.objectives import renoise

    with torch.no_grad():
        x_t = renoise(inputs["x0"], inputs["noise"][:, 1], t[:, 1])
        v = trainer.policy.velocity(x_t, t[:, 1], inputs["cond"], transformer=trainer.model)
    torch.testing.assert_close(v, inputs["v_old"][:, 1], rtol=1e-5, atol=1e-6)
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss) and loss.requires_grad
    m = trainer._metrics["train"]
    assert m["kl"][-1] > 0  # the perturbed LoRA moved away from its reference
    if objective == "awm":  # before any update the policy is the old one: ratio 1, nothing clipped
        assert abs(m["ratio"][-1] - 1.0) < 1e-6 and m["clip_ratio/region_mean"][-1] == 0.0


def test_old_policy_ema_takes_the_old_velocity_from_the_ema_weights(tmp_path):
    from refiner_rl.trainers.objectives import renoise

    trainer = _trainer(tmp_path, objective="nft", old_policy="ema", ema_decay=0.5)
    for name in trainer.ema.names:  # an EMA that differs from the live weights: the LoRA switched off
        if "lora_B" in name:
            trainer.ema.shadow[name].zero_()
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    t, x_t = inputs["timesteps"][:, 0], renoise(inputs["x0"], inputs["noise"][:, 0], inputs["timesteps"][:, 0])
    with torch.no_grad():
        live = trainer.policy.velocity(x_t, t, inputs["cond"], transformer=trainer.model)
        with trainer.policy.adapter_disabled(trainer.model):
            base = trainer.policy.velocity(x_t, t, inputs["cond"], transformer=trainer.model)
    torch.testing.assert_close(inputs["v_old"][:, 0], base, rtol=1e-5, atol=1e-6)
    assert (inputs["v_old"][:, 0] - live).abs().max() > 1e-3  # and the live weights were restored afterwards
    with torch.no_grad():
        torch.testing.assert_close(trainer.policy.velocity(x_t, t, inputs["cond"], transformer=trainer.model), live)


def test_grpo_guard_ratio_is_one_before_the_update_and_training_runs(tmp_path):
    trainer = _trainer(tmp_path, ratio_normalization=True, spatial_advantage_mix=1.0)
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(batch)
    assert inputs["old_means"].shape == inputs["states"].shape
    trainer._metrics["train"].clear()
    loss = trainer.compute_loss(trainer.model, inputs)
    assert torch.isfinite(loss) and abs(trainer._metrics["train"]["ratio"][-1] - 1.0) < 1e-6


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(objective="ppo"), "`objective` must be one of grpo, nft, awm"),
        (dict(objective="nft", shared_initial_noise=True), "set it to false"),
        (dict(objective="awm", ratio_normalization=True), "applies to `objective: grpo` only"),
        (dict(objective="nft", old_policy="ema"), "needs `ema_decay` > 0"),
        (dict(objective="nft", adv_clip_max=None), "needs `adv_clip_max` > 0"),
        (dict(objective="awm", train_timestep_sampling="schedule", train_timesteps=5), "distinct sigmas"),
    ],
)
def test_objective_settings_are_checked(kw, message):
    from refiner_rl.errors import ConfigError
    from refiner_rl.trainers.grpo_config import FlowGRPOConfig

    with pytest.raises(ConfigError, match=message):
        FlowGRPOConfig(output_dir="unused", report_to="none", use_cpu=True, num_inference_steps=4, **kw)


def test_the_objective_is_a_command_line_flag():
    from refiner_rl.cli.train import parse_recipe
    from refiner_rl.configs import DataArguments, ModelArguments
    from refiner_rl.trainers.grpo_config import FlowGRPOConfig

    *_, cfg = parse_recipe(
        (ModelArguments, DataArguments, FlowGRPOConfig),
        ["--objective", "nft", "--output_dir", "unused", "--report_to", "none", "--use_cpu", "true"],
    )
    assert cfg.objective == "nft" and cfg.shared_initial_noise is False  # ODE rollouts: each sample its own noise


def test_nft_resume_continues_exactly(tmp_path):
    """An NFT run (EMA old policy, each rollout reused for two updates) stopped at a checkpoint and resumed logs
    the same metrics and ends with the same weights as the uninterrupted run: the keyed re-noising draws the same
    times and noises, and the old velocities come from the restored EMA."""
    from refiner_rl.trainers.grpo_config import FlowGRPOConfig
    from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer
    from tests.helpers import small_policy, synthetic_dataset

    def trainer(out):
        args = FlowGRPOConfig(
            output_dir=str(out),
            objective="nft",
            old_policy="ema",
            ema_decay=0.5,
            num_iterations=2,
            max_steps=4,
            save_strategy="steps",
            save_steps=2,
            logging_steps=1,
            per_device_train_batch_size=2,
            num_generations=2,
            num_inference_steps=3,
            start_sigma=0.6,
            paste_back=True,
            learning_rate=3e-3,
            beta=0.0,
            seed=0,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            rewards=[{"name": "masked_pixel"}],
        )
        return FlowGRPOTrainer(small_policy(lora=True), args=args, train_dataset=synthetic_dataset(4, size=16))

    full = trainer(tmp_path / "full")
    full.train()
    resumed = trainer(tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    a, b = ([h for h in t.state.log_history if "loss" in h][2:] for t in (full, resumed))
    assert [h["step"] for h in a] == [h["step"] for h in b] == [3, 4]
    for ha, hb in zip(a, b):
        for k in ("loss", "reward", "grad_norm"):
            if k in ha:
                assert hb[k] == pytest.approx(ha[k], rel=1e-4, abs=1e-7), (ha["step"], k)
    w_full, w_res = full.policy.lora_state_dict(), resumed.policy.lora_state_dict()
    assert all(torch.allclose(w_full[k], w_res[k], atol=1e-6) for k in w_full)
    e_full, e_res = full.ema.state_dict(), resumed.ema.state_dict()
    assert all(torch.allclose(e_full[k], e_res[k], atol=1e-6) for k in e_full)
