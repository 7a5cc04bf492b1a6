"""Shared pieces of the stages: load the model a stage starts from, read its data, train, save the artifact."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, concatenate_datasets
from transformers import PreTrainedModel, ProcessorMixin
from transformers.trainer_callback import PrinterCallback

from distill.data.collate import ConversationEncoder, SupervisedCollator, check_fit
from distill.data.formats import load_llava_json
from distill.data.templates import default_chat_template, get_template
from distill.losses.ce import response_ce
from distill.models.student import build_student, load_vlm, use_attn_implementation
from distill.models.trainable import LoraSpec, apply_trainability, merge_lora, parameter_table
from distill.training.blockmask import block_mask_refusal, use_packed_block_masks
from distill.training.config import MODEL_DTYPES, DataConfig, ModelInit, Trainability
from distill.training.context import StageContext
from distill.training.distributed import save_final
from distill.training.kernels import apply_kernels
from distill.training.resilience import Preempted, PreemptionCallback, last_checkpoint
from distill.training.tracking import ProgressLine, add_tracking, finish_wandb, start_wandb_run, tracking_arguments
from distill.training.trainer import DistillTrainer, LossFn, checkpointing_for, training_arguments

log = logging.getLogger(__name__)


def load_model(init: ModelInit, kernels: bool = True) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The trainable model in ``init.weights_dtype`` (fp32 master weights by default; mixed precision comes from
    the trainer settings), with ``init.kernels`` applied unless ``kernels=False`` (D2S applies them to the model it
    upcycles from this one)."""
    dtype = MODEL_DTYPES[init.weights_dtype]
    if init.artifact is not None:
        model, processor = load_vlm(init.artifact, dtype=dtype)
    else:
        model, processor = build_student(init.parts, dtype=dtype)
    use_attn_implementation(model, init.attn_implementation)
    if kernels:
        apply_kernels(model, init.kernels)
    return model, processor


def set_trainable(model: torch.nn.Module, init: ModelInit, modes: dict[str, str], lora: LoraSpec) -> None:
    """Open the components ``modes`` names (``apply_trainability``), then cast every parameter left frozen to
    ``init.frozen_dtype`` (a memory saver; None leaves them as loaded)."""
    apply_trainability(model, modes, lora)
    if init.frozen_dtype is not None:
        cast = cast_frozen(model, MODEL_DTYPES[init.frozen_dtype])
        log.info("model.frozen_dtype=%s: %.1fM frozen parameters cast", init.frozen_dtype, cast / 1e6)


