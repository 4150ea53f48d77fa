"""The planner end to end: TRL's GRPOTrainer on the tiny random Qwen2.5-VL, the recipes, and `refiner-rl edit`.

The tiny planner (refiner_rl.agents.tiny) has the six plan tags as single tokens. `refiner-rl planner` trains it
for ~100 GRPO steps on the synthetic decomposition set (about a minute on a CPU); the partial-credit format
reward must rise and the F1 rewards must not fall. The edit tests run the three agents with the tiny editor.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from refiner_rl.agents.data import planner_messages, with_image
from refiner_rl.agents.plan import format_plan
from refiner_rl.agents.synthetic import synthetic_decompositions, write_synthetic_decompositions
from refiner_rl.agents.tiny import build_tiny_planner
from refiner_rl.cli.main import main
from tests.helpers import LEARNING_SEED, learning_figure

PLAN = [
    {"action": "recolor", "subject": "the square", "goal": "red"},
    {"action": "remove", "subject": "the circle", "goal": "background only"},
]
INSTRUCTION = "make the square red and remove the circle"

pytestmark = pytest.mark.usefixtures("one_thread")


def fifth_means(history: list[dict], key: str) -> tuple[float, float]:
    rows = [h[key] for h in history if key in h]
    n = max(1, len(rows) // 5)
    return sum(rows[:n]) / n, sum(rows[-n:]) / n


@pytest.fixture(scope="module")
def trained_planner(tmp_path_factory):
    """`refiner-rl planner` with the tiny recipe, shortened: the trained folder and its log history."""
    out = str(tmp_path_factory.mktemp("planner"))
    argv = ["planner", "--config", "recipes/imageedit_r1/tiny.yaml", "--output_dir", out, "--max_steps", "100"]
    argv += ["--learning_rate", "5e-3", "--synthetic_records", "32", "--seed", str(LEARNING_SEED)]
    assert main(argv) == 0
    with open(os.path.join(out, "trainer_state.json")) as f:
        return out, json.load(f)["log_history"]


def test_grpo_raises_the_format_reward_and_keeps_f1(trained_planner):
    folder, history = trained_planner
    first, last = fifth_means(history, "rewards/plan_format_partial_reward/mean")
    learning_figure("planner: partial format reward, last fifth - first", last - first, ">", 0.1)
    for key in ("action", "subject", "goal"):
        f_first, f_last = fifth_means(history, f"rewards/{key}_f1_reward/mean")
        learning_figure(f"planner: {key} F1, last fifth - first", f_last - f_first, ">=", -0.02)
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))


def test_recipes_load_as_trl_configs():
    from trl import GRPOConfig, ModelConfig

    from refiner_rl.agents.train import PlannerArguments
    from refiner_rl.cli.train import parse_recipe

    cpu = ["--bf16", "false", "--use_cpu", "true"]
    args, config, model = parse_recipe(
        (PlannerArguments, GRPOConfig, ModelConfig), ["--config", "recipes/imageedit_r1/planner.yaml", *cpu]
    )
    assert type(config) is GRPOConfig and type(model) is ModelConfig
    assert (
        config.learning_rate == 1e-6 and config.per_device_train_batch_size * config.gradient_accumulation_steps == 32
    )
    assert model.model_name_or_path == "Qwen/Qwen2.5-VL-7B-Instruct" and config.beta > 0
    assert args.reward_funcs == ["format", "action", "subject", "goal"]


def _memorised_planner(src: str, dst: str, image, steps: int = 120) -> str:
    """The tiny planner fine-tuned (teacher forcing) to answer PLAN for INSTRUCTION: a real VLM whose greedy answer
    parses, so the pipeline's parse-sequence-edit path runs on model output."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(src)
    model = AutoModelForImageTextToText.from_pretrained(src)
    prompt = processor.apply_chat_template(
        with_image(planner_messages(INSTRUCTION), image), tokenize=False, add_generation_prompt=True
    )
    enc = processor(text=[prompt + format_plan(PLAN) + "<|im_end|>"], images=[[image]], return_tensors="pt")
    n_prompt = processor(text=[prompt], images=[[image]], return_tensors="pt")["input_ids"].shape[1]
    labels = enc["input_ids"].clone()
    labels[:, :n_prompt] = -100
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(dst)
    processor.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def edit_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit")
    image = synthetic_decompositions(1, seed=3)[0]["image"]
    image.save(root / "in.png")
    tiny = build_tiny_planner(str(root / "tiny"))
    return root, tiny, _memorised_planner(tiny, str(root / "memorised"), image)


