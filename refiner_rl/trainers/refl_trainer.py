"""Reward-gradient training (ReFL) of a flow-matching editor against a reference image (OneReward, arXiv 2508.21066).

Read top to bottom, one step is:
1. draw the task k ~ ``task_mix`` and the trained step t ~ U{t1..t2} (keyed by seed and step: every process draws the
   same), and per sample the noises eps1, eps2 (keyed by seed, step and record: independent of the process);
2. x_ref: the reference policy's full ODE sample from eps1 (no gradient): the LoRA switched off or a frozen copy
   (Alg. 1), or the EMA of the policy swapped in (Alg. 2);
3. the policy samples from eps2 down to sigma_t without gradient (:func:`refiner_rl.rollout.rollout`), then predicts
   ``x0 = x_t - sigma_t v_theta(x_t)`` in one forward WITH gradient, decoded with gradient;
4. every reward of task k scores x_theta through :meth:`Reward.score_tensors` (x_ref is the ``baseline`` column a
   pairwise judge compares with); loss = the weighted hinge of :func:`refl_loss`, one backward.
Only the one-step forward, the decode of x_theta and the rewards are differentiated.
"""

from __future__ import annotations

import logging

import torch
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from refiner_rl.configs import resolve_policy
from refiner_rl.data import BucketBatchOrderSampler, TripletDataset
from refiner_rl.distributed import keyed_generator, occurrence_keys
from refiner_rl.errors import ConfigError
from refiner_rl.evaluation import reward_columns
from refiner_rl.evaluation.loop import load_batch, record_batches, sample_batch
from refiner_rl.policies.base import EditorPolicy
from refiner_rl.rollout import initial_latents, paste_back, rollout
from refiner_rl.sampling import batch_conditions, sample_trajectories
from refiner_rl.scoring.base import BASELINE_FIELD, Reward
from refiner_rl.scoring.registry import check_required_fields
from refiner_rl.trainers.base import RewardTrainerMixin
from refiner_rl.trainers.refl_config import FlowReFLConfig

logger = logging.getLogger(__name__)


