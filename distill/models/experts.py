"""``sorted``: an experts forward for transformers' MoE blocks with one host synchronisation per layer.

transformers' ``eager`` experts loop over the experts hit, finding each one's tokens with ``torch.where`` and
testing each index in Python: about nine host-device synchronisations per MoE layer, each of which stops the host
from queueing work ahead of the GPU (a D2S step of a 0.5B student on an H100 spent 165 ms of 800 in them, the GPU
idle half the step). Here the (token, expert) pairs are sorted by expert once and split by the experts' token
counts, the only value the host needs. The same per-expert matrix products as ``eager``, the same result (test:
outputs and gradients equal). ``grouped_mm`` needs no count on the host at all, but was slower under autocast with
fp32 master weights (BENCHMARKS.md).

Registered in transformers' ``ExpertsInterface`` on ``import distill.models``; selected per model with
``config.text_config._experts_implementation = "sorted"`` (``experts_implementation`` of the D2S stage).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sorted_experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                           top_k_weights: torch.Tensor) -> torch.Tensor:
    if self.is_transposed or self.has_bias or not self.has_gate:
        raise ValueError(f"experts_implementation='sorted' supports untransposed gate_up/down experts without bias, "
                         f"not {type(self).__name__}'s layout")
    top_k = top_k_index.size(-1)
    expert_ids = top_k_index.reshape(-1)
    order = torch.argsort(expert_ids, stable=True)
    token_idx = order // top_k
    weights = top_k_weights.reshape(-1)[order]
    counts = torch.bincount(expert_ids, minlength=self.num_experts).tolist()  # the one synchronisation
    outs = []
    for expert, rows in enumerate(hidden_states[token_idx].split(counts)):
        if rows.size(0):
            h = self._apply_gate(F.linear(rows, self.gate_up_proj[expert]))
            outs.append(F.linear(h, self.down_proj[expert]))
    if not outs:
        return torch.zeros_like(hidden_states)
    out = torch.cat(outs) * weights[:, None]
    return torch.zeros_like(hidden_states).index_add_(0, token_idx, out.to(hidden_states.dtype))


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register("sorted", sorted_experts_forward)


IMPLEMENTATIONS = ("sorted", "eager", "grouped_mm")


def check_experts_implementation(name: str) -> None:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"experts_implementation={name!r}: expected one of {list(IMPLEMENTATIONS)}")


def set_experts_implementation(model: torch.nn.Module, name: str) -> None:
    """Use ``name`` for the MoE blocks of ``model`` (a VLM or a text model); a dense model is left alone. Set on the
    text config, which the experts read (a reloaded MoE artifact otherwise gets transformers' default,
    ``grouped_mm``)."""
    check_experts_implementation(name)
    config = getattr(model.config, "text_config", model.config)
    if getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None):
        config._experts_implementation = name
