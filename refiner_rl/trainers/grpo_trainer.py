"""GRPO for flow-matching editors (OmniRefiner stage 2; Flow-GRPO-style SDE rollouts).

Read top to bottom, one rollout is:
1. encode each condition (draft, reference, instruction) once, shared by its group;
2. sample ``num_generations`` trajectories per condition: SDE steps inside the window store their start
   state, next state and log-prob; the other steps are ODE under no_grad (with ``shared_initial_noise`` a
   group starts from one noise, its ODE steps before the window run once, and it branches at the window);
3. decode, score with every reward (failures become ``None``, never a crash), gather scores across
   processes, compute group advantages (optionally per patch);
4. for each micro-batch of the buffered rollout and each trained step: recompute the log-prob with the same
   velocity forward, clipped surrogate + ``beta`` x KL against the reference, backward.

Step 2's SDE window and step 4 belong to the objective (``trainers.objectives``): ``grpo`` as above, or ``nft`` / ``awm``
(DiffusionNFT, Advantage Weighted Matching), whose rollout is ODE only and whose step 4 trains on re-noised clean
samples with the flow-matching forward.

It builds on ``transformers.Trainer`` (like TRL's lean experimental trainers) and keeps TRL's config names
and metric names; TRL's ``GRPOTrainer`` itself assumes a causal LM (docs/algorithms.md#pitfalls-we-guard-against).

This file is the group loop itself (rollout, scoring, advantages, buffering, the per-term backward, checkpoint
hooks), kept in one file so it can be read in one sitting, as the steps above list it. The pieces that stand alone
live elsewhere: what trains on a rollout in ``trainers.objectives``, the reference policy, EMA, logging and held-out
evaluation shared with ReFL in ``trainers.base``, sampling in ``refiner_rl.sampling``, step math in
``refiner_rl.dynamics``, losses in ``trainers.losses``, the per-term backward in ``trainers.backward``, rewards in
``refiner_rl.scoring``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict

import torch
from torch.nn import functional as F
from transformers import Trainer
from trl.trainer.utils import RepeatSampler

from refiner_rl.configs import resolve_policy
from refiner_rl.data import TripletDataset
from refiner_rl.distributed import keyed_generator
from refiner_rl.errors import RewardError
from refiner_rl.evaluation import reward_columns
from refiner_rl.policies.base import EditorPolicy
from refiner_rl.policies.flux import Conditions
from refiner_rl.rollout import Trajectory
from refiner_rl.sampling import batch_conditions, sample_trajectories
from refiner_rl.scoring.aggregate import compute_advantages, spatial_advantages
from refiner_rl.scoring.batch import score_batch
from refiner_rl.scoring.registry import check_required_fields
from refiner_rl.trainers.backward import backward_per_term, per_term_backward_supported
from refiner_rl.trainers.base import (
    FULL_WEIGHTS_DIR,
    RewardTrainerMixin,
    save_transformer_state_dict,
)
from refiner_rl.trainers.grpo_config import FlowGRPOConfig
from refiner_rl.trainers.objectives import objective_for

logger = logging.getLogger(__name__)
EMA_DIR = "ema"  # the EMA weights in the same format as the live ones (LoRA or transformer/)


class FlowGRPOTrainer(RewardTrainerMixin, Trainer):
    """Group-relative policy optimisation of a :class:`EditorPolicy` with pluggable rewards."""

    #: Back-propagate each trained step as soon as its loss is formed (one step's activations alive at a time).
    #: False: one backward over :meth:`compute_loss` (all K steps' activations at once; the same gradient).
    backward_per_step: bool = True

    def __init__(
        self,
        model: EditorPolicy | str,
        reward_funcs=None,
        args: FlowGRPOConfig | None = None,
        train_dataset: TripletDataset | None = None,
        eval_dataset: TripletDataset | None = None,
        peft_config=None,
        callbacks=None,
    ):
        """TRL's signature. ``model``: a :class:`EditorPolicy`, ``"tiny"``, a diffusers repo id or a local folder
        laid out like FLUX.1-Kontext-dev. ``reward_funcs``: one item or a list of reward names, recipe specs,
        dotted paths, :class:`Reward` objects or plain functions ``f(prompts, completions, **kwargs)`` (sync or
        async); when given it replaces ``args.rewards`` (``None`` takes them). Weights come from
        ``args.reward_weights`` (default 1 each). ``peft_config``: a peft ``LoraConfig`` attached to the
        policy's transformer."""
        if args is None:
            args = self.default_args(model, FlowGRPOConfig, "GRPO")
        policy = resolve_policy(model, args, peft_config)
        rewards = self._set_rewards(reward_funcs, args)
        if train_dataset is not None:
            columns = {"prompt", "draft", "mask"} | {
                k for k in ("reference", "target", "task") if _has(train_dataset, k)
            }
            check_required_fields(rewards, columns)
        super().__init__(policy, args, train_dataset, eval_dataset, callbacks)
        # compute_loss returns a per-micro-batch mean: let Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        for r in rewards:
            r.to(self.accelerator.device)
        self.objective = objective_for(self)  # what trains on the rollouts (trainers.objectives)
        self.init_reward_state(policy, frozen_reference=args.beta > 0, ema=args.ema_decay > 0, ema_decay=args.ema_decay)
        self._step = 0
        self._buffered_inputs: list[dict] | None = None
        self._failed_rollouts = 0  # consecutive rollouts in which some reward scored no sample
        # Wall-clock seconds per phase (rollout, reward, advantages per rollout; train per micro-step), for benches.
        self.timings: dict[str, list[float]] = defaultdict(list)

    # ------------------------------------------------------------------------------------------------ data
    def get_train_dataloader(self):
        # One dataloader batch = one rollout's local samples (TRL's layout: groups stay contiguous).
        return self._get_dataloader(
            dataset=self.train_dataset,
            description="Training",
            batch_size=self._train_batch_size * self.args.steps_per_generation,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, dataset=None):
        return EpochRepeatSampler(
            data_source=dataset if dataset is not None else self.train_dataset,
            mini_repeat_count=self.args.num_generations,
            batch_size=self.args.generation_batch_size // self.args.num_generations,
            repeat_count=self.args.num_iterations * self.args.steps_per_generation,
            shuffle=self.args.shuffle_dataset,
            seed=self.args.seed,
        )

    @property
    def rollout_index(self) -> int:
        """How many rollouts happened before the current one (a pure function of the step: resume-safe)."""
        return self._step // self.args.generate_every

    # --------------------------------------------------------------------------------------------- rollout
    def _conditions(self, batch: dict) -> tuple[Conditions, torch.Tensor]:
        """Per-sample conditions, each distinct record encoded once (negative embeddings with true CFG)."""
        negative = self.args.negative_prompt if self.args.true_cfg_scale > 1 else None
        return batch_conditions(self.policy, batch, negative)

    def _sample(
        self, batch: dict, cond: Conditions, generator, sde_steps=(), transformer=None, init_generator=None
    ) -> tuple[list[Trajectory], torch.Tensor, torch.Tensor]:
        """The rollout's trajectories, sigmas and images: :func:`refiner_rl.sampling.sample_trajectories` with this
        config's sampler."""
        a = self.args
        return sample_trajectories(
            self.policy,
            batch,
            cond,
            num_steps=a.num_inference_steps,
            generator=generator,
            init_generator=init_generator,
            sde_steps=sde_steps,
            rule=a.sde_type,
            noise_level=a.noise_level,
            start_sigma=a.start_sigma,
            shared_initial_noise=a.shared_initial_noise,
            tail_steps=a.rollout_tail_steps,
            true_cfg_scale=a.true_cfg_scale,
            paste=a.paste_back,
            micro_batch=a.rollout_batch_size,
            transformer=transformer,
        )

    @torch.no_grad()
    def _generate_and_score(self, batch: dict) -> dict:
        args, policy, acc = self.args, self.policy, self.accelerator
        dev = policy.device
        t0 = _now(dev)
        focus = args.focus_settings()  # region-focused: roll out (and train) on the crop around each mask
        crop = focus.crop(batch, policy.size_multiple) if focus is not None else None
        batch = crop.batch if crop is not None else batch
        cond, _ = self._conditions(batch)
        n = cond.batch_size
        steps = self.objective.sde_steps(self.rollout_index)
        # Sampling noise: one generator per sample, keyed by (seed, rollout, position in the global generation batch),
        # so a resumed run draws the same noise and N processes x n samples draw exactly what 1 process x N*n draws.
        g = [keyed_generator(args.seed, self.rollout_index, acc.process_index * n + j) for j in range(n)]
        # With shared_initial_noise, a group starts from one noise (keyed by its record): advantages then compare
        # only what the trained steps' noise did, not the luck of each sample's starting point.
        init_g = None
        if args.shared_initial_noise:
            init_g = [keyed_generator(args.seed, self.rollout_index, int(i), -1) for i in batch["index"].tolist()]
        # The same (wrapped, autocast-patched) module as compute_loss: one forward for rollout and training.
        model = self.model_wrapped if self.is_deepspeed_enabled else self.model
        was_training = model.training
        model.eval()
        try:
            trajs, sigmas, images = self._sample(batch, cond, g, steps, transformer=model, init_generator=init_g)
            train_inputs = self.objective.rollout_inputs(model, cond, trajs, sigmas)
        finally:
            model.train(was_training)
        t1 = _now(dev)
        shown, shown_batch = crop.scored(images, focus) if crop is not None else (images, batch)
        scored = score_batch(
            self.rewards,
            batch["prompt"],
            list(shown.cpu()),
            {**reward_columns(shown_batch), "trainer_state": self.state},  # TRL passes the state to reward functions
            with_maps=args.spatial_advantage_mix > 0,
        )
        scores, maps = scored.scores, scored.maps
        if crop is not None and focus.score_on == "full":  # spatial advantages live on the crop's token grid
            maps = [m if m is None else crop.crop_maps(m) for m in maps]
        t2 = _now(dev)
        # Gather across processes before advantages: group statistics must see whole groups.
        all_scores = acc.gather(scores.to(dev))
        group_ids = acc.gather(batch["index"].to(dev))
        self._check_reward_failures(all_scores.cpu(), scored.errors)
        res = compute_advantages(
            all_scores,
            self.reward_weights,
            group_ids,
            scale_rewards=args.scale_rewards,
            aggregation=args.multi_objective_aggregation,
            adv_clip_max=args.adv_clip_max,
            names=self.reward_names,
        )
        local = slice(acc.process_index * n, (acc.process_index + 1) * n)
        adv = res.advantages[local].float().to(dev)
        token_adv = self._token_advantages(maps, group_ids, adv, cond)
        t3 = _now(dev)
        self.timings["rollout"].append(t1 - t0)
        self.timings["reward"].append(t2 - t1)
        self.timings["advantages"].append(t3 - t2)
        for k, v in res.metrics.items():
            self._metrics["train"][k].append(float(v))
        self._last_samples = {
            "batch": batch,
            "images": images.cpu(),
            "scores": scores.cpu(),
            "total": res.total_reward[local].cpu(),
        }
        return {"cond": cond, "advantages": adv, "token_advantages": token_adv, "sigmas": sigmas, **train_inputs}

    def _check_reward_failures(self, scores: torch.Tensor, errors: dict[str, str]) -> None:
        """Count consecutive rollouts in which some reward scored no sample of the (gathered) batch; at
        ``max_failed_reward_steps`` write a checkpoint (Trainer's own) and stop with a RewardError naming the
        rewards and their last errors. Every process sees the same gathered scores, so all stop together."""
        dead = [n for j, n in enumerate(self.reward_names) if bool(torch.isnan(scores[:, j]).all())]
        self._failed_rollouts = self._failed_rollouts + 1 if dead else 0
        if not dead or self._failed_rollouts < self.args.max_failed_reward_steps:
            return
        self._save_checkpoint(self.model, trial=None)
        unknown = "no error here: NaN scores (non-finite samples from a diverged policy?) or another process's"
        why = "; ".join(f"{n}: {errors.get(n, unknown)}" for n in dead)
        ckpt = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        raise RewardError(
            f"reward {', '.join(dead)} scored no sample in {self._failed_rollouts} consecutive rollouts "
            f"(max_failed_reward_steps={self.args.max_failed_reward_steps}); last error: {why}. "
            f"Fix the reward, then resume from {ckpt}"
        )

    def _token_advantages(self, maps, group_ids, adv: torch.Tensor, cond: Conditions) -> torch.Tensor | None:
        """Per-token advantages ``[n, N]``: ``(1 - mix) A + mix A_patch``.

        ``A_patch`` is the weighted mean (weights ``w_k / sum |w_k|``) over rewards with maps of the
        group-normalised map (:func:`spatial_advantages`), resized to the token grid (nearest; row-major like
        the packed tokens). Where no reward scored a patch, ``A_patch = A``."""
        mix = self.args.spatial_advantage_mix
        used = [(m, float(w)) for m, w in zip(maps, self.reward_weights) if m is not None]
        if mix <= 0 or not used:
            return None
        acc, dev = self.accelerator, adv.device
        gh, gw = cond.grid[0] // 2, cond.grid[1] // 2
        total, wsum = 0.0, 0.0
        for m, w in used:
            patch_adv = spatial_advantages(acc.gather(m.to(dev)), group_ids)  # [N_all, h, w], NaN = no baseline
            n = m.shape[0]
            local = patch_adv[acc.process_index * n : (acc.process_index + 1) * n].float()
            tok = F.interpolate(local[:, None], size=(gh, gw), mode="nearest")[:, 0].flatten(1)
            total, wsum = total + w * tok, wsum + abs(w)
        patch = total / max(wsum, 1e-8)
        patch = torch.where(torch.isnan(patch), adv[:, None].expand_as(patch), patch)
        if self.args.adv_clip_max:
            patch = patch.clamp(-self.args.adv_clip_max, self.args.adv_clip_max)
        return (1 - mix) * adv[:, None] + mix * patch

    def _prepare_inputs(self, generation_batch: dict) -> dict:
        if self._step % self.args.generate_every == 0 or self._buffered_inputs is None:
            full = self._generate_and_score(generation_batch)
            k = self.args.steps_per_generation
            n = full["advantages"].shape[0]
            size = n // k
            self._buffered_inputs = [_slice_rollout(full, slice(i * size, (i + 1) * size)) for i in range(k)]
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def training_step(self, model, inputs, num_items_in_batch=None):
        dev = self.policy.device
        t0, before = _now(dev), sum(sum(self.timings[k]) for k in ("rollout", "reward", "advantages"))
        loss = self._forward_backward(model, inputs, num_items_in_batch)
        spent = sum(sum(self.timings[k]) for k in ("rollout", "reward", "advantages")) - before
        self.timings["train"].append(_now(dev) - t0 - spent)
        self._step += 1
        return loss

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``(1/K) sum_j L_j`` over the objective's K terms (for ``grpo``: ``mean_i max(-A r, -A clip(r, 1 - eps,
        1 + eps_high)) + beta KL_j`` at each trained step).

        The whole loss with the graphs of all K terms: training calls :meth:`term_loss` per term instead and
        back-propagates each as soon as it is formed (:attr:`backward_per_step`)."""
        stats = defaultdict(list)
        k = self.num_terms(inputs)
        total = 0.0
        for j in range(k):
            total = total + self.term_loss(model, inputs, j, stats) / k
        self._log_step_stats(stats)
        return total

    def num_terms(self, inputs: dict) -> int:
        """Terms of the loss, each with its own forward: GRPO's trained steps, or nft/awm's re-noised times."""
        return self.objective.num_terms(inputs)

    def term_loss(self, model, inputs: dict, j: int, stats: dict[str, list[float]]) -> torch.Tensor:
        """The ``j``-th term of the objective's loss (:meth:`Objective.term_loss`)."""
        return self.objective.term_loss(model, inputs, j, stats)

    def _log_step_stats(self, stats: dict[str, list[float]]) -> None:
        for k, vals in stats.items():
            self._metrics["train"][k].append(sum(vals) / len(vals))

    def _forward_backward(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """Trainer's micro-step (forward, scaled backward; returns the detached loss), with one backward per
        trained step when :attr:`backward_per_step` (only one step's activations alive at a time; the same
        gradient, loss and statistics as one backward over :meth:`compute_loss`)."""
        if not (self.backward_per_step and per_term_backward_supported(self)):
            return super().training_step(model, inputs, num_items_in_batch)
        stats = defaultdict(list)
        loss = backward_per_term(
            self,
            model,
            inputs,
            num_items_in_batch,
            num_terms=self.num_terms,
            term_loss=lambda m, x, j: self.term_loss(m, x, j, stats),
        )
        self._log_step_stats(stats)
        return loss

    # ------------------------------------------------------------------------------------------ held-out
    def evaluation_settings(self) -> dict:
        """The shared settings (:meth:`RewardTrainerMixin.evaluation_settings`), with TRL's ``trainer_state`` passed
        to the rewards as in training."""
        return {**super().evaluation_settings(), "reward_extras": {"trainer_state": self.state}}

    # ------------------------------------------------------------------------------------- checkpointing
    def _save_ema_weights(self, output_dir: str, state_dict: dict | None) -> None:
        """The EMA weights in the same format as the live ones, under ``ema/``."""
        # Written from the shadow, not by swapping it into the module: only this rank saves, and under ZeRO-3 the
        # module's weights are partitioned (swapping would need every rank).
        model = self.accelerator.unwrap_model(self.model)
        dtypes = {n: p.dtype for n, p in model.named_parameters()}
        ema = {n: t.to(dtypes[n]) for n, t in self.ema.state_dict().items()}
        if self.policy.has_lora:
            self.policy.save_lora(os.path.join(output_dir, EMA_DIR), state_dict=ema)
        else:
            live = state_dict if state_dict else model.state_dict()  # gathered under ZeRO-3
            save_transformer_state_dict(model, os.path.join(output_dir, EMA_DIR, FULL_WEIGHTS_DIR), {**live, **ema})

    def _on_resume(self, checkpoint: str) -> None:
        """The rollout counter follows the optimizer step, so window and noise continue where they stopped."""
        with open(os.path.join(checkpoint, "trainer_state.json")) as f:
            step = json.load(f)["global_step"]
        self._step = step * self.args.gradient_accumulation_steps
        self._buffered_inputs = None
        self._failed_rollouts = 0


class EpochRepeatSampler(RepeatSampler):
    """TRL's ``RepeatSampler`` whose shuffle depends only on ``(seed, epoch)``. TRL's draws each epoch's order
    from one generator, so a run resumed in epoch e > 0 would replay epoch 0's order; Trainer calls
    ``set_epoch`` at every epoch (through accelerate's loader), which reseeds here."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if self.shuffle:
            self.generator.manual_seed((self.seed or 0) * 1_000_003 + self.epoch)
        return super().__iter__()


def _now(device) -> float:
    """Wall clock after the device's queued work (phase timings must not leak into the next phase)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _slice_rollout(full: dict, sl: slice) -> dict:
    """The samples ``sl`` of a buffered rollout: every per-sample tensor and the conditions sliced, the schedule and
    the trained step indices kept."""
    out = {k: full[k] for k in ("sigmas", "sde_steps")}
    out["cond"] = full["cond"].select(sl)
    for k, v in full.items():
        if k not in out:
            out[k] = None if v is None else v[sl]
    return out


def _has(ds, field: str) -> bool:
    """Whether every record of ``ds`` has ``field``: a TripletDataset knows; of another dataset, only the columns
    every editor reads are assumed (``reference``: every Kontext dataset has it)."""
    has_field = getattr(ds, "has_field", None)
    if has_field is None:
        return field == "reference"
    return bool(has_field(field))
