"""``JudgeTrainer``: a ``transformers.Trainer`` that trains a VLM judge on preference pairs (OneReward's loss).

Each batch of ``B`` pairs is one forward of ``2B`` chats (both orders, :class:`PairCollator`); the loss is
:func:`refiner_rl.onereward.loss.pairwise_judge_loss` on the answer-position logits. Logged like TRL's
``RewardTrainer``: ``loss``, ``accuracy`` (pairs with order-averaged score > 1/2), ``margin`` (mean of
``P(Yes | winner, loser) - P(Yes | loser, winner)``), ``mean_reward`` (mean order-averaged score), with ``eval_``
in front on held-out data, plus ``eval_accuracy/<task>/<dimension>``; :meth:`JudgeTrainer.evaluate` also writes
the held-out table (``accuracy_table`` in ``output_dir``).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict

import torch
from transformers import Trainer

from refiner_rl.onereward.collator import PairCollator, group_names
from refiner_rl.onereward.config import JudgeConfig
from refiner_rl.onereward.loss import pairwise_judge_loss
from refiner_rl.onereward.templates import JudgeTemplates
from refiner_rl.vlm.questions import answer_token_ids

logger = logging.getLogger(__name__)


class JudgeTrainer(Trainer):
    """Pairwise judge training on any ``AutoModelForImageTextToText`` (LoRA: pass a peft model).

    ``processing_class`` is the model's processor; ``templates`` the tasks and dimensions the records use. The
    tokenizer must encode some of ``args.yes_words`` and of ``args.no_words`` as single tokens (a
    :class:`~refiner_rl.errors.ConfigError` here otherwise, before any step).
    """

    def __init__(
        self,
        model,
        args: JudgeConfig,
        templates: JudgeTemplates,
        processing_class,
        train_dataset=None,
        eval_dataset=None,
        callbacks=None,
    ):
        where = getattr(getattr(model, "config", None), "_name_or_path", None) or type(model).__name__
        self.yes_ids, self.no_ids = answer_token_ids(processing_class.tokenizer, args.yes_words, args.no_words, where)
        self.templates = templates
        self.group_names = group_names(templates)
        super().__init__(
            model=model,
            args=args,
            data_collator=PairCollator(processing_class, templates, args.system_prompt),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
        )
        self.model_accepts_loss_kwargs = False  # the loss is a mean over pairs: Trainer scales it for accumulation
        self._metrics = defaultdict(list)

    def pair_outputs(self, model, inputs: dict):
        """``(PairOutput, groups)`` of a collated batch."""
        inputs = dict(inputs)
        groups = inputs.pop("groups")
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]
        n = groups.shape[0]
        return pairwise_judge_loss(logits[:n], logits[n:], self.yes_ids, self.no_ids, self.args.prob), groups

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out, _ = self.pair_outputs(model, inputs)
        loss = out.loss.mean()
        if model.training:
            gather = self.accelerator.gather_for_metrics
            self._metrics["accuracy"].append(gather((out.score > 0.5).float()).mean().item())
            self._metrics["margin"].append(gather((out.p_yes_forward - out.p_yes_reversed).detach()).mean().item())
            self._metrics["mean_reward"].append(gather(out.score.detach()).mean().item())
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and not any(k.startswith("eval_") for k in logs):
            logs = {**logs, **{k: sum(v) / len(v) for k, v in self._metrics.items()}}
            self._metrics.clear()
        super().log(logs, start_time)

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Held-out loss, accuracy, margin, mean reward, and accuracy per task x dimension (logged, and written to
        ``args.accuracy_table`` in ``output_dir`` by the main process)."""
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        loader = self.get_eval_dataloader(dataset)
        was_training = self.model.training
        self.model.eval()
        parts = defaultdict(list)
        for inputs in loader:
            inputs = self._prepare_inputs(inputs)
            out, groups = self.pair_outputs(self.model, inputs)
            gather = self.accelerator.gather_for_metrics
            for key, value in (("loss", out.loss), ("score", out.score), ("groups", groups)):
                parts[key].append(gather(value.float().contiguous()))
            parts["margin"].append(gather((out.p_yes_forward - out.p_yes_reversed).contiguous()))
        self.model.train(was_training)
        cat = {k: torch.cat(v).cpu() for k, v in parts.items()}
        correct, groups = (cat["score"] > 0.5).float(), cat["groups"].long()
        p = metric_key_prefix
        metrics = {
            f"{p}_loss": cat["loss"].mean().item(),
            f"{p}_accuracy": correct.mean().item(),
            f"{p}_margin": cat["margin"].mean().item(),
            f"{p}_mean_reward": cat["score"].mean().item(),
        }
        rows = []
        for i, name in enumerate(self.group_names):
            hit = correct[groups == i]
            if hit.numel():
                metrics[f"{p}_accuracy/{name}"] = hit.mean().item()
                rows.append((name, hit.numel(), hit.mean().item()))
        self.log(metrics)
        if self.is_world_process_zero():
            self.write_accuracy_table(rows, correct, metrics[f"{p}_loss"])
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def write_accuracy_table(self, rows: list[tuple[str, int, float]], correct: torch.Tensor, loss: float) -> str:
        """The held-out table (markdown): one row per task x dimension, then all pairs."""
        path = os.path.join(self.args.output_dir, self.args.accuracy_table)
        os.makedirs(self.args.output_dir, exist_ok=True)
        lines = [
            f"Held-out pairwise accuracy at step {self.state.global_step} (loss {loss:.4f})",
            "",
            "| task | dimension | pairs | accuracy |",
            "|---|---|---:|---:|",
        ]
        lines += [f"| {n.split('/')[0]} | {n.split('/')[1]} | {k} | {a:.3f} |" for n, k, a in rows]
        lines.append(f"| all | all | {correct.numel()} | {correct.mean().item():.3f} |")
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path
