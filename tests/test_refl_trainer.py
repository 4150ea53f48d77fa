"""ReFL trainer: the loss by hand, what is differentiated, the draws, learning on the tiny task with both references
(and the reversed reward moving the other way), and full-state resume.

The learning task is GRPO's tiny one (tests/test_grpo_learning.py): a small random policy, 16 px synthetic triplets,
4 sampling steps from the draft noised to sigma 0.6 with the draft pasted back outside the mask, masked_pixel as the
reward (differentiable: its gradient reaches the one-step prediction through the pixel codec). The trained runs are
made once per module (``runs``) and shared by the tests that read them.
"""

import os

import pytest
import torch

from refiner_rl.data import TripletDataset, synthetic_records
from refiner_rl.errors import ConfigError
from refiner_rl.trainers.refl_config import FlowReFLConfig
from refiner_rl.trainers.refl_trainer import FlowReFLTrainer, refl_loss
from tests.helpers import LEARNING_SEED, QUIET, data_seeds, learning_figure, small_policy

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16


def _config(out, **kw) -> FlowReFLConfig:
    base = dict(
        output_dir=str(out),
        max_steps=30,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_inference_steps=4,
        t1=1,
        t2=3,
        start_sigma=0.6,
        paste_back=True,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        rewards=[{"name": "masked_pixel"}],
        margin=None,
        **QUIET,
    )
    return FlowReFLConfig(**{**base, **kw})


def _data(n=32, seed=0):
    return TripletDataset(synthetic_records(n, seed=seed, size=SIZE), None, multiple=4)


def _trainer(out, lora=False, **kw) -> FlowReFLTrainer:
    """A trainer drawn from the learning tests' seed (model, data, noise)."""
    train, held = data_seeds()
    return FlowReFLTrainer(
        small_policy(lora=lora, rank=8, seed=LEARNING_SEED),
        args=_config(out, **{"seed": LEARNING_SEED, **kw}),
        train_dataset=_data(seed=train),
        eval_dataset=_data(16, held),
    )


def _run(out, lora=False, **kw) -> dict:
    trainer = _trainer(out, lora=lora, **kw)
    before = trainer.evaluate()
    trainer.train()
    return {"before": before, "after": trainer.evaluate(), "trainer": trainer}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root, done = tmp_path_factory.mktemp("refl"), {}

    def get(name: str) -> dict:
        if name not in done:
            kw = {
                "frozen": dict(reference="frozen"),
                "ema_full": dict(reference="ema", ema_decay=0.9),
                "reversed": dict(
                    reference="frozen",
                    reward_weights=None,
                    rewards=[{"name": "masked_pixel", "weight": -1.0}],
                    max_steps=15,
                ),
            }[name]
            done[name] = _run(root / name, **kw)
        return done[name]

    return get


# -------------------------------------------------------------------------------------------------- loss
def test_refl_loss_by_hand():
    r = torch.tensor([[0.2, 0.9], [0.8, float("nan")], [0.5, 0.4]])
    w = torch.tensor([1.0, 2.0])
    loss, active = refl_loss(r, w, margin=0.6)
    # reward 0: mean(0.4, 0, 0.1) = 1/6; reward 1 (sample 1 not scored): mean(0, 0.2) = 0.1; (1/6 + 2 * 0.1) / 2
    assert loss.item() == pytest.approx((1 / 6 + 0.2) / 2)
    assert active.item() == pytest.approx(3 / 5)  # 0.2, 0.5, 0.4 are below the margin
    loss, active = refl_loss(r, w, margin=None)
    assert loss.item() == pytest.approx(-(0.5 + 2 * 0.65) / 2)
    assert active.item() == 1.0
    x = torch.tensor([[0.3]], requires_grad=True)
    refl_loss(x, torch.ones(1), margin=0.5)[0].backward()
    assert x.grad.item() == -1.0  # descent on the hinge raises the reward
    x.grad = None
    refl_loss(x, torch.ones(1), margin=0.2)[0].backward()
    assert x.grad.item() == 0.0  # already past the margin: no gradient


# ------------------------------------------------------------------------------------------ config, draws
def test_short_help_lists_exactly_the_real_options():
    from tests.test_resume_cli import test_short_help_lists_exactly_the_real_options as check_short_help

    check_short_help("refl")


