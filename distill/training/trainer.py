"""The one Trainer subclass the stages share: a stage-supplied loss and per-component logging.

A stage passes ``loss_fn(model, inputs, num_items_in_batch) -> (loss, {"kd": ..., "ce": ...})``. The loss is
normalised by ``num_items_in_batch`` (the response-token count of the whole accumulated batch, which the
Trainer counts), so that batch 8 x accumulation 1 and batch 2 x accumulation 4 give the same gradients.
Each component is logged under its own key next to the Trainer's ``loss``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainingArguments

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor], Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class DistillTrainer(Trainer):
    def __init__(self, *args: Any, loss_fn: LossFn, token_normalised: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = loss_fn
        # Token losses divide by num_items_in_batch themselves, so the Trainer must not rescale them by the
        # accumulation steps; per-pair losses (preference) are means per micro-batch, which it must rescale.
        self.model_accepts_loss_kwargs = token_normalised
        self._component_sums: dict[str, float] = {}
        self._component_steps = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, components = self.loss_fn(model, inputs, num_items_in_batch)
        if model.training:
            for name, value in components.items():
                self._component_sums[name] = self._component_sums.get(name, 0.0) + float(value.detach())
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and self._component_sums:
            steps = max(self.state.global_step - self._component_steps, 1)
            for name, total in self._component_sums.items():
                logs[f"loss/{name}"] = round(total / steps, 6)
            self._component_sums = {}
            self._component_steps = self.state.global_step
        super().log(logs, *args, **kwargs)


def training_arguments(training: dict[str, Any], output_dir: Path) -> TrainingArguments:
    """TrainingArguments from the recipe's ``training`` block; TrainingArguments validates the values itself.

    ``remove_unused_columns`` is forced off because our collators read the raw record columns.
    """
    fixed = {"output_dir": str(output_dir), "remove_unused_columns": False}
    clash = set(fixed) & set(training)
    if clash:
        raise ValueError(f"training.{sorted(clash)} are set by the pipeline and cannot be overridden")
    return TrainingArguments(**training, **fixed)


def last_checkpoint(output_dir: Path) -> str | None:
    """The newest complete ``checkpoint-N`` folder under ``output_dir``, if any."""
    if not output_dir.is_dir():
        return None
    done = [p for p in output_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    if not done:
        return None
    return str(max(done, key=lambda p: int(p.name.split("-")[-1])))
