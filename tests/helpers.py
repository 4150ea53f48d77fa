"""Small builders shared by the tests."""

from __future__ import annotations

import json
import operator
import os

import torch

from refiner_rl.data import TripletDataset, synthetic_records
from refiner_rl.policies import KontextPolicy

SMALL = dict(num_layers=1, num_single_layers=1, num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6))


# The learning tests' seed: the model's random draw, their data and their noise. 0 unless
# bench/learning_margins.py sets it to measure the tests' figures over seeds.
LEARNING_SEED = int(os.environ.get("REFINER_RL_LEARNING_SEED", "0"))
FIGURES_FILE = os.environ.get("REFINER_RL_LEARNING_FIGURES")  # where learning_figure() appends (JSON lines)
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}


def learning_figure(name: str, value: float, op: str, threshold: float) -> None:
    """Assert a learning test's figure: ``value op threshold``. When bench/learning_margins.py runs the test (its
    figures file is set), record the figure there instead and go on, so every figure of a run is measured; the bench
    compares them with their thresholds."""
    value = float(value)
    if FIGURES_FILE:
        row = {"figure": name, "value": value, "op": op, "threshold": threshold, "seed": LEARNING_SEED}
        with open(FIGURES_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        return
    assert _OPS[op](value, threshold), f"{name}: {value:.4g} is not {op} {threshold:.4g} (seed {LEARNING_SEED})"


def data_seeds(seed: int = LEARNING_SEED) -> tuple[int, int]:
    """Seeds of a learning test's training and held-out synthetic sets: (0, 1) for seed 0, disjoint for any seed."""
    return 10 * seed, 10 * seed + 1


def small_policy(lora: bool = False, rank: int = 4, seed: int = 0, **overrides) -> KontextPolicy:
    torch.manual_seed(seed)
    p = KontextPolicy.tiny(**{**SMALL, **overrides})
    if lora:
        p.add_lora(rank=rank)
    return p


def perturb_lora(policy: KontextPolicy, scale: float = 0.05, seed: int = 1) -> None:
    """LoRA B starts at zero, so a fresh adapter equals its reference (KL 0, ratio 1): give it some weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# Trainer options every test run shares: log each step, no checkpoints, no reporters, CPU, no bars, seed 0.
QUIET = dict(logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
LEARNING = {**QUIET, "seed": LEARNING_SEED}  # the same, seeded for a learning test


def learning_run(trainer_cls, args, size: int) -> dict:
    """Train a small policy on 64 synthetic triplets and evaluate 16 held-out ones before and after: the learning
    tests' common run, drawn from :data:`LEARNING_SEED` (``args.seed`` is the trainer's). Returns ``{"before",
    "after"}`` held-out metrics without the ``eval_`` prefix and ``logs`` (the logged steps that carry a reward)."""
    train_seed, held_seed = data_seeds()
    train = TripletDataset(synthetic_records(64, seed=train_seed, size=size), None, multiple=4)
    held_out = TripletDataset(synthetic_records(16, seed=held_seed, size=size), None, multiple=4)
    trainer = trainer_cls(small_policy(seed=LEARNING_SEED), args=args, train_dataset=train, eval_dataset=held_out)
    before = unprefixed(trainer.evaluate())
    trainer.train()
    after = unprefixed(trainer.evaluate())
    logs = [h for h in trainer.state.log_history if "reward" in h]
    return {"before": before, "after": after, "logs": logs}


@torch.no_grad()
def recompute_log_probs(trainer, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs ``[B, K]`` and per-token ``[B, K, N]`` of a GRPO rollout's stored next states under ``model``:
    what the loss compares with ``old_log_probs`` (equal before any update: the ratio invariant)."""
    from refiner_rl.dynamics import log_prob

    out = [
        log_prob(inputs["next_states"][:, j], *trainer.objective.step_distribution(model, inputs, j))
        for j in range(len(inputs["sde_steps"]))
    ]
    return torch.stack([o[0] for o in out], 1), torch.stack([o[1] for o in out], 1)


def unprefixed(metrics: dict) -> dict:
    return {k.removeprefix("eval_"): v for k, v in metrics.items()}


def synthetic_dataset(n: int = 8, seed: int = 0, size: int = 32, **kw) -> TripletDataset:
    return TripletDataset(synthetic_records(n, seed=seed, size=size), None, multiple=4, **kw)


def tiny_pipeline(transformer=None, **spec_overrides):
    """A diffusers ``FluxKontextPipeline`` over the tiny components (text encoders, tokenizers, transformer) with
    a small ``AutoencoderKL`` standing in for the pixel codec: what a user loads our LoRA / transformer into."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    from refiner_rl.policies.tiny import tiny_components

    c = tiny_components(**spec_overrides)
    vae = AutoencoderKL(
        block_out_channels=(4, 4),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=12,
        norm_num_groups=1,
        layers_per_block=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0,
        scaling_factor=1.0,
    )
    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        text_encoder_2=c["text_encoder_2"],
        tokenizer_2=c["tokenizer_2"],
        transformer=transformer or c["transformer"],
    )
