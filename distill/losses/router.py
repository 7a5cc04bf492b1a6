"""Router losses for MoE students: Switch/GShard load balancing and the router z-loss.

    aux = load_balancing_loss(router_logits, top_k, mask)   # router_logits: one [tokens, E] tensor per layer
    z = router_z_loss(router_logits, mask)

Both average over the MoE layers and over the unmasked (non-padding) tokens; each is meant to be added to the
training loss exactly once per step, by the stage (the models' own aux loss is switched off at upcycling).
Unlike transformers' ``load_balancing_loss_func``, which pools all layers into one sum (so imbalances of
different layers can cancel) and counts k assignments per token, ours balances each layer and divides by k:
perfectly uniform routing gives 1 for any k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _valid(logits: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    logits = logits.float()
    return logits if mask is None else logits[mask.reshape(-1).to(logits.device).bool()]


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """E * sum_e f_e * P_e averaged over layers: f_e the fraction of top-k assignments sent to expert e, P_e the
    mean router probability of e. Equals 1 (per layer) under perfectly uniform routing, larger when unbalanced."""
    losses = []
    for logits in router_logits:
        logits = _valid(logits, mask)
        if logits.numel() == 0:
            continue
        n_experts = logits.size(-1)
        probs = logits.softmax(-1)
        chosen = probs.topk(top_k, dim=-1).indices
        dispatch = torch.zeros_like(probs).scatter_(-1, chosen, 1.0)
        fraction = dispatch.mean(0) / top_k
        losses.append(n_experts * (fraction * probs.mean(0)).sum())
    if not losses:
        return torch.zeros((), device=router_logits[0].device if router_logits else None)
    return torch.stack(losses).mean()


def router_z_loss(router_logits: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared log-partition of the router logits (ST-MoE), averaged over layers."""
    losses = [torch.logsumexp(v, -1).pow(2).mean() for v in (_valid(x, mask) for x in router_logits) if v.numel()]
    if not losses:
        return torch.zeros((), device=router_logits[0].device if router_logits else None)
    return torch.stack(losses).mean()


def expert_load(router_logits: Sequence[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[layers, E]: the fraction of each layer's top-k assignments that each expert receives."""
    rows = []
    for logits in router_logits:
        logits = _valid(logits, mask).detach()
        chosen = logits.topk(top_k, dim=-1).indices
        counts = torch.bincount(chosen.reshape(-1), minlength=logits.size(-1)).float()
        rows.append(counts / counts.sum().clamp_min(1))
    return torch.stack(rows)


def router_entropy(router_logits: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """[layers]: mean entropy (nats) of each layer's routing distribution per token."""
    out = []
    for logits in router_logits:
        logp = _valid(logits, mask).detach().log_softmax(-1)
        out.append(-(logp.exp() * logp).sum(-1).mean())
    return torch.stack(out)
