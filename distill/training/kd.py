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
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``."""

    def __post_init__(self) -> None:
        if not (Path(self.path) / "config.json").is_file():
            raise FileNotFoundError(f"teacher.path: no checkpoint at {self.path}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"teacher.dtype={self.dtype!r}")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, self.dtype)


def split_inputs(inputs: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {k: inputs[prefix + k] for k in MODEL_KEYS if prefix + k in inputs}


def last_hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return out.hidden_states[-1]


class KDLoss:
    """``alpha * KD + (1 - alpha) * CE`` for the DistillTrainer; holds the frozen teacher (never trained)."""

    def __init__(self, teacher: torch.nn.Module, cfg: KDConfig, alpha: float) -> None:
        self.teacher = teacher
        self.cfg = cfg
        self.alpha = alpha

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any):
        # With distill_all_tokens the collator labelled every text token, so "labels" covers them.
        s_mask, t_mask, targets = paired_positions(inputs["labels"], inputs["teacher_labels"])
        device = inputs["input_ids"].device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)  # follows the student onto its device once, on the first step
        t_inputs = {k: v.to(device) for k, v in split_inputs(inputs, "teacher_").items()}
        if "pixel_values" in t_inputs:
            t_inputs["pixel_values"] = t_inputs["pixel_values"].to(self.teacher.dtype)
        with torch.no_grad():
            h_t = last_hidden(self.teacher, t_inputs)[t_mask.to(device)]
        h_s = last_hidden(model, split_inputs(inputs))[s_mask]
        head_s = model.get_output_embeddings().weight if hasattr(model, "get_output_embeddings") else None
        if head_s is None:  # wrapped (DDP / DeepSpeed): reach the module inside
            head_s = model.module.get_output_embeddings().weight
        head_t = self.teacher.get_output_embeddings().weight
        chunk = self.cfg.chunk_size or max(h_s.size(0), 1)
        loss, kd, ce = chunked_kd_loss(
            h_s, head_s, h_t.to(h_s.device), head_t.to(h_s.device), targets.to(h_s.device), self.cfg,
            self.alpha, chunk, num_items_in_batch,
        )
        return loss, ({"kd": kd, "ce": ce} if self.alpha < 1.0 else {"kd": kd})
