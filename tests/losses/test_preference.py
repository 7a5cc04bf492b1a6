"""Preference losses against their reference formulas, and sequence log-probs against a direct gather."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses.preference import per_sequence, preference_loss, response_token_logps, sequence_logps


def _logps(seed: int, n: int = 4) -> torch.Tensor:
    return -torch.rand(n, generator=torch.Generator().manual_seed(seed)) * 20


def test_sequence_logps_sums_response_tokens_with_shift():
    logits = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 2, 4, -100]])
    logp = logits.log_softmax(-1)
    expected = logp[0, 0, 2] + logp[0, 1, 4]
    torch.testing.assert_close(sequence_logps(logits, labels)[0], expected)
    torch.testing.assert_close(sequence_logps(logits, labels, average=True)[0], expected / 2)


@pytest.mark.parametrize("average", [False, True])
def test_response_rows_through_the_head_equal_the_full_logits(average):
    """The head on the response positions only gives sequence_logps of the full logits: values and gradients
    (hidden states and head weight), and chunked the same as whole when no gradient is taken."""
    g = torch.Generator().manual_seed(0)
    labels = torch.full((3, 7), -100)
    labels[0, 2:5] = torch.tensor([3, 1, 4])
    labels[1, 5:] = torch.tensor([0, 9])
    # row 2: no response tokens at all -> 0 (sum) / 0 (mean)
    hidden = torch.randn(3, 7, 6, generator=g, requires_grad=True)
    head = torch.nn.Linear(6, 11, bias=False)
    ref_hidden = hidden.detach().clone().requires_grad_(True)
    full = sequence_logps(head(ref_hidden), labels, average)
    tok, rows = response_token_logps(hidden, labels, head)
    ours = per_sequence(tok, rows, labels, average)
    torch.testing.assert_close(ours, full)
    assert ours[2] == 0
    w = torch.randn(3, generator=g)
    (g_h, g_w), (r_h, r_w) = (torch.autograd.grad((x * w).sum(), [h, head.weight])
                              for x, h in ((ours, hidden), (full, ref_hidden)))
    torch.testing.assert_close(g_h, r_h)
    torch.testing.assert_close(g_w, r_w)
    with torch.no_grad():
        chunked = per_sequence(*response_token_logps(hidden, labels, head, chunk_size=2), labels, average)
    torch.testing.assert_close(chunked, full.detach())


def test_dpo_sigmoid_and_hinge_formulas():
    pc, pr, rc, rr = _logps(1), _logps(2), _logps(3), _logps(4)
    delta = (pc - rc) - (pr - rr)
    losses, cr, rj = preference_loss(pc, pr, rc, rr, "sigmoid", beta=0.1)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(0.1 * delta))
    torch.testing.assert_close(cr, 0.1 * (pc - rc))
    torch.testing.assert_close(rj, 0.1 * (pr - rr))
    hinge, _, _ = preference_loss(pc, pr, rc, rr, "hinge", beta=0.1)
    torch.testing.assert_close(hinge, torch.relu(1 - 0.1 * delta))


def test_ipo_uses_per_token_averages():
    pc, pr, rc, rr = _logps(5), _logps(6), _logps(7), _logps(8)
    lc, lr = torch.tensor([3.0, 4, 5, 6]), torch.tensor([2.0, 2, 8, 1])
    losses, _, _ = preference_loss(pc, pr, rc, rr, "ipo", beta=0.5, chosen_lengths=lc, rejected_lengths=lr)
    torch.testing.assert_close(losses, ((pc - rc) / lc - (pr - rr) / lr - 1.0) ** 2)
    with pytest.raises(ValueError, match="lengths"):
        preference_loss(pc, pr, rc, rr, "ipo")


def test_kto_pair_formula_and_equal_policy_reference():
    pc, pr, rc, rr = _logps(9), _logps(10), _logps(11), _logps(12)
    losses, _, _ = preference_loss(pc, pr, rc, rr, "kto_pair", beta=0.1)
    ckl, rkl = max(float((pc - rc).mean()), 0.0), max(float((pr - rr).mean()), 0.0)
    expected = torch.cat([1 - torch.sigmoid(0.1 * ((pc - rc) - rkl)), 1 - torch.sigmoid(0.1 * (ckl - (pr - rr)))])
    torch.testing.assert_close(losses, expected)
    same, _, _ = preference_loss(pc, pr, pc, pr, "kto_pair", beta=0.1)
    torch.testing.assert_close(same, torch.full((8,), 0.5))  # policy == reference: every term at sigmoid(0)
    dpo_same, _, _ = preference_loss(pc, pr, pc, pr, "sigmoid", beta=0.1)
    torch.testing.assert_close(dpo_same, torch.full((4,), math.log(2)))


def test_swapping_the_reference_changes_the_loss():
    pc, pr, rc, rr = _logps(13), _logps(14), _logps(15), _logps(16)
    a, _, _ = preference_loss(pc, pr, rc, rr, "sigmoid")
    b, _, _ = preference_loss(pc, pr, rr, rc, "sigmoid")
    assert not torch.allclose(a, b)