def refl_loss(scores: torch.Tensor, weights: torch.Tensor, margin: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, active)`` of rewards ``scores`` ``[B, K]`` (NaN = not scored, left out of its mean) with weights ``[K]``:

        loss = (1 / K) sum_k w_k mean_i max(0, margin - r_ik)      (margin None: -r_ik, no hinge)

    ``active``: the fraction of scored (sample, reward) pairs whose hinge is on (``r < margin``; 1 without a margin)."""
    valid = ~torch.isnan(scores)
    r = torch.where(valid, scores, torch.zeros_like(scores))
    per = -r if margin is None else torch.relu(margin - r)
    per_reward = (per * valid).sum(0) / valid.sum(0).clamp(min=1)
    loss = (weights.to(per_reward) * per_reward).sum() / scores.shape[1]
    on = valid if margin is None else valid & (r < margin)
    return loss, on.sum() / valid.sum().clamp(min=1)


class FlowReFLTrainer(RewardTrainerMixin, Trainer):
    """Reward-gradient fine-tuning of a :class:`EditorPolicy` with differentiable rewards."""

    evaluate_with_ema = False  # its EMA is the reference policy; held-out metrics are the policy's own
    ema_resume_hint = "resume with the reference (reference: ema) it was written with"

    def __init__(
        self,
        model: EditorPolicy | str,
        reward_funcs=None,
        args: FlowReFLConfig | None = None,
        train_dataset: TripletDataset | None = None,
        eval_dataset: TripletDataset | None = None,
        peft_config=None,
        callbacks=None,
    ):
        """TRL's signature, as :class:`FlowGRPOTrainer`'s. ``reward_funcs`` (or ``args.rewards``) must all be
        differentiable: a reward without ``differentiable = True`` (a plain function included) is a ConfigError."""
        if args is None:
            args = self.default_args(model, FlowReFLConfig, "ReFL")
        rewards = self._set_rewards(reward_funcs, args)
        for name, r in zip(self.reward_names, rewards):
            if not getattr(r, "differentiable", False):
                raise ConfigError(
                    f"reward {name!r} is not differentiable: refl back-propagates each reward into the image, so it "
                    "needs a Reward with differentiable = True and score_tensors (masked_pixel, patch_dreamsim, "
                    "dino_similarity, pairwise vlm_judge); train with it through `refiner-rl grpo` instead"
                )
        self.task_rewards = _task_rewards(args.task_mix, rewards, self.reward_names)
        # per-dimension metric names: a judge entry is named by its dimension(s), other rewards by their label
        self.metric_names = [
            "+".join(r.dimensions) if getattr(r, "dimensions", None) else name
            for name, r in zip(self.reward_names, rewards)
        ]
        if train_dataset is not None and getattr(train_dataset, "has_field", None) is not None:
            present = {k for k in ("reference", "target", "task") if train_dataset.has_field(k)}
            check_required_fields(rewards, {"prompt", "draft", "mask", BASELINE_FIELD} | present)
        policy = resolve_policy(model, args, peft_config)
        super().__init__(policy, args, train_dataset, eval_dataset, callbacks)
        self.model_accepts_loss_kwargs = False  # compute_loss returns a per-micro-batch mean
        for r in rewards:
            r.to(self.accelerator.device)
        self.reference_is_ema = args.reference == "ema"
        self.init_reward_state(
            policy, frozen_reference=args.reference == "frozen", ema=self.reference_is_ema, ema_decay=args.ema_decay
        )

    # ------------------------------------------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(ds, TripletDataset) and ds.buckets:
            return BucketBatchOrderSampler(ds, self._train_batch_size, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset) if train_dataset is not None else super()._get_train_sampler()

    # ------------------------------------------------------------------------------------------------ draws
    def draw_task_and_step(self) -> tuple[str, int]:
        """Task ``k ~ task_mix`` and trained step ``t ~ U{t1..t2}`` of this optimizer step (the same on every process
        and on a resumed run)."""
        a = self.args
        g = keyed_generator(a.seed, self.state.global_step, -1)
        tasks = list(a.task_mix)
        k = int(torch.multinomial(torch.tensor([a.task_mix[x] for x in tasks]), 1, generator=g))
        t = int(torch.randint(a.t1, a.t2 + 1, (1,), generator=g))
        return tasks[k], t

    def _generators(self, inputs: dict, which: int) -> list[torch.Generator]:
        """One generator per sample keyed by (seed, step, record, occurrence, which): eps1 (1) and eps2 (2)."""
        step = self.state.global_step
        return [keyed_generator(self.args.seed, step, i, k, which) for i, k in occurrence_keys(inputs["index"])]

    # --------------------------------------------------------------------------------------------- images
    @torch.no_grad()
    def reference_images(self, model, inputs: dict, cond) -> torch.Tensor:
        """x_ref ``[B, 3, H, W]``: the reference policy's full ODE sample from eps1, without gradient."""
        a = self.args
        with self.reference_transformer(model) as ref:
            return sample_trajectories(
                self.policy,
                inputs,
                cond,
                num_steps=a.num_inference_steps,
                generator=self._generators(inputs, 1),
                start_sigma=a.start_sigma,
                paste=a.paste_back,
                transformer=ref,
            )[2]

    def one_step_images(self, model, inputs: dict, cond, t: int) -> torch.Tensor:
        """x_theta ``[B, 3, H, W]``: the policy's steps ``0..t-1`` from eps2 without gradient, then
        ``x0 = x_t - sigma_t v_theta(x_t)`` and its decode WITH gradient."""
        a, policy = self.args, self.policy
        sigmas = policy.sigmas(a.num_inference_steps, cond.num_target_tokens, a.start_sigma)
        draft = policy.encode_images(inputs["draft"].to(policy.device)) if a.start_sigma < 1 else None
        with torch.no_grad():
            x = initial_latents(policy, cond, self._generators(inputs, 2), float(sigmas[0]), draft)
            if t > 0:
                x = rollout(policy, cond, sigmas[: t + 1], x=x, transformer=model).latents
        s = float(sigmas[t])
        v = policy.velocity(x, torch.full((x.shape[0],), s, device=x.device), cond, transformer=model)
        x0 = x - s * v

        def decode(z):
            return policy.decode_with_grad(z, cond.grid)

        images = checkpoint(decode, x0, use_reentrant=False) if a.decode_checkpointing else decode(x0)
        if a.paste_back:
            images = paste_back(images, inputs["draft"], inputs["mask"])
        return images

    # ----------------------------------------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """:func:`refl_loss` of the task's rewards on x_theta (against x_ref), from one differentiated forward."""
        task, t = self.draw_task_and_step()
        cond, _ = batch_conditions(self.policy, inputs)
        x_ref = self.reference_images(model, inputs, cond)
        images = self.one_step_images(model, inputs, cond, t)
        columns = {**reward_columns(inputs), "prompt": list(inputs["prompt"]), BASELINE_FIELD: x_ref}
        # task records (mask-guided) are each scored by their own task's rewards, else the whole batch by the drawn
        # task's; the batch's loss is the groups' losses weighted by their rows
        groups = _rows_by_task(inputs["task"], self.args.task_mix) if "task" in inputs else {task: None}
        loss = 0.0
        for task, rows in groups.items():
            idx = self.task_rewards[task]
            part_in, part_cols, part_images, part_ref = (
                (inputs, columns, images, x_ref) if rows is None else _take((inputs, columns, images, x_ref), rows)
            )
            scores = torch.stack(
                [self.rewards[j].score_tensors(part_images, part_cols).to(images.device) for j in idx], 1
            )
            part, active = refl_loss(scores, self.reward_weights[idx], self.args.margin)
            loss = part if rows is None else loss + part * len(rows) / images.shape[0]
            self._record(task, t, idx, scores.detach(), active, part_in, part_images, part_ref)
        return (loss, {"images": images}) if return_outputs else loss

    def _record(self, task, t, idx, scores, active, inputs, images, x_ref) -> None:
        m = self._metrics["train"]
        means = torch.nanmean(scores, 0).tolist()
        for j, mean in zip(idx, means):
            m[f"rewards/{task}/{self.metric_names[j]}/mean"].append(mean)
        w = self.reward_weights[idx]
        m["reward"].append(float((w * torch.tensor(means)).sum() / len(idx)))
        m["hinge_active_frac"].append(float(active))
        m["t"].append(float(t))
        for name in self.args.task_mix:
            m[f"task/{name}"].append(float(name == task))
        full = torch.full((scores.shape[0], len(self.rewards)), float("nan"))
        full[:, idx] = scores.float().cpu()
        self._last_samples = {
            "batch": {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()},
            "images": images.detach().float().cpu(),
            "x_ref": x_ref.float().cpu(),
            "scores": full,
            "total": (torch.nan_to_num(full[:, idx]) * w).sum(1) / len(idx),
        }

    # ------------------------------------------------------------------------------------------- logging
    def sample_grid_rows(self) -> list[list[torch.Tensor]] | None:
        """draft | reference | x_theta | target | x_ref of the last training batch."""
        rows = super().sample_grid_rows()
        return None if rows is None else [row + [self._last_samples["x_ref"][i]] for i, row in enumerate(rows)]

    # ------------------------------------------------------------------------------------------ held-out
    def evaluation_settings(self) -> dict:
        """The shared settings (:meth:`RewardTrainerMixin.evaluation_settings`); rewards that read the ``baseline``
        column get the reference policy's held-out samples (:meth:`_before_evaluation` makes them)."""
        out = super().evaluation_settings()
        baseline = getattr(self, "_eval_baseline", None)
        out["rewards"] = [WithBaseline(r, baseline) if _reads_baseline(r) and baseline else r for r in self.rewards]
        return out

    def _before_evaluation(self, dataset) -> None:
        """Held-out metrics are of the policy's own weights (never the EMA reference's): masked MSE and the rewards'
        ``score`` means. A pairwise judge against x_ref scores the policy's sample against the reference policy's
        sample of the same record and noise (P(Yes | x_theta, x_ref): about its value for two equal images at the
        start)."""
        self._eval_baseline = None
        if dataset is not None and any(_reads_baseline(r) for r in self.rewards):
            self._eval_baseline = self._held_out_references(dataset)

    def _held_out_references(self, ds) -> dict[int, torch.Tensor]:
        """The reference policy's ODE sample of every held-out record (by record index), sampled as the held-out
        evaluation samples the policy: the same batches and record ``i``'s noise from ``(EVAL_SEED, i)``. At the
        start of a frozen-reference run the two samples are equal."""
        a, model = self.args, self.accelerator.unwrap_model(self.model)
        sampler = self.sampler_settings()
        out = {}
        with self.reference_transformer(model) as ref:
            for idx in record_batches(ds, range(len(ds)), a.per_device_eval_batch_size):
                out.update(zip(idx, sample_batch(self.policy, load_batch(ds, idx), sampler, transformer=ref)))
        return out

    # ------------------------------------------------------------------------------------- checkpointing