def test_edit_runs_each_planned_step_and_saves_intermediates(edit_inputs, caplog):
    root, _, planner = edit_inputs
    out = root / "planned"
    argv = ["edit", "--planner", planner, "--editor", "tiny", "--image", str(root / "in.png")]
    argv += ["--instruction", INSTRUCTION, "--output_dir", str(out), "--num_steps", "2", "--max_new_tokens", "48"]
    assert main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["triples"] == PLAN and plan["planned"]
    assert len(plan["steps"]) == 2 and plan["images"] == ["step_01.png", "step_02.png"]
    # The tiny model was not taught to sequence: its answer is not one <step> per edit, so the decomposition order
    # and templated steps are kept, with a warning saying so.
    assert plan["steps"] == ["recolor the square: red", "remove the circle: background only"]
    assert any("keeping the decomposition order" in w for w in plan["warnings"])
    from PIL import Image

    images = [Image.open(out / name) for name in ("input.png", "step_01.png", "step_02.png", "final.png")]
    assert {im.size for im in images} == {images[0].size}
    assert list(images[2].getdata()) == list(images[3].getdata())  # final = last step
    assert list(images[1].getdata()) != list(images[2].getdata())  # the second step really ran on the first's output


def test_edit_drives_a_qwen_image_edit_folder_through_the_plan(edit_inputs):
    """`--editor` a tiny Qwen-Image-Edit Plus pipeline folder (model_index.json picks the editor): the same two-step
    plan, each step on the previous step's output, intermediates saved."""
    from PIL import Image

    from refiner_rl.policies import QwenEditPolicy

    root, _, planner = edit_inputs
    folder = root / "qwen-edit"
    if not folder.is_dir():
        from refiner_rl import model_settings

        editor = QwenEditPolicy.tiny()
        editor.save_pretrained_components(str(folder))
        # its small condition areas travel with it (a trained output writes this file itself)
        model_settings.save(
            model_settings.ModelSettings(kind="qwen_edit", editor_options=editor.options()), str(folder)
        )
    out = root / "planned-qwen"
    argv = ["edit", "--planner", planner, "--editor", str(folder), "--image", str(root / "in.png")]
    argv += ["--instruction", INSTRUCTION, "--output_dir", str(out), "--num_steps", "2", "--max_new_tokens", "48"]
    assert main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["planned"] and len(plan["steps"]) == 2 and plan["images"] == ["step_01.png", "step_02.png"]
    images = [Image.open(out / name) for name in ("input.png", "step_01.png", "step_02.png", "final.png")]
    assert {im.size for im in images} == {images[0].size}
    assert list(images[2].getdata()) == list(images[3].getdata())
    assert list(images[1].getdata()) != list(images[2].getdata())


def test_unparseable_plan_falls_back_to_the_raw_instruction(edit_inputs, caplog):
    root, tiny, _ = edit_inputs
    out = root / "fallback"
    argv = [
        "edit",
        "--planner",
        tiny,
        "--editor",
        "tiny",
        "--image",
        str(root / "in.png"),
        "--instruction",
        INSTRUCTION,
    ]
    argv += ["--output_dir", str(out), "--num_steps", "2", "--max_new_tokens", "8"]
    with caplog.at_level("WARNING"):
        assert main(argv) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["steps"] == [INSTRUCTION] and plan["triples"] is None
    assert "could not be parsed" in caplog.text and "editing with the raw instruction" in plan["warnings"][0]
    assert (out / "step_01.png").is_file()


