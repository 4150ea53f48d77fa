"""GRPO for flow-matching editors (OmniRefiner stage 2; Flow-GRPO-style SDE rollouts).

Read top to bottom, one rollout is:
1. encode each condition (draft, reference, instruction) once, shared by its group;
2. sample ``num_generations`` trajectories per condition: SDE steps inside the window store their start
   state, next state and log-prob; the other steps are ODE under no_grad;
3. decode, score with every reward (failures become ``None``, never a crash), gather scores across
   processes, compute group advantages (optionally per patch);
4. for each micro-batch of the buffered rollout and each trained step: recompute the log-prob with the same
   velocity forward, clipped surrogate + ``beta`` x KL against the reference, backward.

It builds on ``transformers.Trainer`` (like TRL's lean experimental trainers) and keeps TRL's config names
and metric names; TRL's ``GRPOTrainer`` itself assumes a causal LM (SPEC §6).
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import defaultdict

import torch
from torch.nn import functional as F
from transformers import Trainer
from trl.trainer.utils import RepeatSampler

from refiner_rl.data import TripletDataset, collate_triplets
from refiner_rl.dynamics import WindowSchedule, kl_same_std, log_prob, step_mean_std
from refiner_rl.policies.kontext import Conditions, KontextPolicy, TextEmbeds
from refiner_rl.rollout import initial_latents, paste_back, rollout, sampling_sigmas
from refiner_rl.scoring.aggregate import compute_advantages, spatial_advantages
from refiner_rl.scoring.base import Reward, score_safely
from refiner_rl.scoring.registry import check_required_fields, reward_labels
from refiner_rl.trainers.base import PolicyTrainerMixin, setup_wandb_env
from refiner_rl.trainers.ema import EMA
from refiner_rl.trainers.grpo_config import FlowGRPOConfig
from refiner_rl.trainers.losses import clipped_surrogate

logger = logging.getLogger(__name__)
EMA_FILE = "ema_state.pt"


class FlowGRPOTrainer(PolicyTrainerMixin, Trainer):
    """Group-relative policy optimisation of a :class:`KontextPolicy` with pluggable rewards."""

    def __init__(self, policy: KontextPolicy, args: FlowGRPOConfig, rewards: list[Reward], train_dataset: TripletDataset,
                 eval_dataset: TripletDataset | None = None, callbacks=None):  # fmt: skip
        self.policy = policy
        self.rewards = rewards
        self.reward_names = reward_labels(rewards)
        columns = {"prompt", "draft", "reference", "mask"} | ({"target"} if _has_target(train_dataset) else set())
        check_required_fields(rewards, columns)
        setup_wandb_env(args.report_to)
        self._setup_gradient_checkpointing(args)
        super().__init__(model=policy.transformer, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=collate_triplets, callbacks=callbacks)  # fmt: skip
        for r in rewards:
            r.to(self.accelerator.device)
        self.window = WindowSchedule(num_steps=args.num_inference_steps, size=args.sde_window_size, start=args.sde_window_start, mode=args.sde_window_mode,
                                     stride=args.sde_window_stride, max_start=args.sde_window_max_start)  # fmt: skip
        self.ref_transformer = None
        if args.beta > 0 and not policy.has_lora:
            self.ref_transformer = copy.deepcopy(policy.transformer).eval().requires_grad_(False)
        self.ema = EMA(policy.transformer, args.ema_decay) if args.ema_decay > 0 else None
        self._step = 0
        self._buffered_inputs: list[dict] | None = None
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._last_samples: dict | None = None

    # ------------------------------------------------------------------------------------------------ data
    def get_train_dataloader(self):
        # One dataloader batch = one rollout's local samples (TRL's layout: groups stay contiguous).
        return self._get_dataloader(dataset=self.train_dataset, description="Training",
                                    batch_size=self._train_batch_size * self.args.steps_per_generation,
                                    sampler_fn=self._get_train_sampler, is_training=True)  # fmt: skip

    def _get_train_sampler(self, dataset=None):
        return RepeatSampler(
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
        idx = batch["index"]
        uniq, inverse = torch.unique(idx, return_inverse=True)
        first = torch.stack([(idx == u).nonzero()[0, 0] for u in uniq])
        dev, p = self.policy.device, self.policy
        text = None
        if "prompt_embeds" in batch:
            text = TextEmbeds(batch["prompt_embeds"][first].to(dev, p.dtype), batch["pooled_prompt_embeds"][first].to(dev, p.dtype))
        prompts = [batch["prompt"][i] for i in first.tolist()]
        negative = [self.args.negative_prompt] * len(prompts) if self.args.true_cfg_scale > 1 else None
        cond = p.encode_conditions(batch["draft"][first].to(dev), batch["reference"][first].to(dev),
                                   prompts=prompts, text=text, negative_prompts=negative)  # fmt: skip
        return cond.select(inverse.to(dev)), inverse

    @torch.no_grad()
    def _generate_and_score(self, batch: dict) -> dict:
        args, policy, acc = self.args, self.policy, self.accelerator
        dev = policy.device
        cond, _ = self._conditions(batch)
        n = cond.tokens.shape[0]
        sigmas = sampling_sigmas(args.num_inference_steps, cond.num_target_tokens, args.start_sigma)
        steps = self.window.steps(self.rollout_index, generator=torch.Generator().manual_seed(args.seed + self.rollout_index))
        # Sampling noise: deterministic per (seed, rollout, rank), so a resumed run draws the same noise.
        g = torch.Generator().manual_seed(hash((args.seed, self.rollout_index, acc.process_index)) % (2**63))
        draft_latents = policy.encode_images(batch["draft"].to(dev)) if args.start_sigma < 1 else None
        x = initial_latents(policy, cond, g, float(sigmas[0]), draft_latents)
        trajs = []
        mb = args.rollout_batch_size
        model = self.model_wrapped if self.is_deepspeed_enabled else self.model
        model.eval()
        for i in range(0, n, mb):
            sl = slice(i, i + mb)
            trajs.append(rollout(policy, cond.select(sl), sigmas, x=x[sl], sde_steps=steps, rule=args.sde_type,
                                 noise_level=args.noise_level, generator=g, true_cfg_scale=args.true_cfg_scale,
                                 transformer=model))  # fmt: skip
        model.train()
        latents = torch.cat([t.latents for t in trajs])
        images = policy.decode(latents, cond.grid)
        if args.paste_back:
            images = paste_back(images, batch["draft"], batch["mask"])
        scores, maps = self._score(batch, images)
        # Gather across processes before advantages: group statistics must see whole groups.
        all_scores = acc.gather(scores.to(dev))
        group_ids = acc.gather(batch["index"].to(dev))
        res = compute_advantages(all_scores, [r.weight for r in self.rewards], group_ids, scale_rewards=args.scale_rewards,
                                 aggregation=args.multi_objective_aggregation, adv_clip_max=args.adv_clip_max,
                                 names=self.reward_names)  # fmt: skip
        local = slice(acc.process_index * n, (acc.process_index + 1) * n)
        adv = res.advantages[local].float().to(dev)
        token_adv = self._token_advantages(maps, group_ids, adv, cond)
        for k, v in res.metrics.items():
            self._metrics["train"][k].append(float(v))
        self._last_samples = {"batch": batch, "images": images.cpu(), "scores": scores.cpu(), "total": res.total_reward[local].cpu()}
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
            res = score_safely(r, list(batch["prompt"]), comps, **{k: v for k, v in cols.items()})
            out[:, j] = torch.tensor([float("nan") if s is None else s for s in res.scores])
            if res.n_failed:
                logger.warning("reward %s could not score %d of %d samples%s", name, res.n_failed, len(comps),
                               f": {res.error}" if res.error else "")  # fmt: skip
            m = res.maps
            if self.args.spatial_advantage_mix > 0 and getattr(r, "provides_maps", False) and all(x is not None for x in m):
                maps.append(torch.stack([x.float() for x in m]))
            else:
                maps.append(None)
        return out, maps

    def _token_advantages(self, maps, group_ids, adv: torch.Tensor, cond: Conditions) -> torch.Tensor | None:
        """Per-token advantages ``[n, N]``: ``(1 - mix) A + mix A_patch`` (A where a patch has no score)."""
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
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._step += 1
        return loss

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args, policy = self.args, self.policy
        cond: Conditions = inputs["cond"]
        sigmas, steps = inputs["sigmas"], inputs["sde_steps"]
        adv, tok_adv = inputs["advantages"], inputs["token_advantages"]
        sigma_max = sigmas[1] if len(sigmas) > 1 else None
        eps_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
        total = 0.0
        stats = defaultdict(list)
        for j, step in enumerate(steps):
            x, x_next = inputs["states"][:, j], inputs["next_states"][:, j]
            s, s_next = sigmas[step].item(), sigmas[step + 1].item()
            sig = torch.full((x.shape[0],), s, device=x.device)
            v = policy.velocity(x, sig, cond, transformer=model, true_cfg_scale=args.true_cfg_scale)
            mean, std = step_mean_std(args.sde_type, x, v, s, s_next, args.noise_level, sigma_max=sigma_max)
            lp, lp_tok = log_prob(x_next, mean, std)
            old = inputs["old_log_probs"][:, j]
            if tok_adv is None:
                per, clip = clipped_surrogate(lp, old, adv, args.epsilon, eps_high)
                step_loss = per.mean()
            else:
                # Per-token ratios against the rollout's per-token log-probs, weighted by per-token advantages.
                old_tok = inputs["old_log_prob_tokens"][:, j]
                per, clip = clipped_surrogate(lp_tok, old_tok, tok_adv, args.epsilon, eps_high)
                step_loss = per.mean()
            if args.beta > 0:
                with torch.no_grad():
                    if self.ref_transformer is not None:
                        v_ref = policy.velocity(x, sig, cond, transformer=self.ref_transformer, true_cfg_scale=args.true_cfg_scale)
                    else:
                        with policy.adapter_disabled(model):
                            v_ref = policy.velocity(x, sig, cond, transformer=model, true_cfg_scale=args.true_cfg_scale)
                    mean_ref, _ = step_mean_std(args.sde_type, x, v_ref, s, s_next, args.noise_level, sigma_max=sigma_max)
                kl, _ = kl_same_std(mean, mean_ref, std)
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

    # ------------------------------------------------------------------------------------------- updates
    def optimizer_step_hook(self) -> None:
        if self.ema is not None:
            self.ema.update(self.accelerator.unwrap_model(self.model))

    def _maybe_log_save_evaluate(self, tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time, learning_rate=None):
        # Called once per optimizer step: the place to update the EMA after the step.
        self.optimizer_step_hook()
        return super()._maybe_log_save_evaluate(tr_loss, grad_norm, model, trial, epoch, ignore_keys_for_eval, start_time,
                                                learning_rate=learning_rate)  # fmt: skip

    # ------------------------------------------------------------------------------------------- logging
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {k: sum(v) / len(v) for k, v in self._metrics[mode].items() if v}
        if mode == "eval":
            metrics = {f"eval_{k}": v for k, v in metrics.items()}
        logs = {**logs, **metrics}
        super().log(logs, start_time)
        self._metrics[mode].clear()
        if mode == "train" and self.args.log_samples and self._last_samples is not None and self.accelerator.is_main_process:
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
            row = [self.state.global_step, img(b["draft"][i]), img(b["reference"][i]), img(s["images"][i]), tgt, float(s["total"][i])]
            table.add_data(*row, *[float(v) for v in s["scores"][i]])
        wandb.log({"samples": table}, commit=False)

    # ------------------------------------------------------------------------------------------ held-out
    @torch.no_grad()
    def evaluate_rewards(self, dataset: TripletDataset | None = None, *, num_samples: int = 1, batch_size: int = 16,
                         seed: int = 1234) -> dict[str, float]:  # fmt: skip
        """Mean rewards of ODE samples on held-out triplets (EMA weights when EMA is on)."""
        from torch.utils.data import DataLoader

        from refiner_rl.evaluation import generate

        dataset = dataset if dataset is not None else self.eval_dataset
        model = self.accelerator.unwrap_model(self.model)
        ctx = self.ema.applied(model) if self.ema is not None else _nullctx()
        totals, per = [], defaultdict(list)
        with ctx:
            model.eval()
            for i, batch in enumerate(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_triplets)):
                images = generate(self.policy, batch, num_steps=self.args.num_inference_steps, seed=seed + i,
                                  start_sigma=self.args.start_sigma, paste=self.args.paste_back,
                                  true_cfg_scale=self.args.true_cfg_scale)  # fmt: skip
                scores, _ = self._score(batch, images)
                w = torch.tensor([r.weight for r in self.rewards])
                totals.append(torch.nansum(scores * w, dim=1))
                for j, name in enumerate(self.reward_names):
                    per[name].append(scores[:, j])
            model.train()
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
    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if self.ema is not None and self.args.should_save:
            path = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}", EMA_FILE)
            tmp = path + ".tmp"
            torch.save(self.ema.state_dict(), tmp)
            os.replace(tmp, path)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, EMA_FILE)
        if self.ema is not None:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"EMA is on but {path} is missing: resume with the same ema_decay the checkpoint was written with")
            self.ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        if resume_from_checkpoint is True:
            from transformers.trainer_utils import get_last_checkpoint

            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        if resume_from_checkpoint:
            import json

            with open(os.path.join(resume_from_checkpoint, "trainer_state.json")) as f:
                step = json.load(f)["global_step"]
            # The rollout counter follows the optimizer step, so window and noise continue where they stopped.
            self._step = step * self.args.gradient_accumulation_steps
            self._buffered_inputs = None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs)


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


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
