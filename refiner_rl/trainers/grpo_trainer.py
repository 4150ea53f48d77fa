"""GRPO for flow-matching editors (OmniRefiner stage 2; Flow-GRPO-style SDE rollouts).

Read top to bottom, one rollout is:
1. encode each condition (draft, reference, instruction) once, shared by its group;
2. sample ``num_generations`` trajectories per condition: SDE steps inside the window store their start
   state, next state and log-prob; the other steps are ODE under no_grad (with ``shared_initial_noise`` a
   group starts from one noise, its ODE steps before the window run once, and it branches at the window);
3. decode, score with every reward (failures become ``None``, never a crash), gather scores across
   processes, compute group advantages (optionally per patch);
4. for each micro-batch of the buffered rollout and each trained step: recompute the log-prob with the same
   velocity forward (:meth:`FlowGRPOTrainer.step_distribution`), clipped surrogate + ``beta`` x KL against
   the reference, backward.

It builds on ``transformers.Trainer`` (like TRL's lean experimental trainers) and keeps TRL's config names
and metric names; TRL's ``GRPOTrainer`` itself assumes a causal LM (SPEC §6).
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import replace

import torch
from torch.nn import functional as F
from transformers import Trainer, TrainerCallback
from trl.trainer.utils import RepeatSampler

from refiner_rl.data import TripletDataset, collate_triplets
from refiner_rl.distributed import keyed_generator
from refiner_rl.dynamics import WindowSchedule, kl_same_std, log_prob, step_mean_std
from refiner_rl.policies.kontext import Conditions, KontextPolicy, TextEmbeds
from refiner_rl.rollout import (
    Trajectory,
    coarse_tail,
    initial_latents,
    paste_back,
    rollout,
    sampling_sigmas,
)
from refiner_rl.scoring.aggregate import compute_advantages, spatial_advantages
from refiner_rl.scoring.base import Reward, score_safely
from refiner_rl.scoring.registry import check_required_fields, reward_labels
from refiner_rl.trainers.base import (
    FULL_WEIGHTS_DIR,
    PolicyTrainerMixin,
    save_transformer_state_dict,
    setup_wandb_env,
)
from refiner_rl.trainers.ema import EMA
from refiner_rl.trainers.grpo_config import FlowGRPOConfig
from refiner_rl.trainers.losses import clipped_surrogate

logger = logging.getLogger(__name__)
EMA_FILE = "ema_state.pt"  # EMA shadow weights, for resume
EMA_DIR = "ema"  # the EMA weights in the same format as the live ones (LoRA or transformer/)


class FlowGRPOTrainer(PolicyTrainerMixin, Trainer):
    """Group-relative policy optimisation of a :class:`KontextPolicy` with pluggable rewards."""

    def __init__(
        self,
        policy: KontextPolicy,
        args: FlowGRPOConfig,
        rewards: list[Reward],
        train_dataset: TripletDataset,
        eval_dataset: TripletDataset | None = None,
        callbacks=None,
    ):
        self.policy = policy
        self.rewards = rewards
        self.reward_names = reward_labels(rewards)
        columns = {"prompt", "draft", "reference", "mask"} | ({"target"} if _has_target(train_dataset) else set())
        check_required_fields(rewards, columns)
        setup_wandb_env(args.report_to)
        self._setup_gradient_checkpointing(args)
        super().__init__(
            model=policy.transformer,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            data_collator=collate_triplets,
            callbacks=callbacks,
        )
        # compute_loss returns a per-micro-batch mean: let Trainer divide it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        for r in rewards:
            r.to(self.accelerator.device)
        self.window = WindowSchedule(
            num_steps=args.num_inference_steps,
            size=args.sde_window_size,
            start=args.sde_window_start,
            mode=args.sde_window_mode,
            stride=args.sde_window_stride,
            max_start=args.sde_window_max_start,
        )
        self.ref_transformer = None
        if args.beta > 0 and not policy.has_lora:
            self.ref_transformer = copy.deepcopy(policy.transformer).eval().requires_grad_(False)
        self.ema = EMA(policy.transformer, args.ema_decay) if args.ema_decay > 0 else None
        if self.ema is not None:
            self.add_callback(_EMAUpdate(self))
        self._step = 0
        self._buffered_inputs: list[dict] | None = None
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._last_samples: dict | None = None
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
            shuffle=True,
            seed=self.args.seed,
        )

    @property
    def rollout_index(self) -> int:
        """How many rollouts happened before the current one (a pure function of the step: resume-safe)."""
        return self._step // self.args.generate_every

    # --------------------------------------------------------------------------------------------- rollout
    def _conditions(self, batch: dict) -> tuple[Conditions, torch.Tensor]:
        """Encode each distinct record of the batch once; return per-sample conditions."""
        _, first, inverse = _groups(batch["index"])
        dev, p = self.policy.device, self.policy
        text = None
        if "prompt_embeds" in batch:
            text = TextEmbeds(
                batch["prompt_embeds"][first].to(dev, p.dtype), batch["pooled_prompt_embeds"][first].to(dev, p.dtype)
            )
        prompts = [batch["prompt"][i] for i in first.tolist()]
        negative = [self.args.negative_prompt] * len(prompts) if self.args.true_cfg_scale > 1 else None
        cond = p.encode_conditions(
            batch["draft"][first].to(dev),
            batch["reference"][first].to(dev),
            prompts=prompts,
            text=text,
            negative_prompts=negative,
        )
        return cond.select(inverse.to(dev)), inverse

    @torch.no_grad()
    def _sample(
        self,
        batch: dict,
        cond: Conditions,
        generator: torch.Generator | list[torch.Generator],
        sde_steps=(),
        transformer=None,
        init_generator=None,
    ) -> tuple[list[Trajectory], torch.Tensor, torch.Tensor]:
        """Trajectories (in micro-batches of ``rollout_batch_size``), sigmas and decoded images of ``batch``.
        Shared by the rollout (SDE window) and held-out evaluation (``sde_steps=()``: ODE only). The initial noise
        comes from ``init_generator`` when given (else ``generator``), the SDE steps' noise from ``generator``."""
        args, policy = self.args, self.policy
        sigmas = sampling_sigmas(args.num_inference_steps, cond.num_target_tokens, args.start_sigma)
        draft_latents = policy.encode_images(batch["draft"].to(policy.device)) if args.start_sigma < 1 else None
        init = generator if init_generator is None else init_generator
        x = initial_latents(policy, cond, init, float(sigmas[0]), draft_latents)
        # With one initial noise per group, the ODE steps before the window are the same for the whole group:
        # integrate them once per record, then branch (the SDE window is where the group's samples diverge).
        w = min(sde_steps) if len(sde_steps) and init_generator is not None and args.shared_initial_noise else 0
        if w > 0:
            _, first, inverse = _groups(batch["index"])
            first = first.to(x.device)
            prefix = rollout(
                policy,
                cond.select(first),
                sigmas[: w + 1],
                x=x[first],
                true_cfg_scale=args.true_cfg_scale,
                transformer=transformer,
            )
            x = prefix.latents[inverse.to(x.device)]
        # Nothing after the window is trained: a training rollout may finish on a coarser schedule (evaluation,
        # with no SDE steps, keeps the full one). Steps up to the window's end keep their indices.
        run_sigmas = coarse_tail(sigmas, max(sde_steps) + 1, args.rollout_tail_steps) if len(sde_steps) else sigmas
        trajs, mb = [], args.rollout_batch_size
        for i in range(0, x.shape[0], mb):
            sl = slice(i, i + mb)
            gen = (
                generator[sl] if isinstance(generator, list) else generator
            )  # per-sample generators follow their sample
            t = rollout(
                policy,
                cond.select(sl),
                run_sigmas[w:],
                x=x[sl],
                sde_steps=[k - w for k in sde_steps],
                rule=args.sde_type,
                noise_level=args.noise_level,
                generator=gen,
                true_cfg_scale=args.true_cfg_scale,
                transformer=transformer,
                sigma_max=sigmas[1] if len(sigmas) > 1 else None,
            )
            trajs.append(replace(t, sde_steps=[k + w for k in t.sde_steps], sigmas=sigmas))
        images = policy.decode(torch.cat([t.latents for t in trajs]), cond.grid)
        if args.paste_back:
            images = paste_back(images, batch["draft"], batch["mask"])
        return trajs, sigmas, images

    @torch.no_grad()
    def _generate_and_score(self, batch: dict) -> dict:
        args, policy, acc = self.args, self.policy, self.accelerator
        dev = policy.device
        t0 = _now(dev)
        cond, _ = self._conditions(batch)
        n = cond.tokens.shape[0]
        steps = self.window.steps(
            self.rollout_index, generator=torch.Generator().manual_seed(args.seed + self.rollout_index)
        )
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
        finally:
            model.train(was_training)
        t1 = _now(dev)
        scores, maps = self._score(batch, images)
        t2 = _now(dev)
        # Gather across processes before advantages: group statistics must see whole groups.
        all_scores = acc.gather(scores.to(dev))
        group_ids = acc.gather(batch["index"].to(dev))
        res = compute_advantages(
            all_scores,
            [r.weight for r in self.rewards],
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
        return {
            "cond": cond,
            "states": torch.cat([t.states for t in trajs]),
            "next_states": torch.cat([t.next_states for t in trajs]),
            "old_log_probs": torch.cat([t.log_probs for t in trajs]),
            "old_log_prob_tokens": torch.cat([t.log_prob_tokens for t in trajs]),
            "advantages": adv,
            "token_advantages": token_adv,
            "sigmas": sigmas,
            "sde_steps": trajs[0].sde_steps,
        }

    def _score(self, batch: dict, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """Scores ``[n, R]`` (NaN = not scored) and, per reward, maps ``[n, h, w]`` or None."""
        cols = {k: list(batch[k].cpu()) for k in ("draft", "reference", "target", "mask") if k in batch}
        comps = list(images.cpu())
        out = torch.full((len(comps), len(self.rewards)), float("nan"))
        maps: list[torch.Tensor | None] = []
        for j, (r, name) in enumerate(zip(self.rewards, self.reward_names)):
            res = score_safely(r, list(batch["prompt"]), comps, **cols)
            out[:, j] = torch.tensor([float("nan") if s is None else s for s in res.scores])
            if res.n_failed:
                logger.warning(
                    "reward %s could not score %d of %d samples%s",
                    name,
                    res.n_failed,
                    len(comps),
                    f": {res.error}" if res.error else "",
                )
            m = res.maps
            if (
                self.args.spatial_advantage_mix > 0
                and getattr(r, "provides_maps", False)
                and all(x is not None for x in m)
            ):
                maps.append(torch.stack([x.float() for x in m]))
            else:
                maps.append(None)
        return out, maps

    def _token_advantages(self, maps, group_ids, adv: torch.Tensor, cond: Conditions) -> torch.Tensor | None:
        """Per-token advantages ``[n, N]``: ``(1 - mix) A + mix A_patch``.

        ``A_patch`` is the weighted mean (weights ``w_k / sum |w_k|``) over rewards with maps of the
        group-normalised map (:func:`spatial_advantages`), resized to the token grid (nearest; row-major like
        the packed tokens). Where no reward scored a patch, ``A_patch = A``."""
        mix = self.args.spatial_advantage_mix
        used = [(m, r.weight) for m, r in zip(maps, self.rewards) if m is not None]
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
        loss = super().training_step(model, inputs, num_items_in_batch)
        spent = sum(sum(self.timings[k]) for k in ("rollout", "reward", "advantages")) - before
        self.timings["train"].append(_now(dev) - t0 - spent)
        self._step += 1
        return loss

    # ----------------------------------------------------------------------------------------------- loss
    def step_distribution(self, model, inputs: dict, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of ``p_theta(x_{j+1} | x_j)`` at the ``j``-th trained step of the buffered rollout,
        through the same velocity forward and step rule as the rollout (with gradient when enabled)."""
        args, sigmas = self.args, inputs["sigmas"]
        x, step = inputs["states"][:, j], inputs["sde_steps"][j]
        s, s_next = sigmas[step].item(), sigmas[step + 1].item()
        v = self.policy.velocity(
            x,
            torch.full((x.shape[0],), s, device=x.device),
            inputs["cond"],
            transformer=model,
            true_cfg_scale=args.true_cfg_scale,
        )
        sigma_max = sigmas[1] if len(sigmas) > 1 else None
        return step_mean_std(args.sde_type, x, v, s, s_next, args.noise_level, sigma_max=sigma_max)

    @torch.no_grad()
    def recompute_log_probs(self, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs ``[B, K]`` and per-token ``[B, K, N]`` of the stored next states under the current policy:
        what ``compute_loss`` compares with ``old_log_probs`` (equal before any update: the ratio invariant)."""
        out = [
            log_prob(inputs["next_states"][:, j], *self.step_distribution(model, inputs, j))
            for j in range(len(inputs["sde_steps"]))
        ]
        return torch.stack([o[0] for o in out], 1), torch.stack([o[1] for o in out], 1)

    def _reference_mean(self, model, inputs: dict, j: int) -> torch.Tensor:
        """Step mean of the reference policy: the LoRA adapter disabled, or the frozen copy (full fine-tuning)."""
        with torch.no_grad():
            if self.ref_transformer is not None:
                return self.step_distribution(self.ref_transformer, inputs, j)[0]
            with self.policy.adapter_disabled(model):
                return self.step_distribution(model, inputs, j)[0]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``mean_j [ mean_i max(-A r, -A clip(r, 1 - eps, 1 + eps_high)) + beta KL_j ]`` over the K trained
        steps, with ``r = exp(log p_theta - log p_old)`` per sample (per token with spatial advantages)."""
        args = self.args
        adv, tok_adv = inputs["advantages"], inputs["token_advantages"]
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        steps = inputs["sde_steps"]
        total = 0.0
        stats = defaultdict(list)
        for j in range(len(steps)):
            mean, std = self.step_distribution(model, inputs, j)
            lp, lp_tok = log_prob(inputs["next_states"][:, j], mean, std)
            if tok_adv is None:
                per, clip = clipped_surrogate(lp, inputs["old_log_probs"][:, j], adv, args.epsilon, eps_high)
            else:
                # Per-token ratios against the rollout's per-token log-probs, weighted by per-token advantages.
                per, clip = clipped_surrogate(
                    lp_tok, inputs["old_log_prob_tokens"][:, j], tok_adv, args.epsilon, eps_high
                )
            step_loss = per.mean()
            if args.beta > 0:
                kl, _ = kl_same_std(mean, self._reference_mean(model, inputs, j), std)
                step_loss = step_loss + args.beta * kl.mean()
                stats["kl"].append(kl.mean().item())
            total = total + step_loss / len(steps)
            stats["ratio"].append(clip["ratio"].mean().item())
            stats["clip_ratio/low_mean"].append(clip["low"].mean().item())
            stats["clip_ratio/high_mean"].append(clip["high"].mean().item())
            stats["clip_ratio/region_mean"].append(clip["region"].mean().item())
        for k, vals in stats.items():
            self._metrics["train"][k].append(sum(vals) / len(vals))
        return total

    # ------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if metrics and self.accelerator.num_processes > 1:
            # kl, ratio and clip fractions are per-process means: average them over processes, as the loss is (every
            # process logs, with the same keys; the reward statistics are already global and stay unchanged).
            keys = sorted(metrics)
            vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
            metrics = dict(zip(keys, self.accelerator.reduce(vals, reduction="mean").tolist()))
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()
        if (
            mode == "train"
            and self.args.log_samples
            and self._last_samples is not None
            and self.accelerator.is_main_process
        ):
            self._log_sample_table()

    def _log_sample_table(self) -> None:
        targets = [self.args.report_to] if isinstance(self.args.report_to, str) else list(self.args.report_to or [])
        if "wandb" not in targets and "all" not in targets:
            return
        import wandb

        if wandb.run is None:
            return
        s = self._last_samples
        b, k = s["batch"], min(self.args.num_log_samples, s["images"].shape[0])
        cols = ["step", "draft", "reference", "sample", "target", "reward"] + list(self.reward_names)
        table = wandb.Table(columns=cols)

        def img(t):
            return wandb.Image((t.clamp(0, 1).permute(1, 2, 0).numpy() * 255).astype("uint8"))

        for i in range(k):
            tgt = img(b["target"][i]) if "target" in b else None
            row = [
                self.state.global_step,
                img(b["draft"][i]),
                img(b["reference"][i]),
                img(s["images"][i]),
                tgt,
                float(s["total"][i]),
            ]
            table.add_data(*row, *[float(v) for v in s["scores"][i]])
        wandb.log({"samples": table}, commit=False)

    # ------------------------------------------------------------------------------------------ held-out
    @torch.no_grad()
    def evaluate_rewards(
        self, dataset: TripletDataset | None = None, *, batch_size: int = 16, seed: int = 1234, use_ema: bool = True
    ) -> dict[str, float]:
        """Mean rewards of ODE samples (the rollout's sampler without its SDE window) on held-out triplets.

        Uses the EMA weights when EMA is on (``use_ema``). Deterministic given ``seed``: the same noise for
        every call, so two checkpoints are compared on the same draws. ``reward`` is the weighted total."""
        from torch.utils.data import DataLoader

        dataset = dataset if dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluate_rewards needs a held-out dataset: pass one or give the trainer `eval_dataset`")
        model = self.accelerator.unwrap_model(self.model)
        ctx = self.ema.applied(model) if (self.ema is not None and use_ema) else contextlib.nullcontext()
        totals, per = [], defaultdict(list)
        was_training = model.training
        w = torch.tensor([r.weight for r in self.rewards])
        with ctx:
            model.eval()
            try:
                for i, batch in enumerate(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_triplets)):
                    cond, _ = self._conditions(batch)
                    _, _, images = self._sample(batch, cond, torch.Generator().manual_seed(seed + i), transformer=model)
                    scores, _ = self._score(batch, images)
                    totals.append(torch.nansum(scores * w, dim=1))
                    for j, name in enumerate(self.reward_names):
                        per[name].append(scores[:, j])
            finally:
                model.train(was_training)
        out = {"reward": torch.cat(totals).mean().item()}
        out.update({f"rewards/{n}/mean": torch.nanmean(torch.cat(v)).item() for n, v in per.items()})
        return out

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if ds is None:
            return {}
        metrics = {f"{metric_key_prefix}_{k}": v for k, v in self.evaluate_rewards(ds).items()}
        Trainer.log(self, metrics)
        return metrics

    # ------------------------------------------------------------------------------------- checkpointing
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The live weights (base class), plus with EMA: its shadow (``ema_state.pt``, for resume) and the EMA
        weights in the same format under ``ema/``. Checkpoints call this inside their temporary folder, so the
        EMA is part of the atomic rename."""
        super()._save(output_dir, state_dict)
        if self.ema is None or not self.args.should_save:
            return
        output_dir = output_dir or self.args.output_dir
        tmp = os.path.join(output_dir, EMA_FILE + ".tmp")
        torch.save(self.ema.state_dict(), tmp)
        os.replace(tmp, os.path.join(output_dir, EMA_FILE))
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

    def _load_extra_state(self, resume_from_checkpoint: str) -> None:
        # Called on resume by the base class with every launcher (DeepSpeed never calls _load_from_checkpoint).
        path = os.path.join(resume_from_checkpoint, EMA_FILE)
        if self.ema is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"EMA is on but {path} is missing: resume with the same ema_decay the checkpoint was written with"
                )
            self.ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            with open(os.path.join(resume_from_checkpoint, "trainer_state.json")) as f:
                step = json.load(f)["global_step"]
            # The rollout counter follows the optimizer step, so window and noise continue where they stopped.
            self._step = step * self.args.gradient_accumulation_steps
            self._buffered_inputs = None
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )


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


class _EMAUpdate(TrainerCallback):
    """EMA after every optimizer step (and only then: the epoch-end log/save hook runs without a step)."""

    def __init__(self, trainer: FlowGRPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        t = self.trainer
        t.ema.update(t.accelerator.unwrap_model(t.model))


def _now(device) -> float:
    """Wall clock after the device's queued work (phase timings must not leak into the next phase)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _groups(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(unique record indices, first sample of each, group of each sample)`` of a batch's ``index`` column."""
    uniq, inverse = torch.unique(index, return_inverse=True)
    first = torch.stack([(index == u).nonzero()[0, 0] for u in uniq])
    return uniq, first, inverse


def _slice_rollout(full: dict, sl: slice) -> dict:
    out = {k: full[k] for k in ("sigmas", "sde_steps")}
    out["cond"] = full["cond"].select(sl)
    for k in ("states", "next_states", "old_log_probs", "old_log_prob_tokens", "advantages"):
        out[k] = full[k][sl]
    out["token_advantages"] = None if full["token_advantages"] is None else full["token_advantages"][sl]
    return out


def _has_target(ds) -> bool:
    recs = getattr(ds, "records", None)
    return bool(recs) and recs[0].get("target") not in (None, "")