def cast_frozen(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Cast the floating-point parameters that do not require grad to ``dtype`` (LoRA base layers excepted: their
    merged update would be rounded to it); returns how many elements."""
    cast = 0
    for name, param in model.named_parameters():
        if ".base_layer." in name:  # a LoRA layer's base: merge_lora adds the fp32 update into it at the end
            continue
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += param.numel()
    return cast


def prepare_packing(data: DataConfig, *models: Any) -> None:
    """``data.packing`` gives each record 1-D position ids restarting at 0; a model that computes 3-D rope positions
    from its image grids (Qwen2-VL's ``get_rope_index``) would lose them, so it is refused before any work. Each
    flex-attention model that can take it gets the packed rows' block mask built without a compile
    (``data.packing_block_mask``)."""
    if not data.packing:
        return
    models = [m for m in models if isinstance(m, torch.nn.Module)]  # a teacher cache is no model
    for model in models:
        if hasattr(model, "get_rope_index") or hasattr(getattr(model, "model", None), "get_rope_index"):
            raise ValueError(f"data.packing: {type(model).__name__} computes multimodal (3-D) rope positions, "
                             "which a packed row's per-record 1-D positions cannot carry; set data.packing=false")
    if not data.packing_block_mask:
        return
    for model in models:
        if model.config.get_text_config()._attn_implementation != "flex_attention":
            continue  # no block masks to build
        refusal = block_mask_refusal(model)
        if refusal is None:
            use_packed_block_masks(model)
            log.info("data.packing_block_mask: %s's packed rows get block masks built from their records' "
                     "boundaries (no compile)", type(model).__name__)
        else:
            log.info("data.packing_block_mask: %s keeps transformers' compiled mask: %s", type(model).__name__,
                     refusal)


def data_cache(data: DataConfig, cache_base: str | Path | None) -> Path | None:
    """``data.cache_dir``, else ``<cache_base>/cache/data`` (the run folder; a sweep's base folder); None (records
    kept in memory) outside a run."""
    if data.cache_dir is not None:
        return Path(data.cache_dir)
    return Path(cache_base) / "cache" / "data" if cache_base is not None else None


def load_conversations(data: DataConfig, cache_base: str | Path | None) -> tuple[Dataset, list[dict[str, Any]]]:
    parts, stats = [], []
    for path in data.train:
        ds, st = load_llava_json(path, data.image_root, data.on_bad_record, data.verify_images, data.limit,
                                 cache_dir=data_cache(data, cache_base))
        parts.append(ds)
        stats.append(st.as_dict())
        log.info("%s: %d records kept of %d", path, st.kept, st.total)
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0], stats


def fit_data(dataset: Dataset, collator: SupervisedCollator, data: DataConfig, cache_base: str | Path,
             conversations_of: Any = None) -> tuple[Dataset, dict[str, Any]]:
    """The records every model of the stage can be trained on at ``data.max_length`` (``check_fit``), known before
    the first step: strict mode stops here, skip mode drops and counts them."""
    encoders = {"student": collator.student}
    if collator.teacher is not None:
        encoders["teacher"] = collator.teacher
    extra = {"conversations_of": conversations_of} if conversations_of is not None else {}
    return check_fit(dataset, encoders, data.image_root, data.on_bad_record, ", ".join(data.train),
                     cache_dir=data_cache(data, cache_base), **extra)


def ce_loss(model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any):
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels" and not k.startswith("teacher_")}
    # No cache: with one, transformers builds a plain causal mask and a packed row (data.packing) would attend
    # across its records; the training forward never needs one anyway.
    logits = model(**model_inputs, use_cache=False).logits
    ce = response_ce(logits, labels, num_items_in_batch)
    return ce, {"ce": ce}


def train(
    ctx: StageContext,
    model: PreTrainedModel,
    processor: ProcessorMixin,
    dataset: Dataset,
    collator: SupervisedCollator,
    loss_fn: LossFn,
    token_normalised: bool = True,
    track_expert_load: bool = True,
) -> dict[str, Any]:
    """Run the Trainer (resuming from this stage's last checkpoint if one exists) and save the artifact.

    ``track_expert_load=False`` when the loss already logs the MoE expert load itself (D2S).
    """
    training = {**ctx.training, **tracking_arguments(ctx, ctx.training)}
    args, ours = training_arguments(training, ctx.checkpoint_dir)
    checkpointing_for(model, args)
    preemption = PreemptionCallback()
    trainer = DistillTrainer(
        model=model, args=args, train_dataset=dataset, data_collator=collator, loss_fn=loss_fn,
        token_normalised=token_normalised, callbacks=[preemption], max_nonfinite_losses=ours["max_nonfinite_losses"],
    )
    add_tracking(trainer, peak_flops=ours["peak_flops"], moe=track_expert_load)
    if args.disable_tqdm:  # no progress bar: one line per log step with the stage, progress, ETA and the losses
        trainer.remove_callback(PrinterCallback)  # (it printed each raw log dict)
        trainer.add_callback(ProgressLine(ctx.name))
    resume = last_checkpoint(ctx.checkpoint_dir)
    if resume:
        log.info("resuming %s from %s", ctx.name, resume)
    start_wandb_run(ctx, args.report_to)
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        finish_wandb()
    if preemption.preempted_at is not None:
        raise Preempted(f"stage {ctx.name}: stopped on SIGTERM at step {preemption.preempted_at} after writing "
                        f"{ctx.checkpoint_dir}/checkpoint-{preemption.preempted_at}; rerun the same command to resume")
    merge_lora(model)
    save_final(trainer, processor, ctx.model_dir)
    history = [h for h in trainer.state.log_history if "loss" in h]
    return {
        "train_loss": result.training_loss,
        "first_logged": history[0] if history else None,
        "last_logged": history[-1] if history else None,
        "global_step": trainer.state.global_step,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "nonfinite_losses": trainer.nonfinite_losses,
    }


def supervised_stage(
    ctx: StageContext, init: ModelInit, data: DataConfig, trainable: Trainability, train_on: str = "responses"
) -> dict[str, Any]:
    """Cross-entropy training of the components that ``trainable`` opens; the rest stays bit-identical."""
    model, processor = load_model(init)
    template = get_template(data.template)
    default_chat_template(processor, data.template)
    modes = trainable.modes
    if init.parts is not None and init.parts.modality_experts is not None:  # new visual experts: open them
        modes = init.parts.modality_experts.trainable_modes(modes)
    prepare_packing(data, model)
    set_trainable(model, init, modes, trainable.lora)
    log.info("%s trainable parameters:\n%s", ctx.name, parameter_table(model))
    dataset, stats = load_conversations(data, ctx.cache_base)
    encoder = ConversationEncoder(processor, template, data.max_length, train_on=train_on)
    collator = SupervisedCollator(encoder, data.image_root, packed=data.packing)
    dataset, fit = fit_data(dataset, collator, data, ctx.cache_base)
    metrics = train(ctx, model, processor, dataset, collator, ce_loss)
    return {**metrics, "data": stats, "fit": fit}
