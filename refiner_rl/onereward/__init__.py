"""OneReward's unified judge (arXiv 2508.21066): one VLM judging many mask-guided tasks along their dimensions.

- :mod:`refiner_rl.onereward.templates`: tasks, dimensions, context images and the question (YAML-configurable);
- :mod:`refiner_rl.onereward.pairs`: preference records, checked (errors name the record);
- :mod:`refiner_rl.onereward.loss`: the pairwise loss on both orders, from the Yes/No logits;
- :mod:`refiner_rl.onereward.trainer`: :class:`JudgeTrainer` (a ``transformers.Trainer``) and
  :mod:`refiner_rl.onereward.cli`: ``refiner-rl reward-model``;
- :mod:`refiner_rl.onereward.synthetic`: a synthetic preference set where the preferred image is objectively better.

The trained judge is scored through the ``vlm_judge`` reward (GRPO, evaluation) and, differentiably, by ReFL.
"""

from refiner_rl.onereward.loss import PairOutput, pairwise_judge_loss
from refiner_rl.onereward.pairs import PairSet, load_pairs
from refiner_rl.onereward.templates import JudgeTemplates, load_templates

__all__ = ["JudgeTemplates", "PairOutput", "PairSet", "load_pairs", "load_templates", "pairwise_judge_loss"]
