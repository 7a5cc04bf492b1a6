"""Stage 3, dense-to-sparse imitation: upcycle the D2D student into an MoE, then KD + CE + router loss.

The dense FFNs of the chosen layers become ``num_experts`` copies behind a top-k router (exact at conversion,
see distill/models/upcycle.py); experts + routers + the FFNs of the layers left dense (+ projector) train,
attention and embeddings stay frozen.
Logged every logging step: kd, ce, aux, per-layer expert load and router entropy; at the end
``expert_load.png`` / ``.json`` (layer x expert) beside the artifact.

    python -m distill recipe=demo stages.d2s.upcycle.num_experts=8 stages.d2s.upcycle.top_k=1
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from distill.data.templates import default_chat_template
from distill.losses.router import LAYER_REDUCTIONS
from distill.models.experts import check_experts_implementation, set_experts_implementation
from distill.models.trainable import parameter_table
from distill.models.upcycle import UpcycleConfig, moe_blocks, parameter_counts, upcycle
from distill.pipeline import is_main_process
from distill.stages.imitation import build_collator
from distill.training.config import DataConfig, ModelInit, Trainability, as_dataclass, check_precision
from distill.training.context import StageContext
from distill.training.kd import KDConfig, TeacherConfig, open_teacher
from distill.training.kernels import apply_kernels
from distill.training.moe import RouterRecorder, SparseKDLoss, write_load_heatmap
from distill.training.supervised import fit_data, load_conversations, load_model, prepare_packing, set_trainable, train

log = logging.getLogger(__name__)

# What learns in D2S (and, by default, in preference distillation after it), as in LLaVA-MoD: its code picks the
# trainable modules (FFNs, projector) before swapping in the MoE layers, so the FFNs of the layers left dense train
# too. ``dense_ffn: frozen`` trains the experts and routers alone.
SPARSE_TRAINABLE = {"vision_tower": "frozen", "projector": "full", "experts": "full", "router": "full",
                    "dense_ffn": "full"}


@dataclass
class SparseImitationConfig:
    model: ModelInit
    """The dense D2D artifact to upcycle."""
    teacher: TeacherConfig
    data: DataConfig
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    kd: KDConfig = field(default_factory=KDConfig)
    alpha: float = 0.5
    """KD weight; 1 - alpha goes to CE (LLaVA-MoD's D2S uses both)."""
    aux_coef: float = 0.01
    z_coef: float = 0.0
    aux_layers: str = "sum"
    """How the router losses combine the MoE layers: ``sum`` as LLaVA-MoD (its DeepSpeed-MoE layers each return
    their load-balancing loss and the model adds them up, times 0.01), or ``mean`` (a student with more MoE layers
    then gets no more router gradient). With ``sum`` and 12 MoE layers the router gradient is 12x ``mean``'s; for a
    student with one MoE layer (the presets' 2-layer students, ``every_other``) the two are the same."""
    experts_implementation: str = "sorted"
    """The experts' forward: ``sorted`` (a loop over experts with one host synchronisation per layer,
    distill/models/experts.py), transformers' ``eager`` (the same loop, about nine synchronisations per layer) or
    ``grouped_mm``. On an H100 a D2S step ran 5-9% faster with sorted than eager (median step) and the Trainer path
    lost its 17% overhead over a bare loop; eager trained 1.8x faster than grouped_mm under bf16 autocast with fp32
    master weights on an H200 (BENCHMARKS.md)."""
    trainable: Trainability = field(default_factory=lambda: Trainability(dict(SPARSE_TRAINABLE)))
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model = as_dataclass(self.model, ModelInit)
        check_precision(self.model, self.training)
        self.teacher = as_dataclass(self.teacher, TeacherConfig)
        self.data = as_dataclass(self.data, DataConfig)
        self.upcycle = as_dataclass(self.upcycle, UpcycleConfig)
        self.kd = as_dataclass(self.kd, KDConfig)
        self.trainable = as_dataclass(self.trainable, Trainability)
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha={self.alpha}: must lie in [0, 1]")
        check_experts_implementation(self.experts_implementation)
        if self.aux_coef < 0 or self.z_coef < 0:
            raise ValueError("aux_coef and z_coef must be >= 0")
        if self.aux_layers not in LAYER_REDUCTIONS:
            raise ValueError(f"aux_layers={self.aux_layers!r}: expected one of {LAYER_REDUCTIONS}")

    def run(self, ctx: StageContext) -> dict[str, Any]:
        return run(self, ctx)


def run(cfg: SparseImitationConfig, ctx: StageContext) -> dict[str, Any]:
    dense, processor = load_model(cfg.model, kernels=False)
    default_chat_template(processor, cfg.data.template)
    model = upcycle(dense, cfg.upcycle)
    del dense
    apply_kernels(model, cfg.model.kernels)  # on the upcycled model: upcycling builds new layers
    set_experts_implementation(model, cfg.experts_implementation)
    total, active = parameter_counts(model, cfg.upcycle.top_k)
    teacher, teacher_processor = open_teacher(cfg.teacher, cfg.kd, cfg.data.template, cfg.data.max_length)
    prepare_packing(cfg.data, model, teacher)
    set_trainable(model, cfg.model, cfg.trainable.modes, cfg.trainable.lora)
    log.info("%s trainable parameters:\n%s", ctx.name, parameter_table(model))
    dataset, stats = load_conversations(cfg.data, ctx.cache_base)
    collator = build_collator(cfg.data, cfg.kd, processor, teacher_processor)
    dataset, fit = fit_data(dataset, collator, cfg.data, ctx.cache_base)
    recorder = RouterRecorder(model)
    loss_fn = SparseKDLoss(teacher, cfg.kd, cfg.alpha, recorder, cfg.upcycle.top_k, cfg.aux_coef, cfg.z_coef,
                           cfg.aux_layers)
    metrics = train(ctx, model, processor, dataset, collator, loss_fn, track_expert_load=False)
    recorder.remove()
    layers = [i for i, _ in moe_blocks(model)]
    load = loss_fn.mean_load()
    png = str(ctx.dir / "expert_load.png")
    if is_main_process():  # this rank's load; every rank's files would race for the same names
        png = write_load_heatmap(load, layers, ctx.dir)["png"]
    return {**metrics, "data": stats, "fit": fit, "params_total": total, "params_active": active, "moe_layers": layers,
            "expert_load": load.tolist(), "expert_load_png": png}