def _task_rewards(task_mix: dict[str, float], rewards, names: list[str]) -> dict[str, list[int]]:
    """Indices of the rewards that score each task: a reward with a ``task`` attribute scores that task only, one
    without scores every task. ConfigError for a task with no reward, or a reward whose task is never drawn."""
    out = {task: [] for task in task_mix}
    for j, r in enumerate(rewards):
        task = getattr(r, "task", None)
        if task is None:
            for ids in out.values():
                ids.append(j)
        elif task in out:
            out[task].append(j)
        else:
            raise ConfigError(
                f"reward {names[j]!r} scores task {task!r}, which `task_mix` ({', '.join(task_mix)}) never draws: "
                "add it to task_mix or remove the reward"
            )
    empty = [task for task, ids in out.items() if not ids]
    if empty:
        raise ConfigError(
            f"`task_mix` task(s) {', '.join(map(repr, empty))} have no reward: add a reward with that task"
        )
    return out


def _take(parts: tuple, rows: list[int]) -> tuple:
    """``rows`` of each part: a tensor (by index, on its own device), a list, or a dict of tensors and lists."""

    def take(v):
        if isinstance(v, dict):
            return {k: take(x) for k, x in v.items()}
        if isinstance(v, list):
            return [v[i] for i in rows]
        return v[torch.tensor(rows, device=v.device)]

    return tuple(take(p) for p in parts)


