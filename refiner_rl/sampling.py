"""The one sampling path: conditions from a batch, then trajectories and images.

The GRPO rollout (SDE window + ODE elsewhere), held-out evaluation and the demo (ODE only) all go through
:func:`sample_trajectories`; :func:`sample_images` is its ODE-only form. Text embeddings of a batch are built
by :func:`batch_text` (precomputed columns, or the policy's encoders), which SFT uses too.

A batch is what :func:`refiner_rl.data.collate_triplets` returns: ``prompt``, ``index``, ``draft``,
``reference`` (absent for mask-guided task records; ``reference_2``, ... for records with several), ``mask`` (and ``target``, ``task``, ``prompt_embeds``,
``pooled_prompt_embeds`` when the data has them). The editor reads its own condition columns
(:attr:`EditorPolicy.condition_fields`).
Samples with the same ``index`` share a record; a batch without ``index`` holds one record per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from refiner_rl.data.records import reference_columns
from refiner_rl.focus import FocusSettings
from refiner_rl.policies.base import EditorPolicy
from refiner_rl.policies.flux import Conditions, TextEmbeds
from refiner_rl.rollout import Trajectory, coarse_tail, initial_latents, paste_back, rollout


def groups(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(unique record indices, first sample of each, group of each sample)`` of a batch's ``index`` column."""
    index = torch.as_tensor(index)
    uniq, inverse = torch.unique(index, return_inverse=True)
    first = torch.stack([(index == u).nonzero()[0, 0] for u in uniq])
    return uniq, first, inverse


def batch_text(
    policy: EditorPolicy, batch: dict, rows: torch.Tensor | None = None, drop: torch.Tensor | None = None
) -> TextEmbeds:
    """Text embeddings of ``batch`` (of its ``rows`` when given): the precomputed ``prompt_embeds`` /
    ``pooled_prompt_embeds`` columns when present, else the policy's encoders on ``prompt``.

    ``drop`` (bool per row) replaces a row's instruction by the empty one: zero embeddings when precomputed,
    the empty prompt otherwise (caption dropout)."""
    n = len(batch["prompt"])
    rows = torch.arange(n) if rows is None else rows.cpu()
    drop = torch.zeros(len(rows), dtype=torch.bool) if drop is None else drop.cpu().bool()
    if "prompt_embeds" in batch:
        seq, pooled = batch["prompt_embeds"][rows].clone(), batch["pooled_prompt_embeds"][rows].clone()
        seq[drop], pooled[drop] = 0.0, 0.0
        return TextEmbeds(seq.to(policy.device, policy.dtype), pooled.to(policy.device, policy.dtype))
    prompts = ["" if d else batch["prompt"][i] for i, d in zip(rows.tolist(), drop.tolist())]
    return policy.encode_prompts(prompts)


@torch.no_grad()
def batch_conditions(
    policy: EditorPolicy, batch: dict, negative_prompt: str | None = None
) -> tuple[Conditions, torch.Tensor]:
    """Per-sample conditions of ``batch``, each distinct record (``index``) encoded once, and the group of each
    sample. ``negative_prompt`` (for true CFG) adds negative embeddings."""
    _, first, inverse = groups(_index(batch))
    dev = policy.device
    negative = [negative_prompt] * len(first) if negative_prompt is not None else None
    columns = (*policy.condition_fields, *reference_columns(batch), "index")  # every reference of a record
    rows = {k: batch[k][first] for k in columns if k in batch}
    cond = policy.encode_batch(rows, batch_text(policy, batch, first), negative)
    return cond.select(inverse.to(dev)), inverse


Generators = torch.Generator | Sequence[torch.Generator]


