"""The objectives that train on GRPO's group rollouts without per-step log-probs: DiffusionNFT (``nft``) and
Advantage Weighted Matching (``awm``).

Both keep GRPO's rollout (here ODE only: no SDE window), rewards and group advantages, and replace what follows:

1. at rollout time, each clean sample ``x0`` (the final latents) is re-noised at K = ``train_timesteps`` times,
   ``x_t = (1 - t) x0 + t eps``, with ``t`` and ``eps`` drawn from the sample's own keyed generator (so N processes
   draw what one does, and a resumed run what the uninterrupted one did), and the old policy's velocity
   ``v_old(x_t, t)`` is taken under ``no_grad``: the rollout weights, or their EMA (``old_policy: ema``);
2. each trained term ``j`` is the ordinary flow-matching forward ``v_theta(x_t_j, t_j)`` with the sample's
   conditions (draft and reference tokens, text) exactly as the rollout used them, fed to
   :func:`refiner_rl.trainers.losses.nft_loss` or :func:`refiner_rl.trainers.losses.awm_loss`; the trainer
   back-propagates term by term as it does GRPO's steps.

``t`` lies in ``[0, start_sigma]``, where the sampler uses the policy: ``uniform`` or ``logit_normal`` scaled to that
range, or ``schedule`` (K distinct sigmas of the rollout's own schedule, 0 excluded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from refiner_rl.dynamics.schedules import sample_training_sigmas
from refiner_rl.trainers.losses import awm_loss, nft_loss


def renoise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x0 + t eps`` in fp32; ``t`` is ``[B]``, ``x0`` and ``noise`` ``[B, N, C]``."""
    t = t.float().reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - t) * x0.float() + t * noise.float()


def training_timesteps(
    scheme: str, k: int, sigmas: torch.Tensor, generator: torch.Generator, num_steps: int
) -> torch.Tensor:
    """K training times ``[K]`` for one sample: ``scheme`` ``uniform``/``logit_normal`` draws ``u`` in [0, 1) and
    returns ``u sigmas[0]`` (the rollout's first sigma, ``start_sigma``); ``schedule`` returns K distinct values
    of ``sigmas[:num_steps]`` (the sampler's noise levels, sigma 0 excluded)."""
    if scheme == "schedule":
        return sigmas[:num_steps][torch.randperm(num_steps, generator=generator)[:k]].float()
    return sample_training_sigmas(k, scheme, generator=generator) * float(sigmas[0])


@torch.no_grad()
def renoised_inputs(
    trainer, model, cond, x0: torch.Tensor, sigmas: torch.Tensor, generators: Sequence[torch.Generator]
) -> dict:
    """The training inputs of one rollout: ``x0`` ``[B, N, C]``, ``timesteps`` ``[B, K]``, ``noise`` and the old
    policy's ``v_old`` ``[B, K, N, C]``; one generator per sample draws its times, then its noises."""
    args, policy = trainer.args, trainer.policy
    k, dev = args.train_timesteps, x0.device
    t = torch.stack(
        [
            training_timesteps(args.train_timestep_sampling, k, sigmas.cpu(), g, args.num_inference_steps)
            for g in generators
        ]
    ).to(dev)
    noise = torch.stack([torch.randn((k, *x0.shape[1:]), generator=g, dtype=torch.float32) for g in generators])
    noise = noise.to(dev)
    v_old = torch.empty_like(noise)
    mb = args.rollout_batch_size or x0.shape[0]
    ctx = contextlib.nullcontext()
    if args.old_policy == "ema":
        ctx = trainer.ema.applied(trainer.accelerator.unwrap_model(trainer.model))
    with ctx:
        for i in range(0, x0.shape[0], mb):
            sl = slice(i, i + mb)
            c = cond.select(sl)
            for j in range(k):
                x_t = renoise(x0[sl], noise[sl, j], t[sl, j])
                v_old[sl, j] = policy.velocity(
                    x_t, t[sl, j], c, transformer=model, true_cfg_scale=args.true_cfg_scale
                ).float()
    return {"x0": x0.float(), "timesteps": t, "noise": noise, "v_old": v_old}


def term_loss(trainer, model, inputs: dict, j: int, stats: dict[str, list[float]]) -> torch.Tensor:
    """The ``j``-th trained term (with its graph): the objective's loss on the samples re-noised at their ``j``-th
    time, averaged over samples (over tokens too with per-token advantages), plus ``beta mean (v_theta - v_ref)^2``
    when ``beta`` > 0 (the squared velocity gap to the reference on the same ``x_t``). Appends the term's
    statistics to ``stats`` (AWM: ratio and clip fractions; ``kl`` with a reference)."""
    args = trainer.args
    x0, noise, t = inputs["x0"], inputs["noise"][:, j], inputs["timesteps"][:, j]
    x_t = renoise(x0, noise, t)
    # The no-grad reference forward first, so its activations are never alive next to this term's graph.
    v_ref = reference_velocity(trainer, model, x_t, t, inputs["cond"]) if args.beta > 0 else None
    v = trainer.policy.velocity(x_t, t, inputs["cond"], transformer=model, true_cfg_scale=args.true_cfg_scale)
    adv = inputs["token_advantages"] if inputs["token_advantages"] is not None else inputs["advantages"]
    v_old = inputs["v_old"][:, j]
    if args.objective == "nft":
        per = nft_loss(v, v_old, x_t, x0, t, adv, args.nft_beta, args.adv_clip_max, args.nft_adaptive_weight)
    else:
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        per, clip = awm_loss(v, v_old, noise - x0, adv, args.epsilon, eps_high, args.awm_scale)
        stats["ratio"].append(clip["ratio"].mean().item())
        stats["clip_ratio/low_mean"].append(clip["low"].mean().item())
        stats["clip_ratio/high_mean"].append(clip["high"].mean().item())
        stats["clip_ratio/region_mean"].append(clip["region"].mean().item())
    loss = per.mean()
    if args.beta > 0:
        gap = (v.float() - v_ref).pow(2).flatten(1).mean(1)
        loss = loss + args.beta * gap.mean()
        stats["kl"].append(gap.mean().item())
    return loss


@torch.no_grad()
def reference_velocity(trainer, model, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
    """The reference policy's velocity: the LoRA adapter disabled, or the frozen copy (full fine-tuning)."""
    with trainer.reference_transformer(model) as ref:
        return trainer.policy.velocity(x_t, t, cond, transformer=ref, true_cfg_scale=trainer.args.true_cfg_scale)
