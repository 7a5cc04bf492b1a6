"""The teacher: any local image-text-to-text checkpoint with its processor, frozen by construction.

    teacher, processor = load_teacher("ckpt/llava-qwen2-7b", dtype=torch.bfloat16)

Frozen means: eval mode, every parameter with ``requires_grad=False``, and ``train()`` made a no-op so that
no trainer can switch dropout back on. The teacher is never handed to an optimizer: stages keep it outside
the model the Trainer owns. Where it runs (one device, a replica per rank, or ZeRO-3 shards) is decided once
the Trainer exists: distill/training/distributed.py.
"""

from __future__ import annotations

import types
from pathlib import Path

import torch
from transformers import PreTrainedModel, ProcessorMixin

from distill.models.student import load_vlm, use_attn_implementation


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """Put ``model`` in eval mode for good and stop gradients into it."""
    model.eval()
    model.requires_grad_(False)
    model.train = types.MethodType(lambda self, mode=True: self, model)
    return model


def load_teacher(
    path: str | Path, dtype: torch.dtype | None = None, attn_implementation: str = "auto"
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a frozen teacher and its processor from a local folder."""
    model, processor = load_vlm(path, dtype=dtype)
    # Set after loading (on the vision tower and the LLM alike): load_vlm keeps transformers' default, sdpa.
    use_attn_implementation(model, attn_implementation)
    return freeze(model), processor
