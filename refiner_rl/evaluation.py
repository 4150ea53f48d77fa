"""Held-out evaluation of a refiner: sample with ODE steps and measure error inside and outside the mask."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from refiner_rl.data import TripletDataset, collate_triplets
from refiner_rl.policies.kontext import KontextPolicy
from refiner_rl.rollout import initial_latents, paste_back, rollout, sampling_sigmas


def masked_mse(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-image ``sum(W * mean_c (a - b)^2) / sum(W)``; NaN where ``W`` is empty."""
    err = (a.float() - b.float()).pow(2).mean(1, keepdim=True)
    w = weight.float()
    return (err * w).flatten(1).sum(1) / w.flatten(1).sum(1)


@torch.no_grad()
def generate(
    policy: KontextPolicy,
    batch: dict,
    *,
    num_steps: int = 10,
    seed: int = 0,
    start_sigma: float = 1.0,
    paste: bool = False,
    true_cfg_scale: float = 1.0,
) -> torch.Tensor:
    """Refined images ``[B, 3, H, W]`` for a collated batch (ODE sampling, deterministic given ``seed``)."""
    dev = policy.device
    text = None
    if "prompt_embeds" in batch:
        from refiner_rl.policies.kontext import TextEmbeds

        text = TextEmbeds(
            batch["prompt_embeds"].to(dev, policy.dtype), batch["pooled_prompt_embeds"].to(dev, policy.dtype)
        )
    cond = policy.encode_conditions(
        batch["draft"].to(dev), batch["reference"].to(dev), prompts=batch["prompt"], text=text
    )
    sigmas = sampling_sigmas(num_steps, cond.num_target_tokens, start_sigma)
    g = torch.Generator().manual_seed(seed)
    draft_latents = policy.encode_images(batch["draft"].to(dev)) if start_sigma < 1.0 else None
    x = initial_latents(policy, cond, g, float(sigmas[0]), draft_latents)
    traj = rollout(policy, cond, sigmas, x=x, true_cfg_scale=true_cfg_scale)
    images = policy.decode(traj.latents, cond.grid)
    return paste_back(images, batch["draft"], batch["mask"]) if paste else images


@torch.no_grad()
def evaluate_refinement(
    policy: KontextPolicy,
    dataset: TripletDataset,
    *,
    num_steps: int = 10,
    batch_size: int = 16,
    seed: int = 0,
    start_sigma: float = 1.0,
    paste: bool = False,
) -> dict[str, float]:
    """Mean MSE inside/outside the mask of the output and of the draft, both against the target."""
    sums = {"output_in": 0.0, "output_out": 0.0, "draft_in": 0.0, "draft_out": 0.0}
    n = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_triplets)
    for i, batch in enumerate(loader):
        out = generate(policy, batch, num_steps=num_steps, seed=seed + i, start_sigma=start_sigma, paste=paste)
        t, d, m = batch["target"].to(out.device), batch["draft"].to(out.device), batch["mask"].to(out.device)
        sums["output_in"] += masked_mse(out, t, m).sum().item()
        sums["output_out"] += torch.nan_to_num(masked_mse(out, t, 1 - m)).sum().item()
        sums["draft_in"] += masked_mse(d, t, m).sum().item()
        sums["draft_out"] += torch.nan_to_num(masked_mse(d, t, 1 - m)).sum().item()
        n += out.shape[0]
    res = {f"mse_{k}": v / n for k, v in sums.items()}
    res["mse_in_ratio"] = res["mse_output_in"] / max(res["mse_draft_in"], 1e-12)
    return res