@pytest.mark.parametrize("recipe", ["refl.yaml", "refl_tiny.yaml", "refl_fill.yaml", "refl_fill_tiny.yaml"])
def test_recipes_parse_and_open_with_their_command(recipe):
    from refiner_rl.cli.train import _stage_types, parse_recipe

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "recipes", "onereward", recipe)
    from tests.test_recipes import _command

    assert open(path).read().startswith("#") and _command(path) == "refl"  # the header launches this very file
    _, _, config = parse_recipe(_stage_types("refl"), ["--config", path, "--use_cpu", "true", "--bf16", "false"])
    assert config.rewards and config.task_mix


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="`reference` must be one of"):
        _config(tmp_path, reference="copy")
    with pytest.raises(ConfigError, match="t1 <= t2"):
        _config(tmp_path, t1=3, t2=1)
    with pytest.raises(ConfigError, match="`task_mix`"):
        _config(tmp_path, task_mix={"refine": -1})
    assert _config(tmp_path, task_mix='{"fill": 1, "refine": 3}').task_mix == {"fill": 0.25, "refine": 0.75}
    assert _config(tmp_path, margin=float("inf")).margin is None
    from refiner_rl.rewards.masked_pixel import MaskedPixel

    refine_only = MaskedPixel()
    refine_only.task = "refine"  # a reward of one task, as a judge's (task, dimension) entry
    with pytest.raises(ConfigError, match=r"task\(s\) 'fill' have no reward"):
        FlowReFLTrainer(small_policy(), [refine_only], args=_config(tmp_path, task_mix={"refine": 1, "fill": 1}))


def test_task_and_step_draws_follow_the_mix_and_range(tmp_path):
    from refiner_rl.rewards.masked_pixel import MaskedPixel

    trainer = FlowReFLTrainer(
        small_policy(), [MaskedPixel()], args=_config(tmp_path, task_mix={"fill": 1, "refine": 3}, t1=1, t2=2)
    )
    draws = []
    for step in range(400):
        trainer.state.global_step = step
        draws.append(trainer.draw_task_and_step())
    trainer.state.global_step = 7
    assert trainer.draw_task_and_step() == draws[7]  # a pure function of the step: resume and ranks agree
    frac = sum(task == "refine" for task, _ in draws) / len(draws)
    assert 0.68 < frac < 0.82
    assert {t for _, t in draws} == {1, 2}


def test_only_the_one_step_prediction_is_differentiated_and_checkpointing_gives_the_same_gradient(tmp_path):
    grads, calls = {}, []
    for ckpt in (False, True):
        trainer = _trainer(tmp_path / str(ckpt), lora=True, activation_checkpointing=ckpt, decode_checkpointing=ckpt)
        model = trainer.model
        hook = model.register_forward_pre_hook(lambda m, a, k: calls.append(torch.is_grad_enabled()), with_kwargs=True)
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.state.global_step = 2  # t = 2: two no-grad policy steps, four reference steps, one trained forward
        assert trainer.draw_task_and_step()[1] >= 1
        calls.clear()
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        hook.remove()
        assert sum(calls) == 1, calls  # exactly one forward with gradient
        assert len(calls) == 1 + trainer.draw_task_and_step()[1] + 4
        grads[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        assert grads[ckpt] and all("lora" in n for n in grads[ckpt])
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-5, atol=1e-7)


# -------------------------------------------------------------------------------------------------- learning
def _print(name, run):
    b, a = run["before"], run["after"]
    print(
        f"{name}: held-out masked_pixel {b['eval_rewards/masked_pixel/mean']:.5f} -> "
        f"{a['eval_rewards/masked_pixel/mean']:.5f}, masked MSE in {b['eval_mse_output_in']:.5f} -> {a['eval_mse_output_in']:.5f}"
    )


