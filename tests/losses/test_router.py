"""Router losses against transformers' reference and hand-made cases."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from distill.losses.router import expert_load, load_balancing_loss, router_entropy, router_z_loss


@pytest.mark.parametrize("top_k", [1, 2])
def test_load_balancing_matches_transformers(top_k):
    g = torch.Generator().manual_seed(0)
    layers = [torch.randn(2 * 7, 4, generator=g) for _ in range(3)]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    ours = load_balancing_loss(layers, top_k, mask)
    # transformers pools all layers into one sum (so imbalances of different layers can cancel) and counts
    # top-k assignments without dividing by k; ours is per layer and per assignment: the mean over layers of
    # transformers' single-layer value, divided by k (uniform routing gives 1 for any k).
    per_layer = [load_balancing_loss_func((x,), num_experts=4, top_k=top_k, attention_mask=mask) for x in layers]
    torch.testing.assert_close(ours, torch.stack(per_layer).mean() / top_k, rtol=1e-5, atol=1e-6)


def test_uniform_routing_gives_one_and_collapse_gives_more():
    uniform = [torch.zeros(8, 4)]
    # Zero logits: top-k ties break to the same experts, so f is not uniform; use a balanced assignment instead.
    balanced = [torch.eye(4).repeat(2, 1) * 10]
    assert float(load_balancing_loss(balanced, 1)) == pytest.approx(1.0, abs=1e-3)
    collapsed = [torch.tensor([[10.0, 0, 0, 0]]).repeat(8, 1)]
    assert float(load_balancing_loss(collapsed, 1)) == pytest.approx(4.0, abs=1e-2)
    assert float(router_z_loss(uniform)) == pytest.approx(math.log(4) ** 2)


def test_load_and_entropy_and_empty_mask():
    logits = [torch.eye(4).repeat(2, 1) * 10]
    torch.testing.assert_close(expert_load(logits, 1), torch.full((1, 4), 0.25))
    assert float(router_entropy([torch.zeros(3, 4)])[0]) == pytest.approx(math.log(4))
    empty = torch.zeros(8, dtype=torch.long)
    assert float(load_balancing_loss(logits, 1, empty)) == 0.0


def test_layer_sum_is_llava_mods_formula():
    """``layers="sum"``: per layer E * sum_e me_e * ce_e (me: mean gate probability, ce: share of tokens whose first
    choice is e, DeepSpeed-MoE's top-1 gating as LLaVA-MoD uses), summed over the MoE layers."""
    layers = [torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0]]),
              torch.tensor([[0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 4.0], [1.0, 2.0, 0.0, 0.0]])]
    expected = 0.0
    for logits in layers:
        me = logits.softmax(-1).mean(0)
        ce = torch.nn.functional.one_hot(logits.argmax(-1), 4).float().mean(0)
        expected += 4 * float((me * ce).sum())
    assert float(load_balancing_loss(layers, 1, layers="sum")) == pytest.approx(expected, rel=1e-6)
    assert float(load_balancing_loss(layers, 1, layers="mean")) == pytest.approx(expected / 2, rel=1e-6)
    assert float(router_z_loss(layers, layers="sum")) == pytest.approx(2 * float(router_z_loss(layers)), rel=1e-6)
    with pytest.raises(ValueError, match="layers"):
        load_balancing_loss(layers, 1, layers="max")
