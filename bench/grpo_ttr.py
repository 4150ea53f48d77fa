"""Time to reward, the fourth part of ``bench/grpo_step.py`` (which imports it): on the tiny learning task, the
training wall time until the held-out reward reaches a fixed level, for our GRPO settings vs peer-like ones
(every step stochastic, all but the last trained, one advantage per image, independent noise).

Run it through ``python bench/grpo_step.py --skip breakdown overhead window memory``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time

from transformers import TrainerCallback

from refiner_rl.data import TripletDataset, synthetic_records

TTR_BEST = dict(sde_window_size=2, sde_window_start=0, spatial_advantage_mix=1.0, shared_initial_noise=True)
TTR_PEER = dict(spatial_advantage_mix=0.0, shared_initial_noise=False)  # window: every step but the last (set below)


def ttr_settings(a) -> dict:
    """The tiny learning task of tests/test_grpo_learning.py (the settings documented there)."""
    return dict(
        num_inference_steps=a.ttr_sampling_steps,
        learning_rate=a.ttr_lr,
        beta=0.0,
        start_sigma=0.6,
        paste_back=True,
        rewards=[{"name": "masked_pixel", "patch_size": 4}],
        lr_scheduler_type="constant",
        max_steps=a.ttr_max_steps,
    )


class EvalUntil(TrainerCallback):
    """Held-out reward every ``every`` steps; stops at ``level``. Evaluation time is not counted."""

    def __init__(self, trainer, dataset, every: int, level: float, budget_s: float):
        self.trainer, self.dataset, self.every, self.level, self.budget = trainer, dataset, every, level, budget_s
        self.train_s, self.curve, self.reached = 0.0, [], None
        self._t = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._t is None:
            self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_s += time.perf_counter() - self._t
        if state.global_step % self.every == 0:
            r = self.trainer.evaluate(self.dataset)["eval_reward"]
            self.curve.append((state.global_step, round(self.train_s, 2), r))
            if r >= self.level and self.reached is None:
                self.reached = self.train_s
                control.should_training_stop = True
        if self.train_s > self.budget:
            control.should_training_stop = True
        self._t = time.perf_counter()


def time_to_reward(a, build_trainer) -> dict:
    """Training seconds (held-out evaluation excluded) until the held-out reward reaches ``start + ttr_gain *
    |start|``, for our settings vs peer-like ones; ``build_trainer(args, out_dir, **config)`` builds each trainer."""
    logging.getLogger("refiner_rl").setLevel(logging.ERROR)
    held_out = TripletDataset(synthetic_records(16, seed=a.seed + 1, size=16), None, multiple=4)
    runs = {}
    start = None
    tiny = argparse.Namespace(
        **{
            **vars(a),
            "layers": 1,
            "single_layers": 1,
            "heads": 2,
            "head_dim": 16,
            "joint_dim": 32,
            "size": 16,
            "group": 8,
            "prompts": 2,
            "lora_rank": 0,
            "seed": a.seed,
        }
    )
    peer = dict(TTR_PEER, sde_window_size=a.ttr_sampling_steps - 1, sde_window_start=0)
    settings = [("ours", TTR_BEST), ("peer_like", peer)]
    if a.ttr_ablations:  # one of our changes at a time, on top of the peer-like settings
        settings += [
            ("peer+spatial", dict(peer, spatial_advantage_mix=1.0)),
            ("peer+shared_noise", dict(peer, shared_initial_noise=True)),
            ("peer+window_2", dict(peer, sde_window_size=2)),
        ]
    for name, extra in settings:
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_trainer(tiny, tmp, **{**ttr_settings(a), **extra})
            if start is None:
                start = trainer.evaluate(held_out)["eval_reward"]
            level = start + a.ttr_gain * abs(start)
            cb = EvalUntil(trainer, held_out, a.ttr_eval_every, level, a.ttr_budget)
            trainer.add_callback(cb)
            trainer.train()
            runs[name] = {
                "seconds_to_level": cb.reached,
                "train_s": round(cb.train_s, 1),
                "curve": cb.curve,
                "settings": extra,
            }
    o, p = runs["ours"]["seconds_to_level"], runs["peer_like"]["seconds_to_level"]
    speedup = None
    if o is not None:
        speedup = (p / o) if p is not None else f">{runs['peer_like']['train_s'] / o:.1f} (peer-like never reached it)"
    return {"start_reward": start, "level": start + a.ttr_gain * abs(start), "runs": runs, "speedup": speedup}
