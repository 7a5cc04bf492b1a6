"""Parity with TRL: the same policy and reference log-probs give the same loss as TRL's own code.

TRL 1.x computes DPO-family losses inline in ``DPOTrainer._compute_loss`` (no standalone function), so the test
drives that method itself with a stand-in ``self`` and a stand-in model that returns fixed per-token log-probs, and
with ``precompute_ref_logps`` on, so the reference log-probs come straight from the batch. ``kto_pair`` existed in TRL
from 0.7.9 to 0.9.4 (removed in 0.9.6); its reference is the ``DPOTrainer.dpo_loss`` branch of those releases (the
one LLaVA-MoD trained with), restated below.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from distill.losses.preference import preference_loss

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

B, T = 3, 7


def _batch(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    for row, start in enumerate([2, 3, 4, 2, 5, 3]):  # prompts of different lengths, chosen rows first
        completion[row, start:] = 1
    return {
        "input_ids": torch.randint(0, 50, (2 * B, T), generator=g),
        "attention_mask": torch.ones(2 * B, T, dtype=torch.long),
        "completion_mask": completion,
        "token_logps": -torch.rand(2 * B, T - 1, generator=g) * 3,
        "ref_chosen_logps": -torch.rand(B, generator=g) * 10,
        "ref_rejected_logps": -torch.rand(B, generator=g) * 10,
    }


def _trl_loss(batch: dict[str, torch.Tensor], loss_type: str, beta: float) -> torch.Tensor:
    shift_mask = batch["completion_mask"][:, 1:]
    token_logps = batch["token_logps"] * shift_mask  # TRL's fused head zeroes positions whose label is -100

    def model(**kwargs):
        zeros = torch.zeros_like(token_logps)
        return SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool())

    model.training = True
    fake = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x,
                                                 gather=lambda x: x),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, use_weighting=False, label_smoothing=0.0,
        _metrics={"train": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {k: v for k, v in batch.items() if k != "token_logps"}
    return trl_dpo.DPOTrainer._compute_loss(fake, model, inputs, return_outputs=False)


def _ours(batch: dict[str, torch.Tensor], loss_type: str, beta: float) -> torch.Tensor:
    shift_mask = batch["completion_mask"][:, 1:]
    seq = (batch["token_logps"] * shift_mask).sum(-1)
    lengths = shift_mask.sum(-1)
    losses, _, _ = preference_loss(
        seq[:B], seq[B:], batch["ref_chosen_logps"], batch["ref_rejected_logps"], loss_type, beta,
        chosen_lengths=lengths[:B], rejected_lengths=lengths[B:],
    )
    return losses.mean()


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_family_equals_trl(loss_type: str, beta: float):
    for seed in range(3):
        batch = _batch(seed)
        torch.testing.assert_close(_ours(batch, loss_type, beta), _trl_loss(batch, loss_type, beta))


def _trl_0_9_kto_pair(pc, pr, rc, rr, beta):
    """TRL 0.7.9-0.9.4 ``DPOTrainer.dpo_loss``, ``loss_type == "kto_pair"`` (HALOs eq. 7), restated."""
    chosen_kl = (pc - rc).mean().clamp(min=0)
    rejected_kl = (pr - rr).mean().clamp(min=0)
    return torch.cat((1 - F.sigmoid(beta * ((pc - rc) - rejected_kl)), 1 - F.sigmoid(beta * (chosen_kl - (pr - rr)))))


def test_kto_pair_equals_trl_0_9_in_value_and_gradient():
    for seed in range(3):
        batch = _batch(seed)
        seq = (batch["token_logps"] * batch["completion_mask"][:, 1:]).sum(-1)
        # Policy log-probs above and below the reference, so both KL clamps are exercised.
        for shift in (-2.0, 0.0, 3.0):
            ours_pol = (seq + shift).clone().requires_grad_(True)
            ref_pol = (seq + shift).clone().requires_grad_(True)
            rc, rr = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
            ours, _, _ = preference_loss(ours_pol[:B], ours_pol[B:], rc, rr, "kto_pair", 0.1)
            ref = _trl_0_9_kto_pair(ref_pol[:B], ref_pol[B:], rc, rr, 0.1)
            torch.testing.assert_close(ours, ref)
            ours.mean().backward()
            ref.mean().backward()
            torch.testing.assert_close(ours_pol.grad, ref_pol.grad)
