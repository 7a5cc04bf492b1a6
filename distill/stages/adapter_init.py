"""Stage 1, adapter init: only the projector learns, cross-entropy on image captions.

The student is assembled from a pretrained vision tower and a pretrained small LLM (``model.parts``); both stay
frozen, bit for bit. The result is the starting point of dense-to-dense imitation.

    python -m distill recipe=demo stages.adapter_init.training.learning_rate=1e-3
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distill.training.config import DataConfig, ModelInit, Trainability, as_dataclass, check_precision
from distill.training.context import StageContext
from distill.training.supervised import supervised_stage

ONLY_PROJECTOR = {"vision_tower": "frozen", "projector": "full", "llm": "frozen"}


@dataclass
class AdapterInitConfig:
    model: ModelInit
    data: DataConfig
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model = as_dataclass(self.model, ModelInit)
        check_precision(self.model, self.training)
        self.data = as_dataclass(self.data, DataConfig)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        # With parts.modality_experts, supervised_stage opens the new visual experts too.
        return supervised_stage(ctx, self.model, self.data, Trainability(dict(ONLY_PROJECTOR)))
