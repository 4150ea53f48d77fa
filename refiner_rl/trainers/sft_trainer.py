"""SFT stage: teach the editor to take the draft and the reference together (OmniRefiner stage 1).

Per batch (with ``focus_crop``, the crop around each mask at the working size): encode the conditions once, draw
sigma and noise, form ``x_s = (1 - s) x0 + s eps`` from the target's latents, run the policy's one velocity forward,
and minimise the mask-weighted rectified-flow loss against ``eps - x0``.
"""

from __future__ import annotations

import math

import torch
from transformers import Trainer

from refiner_rl.data import BucketBatchOrderSampler, TripletDataset, collate_triplets
from refiner_rl.distributed import keyed_generator, occurrence_keys
from refiner_rl.dynamics.schedules import loss_weighting, sample_training_sigmas
from refiner_rl.policies.base import EditorPolicy
from refiner_rl.policies.flux import TextEmbeds
from refiner_rl.sampling import batch_text
from refiner_rl.trainers.base import PolicyTrainerMixin, grid_row
from refiner_rl.trainers.losses import mask_weighted_flow_loss
from refiner_rl.trainers.sft_config import FlowSFTConfig


class CurriculumSampler(torch.utils.data.Sampler):
    """A curriculum's phases one after another: phase ``k`` (records ``[start_k, end_k)``, fraction ``f_k``) fills
    optimizer steps ``round(F_{k-1} S) .. round(F_k S)`` (``F_k`` = f_1 + ... + f_k, ``S`` steps of ``per_step``
    samples), drawing its records in seeded permutations, a fresh one per pass."""

    def __init__(self, phases, steps: int, per_step: int, seed: int = 0):
        self.phases, self.steps, self.per_step, self.seed = list(phases), int(steps), int(per_step), seed

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        done, cum = 0, 0.0
        for k, (start, end, fraction) in enumerate(self.phases):
            cum += fraction
            stop = self.steps if k == len(self.phases) - 1 else round(cum * self.steps)
            count, done = (stop - done) * self.per_step, stop
            out: list[int] = []
            while len(out) < count:
                out += (start + torch.randperm(end - start, generator=g)).tolist()
            yield from out[:count]

    def __len__(self) -> int:
        return self.steps * self.per_step


class FlowSFTTrainer(PolicyTrainerMixin, Trainer):
    """``transformers.Trainer`` over a :class:`EditorPolicy`; only the transformer (or its LoRA) trains."""

    def __init__(
        self,
        model: EditorPolicy | str,
        args: FlowSFTConfig | None = None,
        train_dataset: TripletDataset | None = None,
        eval_dataset: TripletDataset | None = None,
        peft_config=None,
        callbacks=None,
    ):
        """TRL's signature: ``model`` is a :class:`EditorPolicy`, ``"tiny"``, a diffusers repo id or a local
        folder; ``peft_config`` a peft ``LoraConfig`` attached to its transformer."""
        from refiner_rl.configs import resolve_policy

        if args is None:
            args = self.default_args(model, FlowSFTConfig, "SFT")
        super().__init__(resolve_policy(model, args, peft_config), args, train_dataset, eval_dataset, callbacks)

    # ------------------------------------------------------------------------------------------------ data
    def _get_train_sampler(self, train_dataset=None):
        ds = train_dataset if train_dataset is not None else self.train_dataset
        if getattr(ds, "curriculum", None):
            a = self.args
            per_step = self._train_batch_size * a.gradient_accumulation_steps * a.world_size
            steps = a.max_steps if a.max_steps > 0 else math.ceil(len(ds) * a.num_train_epochs / per_step)
            return CurriculumSampler(ds.curriculum, steps, per_step, seed=a.seed)
        if isinstance(ds, TripletDataset) and ds.buckets:
            return BucketBatchOrderSampler(ds, self._train_batch_size, seed=self.args.seed)
        return super()._get_train_sampler(train_dataset) if train_dataset is not None else super()._get_train_sampler()

    # --------------------------------------------------------------------------------------------- samples
    def sample_grid_rows(self) -> list[list[torch.Tensor]]:
        """draft | reference | sample | target for the first ``num_sample_images`` held-out records (training
        records without a held-out set), sampled with the same seed every time so grids compare across steps."""
        from refiner_rl.sampling import sample_images

        ds = self.eval_dataset if self.eval_dataset is not None else self.train_dataset
        batch = collate_triplets([ds[i] for i in range(min(self.args.num_sample_images, len(ds)))])
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        try:
            images = sample_images(
                self.policy,
                batch,
                num_steps=self.args.sample_inference_steps,
                seed=self.args.seed,
                transformer=model,
                focus=self.args.focus_settings(),
            ).cpu()
        finally:
            model.train(was_training)
        return [grid_row(batch, i, images[i]) for i in range(images.shape[0])]

    # ------------------------------------------------------------------------------------------------ loss
    def _sample_generators(self, inputs: dict) -> list[torch.Generator]:
        """One generator per sample, keyed by (seed, optimizer step, record, occurrence): caption dropout, sigma and
        noise do not depend on which process holds the sample, so N processes x B samples train exactly like
        1 process x N*B, and a resumed run draws what the uninterrupted one drew."""
        step = self.state.global_step
        return [keyed_generator(self.args.seed, step, i, k) for i, k in occurrence_keys(inputs["index"])]

    def _text(self, inputs: dict, gens: list[torch.Generator]) -> TextEmbeds:
        prompts = list(inputs["prompt"])
        if self.model.training:
            drop = torch.cat([torch.rand(1, generator=g) for g in gens]) < self.args.caption_dropout
        else:
            drop = torch.zeros(len(prompts), dtype=torch.bool)
        return batch_text(self.policy, inputs, drop=drop)  # dropped: zero embeddings, or the empty prompt

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        policy, args = self.policy, self.args
        dev = policy.device
        focus = args.focus_settings()
        if focus is not None:  # region-focused: the loss is on the crop around the mask, at the working size
            inputs = focus.crop(inputs, policy.size_multiple).batch
        gens = self._sample_generators(inputs)
        cond = policy.encode_batch(inputs, self._text(inputs, gens))
        x0 = policy.encode_images(inputs["target"].to(dev))
        sigma = torch.cat(
            [
                sample_training_sigmas(
                    1,
                    args.timestep_sampling,
                    args.logit_mean,
                    args.logit_std,
                    args.mode_scale,
                    generator=g,
                    shift=args.timestep_shift,
                )
                for g in gens
            ]
        ).to(dev)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(dev, x0.dtype)
        s = sigma.view(-1, 1, 1)
        xt = (1.0 - s) * x0 + s * noise
        v = policy.velocity(xt, sigma, cond, transformer=model)
        mask_tokens = policy.mask_to_tokens(inputs["mask"])
        loss = mask_weighted_flow_loss(
            v, noise - x0, mask_tokens, args.mask_weight, loss_weighting(sigma, args.loss_weighting)
        )
        return (loss, {"velocity": v}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None
