"""The one Trainer subclass the stages share: a stage-supplied loss and per-component logging.

A stage passes ``loss_fn(model, inputs, num_items_in_batch) -> (loss, {"kd": ..., "ce": ...})``. The loss is
normalised by ``num_items_in_batch`` (the response-token count of the whole accumulated batch, which the
Trainer counts), so that batch 8 x accumulation 1 and batch 2 x accumulation 4 give the same gradients.
Each component is logged under its own key next to the Trainer's ``loss``.

Checkpoints are written into ``<output_dir>/.staging/`` and renamed into place once complete, so a checkpoint
folder either is whole or does not exist; ``save_total_limit`` then keeps the newest N. A checkpoint stores the
weights under the model's own parameter names (``model_state.safetensors``) and resume loads them strictly:
``save_pretrained`` renames Llava's keys to the hub layout, which the Trainer's own resume loads with
``strict=False``, silently keeping the fresh weights (transformers 5.17). The stage's final artifact stays a
plain ``save_pretrained`` folder. A micro-batch whose loss
is NaN/Inf is skipped (no gradient) and counted; past ``max_nonfinite_losses`` the stage stops with
``NonFiniteLossError`` and the last good checkpoint stays.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import rotate_checkpoints

from distill.losses.kd import reply_starts
from distill.models.trainable import vision_parts
from distill.training.resilience import STAGING, STATE_FILE, DeferSigterm, NonFiniteLossError, fault_point

log = logging.getLogger(__name__)

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor], Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class DistillTrainer(Trainer):
    def __init__(self, *args: Any, loss_fn: LossFn, token_normalised: bool = True, max_nonfinite_losses: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.load_best_model_at_end:
            raise ValueError("training.load_best_model_at_end is not supported (checkpoints are staged and renamed); "
                             "compare artifacts with the eval stage instead")
        self.max_nonfinite_losses = max_nonfinite_losses
        self.nonfinite_losses = 0
        self._staging = False
        prepare = getattr(loss_fn, "prepare", None)
        if prepare is not None:  # the loss places its teacher now that the accelerator exists (ZeRO-3 partitions it)
            prepare(self)
        self.loss_fn = loss_fn
        # Token losses divide by num_items_in_batch themselves, so the Trainer must not rescale them by the
        # accumulation steps; per-pair losses (preference) are means per micro-batch, which it must rescale.
        self.model_accepts_loss_kwargs = token_normalised
        # kd.normalise=replies: num_items_in_batch counts the replies of the accumulated batch instead of its tokens
        self.count_replies = getattr(loss_fn, "normalise", "tokens") == "replies"
        self._component_sums: dict[str, torch.Tensor | float] = {}
        self._tokens_pending: torch.Tensor | int = 0
        self._component_since: int | None = None

    def _inner_training_loop(self, *args: Any, **kwargs: Any):
        # A retry (auto_find_batch_size) starts from a fresh state: nothing of the failed attempt is carried over.
        self._component_sums, self._component_since, self._tokens_pending = {}, None, 0
        return super()._inner_training_loop(*args, **kwargs)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()
        # accelerate's loader iterates the DataLoader it wraps (base_dataloader): set the workers' init there
        base = getattr(loader, "base_dataloader", loader)
        if base.num_workers > 0:  # a preemption notice to the whole process group must not kill the workers
            DeferSigterm.wrap(base)
        return loader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, components = self.loss_fn(model, inputs, num_items_in_batch)
        token_mean = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        if token_mean and self.args.average_tokens_across_devices:
            # num_items_in_batch counts every rank's tokens and DDP/DeepSpeed average gradients over the ranks: scale
            # back up, as the Trainer's own compute_loss does (else N processes train with 1/N of the gradient).
            scale = self.accelerator.num_processes
            loss, components = loss * scale, {k: v * scale for k, v in components.items()}
        if model.training and not torch.isfinite(loss.detach()).all():
            return self._skip_nonfinite(loss, return_outputs)
        if model.training:
            if self._component_since is None:
                self._component_since = self.state.global_step
            for name, value in components.items():  # summed where they are: no host read per micro-batch
                value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
                self._component_sums[name] = self._component_sums.get(name, 0.0) + value
        return (loss, None) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """The Trainer's count (and its gather across ranks), over the reply starts instead of every response token
        when the loss normalises per reply: a label is kept only where a reply begins."""
        if self.count_replies and batch_samples and "labels" in batch_samples[0]:
            batch_samples = [{**batch, "labels": reply_starts(batch["labels"])} for batch in batch_samples]
        return super()._get_num_items_in_batch(batch_samples, device)

    def _track_num_input_tokens(self, inputs):
        """The tokens seen, counted where they are and added to ``state.num_input_tokens_seen`` at the next log or
        checkpoint (``_flush_tokens``): the Trainer's own count reads the GPU back every micro-batch. A packed batch
        (data.packing) has no padding and no attention mask: every token is real."""
        mode = self.args.include_num_input_tokens_seen
        if mode in ("no", False):
            return
        packed = "attention_mask" not in inputs and "position_ids" in inputs
        if packed or mode in ("all", True):
            tokens = inputs["input_ids"].numel()
        elif "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        else:
            return super()._track_num_input_tokens(inputs)
        self._tokens_pending = self._tokens_pending + tokens

    def _flush_tokens(self) -> None:
        """Add the pending token count (every rank's) to the state; every rank calls it at the same steps."""
        pending, self._tokens_pending = self._tokens_pending, 0
        if self.args.include_num_input_tokens_seen in ("no", False):
            return
        if self.accelerator.num_processes == 1 and not isinstance(pending, torch.Tensor):
            self.state.num_input_tokens_seen += pending
            return
        total = torch.as_tensor(pending, device=self.args.device, dtype=torch.int64)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(total.reshape(1)).sum().item())

    def _skip_nonfinite(self, loss: torch.Tensor, return_outputs: bool):
        self.nonfinite_losses += 1
        step, loss = self.state.global_step, loss.detach()
        if self.nonfinite_losses > self.max_nonfinite_losses:
            raise NonFiniteLossError(
                f"loss was {float(loss)} at step {step}: {self.nonfinite_losses} non-finite losses, more than "
                f"training.max_nonfinite_losses={self.max_nonfinite_losses}. The last good checkpoint is kept under "
                f"{self.args.output_dir}; lower the learning rate or check the data before resuming.")
        log.warning("non-finite loss (%s) at step %d: micro-batch skipped (%d of at most %d)", float(loss), step,
                    self.nonfinite_losses, self.max_nonfinite_losses)
        zero = loss.detach().new_zeros(()).requires_grad_()  # a leaf: backward touches no parameter
        return (zero, None) if return_outputs else zero

    def _get_output_dir(self, trial):
        out = super()._get_output_dir(trial)
        return os.path.join(out, STAGING) if self._staging else out

    def _raw_checkpoint(self) -> bool:
        return not (self.is_deepspeed_enabled or self.is_fsdp_enabled)  # those resume from their own engine state

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not (self._staging and self._raw_checkpoint()):
            return super()._save(output_dir, state_dict)
        os.makedirs(output_dir, exist_ok=True)
        # save_model drops tied duplicates and load_model restores them.
        safetensors.torch.save_model(self.accelerator.unwrap_model(self.model), os.path.join(output_dir, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        path = Path(resume_from_checkpoint) / STATE_FILE
        if not path.is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        safetensors.torch.load_model(model or self.model, path, strict=True, device="cpu")

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written under ``.staging/`` and renamed into place when every rank is done."""
        self._flush_tokens()  # the state saved with the checkpoint counts every token up to it
        root = Path(self._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        if self.args.should_save:
            shutil.rmtree(root / STAGING / name, ignore_errors=True)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            fault_point("checkpoint_write", self.state.global_step)
            final = root / name
            if final.exists():  # the same step saved again (a resumed run): the new one replaces it
                shutil.rmtree(final)
            os.replace(root / STAGING / name, final)
            rotate_checkpoints(str(root), self.args.save_total_limit)
        self.accelerator.wait_for_everyone()

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        self._flush_tokens()
        if "loss" in logs and self._component_sums:
            steps = max(self.state.global_step - (self._component_since or 0), 1)
            names = sorted(self._component_sums)
            totals = torch.stack([torch.as_tensor(self._component_sums[n], dtype=torch.float64).to(self.args.device)
                                  for n in names])
            if self.accelerator.num_processes > 1:  # every rank logs at the same steps: average their shares
                totals = self.accelerator.reduce(totals, reduction="mean")
            for name, total in zip(names, totals.tolist()):
                logs[f"loss/{name}"] = round(total / steps, 6)
            self._component_sums = {}
            self._component_since = self.state.global_step
            if self.nonfinite_losses:
                logs["nonfinite_losses"] = self.nonfinite_losses
        super().log(logs, *args, **kwargs)


CHECKPOINTING_KWARGS = ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs")
"""The TrainingArguments fields the Trainer reads checkpointing settings from: transformers >= 5.2x reads the first
(the second is its deprecated alias, copied at init); earlier 5.x only has the second."""


def checkpointing_for(model: torch.nn.Module, args: TrainingArguments) -> None:
    """Reentrant activation checkpointing when the model attends with flex_attention and the recipe left the
    checkpointing kwargs unset (the Trainer's default is non-reentrant). Call after the trainable parts are set.

    On an H100 (torch 2.11, 2026-12-07) the D2D step of the 1.5B Qwen2-shaped student, packed, flex_attention,
    bf16 weights, failed its first backward with non-reentrant checkpointing: the recomputed forward saved the
    same tensors in another order (the block mask's indices after the queries instead of before), which
    ``torch.utils.checkpoint`` refuses. Reentrant checkpointing trained, and so did non-reentrant with sdpa. The
    tiny test students do not show the failure. Reentrant checkpointing needs a layer input that requires grad:
    transformers makes the input embeddings' output require it, but pixels never do, so a trainable vision tower
    would get no gradients; that case is refused.
    """
    if not args.gradient_checkpointing:
        return
    fields = [f for f in CHECKPOINTING_KWARGS if hasattr(args, f)]
    if any(getattr(args, f) is not None for f in fields):
        return
    if "flex_attention" not in (model.config.get_text_config()._attn_implementation, model.config._attn_implementation):
        return
    try:
        tower = vision_parts(model)[0]
    except ValueError:  # a text-only model
        tower = []
    if any(p.requires_grad for m in tower for p in m.parameters()):
        raise ValueError("gradient checkpointing with flex_attention must be reentrant (non-reentrant fails in the "
                         "backward), and reentrant checkpointing gives a trainable vision tower no gradients: freeze "
                         "the tower, use attn_implementation=sdpa, or set training.gradient_checkpointing_kwargs")
    for f in fields:
        setattr(args, f, {"use_reentrant": True})
    log.info("gradient checkpointing: reentrant (flex_attention; set training.gradient_checkpointing_kwargs to "
             "choose)")


DISTILL_KEYS = {"max_nonfinite_losses": 10, "peak_flops": None}
"""Keys of a ``training`` block that are ours, not TrainingArguments', with their defaults."""


def training_arguments(training: dict[str, Any], output_dir: Path) -> tuple[TrainingArguments, dict[str, Any]]:
    """TrainingArguments from the recipe's ``training`` block (it validates the values itself), and our own keys.

    ``remove_unused_columns`` is forced off because our collators read the raw record columns;
    ``logging_nan_inf_filter`` defaults to off (the DistillTrainer skips non-finite losses before the Trainer sees
    them, so the filter would only cost a host synchronisation per micro-batch).
    """
    fixed = {"output_dir": str(output_dir), "remove_unused_columns": False}
    clash = set(fixed) & set(training)
    if clash:
        raise ValueError(f"training.{sorted(clash)} are set by the pipeline and cannot be overridden")
    ours = {k: training.get(k, default) for k, default in DISTILL_KEYS.items()}
    rest = {"logging_nan_inf_filter": False, **{k: v for k, v in training.items() if k not in DISTILL_KEYS}}
    return TrainingArguments(**rest, **fixed), ours
