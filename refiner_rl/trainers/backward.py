"""``Trainer.training_step`` for a loss that is a mean of terms with separate graphs, one backward per term.

GRPO's loss is ``L = (1/K) sum_j L_j`` over the K trained steps, and each ``L_j`` has its own transformer forward.
Forming ``L`` first and calling one backward keeps the activations of all K forwards alive at once; calling a
backward on ``L_j / (K G)`` as soon as ``L_j`` is formed (G = the gradient-accumulation divisor Trainer applies)
frees each step's graph before the next forward and accumulates the same gradient, ``sum_j dL_j / (K G)``.

:func:`backward_per_term` repeats what transformers' ``Trainer.training_step`` (5.x) does around ``compute_loss``:
``model.train()``, the optimizer's ``train()``, ``_prepare_inputs``, the context-parallel and loss contexts, the
division by the accumulation steps unless the loss is already scaled for them, ``scale_wrt_gas=False`` under
DeepSpeed, ``accelerator.backward``, the periodic cache clearing; it returns the detached total, as Trainer does.
Between terms:

- DeepSpeed: every term but the last goes through ``engine.backward`` with the accumulation boundary off (the
  engine accumulates, as for gradient-accumulation micro-batches; ZeRO-1/2/3 reduce linearly, so the sum is the
  same), the last through ``accelerator.backward``, which sets the boundary from Trainer's sync flag and steps.
- DDP: every term but the last runs (forward and backward) under ``no_sync``, so gradients are all-reduced once.
- LOMO/AdaLomo (which update the weights inside backward) and SageMaker model parallelism: one backward over the
  whole loss (Trainer's own step), since a per-term backward would change the update there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from accelerate.utils import DistributedType
from accelerate.utils.memory import clear_device_cache
from transformers.training_args import OptimizerNames
from transformers.utils import is_sagemaker_mp_enabled


def per_term_backward_supported(trainer) -> bool:
    """False where only Trainer's single backward is right (LOMO-type optimizers, SageMaker model parallelism)."""
    return trainer.args.optim not in (OptimizerNames.LOMO, OptimizerNames.ADALOMO) and not is_sagemaker_mp_enabled()


def ga_divisor(trainer, num_items_in_batch) -> int:
    """What ``Trainer.training_step`` divides the loss by: the micro-batches of this optimizer step, unless the
    loss is already scaled for them (``loss_is_scaled_for_ga``, or a model taking loss kwargs with
    ``num_items_in_batch``, or a ``compute_loss_func``)."""
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (
            trainer.model_accepts_loss_kwargs and num_items_in_batch is not None
        ) or trainer.compute_loss_func is not None
    return 1 if scaled else trainer.current_gradient_accumulation_steps


def backward_per_term(
    trainer,
    model: torch.nn.Module,
    inputs: dict,
    num_items_in_batch,
    num_terms: Callable[[dict], int],
    term_loss: Callable[[torch.nn.Module, dict, int], torch.Tensor],
) -> torch.Tensor:
    """One Trainer micro-step of ``L = (1/K) sum_j term_loss(model, inputs, j)``, K = ``num_terms(inputs)``
    (after ``_prepare_inputs``), with a backward per term. Returns ``L / G`` detached (G: :func:`ga_divisor`)."""
    acc = trainer.accelerator
    deepspeed = acc.distributed_type == DistributedType.DEEPSPEED
    cp_context, inputs = trainer._prepare_context_parallel_inputs(model, inputs)
    with cp_context():
        model.train()
        if hasattr(trainer.optimizer, "train") and callable(trainer.optimizer.train):
            trainer.optimizer.train()
        inputs = trainer._prepare_inputs(inputs)
        k = num_terms(inputs)
        divisor = k * ga_divisor(trainer, num_items_in_batch)
        kwargs = {"scale_wrt_gas": False} if deepspeed else {}
        total = None
        for j in range(k):
            last = j == k - 1
            defer = not last and isinstance(model, torch.nn.parallel.DistributedDataParallel)
            with model.no_sync() if defer else contextlib.nullcontext():
                with trainer.compute_loss_context_manager():
                    loss = term_loss(model, inputs, j) / divisor
                if deepspeed and not last:
                    engine = acc.deepspeed_engine_wrapped.engine
                    engine.set_gradient_accumulation_boundary(False)
                    engine.backward(loss, **kwargs)
                else:
                    acc.backward(loss, **kwargs)
            total = loss.detach() if total is None else total + loss.detach()
            del loss
        del inputs
        if trainer.args.torch_empty_cache_steps is not None and (
            trainer.state.global_step % trainer.args.torch_empty_cache_steps == 0
        ):
            clear_device_cache()
            if torch.backends.mps.is_available() and hasattr(torch.mps, "clear_graph_cache"):
                torch.mps.clear_graph_cache()
        return total
