"""GRPO loss math: the clipped surrogate by hand, the KL convention, and the sign with which advantages reach
the policy (one SGD step raises the log-prob of a positive-advantage sample and lowers a negative one)."""

import math

import pytest
import torch

from refiner_rl.dynamics import kl_same_std
from refiner_rl.trainers.grpo_config import FlowGRPOConfig
from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer
from refiner_rl.trainers.losses import clipped_surrogate
from tests.helpers import perturb_lora, recompute_log_probs, small_policy, synthetic_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clipped_surrogate_by_hand():
    eps_low, eps_high = 0.1, 0.2
    ratio = torch.tensor([1.05, 1.3, 1.3, 0.8, 0.8, 0.95])
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0, 3.0, 0.0])
    loss, clip = clipped_surrogate(torch.log(ratio), torch.zeros(6), adv, eps_low, eps_high)
    # max(-A r, -A clip(r, 0.9, 1.2)):
    #  r=1.05 A=2 : inside the range            -> -2.1
    #  r=1.3  A=2 : max(-2.6, -2.4)             -> -2.4  (clipped high: no gain past 1 + eps_high)
    #  r=1.3  A=-1: max(1.3, 1.2)               ->  1.3  (a bad sample made likelier is never clipped)
    #  r=0.8  A=-1: max(0.8, 0.9)               ->  0.9  (clipped low)
    #  r=0.8  A=3 : max(-2.4, -2.7)             -> -2.4  (a good sample made less likely is never clipped)
    #  r=0.95 A=0 :                             ->  0
    expected = torch.tensor([-2.1, -2.4, 1.3, 0.9, -2.4, 0.0])
    assert torch.allclose(loss, expected, atol=1e-6)
    assert clip["low"].tolist() == [0, 0, 0, 1, 0, 0]
    assert clip["high"].tolist() == [0, 1, 0, 0, 0, 0]
    assert clip["region"].tolist() == [0, 1, 0, 1, 0, 0]
    assert torch.allclose(clip["ratio"], ratio)
    # gradient: zero where clipped, -A r elsewhere (d(-A r)/d log r = -A r)
    lp = torch.log(ratio).requires_grad_(True)
    clipped_surrogate(lp, torch.zeros(6), adv, eps_low, eps_high)[0].sum().backward()
    assert torch.allclose(lp.grad, torch.tensor([-2.1, 0.0, 1.3, 0.0, -2.4, 0.0]), atol=1e-6)


def test_kl_convention_is_the_exact_gaussian_kl_mean_over_dims():
    mu_a = torch.tensor([[[0.0, 1.0], [2.0, -1.0]]])  # [B=1, N=2, C=2]
    mu_b = torch.tensor([[[0.5, 1.0], [1.0, 0.0]]])
    std = 0.5
    kl, kl_tok = kl_same_std(mu_a, mu_b, std)
    # (mu_a - mu_b)^2 / (2 std^2) = [[0.25, 0], [1, 1]] / 0.5 = [[0.5, 0], [2, 2]]; mean over C then N
    assert kl_tok.tolist() == [[0.25, 2.0]]
    assert kl.item() == pytest.approx(1.125)
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu_a, std), torch.distributions.Normal(mu_b, std)
    )
    assert kl.item() == pytest.approx(exact.mean().item(), rel=1e-6)


def _trainer(tmp_path, **kw) -> FlowGRPOTrainer:
    policy = small_policy(lora=True)
    perturb_lora(policy, scale=0.05)
    base = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=2,
        num_inference_steps=4,
        sde_window_size=2,
        beta=0.0,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        rewards=[{"name": "masked_pixel"}],
    )
    args = FlowGRPOConfig(**{**base, **kw})
    return FlowGRPOTrainer(policy, args=args, train_dataset=synthetic_dataset(4, size=16))


def test_trainer_loss_and_logged_kl_follow_the_formulas(tmp_path):
    beta = 0.5
    trainer = _trainer(tmp_path, beta=beta)
    model = trainer.model
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    loss = trainer.compute_loss(model, inputs)
    # by hand: ratio = 1 before any update, so the surrogate is -mean(A); KL against the adapter switched off
    kls = []
    with torch.no_grad():
        for j in range(2):
            mean, std = trainer.objective.step_distribution(model, inputs, j)
            with trainer.policy.adapter_disabled(model):
                mean_ref, _ = trainer.objective.step_distribution(model, inputs, j)
            kls.append(((mean - mean_ref) ** 2 / (2 * std**2)).mean())
    kl = torch.stack(kls).mean().item()
    assert kl > 0
    assert trainer._metrics["train"]["kl"][-1] == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(-inputs["advantages"].mean().item() + beta * kl, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("spatial", [False, True], ids=["scalar", "per_token"])
def test_one_sgd_step_raises_the_log_prob_of_positive_advantage_samples(tmp_path, spatial):
    trainer = _trainer(tmp_path)
    model = trainer.model
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    inputs = dict(inputs, advantages=adv)
    if spatial:  # the same signs carried per token
        inputs["token_advantages"] = adv[:, None].expand_as(inputs["old_log_prob_tokens"][:, 0]).clone()
    before, _ = recompute_log_probs(trainer, model, inputs)
    params = [p for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    trainer.compute_loss(model, inputs).backward()
    # Log-probs are means over latent dims, so gradients are ~1e-4: take a step of fixed length along -grad.
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    with torch.no_grad():
        for p in params:
            p -= 5e-2 * p.grad / norm
    after, _ = recompute_log_probs(trainer, model, inputs)
    delta = (after - before).sum(dim=1)  # summed over the trained steps
    assert (delta[adv > 0] > 0).all() and (delta[adv < 0] < 0).all(), delta
    # and the loss fell: -mean(A r) is lower after the step
    assert (
        -(adv * torch.exp(after - inputs["old_log_probs"]).mean(1)).mean()
        < -(adv * torch.exp(before - inputs["old_log_probs"]).mean(1)).mean()
    )
    assert not math.isnan(delta.sum().item())