def test_without_planner_the_editor_runs_once(edit_inputs):
    root, _, _ = edit_inputs
    out = root / "raw"
    argv = ["edit", "--editor", "tiny", "--image", str(root / "in.png"), "--instruction", INSTRUCTION]
    assert main([*argv, "--output_dir", str(out), "--num_steps", "2"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["steps"] == [INSTRUCTION] and not plan["planned"] and plan["warnings"] == []


def test_bad_editor_fails_before_planning(edit_inputs, tmp_path, capsys):
    root, _, _ = edit_inputs
    empty = tmp_path / "not-a-checkpoint"
    empty.mkdir()
    argv = ["edit", "--planner", "/no/such/planner", "--image", str(root / "in.png"), "--instruction", "x"]
    assert main([*argv, "--editor", str(empty), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "neither transformer/" in err and "not-a-checkpoint" in err and "planner" not in err.split("editor")[0]
    assert not (tmp_path / "o").exists()


def test_lora_and_full_checkpoints_load_as_editors(tmp_path):
    from refiner_rl.agents.editor import editor_arguments, load_editor
    from refiner_rl.configs import ModelArguments, build_policy

    policy = build_policy(
        ModelArguments(model_name_or_path="tiny", use_lora=True, lora_r=4, lora_target_modules=["to_q", "to_k"])
    )
    policy.save_lora(str(tmp_path / "lora"))
    args = editor_arguments(str(tmp_path / "lora"))
    assert (args.use_lora, args.lora_r, sorted(args.lora_target_modules)) == (True, 4, ["to_k", "to_q"])
    assert load_editor(str(tmp_path / "lora")).has_lora
    full = build_policy(ModelArguments(model_name_or_path="tiny", use_lora=False))
    full.transformer.save_pretrained(str(tmp_path / "full" / "transformer"))
    assert editor_arguments(str(tmp_path / "full")).transformer_path.endswith("transformer")
    load_editor(str(tmp_path / "full"))


def test_evaluation_reports_planner_vs_no_planner(edit_inputs, tmp_path):
    root, tiny, planner = edit_inputs
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "a", "image": str(root / "in.png"), "instruction": INSTRUCTION}) + "\n")
    argv = ["edit", "--planner", planner, "--editor", "tiny", "--requests", str(requests), "--judge", tiny]
    assert main([*argv, "--output_dir", str(tmp_path / "eval"), "--num_steps", "2", "--max_new_tokens", "48"]) == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    for mode in ("planner", "no_planner"):
        row = report["requests"][0][mode]
        assert all(0.0 <= row[c] <= 10.0 for c in ("completion", "quality", "preservation"))
        assert row["score"] == pytest.approx((row["completion"] + row["quality"] + row["preservation"]) / 3)
        assert not math.isnan(report["summary"][mode]["score"])
    assert report["requests"][0]["planner"]["steps"] == 2 and report["requests"][0]["no_planner"]["steps"] == 1
    assert (tmp_path / "eval" / "a" / "planner" / "step_02.png").is_file()


def test_synthetic_records_round_trip_through_jsonl(tmp_path):
    from refiner_rl.agents.data import load_decomposition_dataset

    path = write_synthetic_decompositions(str(tmp_path), 3, seed=1)
    ds = load_decomposition_dataset(path)
    assert len(ds) == 3 and ds[0]["image"].size == (56, 56)
    assert ds[0]["prompt"][-1]["role"] == "user" and ds[0]["prompt"][-1]["content"].startswith("Instruction: ")


def test_planner_adapter_folder_loads_over_its_base(edit_inputs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from refiner_rl.agents.generation import load_planner_vlm

    _, tiny, _ = edit_inputs
    model = get_peft_model(
        AutoModelForImageTextToText.from_pretrained(tiny), LoraConfig(r=2, target_modules=["q_proj"])
    )
    with torch.no_grad():  # a non-zero adapter, so merging changes the weights
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.5)
    model.save_pretrained(str(tmp_path / "adapter"))
    merged = load_planner_vlm(str(tmp_path / "adapter"))
    plain = load_planner_vlm(tiny)
    q = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.model.state_dict()[q], plain.model.state_dict()[q])
    assert not any("lora" in k for k in merged.model.state_dict())