def _rows_by_task(tasks: list[str], task_mix: dict[str, float]) -> dict[str, list[int]]:
    """``{task: row indices}`` of a batch of mask-guided task records; a ConfigError for a task ``task_mix`` lacks
    (its rewards are then unknown)."""
    out: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        if task not in task_mix:
            raise ConfigError(
                f"a training record has task {task!r}, which `task_mix` ({', '.join(task_mix)}) does not list: add it "
                "with its rewards (for task records the data sets the mix; task_mix names the tasks)"
            )
        out.setdefault(task, []).append(i)
    return out


def _reads_baseline(reward) -> bool:
    return BASELINE_FIELD in getattr(reward, "required_fields", ())


class WithBaseline(Reward):
    """``reward`` with the ``baseline`` column filled from ``images`` (record index -> image), for held-out scoring."""

    def __init__(self, reward: Reward, images: dict[int, torch.Tensor]):
        super().__init__(device=reward.device, dtype=reward.dtype)
        self.reward, self.images = reward, images
        self.name, self.required_fields = reward.name, reward.required_fields

    def score(self, prompts, completions, **columns) -> list[float | None]:
        baseline = [self.images[int(i)] for i in columns["index"]]
        return self.reward.score(prompts, completions, **{**columns, BASELINE_FIELD: baseline})
