"""GRPO back-propagates each trained step as soon as its loss is formed: the accumulated gradient, the returned
loss and the logged ratio/clip/KL statistics equal those of one backward over the whole loss, written here from
the public pieces (``GRPOObjective.step_distribution``, ``log_prob``, ``clipped_surrogate``, ``kl_same_std``)."""

import pytest
import torch

from refiner_rl.dynamics import kl_same_std, log_prob
from refiner_rl.trainers.grpo_trainer import FlowGRPOTrainer
from refiner_rl.trainers.losses import clipped_surrogate
from tests.test_grpo_invariant import _trainer as small_grpo_trainer

pytestmark = pytest.mark.usefixtures("one_thread")

GA = 2  # gradient-accumulation micro-batches: the loss is divided by them, per step as in one backward
# How far the policy is moved after the rollout, and a clip range that some of the ratios then leave (measured:
# |log ratio| up to ~5e-5 for the LoRA, ~4e-4 for the full fine-tune).
MOVE = {True: (3e-2, 1e-5), False: (1e-3, 1e-4)}  # lora -> (perturbation std, epsilon)


def _trainer(tmp_path, lora: bool, beta: float) -> FlowGRPOTrainer:
    """The invariant tests' small trainer (LoRA perturbed), with a 3-step window of flow_sde steps."""
    trainer = small_grpo_trainer(
        tmp_path, lora, sde_type="flow_sde", sde_window_size=3, beta=beta, epsilon=MOVE[lora][1]
    )
    trainer.current_gradient_accumulation_steps = GA
    return trainer


def _reference_loss(trainer: FlowGRPOTrainer, model, inputs: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """``(1/K) sum_j [mean_i clipped surrogate + beta KL_j]`` with every step's graph alive, and the mean
    over steps of each step's ratio / clip fractions / KL."""
    args, k = trainer.args, len(inputs["sde_steps"])
    clips = {"clip_ratio/low_mean": "low", "clip_ratio/high_mean": "high", "clip_ratio/region_mean": "region"}
    total, stats = 0.0, {"ratio": 0.0, "kl": 0.0, **dict.fromkeys(clips, 0.0)}
    for j in range(k):
        mean, std = trainer.objective.step_distribution(model, inputs, j)
        lp, _ = log_prob(inputs["next_states"][:, j], mean, std)
        eps = args.epsilon
        per, clip = clipped_surrogate(lp, inputs["old_log_probs"][:, j], inputs["advantages"], eps, eps)
        loss = per.mean()
        if args.beta > 0:
            with torch.no_grad():
                if trainer.ref_transformer is not None:
                    ref_mean = trainer.objective.step_distribution(trainer.ref_transformer, inputs, j)[0]
                else:
                    with trainer.policy.adapter_disabled(model):
                        ref_mean = trainer.objective.step_distribution(model, inputs, j)[0]
            kl, _ = kl_same_std(mean, ref_mean, std)
            loss = loss + args.beta * kl.mean()
            stats["kl"] += kl.mean().item() / k
        total = total + loss / k
        stats["ratio"] += clip["ratio"].mean().item() / k
        for key, name in clips.items():
            stats[key] += clip[name].mean().item() / k
    return total, stats


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("beta", [0.0, 0.05], ids=["no_kl", "kl"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_per_step_backward_gives_the_gradient_of_one_backward(tmp_path, lora, beta):
    trainer = _trainer(tmp_path, lora, beta)
    model = trainer.model
    assert trainer.accelerator.gradient_accumulation_steps == 1  # Trainer divides by GA itself
    batch = next(iter(trainer.get_train_dataloader()))
    inputs = trainer._prepare_inputs(batch)  # the rollout; both halves of it stay buffered
    assert (trainer.ref_transformer is not None) == (beta > 0 and not lora)  # full FT: KL against a frozen copy
    # Move the policy away from the rollout's, so ratios differ from 1 and some leave the clip range.
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * MOVE[lora][0])

    model.zero_grad(set_to_none=True)
    ref_loss, ref_stats = _reference_loss(trainer, model, inputs)
    (ref_loss / GA).backward()
    expected = _grads(model)
    assert 0 < ref_stats["clip_ratio/region_mean"] < 1, "some ratios clipped, some not"
    assert (ref_stats["kl"] > 0) == (beta > 0)

    results = {}
    for per_step in (True, False):
        trainer.backward_per_step = per_step
        trainer._metrics["train"].clear()
        model.zero_grad(set_to_none=True)
        trainer._step = 1  # the second micro-batch of the buffered rollout: no new rollout
        inputs_again = trainer._buffered_inputs[0]
        trainer._buffered_inputs[1] = inputs_again
        loss = trainer.training_step(model, batch)
        assert not loss.requires_grad
        results[per_step] = (loss, _grads(model), {k: v[-1] for k, v in trainer._metrics["train"].items()})

    for per_step, (loss, grads, stats) in results.items():
        assert loss.item() == pytest.approx(ref_loss.item() / GA, rel=1e-5, abs=1e-9), per_step
        assert set(grads) == set(expected)
        scale = max(g.abs().max().item() for g in expected.values())
        assert scale > 0
        worst = max((grads[n] - expected[n]).abs().max().item() for n in expected)
        assert worst <= 1e-5 * scale, f"per_step={per_step}: gradients differ by {worst:.3g} (scale {scale:.3g})"
        for key, value in ref_stats.items():
            if key == "kl" and beta == 0:
                assert "kl" not in stats
            else:
                assert stats[key] == pytest.approx(value, rel=1e-5, abs=1e-9), (per_step, key)


class _Saved:
    """A tensor saved for backward, counted in ``alive`` until the graph holding it is freed."""

    def __init__(self, t: torch.Tensor, alive: list[int]):
        self.t, self.n, self.alive = t, t.numel() * t.element_size(), alive
        alive[0] += self.n
        alive[1] = max(alive[1], alive[0])

    def __del__(self):
        self.alive[0] -= self.n


def test_per_step_backward_frees_each_steps_graph(tmp_path):
    """Only one trained step's graph is alive at a time: step j's saved activations are freed before step
    j + 1's forward, so the peak of saved tensors is one step's instead of all K steps'."""
    trainer = _trainer(tmp_path, True, 0.0)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer._prepare_inputs(batch)
    k = trainer.args.sde_window_size

    def peak_saved_bytes(per_step: bool) -> int:
        alive = [0, 0]  # bytes alive now, peak
        trainer.backward_per_step = per_step
        trainer._step = 1  # the buffered rollout's second micro-batch
        with torch.autograd.graph.saved_tensors_hooks(lambda t: _Saved(t, alive), lambda s: s.t):
            trainer.training_step(trainer.model, batch)
        trainer.model.zero_grad(set_to_none=True)
        assert alive[0] == 0  # every graph freed after the step
        return alive[1]

    single, per_step = peak_saved_bytes(False), peak_saved_bytes(True)
    assert single > (k - 0.5) * per_step, (single, per_step)
