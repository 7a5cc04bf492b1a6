"""The KD training loss: student and frozen teacher on their own inputs, paired response positions, chunked KD.

Both models are called through their normal forward (so DDP / DeepSpeed hooks run) with
``output_hidden_states=True`` and ``logits_to_keep=1``: the full [tokens, vocab] logits are never built there;
the chunked loss applies each model's LM head to the paired response positions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.losses.kd import KDOptions, chunked_kd_loss, paired_positions
from distill.models.student import ATTN_IMPLEMENTATIONS
from distill.training.distributed import gathered, is_zero3_engine, prepare_teacher, run_in_forward, unwrap

MODEL_KEYS = ("input_ids", "attention_mask", "pixel_values", "image_sizes")


@dataclass(frozen=True)
class KDConfig(KDOptions):
    """The loss settings of KDOptions (divergence, temperature, beta, top_k, tail_bucket) plus how to run it."""

    chunk_size: int = 1024
    """Tokens per chunk of the LM-head + loss computation; 0 computes all at once."""
    distill_all_tokens: bool = False
    """KD (and CE) on every text token, prompt included, instead of the responses only."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 0:
            raise ValueError("kd.chunk_size must be >= 0")


@dataclass
class TeacherConfig:
    path: str
    dtype: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``. Under DeepSpeed the
    teacher takes the student's dtype (bf16 when ``training.bf16``)."""
    attn_implementation: str = "auto"
    """``auto`` (flash_attention_2 when flash-attn is installed and a GPU is present, else sdpa), ``sdpa``,
    ``flash_attention_2`` or ``eager``."""

    def __post_init__(self) -> None:
        if not (Path(self.path) / "config.json").is_file():
            raise FileNotFoundError(f"teacher.path: no checkpoint at {self.path}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"teacher.dtype={self.dtype!r}")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"teacher.attn_implementation={self.attn_implementation!r}: expected one of "
                             f"{ATTN_IMPLEMENTATIONS}")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, self.dtype)


def split_inputs(inputs: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: inputs[prefix + k] for k in MODEL_KEYS if prefix + k in inputs}


def last_hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final (normed) hidden states, without the [tokens, vocab] logits.

    Through the wrapper's forward (DDP needs it to reduce the gradients), except for a ZeRO-3 engine: the loss
    already runs as that engine's forward (``run_in_forward``), so its backbone is called directly.
    """
    if is_zero3_engine(model):
        return unwrap(model).base_model(**inputs, use_cache=False).last_hidden_state
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


class KDLoss:
    """``alpha * KD + (1 - alpha) * CE`` for the DistillTrainer; holds the frozen teacher (never trained)."""

    def __init__(self, teacher: torch.nn.Module, cfg: KDConfig, alpha: float) -> None:
        self.teacher = teacher
        self.cfg = cfg
        self.alpha = alpha
        self.placed = False

    def prepare(self, trainer: Any) -> None:
        """Place the teacher once the Trainer exists: partitioned under ZeRO-3, a replica otherwise."""
        if not self.placed:
            self.teacher = prepare_teacher(self.teacher, trainer.accelerator)
            self.placed = True

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any):
        if not self.placed:  # no prepare(trainer) call: follow the student onto its device, once
            self.teacher.to(inputs["input_ids"].device)
            self.placed = True
        # The LM heads are applied outside the models' forwards; under ZeRO-3 the student's must be gathered inside
        # its engine's forward for DeepSpeed to reduce its gradient (elsewhere this is a plain call).
        return run_in_forward(model, self.loss, model, inputs, num_items_in_batch)

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any):
        # With distill_all_tokens the collator labelled every text token, so "labels" covers them.
        s_mask, t_mask, targets = paired_positions(inputs["labels"], inputs["teacher_labels"])
        device = inputs["input_ids"].device
        t_inputs = {k: v.to(device) for k, v in split_inputs(inputs, "teacher_").items()}
        if "pixel_values" in t_inputs:
            t_inputs["pixel_values"] = t_inputs["pixel_values"].to(self.teacher.dtype)
        with torch.no_grad():
            h_t = last_hidden(self.teacher, t_inputs)[t_mask.to(device)]
        h_s = last_hidden(model, split_inputs(inputs))[s_mask]
        head_s = unwrap(model).get_output_embeddings().weight
        head_t = unwrap(self.teacher).get_output_embeddings().weight
        chunk = self.cfg.chunk_size or max(h_s.size(0), 1)
        with gathered(head_s, head_t):  # ZeRO-3 shards: full weights for the loss only
            loss, kd, ce = chunked_kd_loss(
                h_s, head_s, h_t.to(h_s.device), head_t.to(h_s.device), targets.to(h_s.device), self.cfg,
                self.alpha, chunk, num_items_in_batch,
            )
        return loss, ({"kd": kd, "ce": ce} if self.alpha < 1.0 else {"kd": kd})
