"""Supervised fine-tuning: cross-entropy on the responses.

It trains the synthetic world's teacher, and it is the SFT baseline the paper compares distillation to
(MoE-LLaVA-style tuning). Which components learn is up to ``trainable``.

    python -m distill recipe=demo stages.teacher.training.max_steps=50
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.training.config import DataConfig, ModelInit, Trainability, as_dataclass, check_precision
from distill.training.context import StageContext
from distill.training.supervised import supervised_stage


@dataclass
class SFTConfig:
    model: ModelInit
    data: DataConfig
    trainable: Trainability = field(
        default_factory=lambda: Trainability({"vision_tower": "frozen", "projector": "full", "llm": "full"})
    )
    train_on: str = "responses"
    training: dict[str, Any] = field(default_factory=dict)
    """Stage-specific TrainingArguments, merged over the recipe's ``trainer`` block by the pipeline."""

    def __post_init__(self) -> None:
        self.model = as_dataclass(self.model, ModelInit)
        check_precision(self.model, self.training)
        self.data = as_dataclass(self.data, DataConfig)
        self.trainable = as_dataclass(self.trainable, Trainability)
        if self.train_on not in ("responses", "all"):
            raise ValueError(f"train_on={self.train_on!r}: expected 'responses' or 'all'")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        return supervised_stage(ctx, self.model, self.data, self.trainable, self.train_on)
