"""The ``sorted`` experts forward equals transformers' ``eager`` one: outputs and gradients, every family."""

from __future__ import annotations

import pytest
import torch

import distill.models  # noqa: F401 - registers the "sorted" experts forward
from distill.models.upcycle import UpcycleConfig, moe_blocks, upcycle
from tests.models.test_upcycle import FAMILIES, _inputs, _llava


def _grads(model, impl: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.config.text_config._experts_implementation = impl
    model.zero_grad()
    logits = model(**_inputs()).logits
    (logits * torch.linspace(-1, 1, logits.size(-1))).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sorted_experts_equal_eager(family):
    text, layers, _ = FAMILIES[family]
    model = upcycle(_llava(text), UpcycleConfig(num_experts=4, top_k=2, layers=layers, router_init="normal"))
    with torch.no_grad():  # experts that differ, so a token sent to the wrong one would show
        for _, block in moe_blocks(model):
            block.experts.gate_up_proj.normal_(0, 0.2)
            block.experts.down_proj.normal_(0, 0.2)
    eager_logits, eager_grads = _grads(model, "eager")
    sorted_logits, sorted_grads = _grads(model, "sorted")
    torch.testing.assert_close(sorted_logits, eager_logits, rtol=1e-5, atol=1e-6)
    assert sorted_grads.keys() == eager_grads.keys() and any("experts" in n for n in eager_grads)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(sorted_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_experts_without_tokens_get_no_gradient():
    text, _, _ = FAMILIES["qwen2"]
    model = upcycle(_llava(text), UpcycleConfig(num_experts=4, top_k=2, layers="all"))
    experts = moe_blocks(model)[0][1].experts
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, text.hidden_size, generator=g)
    index = torch.tensor([[0, 2]] * 6)  # experts 1 and 3 get nothing
    weights = torch.rand(6, 2, generator=g)
    grads = {}
    for impl in ("eager", "sorted"):
        experts.config._experts_implementation = impl
        experts.zero_grad()
        out = experts(hidden, index, weights)
        out.pow(2).sum().backward()
        grads[impl] = (out.detach(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone())
    for ours, theirs in zip(grads["sorted"], grads["eager"]):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    for grad in grads["sorted"][1:]:
        assert grad[[1, 3]].abs().sum() == 0 and grad[[0, 2]].abs().sum() > 0
