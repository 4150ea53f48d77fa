"""OneReward's editor learns: ReFL on the tiny FLUX.1-Fill editor with masked_pixel lowers the held-out masked MSE of
fill, extend and removal records, and with the reward reversed raises it. Figures per seed: docs/algorithms.md."""

import pytest
import torch

from refiner_rl import FlowReFLConfig, FlowReFLTrainer
from refiner_rl.data import TripletDataset, mask_task_records
from refiner_rl.policies import FillPolicy
from tests.helpers import LEARNING, LEARNING_SEED, data_seeds, learning_figure

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 16
TASKS = ("fill", "extend", "removal")


def _run(out, weight: float, max_steps: int) -> dict:
    train, held = data_seeds()
    torch.manual_seed(LEARNING_SEED)
    policy = FillPolicy.tiny(num_layers=1, num_single_layers=1, seed=LEARNING_SEED)
    args = FlowReFLConfig(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        num_inference_steps=4,
        t1=1,
        t2=3,
        paste_back=True,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        rewards=[{"name": "masked_pixel", "weight": weight}],
        task_mix={"fill": 0.5, "extend": 0.25, "removal": 0.25},  # the data's mix; names the tasks' rewards
        margin=None,
        **LEARNING,
    )
    trainer = FlowReFLTrainer(
        policy, args=args, train_dataset=TripletDataset(mask_task_records(64, seed=train, size=SIZE), None, multiple=4)
    )
    held_out = {
        t: TripletDataset(mask_task_records(16, seed=held, size=SIZE, tasks={t: 1}), None, multiple=4) for t in TASKS
    }
    before = {t: trainer.evaluate(ds)["eval_mse_output_in"] for t, ds in held_out.items()}
    trainer.train()
    after = {t: trainer.evaluate(ds)["eval_mse_output_in"] for t, ds in held_out.items()}
    logged = {k for h in trainer.state.log_history for k in h}
    assert {f"rewards/{t}/masked_pixel/mean" for t in TASKS} <= logged  # each row scored as its own task
    return {t: after[t] / before[t] for t in TASKS}


@pytest.fixture(scope="module")
def ratios(tmp_path_factory):
    root = tmp_path_factory.mktemp("fill-refl")
    return {"forward": _run(root / "forward", 1.0, 30), "reversed": _run(root / "reversed", -1.0, 15)}


@pytest.mark.parametrize("task", TASKS)
def test_refl_on_fill_lowers_each_task_s_held_out_masked_mse(ratios, task):
    print({k: {t: round(v, 4) for t, v in r.items()} for k, r in ratios.items()})
    learning_figure(f"fill refl {task}: held-out masked MSE after / before", ratios["forward"][task], "<=", 0.95)


@pytest.mark.parametrize("task", TASKS)
def test_reversed_reward_raises_each_task_s_held_out_masked_mse(ratios, task):
    learning_figure(
        f"fill refl reversed {task}: held-out masked MSE after / before", ratios["reversed"][task], ">", 1.0
    )
