"""Next-token cross-entropy on the labelled (response) positions.

    loss = response_ce(logits, labels)                          # mean over valid tokens
    loss = response_ce(logits, labels, num_items_in_batch=n)    # sum / n, exact under gradient accumulation
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def normalise(total: torch.Tensor, n_valid: torch.Tensor | int, num_items_in_batch: torch.Tensor | int | None):
    """Divide a summed loss by the accumulated token count if given, else by this batch's; 0 for no tokens."""
    denom = num_items_in_batch if num_items_in_batch is not None else n_valid
    if isinstance(denom, torch.Tensor):
        denom = denom.to(total.device, total.dtype).clamp_min(1)
        return total / denom
    return total / max(int(denom), 1)


def response_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """CE of ``logits[:, t]`` against ``labels[:, t + 1]``; positions labelled -100 are ignored."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return normalise(total, shift_labels.ne(IGNORE_INDEX).sum(), num_items_in_batch)
