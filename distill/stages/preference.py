"""Stage 4, preference distillation: DPO-family training on chosen/rejected pairs, the TEACHER as reference.

Policy = the student (MoE after D2S), reference = the frozen teacher, which scores the same response tokens on
its own inputs (its processor may differ). Sequence log-probs are summed over the response (``average_logps``
averages them). Loss types: kto_pair (LLaVA-MoD's default), sigmoid (DPO), ipo, hinge; beta 0.1; an optional NLL
term on the chosen response; the router load-balancing loss for MoE students. With ``precompute_reference`` one
pass stores the teacher's log-probs in the dataset first and the teacher leaves memory before training.
Logged: rewards of chosen and rejected, margin and preference accuracy.

    python -m distill recipe=demo stages.preference.loss_type=sigmoid
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets

from distill.data.collate import ConversationEncoder, SupervisedCollator
from distill.data.formats import IMAGE_PLACEHOLDER, load_preference
from distill.data.templates import default_chat_template, get_template
from distill.losses.preference import LOSS_TYPES, per_sequence, preference_loss, response_token_logps
from distill.losses.router import LAYER_REDUCTIONS, load_balancing_loss
from distill.models.experts import check_experts_implementation, set_experts_implementation
from distill.models.teacher import load_teacher
from distill.models.trainable import parameter_table
from distill.models.upcycle import moe_blocks
from distill.stages.sparse_imitation import SPARSE_TRAINABLE
from distill.training.config import DataConfig, ModelInit, Trainability, as_dataclass, check_precision
from distill.training.context import StageContext
from distill.training.distributed import gathered, local_device, prepare_teacher, run_in_forward, unwrap
from distill.training.kd import TeacherConfig, last_hidden, split_inputs
from distill.training.kernels import apply_kernels
from distill.training.moe import RouterRecorder
from distill.training.supervised import data_cache, fit_data, load_model, set_trainable, train

log = logging.getLogger(__name__)


@dataclass
class PreferenceConfig:
    model: ModelInit
    teacher: TeacherConfig
    data: DataConfig
    """RLAIF-V-style pair files (parquet, JSON, JSONL) sharing an image folder."""
    loss_type: str = "kto_pair"
    beta: float = 0.1
    average_logps: bool = False
    nll_coef: float = 0.0
    """Weight of an NLL (CE) term on the chosen response."""
    aux_coef: float = 0.01
    """Router load-balancing weight, for MoE students."""
    aux_layers: str = "sum"
    """How the load-balancing loss combines the MoE layers: ``sum`` (LLaVA-MoD) or ``mean``; as D2S's."""
    precompute_reference: bool = False
    experts_implementation: str = "sorted"
    """An MoE student's experts forward, as D2S's (a reloaded artifact would otherwise get ``grouped_mm``)."""
    trainable: Trainability = field(default_factory=lambda: Trainability(dict(SPARSE_TRAINABLE)))
    """As D2S; a dense student needs e.g. ``{projector: full, llm: full}``."""
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model = as_dataclass(self.model, ModelInit)
        check_precision(self.model, self.training)
        self.teacher = as_dataclass(self.teacher, TeacherConfig)
        if self.teacher.path is None:
            raise ValueError("preference.teacher: needs the teacher checkpoint (teacher.path): a top-k cache holds "
                             "no sequence log-probs; precompute_reference keeps the teacher out of memory instead")
        self.data = as_dataclass(self.data, DataConfig)
        if self.data.packing:
            raise ValueError("preference.data.packing: not supported; the pairs' sequence log-probs are taken per row")
        self.trainable = as_dataclass(self.trainable, Trainability)
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}: expected one of {LOSS_TYPES}")
        if self.beta <= 0:
            raise ValueError("beta must be positive")
        if self.aux_layers not in LAYER_REDUCTIONS:
            raise ValueError(f"aux_layers={self.aux_layers!r}: expected one of {LAYER_REDUCTIONS}")
        check_experts_implementation(self.experts_implementation)

    def run(self, ctx: StageContext) -> dict[str, Any]:
        return run(self, ctx)


