"""An fp8 forward for a frozen teacher: its LLM's linear layers as rowwise-scaled float8 matrix products.

The teacher only runs forward and is about 60% of a distillation step's FLOPs; on Hopper, fp8 products of its
shapes run 1.7-1.9x faster than bf16 (issue 10). Each ``nn.Linear`` of the language model (not the LM head, which
the chunked KD loss reads directly, and not the vision tower or projector) becomes an ``Fp8Linear``: the weight is
quantised once per output row to ``float8_e4m3fn``; each activation row is quantised on the fly with its own
scale; ``torch._scaled_mm`` multiplies them with both scales applied and returns bf16.

It is an approximation and opt-in (``teacher.fp8: true``); ``fp8_fidelity`` measures it as the KL divergence
between the exact and the fp8 teacher's next-token distributions.
"""

from __future__ import annotations

import torch
from torch import nn

E4M3_MAX = 448.0
"""Largest finite float8_e4m3fn value."""


def _rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x_fp8, scale)`` with ``x ~= x_fp8 * scale`` and one fp32 scale per row."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


_fused_rowwise = None


def _quantise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_rowwise`` for activations; on GPU compiled into one kernel (eager runs the amax, the division and the
    cast as separate passes over the activations, which ate the fp8 GEMM's gain in the benchmark)."""
    global _fused_rowwise
    if not x.is_cuda:
        return _rowwise(x)
    if _fused_rowwise is None:
        _fused_rowwise = torch.compile(_rowwise, dynamic=True)
    return _fused_rowwise(x)


class Fp8Linear(nn.Module):
    """Inference-only stand-in for an ``nn.Linear``: fp8 weight (per output row scale), fp8 activations (per row)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight_fp8, scale = _rowwise(linear.weight.detach())
        self.register_buffer("weight_fp8", weight_fp8)  # [out, in]
        self.register_buffer("weight_scale", scale.t().contiguous())  # [1, out]
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp8, x_scale = _quantise(x.reshape(-1, self.in_features))
        out = torch._scaled_mm(x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale,
                               bias=self.bias, out_dtype=torch.bfloat16)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 rowwise"


def convert_to_fp8(model: nn.Module) -> dict[str, int]:
    """Replace the language model's ``nn.Linear`` layers (sizes divisible by 16, as the fp8 GEMM needs) by
    ``Fp8Linear`` in place; returns how many were converted and kept."""
    llm = model.get_decoder() if hasattr(model, "get_decoder") else model
    counts = {"converted": 0, "kept": 0}
    for parent in list(llm.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if child.in_features % 16 or child.out_features % 16:
                    counts["kept"] += 1
                    continue
                setattr(parent, name, Fp8Linear(child))
                counts["converted"] += 1
    if counts["converted"] == 0:
        raise ValueError("teacher.fp8: no linear layer of the teacher's language model could be converted "
                         "(their sizes must be multiples of 16)")
    return counts


@torch.no_grad()
def fp8_fidelity(exact_logits: torch.Tensor, fp8_logits: torch.Tensor) -> float:
    """Mean over positions of KL(exact || fp8) between the two next-token distributions, in nats (the KD loss's
    forward KL, with the exact model in the teacher's place)."""
    from distill.losses.kd import KDOptions, token_divergence

    return token_divergence(fp8_logits, exact_logits, KDOptions()).mean().item()
