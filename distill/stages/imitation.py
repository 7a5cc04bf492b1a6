"""Stage 2, dense-to-dense imitation: the dense student learns to match the frozen teacher's distributions.

Loss = alpha * KD + (1 - alpha) * CE on the response tokens (alpha = 1 by default, as in LLaVA-MoD: KD only),
KD = forward KL(teacher || student) by default. The teacher sees its own inputs (its processor may use another
vision tower or image-token count); the response positions of both are paired through their label masks.
Trainable by default: LLM + projector; the vision tower stays frozen.

    python -m distill recipe=demo stages.d2d.kd.divergence=jsd stages.d2d.alpha=0.5

``teacher: {cache: DIR}`` (a folder from ``python -m data_prep.teacher_cache``) replaces the live teacher by its
cached top-k log-probs: see distill/training/kd.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from distill.data.collate import ConversationEncoder, SupervisedCollator
from distill.data.templates import default_chat_template, get_template
from distill.models.trainable import parameter_table
from distill.training.config import DataConfig, ModelInit, Trainability, as_dataclass, check_precision
from distill.training.context import StageContext
from distill.training.kd import KDConfig, KDLoss, TeacherConfig, open_teacher
from distill.training.supervised import fit_data, load_conversations, load_model, prepare_packing, set_trainable, train

log = logging.getLogger(__name__)


@dataclass
class ImitationConfig:
    model: ModelInit
    teacher: TeacherConfig
    data: DataConfig
    kd: KDConfig = field(default_factory=KDConfig)
    alpha: float = 1.0
    """Weight of KD; 1 - alpha goes to cross-entropy on the responses."""
    trainable: Trainability = field(
        default_factory=lambda: Trainability({"vision_tower": "frozen", "projector": "full", "llm": "full"})
    )
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model = as_dataclass(self.model, ModelInit)
        check_precision(self.model, self.training)
        self.teacher = as_dataclass(self.teacher, TeacherConfig)
        self.data = as_dataclass(self.data, DataConfig)
        self.kd = as_dataclass(self.kd, KDConfig)
        self.trainable = as_dataclass(self.trainable, Trainability)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha}: must lie in [0, 1]")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        return run(self, ctx)


def build_collator(cfg_data: DataConfig, kd: KDConfig, processor, teacher_processor) -> SupervisedCollator:
    """Student and teacher inputs; with a teacher cache (``teacher_processor=None``) student inputs + record ids.
    Both carry ``host_labels`` for the KD loss."""
    template = get_template(cfg_data.template)
    train_on = "all" if kd.distill_all_tokens else "responses"
    student = ConversationEncoder(processor, template, cfg_data.max_length, train_on=train_on)
    if teacher_processor is None:
        return SupervisedCollator(student, cfg_data.image_root, with_ids=True, packed=cfg_data.packing,
                                  host_labels=True)
    teacher = ConversationEncoder(teacher_processor, template, cfg_data.max_length, train_on=train_on)
    return SupervisedCollator(student, cfg_data.image_root, teacher=teacher, packed=cfg_data.packing,
                              host_labels=True)


def run(cfg: ImitationConfig, ctx: StageContext) -> dict[str, Any]:
    model, processor = load_model(cfg.model)
    default_chat_template(processor, cfg.data.template)
    teacher, teacher_processor = open_teacher(cfg.teacher, cfg.kd, cfg.data.template, cfg.data.max_length)
    prepare_packing(cfg.data, model, teacher)
    set_trainable(model, cfg.model, cfg.trainable.modes, cfg.trainable.lora)
    log.info("%s trainable parameters:\n%s", ctx.name, parameter_table(model))
    dataset, stats = load_conversations(cfg.data, ctx.cache_base)
    collator = build_collator(cfg.data, cfg.kd, processor, teacher_processor)
    dataset, fit = fit_data(dataset, collator, cfg.data, ctx.cache_base)
    metrics = train(ctx, model, processor, dataset, collator, KDLoss(teacher, cfg.kd, cfg.alpha))
    return {**metrics, "data": stats, "fit": fit}