def _conversations(record: dict[str, Any], response: str) -> dict[str, Any]:
    has_image = record.get("image") is not None or record.get("image_bytes") is not None
    question = f"{IMAGE_PLACEHOLDER}\n{record['question']}" if has_image else record["question"]
    return {"id": record["id"], "image": record.get("image"), "image_bytes": record.get("image_bytes"),
            "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": response}]}


def _pair_conversations(record: dict[str, Any]) -> list[list[dict[str, str]]]:
    return [_conversations(record, record[key])["conversations"] for key in ("chosen", "rejected")]


class PairCollator:
    """Rows [chosen..., rejected...] for the student and the teacher, plus precomputed reference log-probs."""

    def __init__(self, inner: SupervisedCollator) -> None:
        self.inner = inner

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [_conversations(r, r["chosen"]) for r in records] + [_conversations(r, r["rejected"]) for r in records]
        batch = self.inner(rows)
        if "ref_chosen_logps" in records[0]:
            batch["ref_logps"] = torch.tensor([r["ref_chosen_logps"] for r in records] +
                                              [r["ref_rejected_logps"] for r in records])
        return batch


def reference_logps(teacher: torch.nn.Module, batch: dict[str, torch.Tensor], average: bool,
                    device: torch.device, chunk_size: int = 1024) -> torch.Tensor:
    """The teacher's sequence log-probs, its inputs on ``device`` (the student's: ZeRO-3 may keep the
    teacher's own shards elsewhere, e.g. offloaded to CPU); its LM head only on the response positions."""
    inputs = {k: v.to(device) for k, v in split_inputs(batch, "teacher_", teacher.dtype).items()}
    labels = batch["teacher_labels"].to(device)
    head = unwrap(teacher).get_output_embeddings()
    with torch.no_grad(), gathered(head.weight):
        tok, rows = response_token_logps(last_hidden(teacher, inputs), labels, head, chunk_size)
    return per_sequence(tok, rows, labels, average)


class PreferenceLoss:
    def __init__(self, cfg: PreferenceConfig, teacher: torch.nn.Module | None, recorder: RouterRecorder | None,
                 top_k: int) -> None:
        self.cfg, self.teacher, self.recorder, self.top_k = cfg, teacher, recorder, top_k
        self.placed = teacher is None

    def prepare(self, trainer: Any) -> None:
        """Place the reference teacher once the Trainer exists: partitioned under ZeRO-3, a replica otherwise."""
        if not self.placed:
            self.teacher = prepare_teacher(self.teacher, trainer.accelerator)
            self.placed = True

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any):
        # The LM head runs outside the model's forward (on the response positions only); under ZeRO-3 the loss
        # then has to run as the engine's forward for the head's gradient to reach DeepSpeed (as the KD loss).
        return run_in_forward(model, self.loss, model, inputs)

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
        cfg = self.cfg
        if self.recorder is not None:
            self.recorder.take()
        labels = inputs["labels"]
        head = unwrap(model).get_output_embeddings()
        hidden = last_hidden(model, split_inputs(inputs))
        with gathered(head.weight):
            tok, rows = response_token_logps(hidden, labels, head)
        policy = per_sequence(tok, rows, labels, cfg.average_logps)
        if "ref_logps" in inputs:
            ref = inputs["ref_logps"].to(policy.device, policy.dtype)
        else:
            if not self.placed:  # no prepare(trainer) call: follow the student onto its device, once
                self.teacher.to(policy.device)
                self.placed = True
            ref = reference_logps(self.teacher, inputs, cfg.average_logps, policy.device)
        n = policy.size(0) // 2
        lengths = (labels[:, 1:] != -100).sum(-1).float()
        losses, chosen_r, rejected_r = preference_loss(
            policy[:n], policy[n:], ref[:n], ref[n:], cfg.loss_type, cfg.beta, lengths[:n], lengths[n:])
        loss = losses.mean()
        parts = {"pref": loss.detach(), "rewards/chosen": chosen_r.mean(), "rewards/rejected": rejected_r.mean(),
                 "rewards/margin": (chosen_r - rejected_r).mean(),
                 "rewards/accuracy": (chosen_r > rejected_r).float().mean()}
        if cfg.nll_coef > 0:  # CE on the chosen responses: the mean of their tokens' negative log-probs
            chosen = rows < n
            nll = -tok[chosen].sum() / chosen.sum().clamp_min(1)
            loss = loss + cfg.nll_coef * nll
            parts["nll"] = nll.detach()
        if self.recorder is not None and cfg.aux_coef > 0:
            # A mean per micro-batch, like the pair loss it is added to (the Trainer averages both over the
            # accumulation steps and DDP over the processes).
            aux = load_balancing_loss(self.recorder.take_valid(inputs.get("attention_mask")), self.top_k,
                                      layers=cfg.aux_layers)
            loss = loss + cfg.aux_coef * aux
            parts["aux"] = aux.detach()
        return loss, parts


