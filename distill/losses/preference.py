"""Preference-distillation losses on sequence log-probabilities (policy = student, reference = teacher).

    logps = sequence_logps(logits, labels)                       # [B]: summed over the response tokens
    tok, row = response_token_logps(hidden, labels, lm_head)     # the same from the final hidden states, the
    logps = per_sequence(tok, row, labels)                       # head applied to the response positions only
    losses, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, loss_type="kto_pair", beta=0.1)

Loss types: ``sigmoid`` (DPO), ``hinge`` (SLiC), ``ipo`` (on per-token averages, as TRL 1.x normalises it;
LLaVA-MoD's TRL summed them) and ``kto_pair`` (LLaVA-MoD's default: KTO with paired data, the KL baselines
estimated from the batch's own log-ratios and clamped at 0, as TRL 0.7.9-0.9.4 computed it (removed in 0.9.6):
value and gradient, the baselines not detached).
Rewards are beta * (policy - ref). ``tests/losses/test_preference_trl_parity.py`` checks each type against TRL.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill.losses.ce import IGNORE_INDEX
from distill.losses.kd import shifted_response_mask

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "kto_pair")


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) over labelled positions of log p(label_t | < t), with the next-token shift; fp32."""
    logp = logits[:, :-1].float().log_softmax(-1)
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    token = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask
    total = token.sum(-1)
    return total / mask.sum(-1).clamp_min(1) if average else total


def response_token_logps(
    hidden: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per response token, log p(label_t | < t) from the final hidden states [B, T, H] and the LM head; fp32.

    Only the response positions go through the head, so the [B, T, V] logits are never built: for a preference
    batch (image and prompt tokens, a short answer) that is most of the logits' memory. ``chunk_size`` rows at a
    time when no gradient is needed (the reference); with one, all rows at once (their logits are kept for the
    backward either way). Returns the log-probs [N] and each one's row in the batch [N].
    """
    mask = shifted_response_mask(labels)
    rows, targets = hidden[mask], labels[:, 1:][mask[:, :-1]]
    step = chunk_size if chunk_size and not torch.is_grad_enabled() else max(rows.size(0), 1)
    rows = rows.to(head.weight.dtype)  # outside the forward's autocast: a bf16 head (frozen_dtype) takes bf16 rows
    parts = [-F.cross_entropy(head(rows[i:i + step]).float(), targets[i:i + step], reduction="none")
             for i in range(0, rows.size(0), step)]
    tok = torch.cat(parts) if parts else rows.new_zeros(0, dtype=torch.float32)
    return tok, mask.nonzero()[:, 0]


def per_sequence(token_logps: torch.Tensor, rows: torch.Tensor, labels: torch.Tensor,
                 average: bool = False) -> torch.Tensor:
    """Sum (or mean) of ``response_token_logps`` per sequence [B]: equal to ``sequence_logps`` of the logits."""
    total = token_logps.new_zeros(labels.size(0)).index_add(0, rows, token_logps)
    return total / (labels[:, 1:] != IGNORE_INDEX).sum(-1).clamp_min(1) if average else total


def preference_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses [B] and the chosen / rejected rewards [B] (detached)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs the response lengths (it works on per-token averages)")
        delta = chosen_ratio / chosen_lengths.clamp_min(1) - rejected_ratio / rejected_lengths.clamp_min(1)
        losses = (delta - 1 / (2 * beta)) ** 2
    else:
        chosen_kl = chosen_ratio.mean().clamp(min=0)
        rejected_kl = rejected_ratio.mean().clamp(min=0)
        # Chosen pushed above the rejected baseline, rejected pushed below the chosen one (one term each).
        losses = torch.cat([1 - torch.sigmoid(beta * (chosen_ratio - rejected_kl)),
                            1 - torch.sigmoid(beta * (chosen_kl - rejected_ratio))])
    return losses, (beta * chosen_ratio).detach(), (beta * rejected_ratio).detach()