@pytest.mark.parametrize("name", ["frozen", "ema_full"])
def test_refl_improves_the_held_out_reward_and_masked_mse(runs, name):
    run = runs(name)
    _print(name, run)
    b, a = run["before"], run["after"]
    rb, ra = b["eval_rewards/masked_pixel/mean"], a["eval_rewards/masked_pixel/mean"]
    learning_figure(f"refl {name}: held-out masked_pixel gain", (ra - rb) / abs(rb), ">=", 0.09)
    learning_figure(
        f"refl {name}: held-out masked MSE after / before",
        a["eval_mse_output_in"] / b["eval_mse_output_in"],
        "<=",
        0.93,
    )
    logs = [h for h in run["trainer"].state.log_history if "hinge_active_frac" in h]
    assert len(logs) == run["trainer"].args.max_steps
    assert all("rewards/refine/masked_pixel/mean" in h and h["task/refine"] == 1.0 for h in logs)


def test_reversed_reward_moves_the_held_out_reward_the_other_way(runs):
    run = runs("reversed")
    _print("reversed", run)
    b, a = run["before"], run["after"]
    rb, ra = b["eval_rewards/masked_pixel/mean"], a["eval_rewards/masked_pixel/mean"]
    learning_figure("refl reversed: held-out masked_pixel gain", (ra - rb) / abs(rb), "<", -0.1)
    learning_figure(
        "refl reversed: held-out masked MSE after / before", a["eval_mse_output_in"] / b["eval_mse_output_in"], ">", 1.0
    )


def test_frozen_reference_stays_the_start_and_ema_reference_follows_the_policy(runs, tmp_path):
    from refiner_rl.data import collate_triplets
    from refiner_rl.sampling import batch_conditions, sample_trajectories

    batch = collate_triplets([_data(4, 2)[i] for i in range(4)])
    start = _trainer(tmp_path)  # the same starting weights, untrained
    out = {}
    for name, tr in (("start", start), ("frozen", runs("frozen")["trainer"]), ("ema", runs("ema_full")["trainer"])):
        tr.state.global_step = 5  # the same eps1 for all
        cond, _ = batch_conditions(tr.policy, batch)
        out[name] = tr.reference_images(tr.model, batch, cond)
        gens = tr._generators(batch, 1)
        out[name + "_live"] = sample_trajectories(
            tr.policy, batch, cond, num_steps=4, generator=gens, start_sigma=0.6, paste=True, transformer=tr.model
        )[2]
    torch.testing.assert_close(out["frozen"], out["start"])  # Alg. 1: x_ref never moves
    torch.testing.assert_close(out["start"], out["start_live"])
    gap = (out["frozen_live"] - out["start"]).abs().mean()  # how far training moved the policy's samples
    assert gap > 1e-3
    # Alg. 2: after 30 steps with tau 0.9 the EMA sits near the policy, far from the start
    assert (out["ema"] - out["ema_live"]).abs().mean() < 0.5 * (out["ema"] - out["start"]).abs().mean()
    assert (out["ema"] - out["start"]).abs().mean() > 0.5 * gap


# -------------------------------------------------------------------------------------------------- resume
def test_full_state_resume_matches_the_uninterrupted_run(tmp_path):
    from safetensors.torch import load_file

    kw = dict(
        reference="ema", ema_decay=0.5, max_steps=3, save_strategy="steps", save_steps=2, lora=True, sample_steps=2
    )
    kw["learning_rate"] = 1e-2
    full = _trainer(tmp_path / "full", **kw)
    full.train()
    ck = tmp_path / "full" / "checkpoint-2"
    assert (tmp_path / "full" / "samples" / "step-000002.png").is_file()  # draft | reference | x_theta | target | x_ref
    assert (ck / "ema_state.safetensors").is_file() and (ck / "optimizer.pt").is_file()
    resumed = _trainer(tmp_path / "resumed", **kw)
    resumed.train(resume_from_checkpoint=str(ck))
    for a, b in ((full, resumed),):
        wa, wb = a.ema.state_dict(), b.ema.state_dict()
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
        la = {n: p for n, p in a.model.named_parameters() if p.requires_grad}
        lb = {n: p for n, p in b.model.named_parameters() if p.requires_grad}
        assert max((la[k] - lb[k]).abs().max().item() for k in la) < 1e-6
    w2 = load_file(os.path.join(ck, "pytorch_lora_weights.safetensors"))
    assert w2  # the adapter is in the checkpoint