def precompute(dataset: Dataset, collator: PairCollator, teacher: torch.nn.Module, average: bool,
               batch_size: int = 16) -> Dataset:
    """The teacher's reference log-probs for every pair, stored as two dataset columns."""
    chosen, rejected = [], []
    device = local_device()  # every rank scores all pairs (the same column everywhere)
    teacher.to(device)
    for start in range(0, len(dataset), batch_size):
        records = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        logps = reference_logps(teacher, collator(records), average, device).float().cpu()
        chosen.extend(logps[: len(records)].tolist())
        rejected.extend(logps[len(records) :].tolist())
    return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


def run(cfg: PreferenceConfig, ctx: StageContext) -> dict[str, Any]:
    model, processor = load_model(cfg.model)
    set_experts_implementation(model, cfg.experts_implementation)
    template = get_template(cfg.data.template)
    default_chat_template(processor, cfg.data.template)
    teacher, teacher_processor = load_teacher(cfg.teacher.path, cfg.teacher.torch_dtype(),
                                              cfg.teacher.attn_implementation)
    apply_kernels(teacher, cfg.teacher.kernels)
    set_trainable(model, cfg.model, cfg.trainable.modes, cfg.trainable.lora)
    log.info("%s trainable parameters:\n%s", ctx.name, parameter_table(model))
    parts, stats = [], []
    for path in cfg.data.train:
        ds, st = load_preference(path, cfg.data.image_root, cfg.data.on_bad_record, cfg.data.verify_images,
                                 cfg.data.limit, cache_dir=data_cache(cfg.data, ctx.cache_base))
        parts.append(ds)
        stats.append(st.as_dict())
    dataset = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    collator = PairCollator(SupervisedCollator(
        ConversationEncoder(processor, template, cfg.data.max_length), cfg.data.image_root,
        teacher=ConversationEncoder(teacher_processor, template, cfg.data.max_length)))
    dataset, fit = fit_data(dataset, collator.inner, cfg.data, ctx.cache_base, conversations_of=_pair_conversations)
    if cfg.precompute_reference:
        dataset = precompute(dataset, collator, teacher, cfg.average_logps)
        teacher = None
        gc.collect()
    blocks = moe_blocks(model)
    recorder = RouterRecorder(model) if blocks else None
    top_k = model.config.text_config.num_experts_per_tok if blocks else 0
    loss_fn = PreferenceLoss(cfg, teacher, recorder, top_k)
    metrics = train(ctx, model, processor, dataset, collator, loss_fn, token_normalised=False)
    if recorder is not None:
        recorder.remove()
    return {**metrics, "data": stats, "fit": fit}