@torch.no_grad()
def sample_trajectories(
    policy: EditorPolicy,
    batch: dict,
    cond: Conditions,
    *,
    num_steps: int,
    generator: Generators,
    init_generator: Generators | None = None,
    sde_steps: Sequence[int] = (),
    rule: str = "flow_sde",
    noise_level: float = 0.9,
    start_sigma: float = 1.0,
    shared_initial_noise: bool = False,
    tail_steps: int | None = None,
    true_cfg_scale: float = 1.0,
    paste: bool = False,
    micro_batch: int | None = None,
    transformer=None,
) -> tuple[list[Trajectory], torch.Tensor, torch.Tensor]:
    """Trajectories (in micro-batches of ``micro_batch`` samples), the sigma schedule and the decoded images
    ``[B, 3, H, W]`` of ``batch`` under conditions ``cond``.

    - The schedule has ``num_steps`` steps from ``start_sigma`` to 0; below 1 the start is the draft noised to
      ``start_sigma`` (``x = (1 - s) z_draft + s eps``), else pure noise.
    - Initial noise comes from ``init_generator`` when given, else ``generator``; SDE steps' noise from
      ``generator`` (one generator, or one per sample so each sample's noise is its own).
    - With ``shared_initial_noise`` and an ``init_generator``, the ODE steps before the first SDE step run once per
      record (its samples start from one noise) and the group branches at the window.
    - With SDE steps, the steps after the window may run on a coarser schedule (``tail_steps``, see
      :func:`refiner_rl.rollout.coarse_tail`); without them the full schedule runs.
    - ``paste`` keeps the draft outside the mask (``M * x + (1 - M) * draft``)."""
    sigmas = policy.sigmas(num_steps, cond.num_target_tokens, start_sigma)
    draft_latents = policy.encode_images(batch["draft"].to(policy.device)) if start_sigma < 1 else None
    init = generator if init_generator is None else init_generator
    x = initial_latents(policy, cond, init, float(sigmas[0]), draft_latents)
    w = min(sde_steps) if len(sde_steps) and init_generator is not None and shared_initial_noise else 0
    if w > 0:
        _, first, inverse = groups(_index(batch))
        first = first.to(x.device)
        prefix = rollout(
            policy,
            cond.select(first),
            sigmas[: w + 1],
            x=x[first],
            true_cfg_scale=true_cfg_scale,
            transformer=transformer,
        )
        x = prefix.latents[inverse.to(x.device)]
    run_sigmas = coarse_tail(sigmas, max(sde_steps) + 1, tail_steps) if len(sde_steps) else sigmas
    trajs, mb = [], micro_batch or x.shape[0]
    for i in range(0, x.shape[0], mb):
        sl = slice(i, i + mb)
        gen = generator[sl] if isinstance(generator, (list, tuple)) else generator  # per-sample ones follow it
        t = rollout(
            policy,
            cond.select(sl),
            run_sigmas[w:],
            x=x[sl],
            sde_steps=[k - w for k in sde_steps],
            rule=rule,
            noise_level=noise_level,
            generator=gen,
            true_cfg_scale=true_cfg_scale,
            transformer=transformer,
            sigma_max=sigmas[1] if len(sigmas) > 1 else None,
        )
        trajs.append(replace(t, sde_steps=[k + w for k in t.sde_steps], sigmas=sigmas))
    images = policy.decode(torch.cat([t.latents for t in trajs]), cond.grid)
    if paste:
        images = paste_back(images, batch["draft"], batch["mask"])
    return trajs, sigmas, images


@torch.no_grad()
def sample_images(
    policy: EditorPolicy,
    batch: dict,
    *,
    num_steps: int = 10,
    seed: int | None = 0,
    generators: Generators | None = None,
    start_sigma: float = 1.0,
    paste: bool = False,
    true_cfg_scale: float = 1.0,
    negative_prompt: str = "",
    micro_batch: int | None = None,
    transformer=None,
    focus: FocusSettings | None = None,
) -> torch.Tensor:
    """Refined images ``[B, 3, H, W]`` in [0, 1] of a collated batch by ODE sampling: deterministic given
    ``seed`` (one generator for the batch) or ``generators`` (one per sample). True CFG runs with the
    ``negative_prompt`` when ``true_cfg_scale > 1``.

    With ``focus`` (region-focused refinement) the crop around each mask is refined at the working size and pasted
    back feathered into the full draft (:mod:`refiner_rl.focus`); ``paste`` then acts inside the crop. To score on the
    crop instead, sample ``focus.crop(batch, multiple).batch`` without ``focus``."""
    if generators is None:
        generators = torch.Generator().manual_seed(int(seed or 0))
    if focus is not None:
        crop = focus.crop(batch, policy.size_multiple)
        kwargs = dict(start_sigma=start_sigma, paste=paste, true_cfg_scale=true_cfg_scale, micro_batch=micro_batch)
        out = sample_images(
            policy,
            crop.batch,
            num_steps=num_steps,
            generators=generators,
            negative_prompt=negative_prompt,
            transformer=transformer,
            **kwargs,
        )
        return crop.paste_back(out, focus.feather, focus.ramp)[0]
    cond, _ = batch_conditions(policy, batch, negative_prompt if true_cfg_scale > 1 else None)
    _, _, images = sample_trajectories(
        policy,
        batch,
        cond,
        num_steps=num_steps,
        generator=generators,
        start_sigma=start_sigma,
        true_cfg_scale=true_cfg_scale,
        paste=paste,
        micro_batch=micro_batch,
        transformer=transformer,
    )
    return images


def _index(batch: dict) -> torch.Tensor:
    """The batch's record index per sample (each sample its own record when the batch has none)."""
    return batch["index"] if "index" in batch else torch.arange(len(batch["prompt"]))
