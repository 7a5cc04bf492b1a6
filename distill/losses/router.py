"""Router losses for MoE students: Switch/GShard load balancing and the router z-loss.

    aux = load_balancing_loss(router_logits, top_k, mask)   # router_logits: one [tokens, E] tensor per layer
    z = router_z_loss(router_logits, mask)

Both average over the unmasked (non-padding) tokens and, by default, over the MoE layers (``layers="mean"``);
``layers="sum"`` adds the layers up as LLaVA-MoD (DeepSpeed-MoE's per-layer ``l_aux``, summed by its model), which
gives the router of a 12-MoE-layer student 12 times the gradient. Each is meant to be added to the training loss
exactly once per step, by the stage (the models' own aux loss is switched off at upcycling); under gradient
accumulation the stage weights each micro-batch's term by its share of the step's tokens (``micro_batch_share``).
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


LAYER_REDUCTIONS = ("mean", "sum")


def _reduce(losses: list[torch.Tensor], layers: str) -> torch.Tensor:
    if layers not in LAYER_REDUCTIONS:
        raise ValueError(f"layers={layers!r}: expected one of {LAYER_REDUCTIONS}")
    stacked = torch.stack(losses)
    return stacked.mean() if layers == "mean" else stacked.sum()


def load_balancing_loss(router_logits: Sequence[torch.Tensor], top_k: int,
                        mask: torch.Tensor | None = None, layers: str = "mean") -> torch.Tensor:
    """E * sum_e f_e * P_e per layer, averaged (``layers="mean"``) or summed (``"sum"``, LLaVA-MoD) over layers: f_e
    the fraction of top-k assignments sent to expert e, P_e the mean router probability of e. Equals 1 per layer
    under perfectly uniform routing, larger when unbalanced."""
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
    return _reduce(losses, layers)


def router_z_loss(router_logits: Sequence[torch.Tensor], mask: torch.Tensor | None = None,
                  layers: str = "mean") -> torch.Tensor:
    """Mean squared log-partition of the router logits (ST-MoE), averaged or summed over layers."""
    losses = [torch.logsumexp(v, -1).pow(2).mean() for v in (_valid(x, mask) for x in router_logits) if v.numel()]
    if not losses:
        return torch.zeros((), device=router_logits[0].device if router_logits else None)
    return _reduce(losses, layers)


def micro_batch_share(labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None) -> torch.Tensor | float:
    """This micro-batch's share of the optimizer step's trained tokens (``num_items_in_batch`` counts them over the
    accumulated micro-batches and the processes). A per-micro-batch router term weighted by it adds up, over the
    step, to the token-weighted mean of the micro-batches' terms: the same scale for batch 8 x accumulation 1, 2 x 4
    or 2 processes x 4 (unweighted, it grew with the accumulation steps). ``None`` (no accumulation count): 1."""
    if num_items_in_batch is None:
        return 1.0
    tokens = (labels[..., 1:] != -100).sum()
    return tokens / torch.as_tensor(num_items_in_batch, device=tokens.device).clamp_min(1)


def expert_load(router_logits: Sequence[torch.Tensor], top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[layers, E]: the fraction of each layer's top-k assignments that each expert receives."""
    rows = []
    for logits in router_logits:
        logits = _valid(logits, mask).detach()
        chosen = logits.topk(top_k, dim=-1).indices
        chosen = chosen.reshape(-1)  # counted by scatter: bincount on a GPU reads its maximum back to the host
        counts = torch.zeros(logits.size(-1), dtype=torch.long, device=chosen.device)
        counts = counts.scatter_add_(0, chosen, torch.ones_like(chosen)).float()
        rows.append(counts / counts.sum().clamp_min(1))
    return torch.stack(rows)


def router_entropy(router_logits: Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """[layers]: mean entropy (nats) of each layer's routing distribution per token."""
    out = []
    for logits in router_logits:
        logp = _valid(logits, mask).detach().log_softmax(-1)
        out.append(-(logp.exp() * logp).sum(-1).mean())
    return torch.stack(out)
