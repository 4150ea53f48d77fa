"""What trains on GRPO's group rollouts: one class per ``objective``, chosen by :func:`objective_for`.

The trainer owns the rollout, the rewards and the group advantages; an objective owns what is kept from the rollout
and the loss built from it, as four methods: :meth:`Objective.sde_steps` (which sampler steps are stochastic),
:meth:`Objective.rollout_inputs` (what the buffered rollout keeps), :meth:`Objective.num_terms` and
:meth:`Objective.term_loss` (the loss is the mean of its terms, each with its own forward, so the trainer can
back-propagate term by term).

- ``grpo`` (:class:`GRPOObjective`): SDE steps inside a window store their start state, next state and log-prob;
  each trained step recomputes the log-prob with the same velocity forward (:meth:`GRPOObjective.step_distribution`)
  and takes the clipped surrogate plus ``beta`` x KL against the reference.
- ``nft`` / ``awm`` (:class:`NFTObjective`, :class:`AWMObjective`), DiffusionNFT and Advantage Weighted Matching,
  train without per-step log-probs. The rollout is ODE only;

  1. at rollout time, each clean sample ``x0`` (the final latents) is re-noised at K = ``train_timesteps`` times,
     ``x_t = (1 - t) x0 + t eps``, with ``t`` and ``eps`` drawn from the sample's own keyed generator (so N
     processes draw what one does, and a resumed run what the uninterrupted one did), and the old policy's velocity
     ``v_old(x_t, t)`` is taken under ``no_grad``: the rollout weights, or their EMA (``old_policy: ema``);
  2. each trained term ``j`` is the ordinary flow-matching forward ``v_theta(x_t_j, t_j)`` with the sample's
     conditions exactly as the rollout used them, fed to :func:`refiner_rl.trainers.losses.nft_loss` or
     :func:`refiner_rl.trainers.losses.awm_loss`.

  ``t`` lies in ``[0, start_sigma]``, where the sampler uses the policy: ``uniform`` or ``logit_normal`` scaled to
  that range, or ``schedule`` (K distinct sigmas of the rollout's own schedule, 0 excluded).
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Sequence

import torch

from refiner_rl.distributed import keyed_generator
from refiner_rl.dynamics import WindowSchedule, kl_same_std, log_prob, step_mean_std
from refiner_rl.dynamics.schedules import sample_training_sigmas
from refiner_rl.trainers.losses import awm_loss, clipped_surrogate, guard_log_ratio, nft_loss


class Objective:
    """What trains on the rollouts of ``trainer`` (a :class:`~refiner_rl.trainers.grpo_trainer.FlowGRPOTrainer`):
    the module docstring's four methods. Subclasses set :attr:`name` (the config's ``objective``)."""

    name: str

    def __init__(self, trainer):
        self.trainer = trainer

    @property
    def args(self):
        return self.trainer.args

    def sde_steps(self, rollout_index: int) -> list[int]:
        """The sampler steps that are stochastic in rollout ``rollout_index`` (none: an ODE rollout)."""
        return []

    def rollout_inputs(self, model, cond, trajectories, sigmas: torch.Tensor) -> dict:
        """What the buffered rollout keeps for :meth:`term_loss`, per sample (``sigmas`` and ``sde_steps`` are
        shared by the batch)."""
        raise NotImplementedError

    def num_terms(self, inputs: dict) -> int:
        raise NotImplementedError

    def term_loss(self, model, inputs: dict, j: int, stats: dict[str, list[float]]) -> torch.Tensor:
        """The ``j``-th term of the loss, with its graph; appends the term's statistics to ``stats``."""
        raise NotImplementedError

    def _velocity(self, model, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return self.trainer.policy.velocity(x, t, cond, transformer=model, true_cfg_scale=self.args.true_cfg_scale)


class GRPOObjective(Objective):
    """Flow-GRPO: SDE steps inside a window (:class:`~refiner_rl.dynamics.WindowSchedule`), per-step log-probs,
    clipped surrogate and KL to the reference."""

    name = "grpo"

    def __init__(self, trainer):
        super().__init__(trainer)
        a = self.args
        self.window = WindowSchedule(
            num_steps=a.num_inference_steps,
            size=a.sde_window_size,
            start=a.sde_window_start,
            mode=a.sde_window_mode,
            stride=a.sde_window_stride,
            max_start=a.sde_window_max_start,
        )

    def sde_steps(self, rollout_index: int) -> list[int]:
        g = torch.Generator().manual_seed(self.args.seed + rollout_index)
        return self.window.steps(rollout_index, generator=g)

    def rollout_inputs(self, model, cond, trajectories, sigmas: torch.Tensor) -> dict:
        out = {
            "states": torch.cat([t.states for t in trajectories]),
            "next_states": torch.cat([t.next_states for t in trajectories]),
            "old_log_probs": torch.cat([t.log_probs for t in trajectories]),
            "old_log_prob_tokens": torch.cat([t.log_prob_tokens for t in trajectories]),
            "sde_steps": trajectories[0].sde_steps,
        }
        if self.args.ratio_normalization:
            out["old_means"] = torch.cat([t.means for t in trajectories])
        return out

    def num_terms(self, inputs: dict) -> int:
        return len(inputs["sde_steps"])

    def step_distribution(self, model, inputs: dict, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of ``p_theta(x_{j+1} | x_j)`` at the ``j``-th trained step of the buffered rollout,
        through the same velocity forward and step rule as the rollout (with gradient when enabled)."""
        args, sigmas = self.args, inputs["sigmas"]
        x, step = inputs["states"][:, j], inputs["sde_steps"][j]
        s, s_next = sigmas[step].item(), sigmas[step + 1].item()
        v = self._velocity(model, x, torch.full((x.shape[0],), s, device=x.device), inputs["cond"])
        sigma_max = sigmas[1] if len(sigmas) > 1 else None
        return step_mean_std(args.sde_type, x, v, s, s_next, args.noise_level, sigma_max=sigma_max)

    def term_loss(self, model, inputs: dict, j: int, stats: dict[str, list[float]] | None = None) -> torch.Tensor:
        """``L_j = mean_i max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) + beta KL_j`` at the ``j``-th trained step,
        ``r = exp(log p_theta - log p_old)`` per sample (per token with spatial advantages); appends the step's
        ratio, clip fractions and KL to ``stats``. With ``ratio_normalization`` (GRPO-Guard), ``log r`` is
        :func:`guard_log_ratio` of the step."""
        args = self.args
        adv, tok_adv = inputs["advantages"], inputs["token_advantages"]
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        stats = stats if stats is not None else defaultdict(list)
        # The no-grad reference forward runs first, so its activations are never alive next to this step's graph.
        ref_mean = None
        if args.beta > 0:
            with torch.no_grad(), self.trainer.reference_transformer(model) as ref:
                ref_mean = self.step_distribution(ref, inputs, j)[0]
        mean, std = self.step_distribution(model, inputs, j)
        lp, lp_tok = log_prob(inputs["next_states"][:, j], mean, std)
        # Per-token advantages: per-token ratios against the rollout's per-token log-probs.
        lp, old, a = (
            (lp, inputs["old_log_probs"][:, j], adv)
            if tok_adv is None
            else (lp_tok, inputs["old_log_prob_tokens"][:, j], tok_adv)
        )
        if args.ratio_normalization:
            lp = guard_log_ratio(lp, old, mean, inputs["old_means"][:, j], std)
            old = torch.zeros_like(lp)
        per, clip = clipped_surrogate(lp, old, a, args.epsilon, eps_high)
        loss = per.mean()
        if args.beta > 0:
            kl, _ = kl_same_std(mean, ref_mean, std)
            loss = loss + args.beta * kl.mean()
            stats["kl"].append(kl.mean().item())
        _clip_stats(stats, clip)
        return loss


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


class RenoisedObjective(Objective):
    """Training on re-noised clean samples (module docstring): ``nft`` and ``awm`` differ only in
    :meth:`per_sample_loss`."""

    @torch.no_grad()
    def rollout_inputs(self, model, cond, trajectories, sigmas: torch.Tensor) -> dict:
        """``x0`` ``[B, N, C]``, ``timesteps`` ``[B, K]``, ``noise`` and the old policy's ``v_old``
        ``[B, K, N, C]``; each sample's generator (keyed by seed, rollout and its place in the global batch, like
        the sampling noise) draws its times, then its noises."""
        trainer, args = self.trainer, self.args
        x0 = torch.cat([t.latents for t in trajectories])
        n, first = x0.shape[0], trainer.accelerator.process_index * x0.shape[0]
        generators = [keyed_generator(args.seed, trainer.rollout_index, first + j, -2) for j in range(n)]
        return {**self.renoised(model, cond, x0, sigmas, generators), "sde_steps": []}

    @torch.no_grad()
    def renoised(
        self, model, cond, x0: torch.Tensor, sigmas: torch.Tensor, generators: Sequence[torch.Generator]
    ) -> dict:
        """The training inputs of :meth:`rollout_inputs` for clean samples ``x0`` and one generator per sample."""
        args, trainer = self.args, self.trainer
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
                    v_old[sl, j] = self._velocity(model, renoise(x0[sl], noise[sl, j], t[sl, j]), t[sl, j], c).float()
        return {"x0": x0.float(), "timesteps": t, "noise": noise, "v_old": v_old}

    def num_terms(self, inputs: dict) -> int:
        return inputs["timesteps"].shape[1]

    def per_sample_loss(self, v, v_old, x_t, x0, noise, t, adv, stats) -> torch.Tensor:
        raise NotImplementedError

    def term_loss(self, model, inputs: dict, j: int, stats: dict[str, list[float]]) -> torch.Tensor:
        """The objective's loss on the samples re-noised at their ``j``-th time, averaged over samples (over tokens
        too with per-token advantages), plus ``beta mean (v_theta - v_ref)^2`` when ``beta`` > 0 (the squared
        velocity gap to the reference on the same ``x_t``, logged as ``kl``)."""
        args = self.args
        x0, noise, t = inputs["x0"], inputs["noise"][:, j], inputs["timesteps"][:, j]
        x_t = renoise(x0, noise, t)
        # The no-grad reference forward first, so its activations are never alive next to this term's graph.
        v_ref = None
        if args.beta > 0:
            with torch.no_grad(), self.trainer.reference_transformer(model) as ref:
                v_ref = self._velocity(ref, x_t, t, inputs["cond"])
        v = self._velocity(model, x_t, t, inputs["cond"])
        adv = inputs["token_advantages"] if inputs["token_advantages"] is not None else inputs["advantages"]
        loss = self.per_sample_loss(v, inputs["v_old"][:, j], x_t, x0, noise, t, adv, stats).mean()
        if args.beta > 0:
            gap = (v.float() - v_ref).pow(2).flatten(1).mean(1)
            loss = loss + args.beta * gap.mean()
            stats["kl"].append(gap.mean().item())
        return loss


class NFTObjective(RenoisedObjective):
    """DiffusionNFT: :func:`~refiner_rl.trainers.losses.nft_loss`."""

    name = "nft"

    def per_sample_loss(self, v, v_old, x_t, x0, noise, t, adv, stats) -> torch.Tensor:
        a = self.args
        return nft_loss(v, v_old, x_t, x0, t, adv, a.nft_beta, a.adv_clip_max, a.nft_adaptive_weight)


class AWMObjective(RenoisedObjective):
    """Advantage Weighted Matching: :func:`~refiner_rl.trainers.losses.awm_loss` (clipped ratio, logged like
    GRPO's)."""

    name = "awm"

    def per_sample_loss(self, v, v_old, x_t, x0, noise, t, adv, stats) -> torch.Tensor:
        a = self.args
        eps_high = a.epsilon_high if a.epsilon_high is not None else a.epsilon
        per, clip = awm_loss(v, v_old, noise - x0, adv, a.epsilon, eps_high, a.awm_scale)
        _clip_stats(stats, clip)
        return per


def _clip_stats(stats: dict[str, list[float]], clip: dict[str, torch.Tensor]) -> None:
    stats["ratio"].append(clip["ratio"].mean().item())
    for k in ("low", "high", "region"):
        stats[f"clip_ratio/{k}_mean"].append(clip[k].mean().item())


OBJECTIVE_CLASSES = {cls.name: cls for cls in (GRPOObjective, NFTObjective, AWMObjective)}


def objective_for(trainer) -> Objective:
    """The objective ``trainer.args.objective`` names (the config has checked the name)."""
    return OBJECTIVE_CLASSES[trainer.args.objective](trainer)
