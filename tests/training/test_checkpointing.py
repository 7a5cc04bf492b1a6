"""Activation checkpointing with flex_attention is reentrant unless the recipe chose (non-reentrant checkpointing
of a flex_attention layer fails its first backward on the GPU), and a reentrant checkpoint still trains the
layers when the input embeddings are frozen."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from distill.training.trainer import checkpointing_for, training_arguments


def _llm(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize(("attn", "kwargs", "expected"), [
    ("flex_attention", None, {"use_reentrant": True}),
    ("flex_attention", {"use_reentrant": False}, {"use_reentrant": False}),  # the recipe's choice stands
    ("sdpa", None, None),
])
def test_flex_attention_checkpoints_reentrant_unless_chosen(tmp_path, cpu_training, attn, kwargs, expected):
    training = {**cpu_training, "gradient_checkpointing": True}
    if kwargs is not None:
        training["gradient_checkpointing_kwargs"] = kwargs
    args, _ = training_arguments(training, tmp_path)
    model = _llm(attn)
    checkpointing_for(model, args)
    assert args.gradient_checkpointing_kwargs == expected


def test_no_checkpointing_changes_nothing(tmp_path, cpu_training):
    args, _ = training_arguments(cpu_training, tmp_path)
    checkpointing_for(_llm("flex_attention"), args)
    assert args.gradient_checkpointing_kwargs is None


def test_reentrant_checkpointing_trains_the_layers_behind_frozen_embeddings(tmp_path, cpu_training):
    """The reentrant checkpointing that checkpointing_for chooses gives the gradients of the plain forward, also
    when nothing before the first layer requires grad (the case reentrant checkpointing can get wrong)."""
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])

    def grads(checkpoint: bool) -> dict[str, torch.Tensor]:
        model = _llm("sdpa")
        model.model.embed_tokens.requires_grad_(False)
        model.train()
        if checkpoint:
            args, _ = training_arguments({**cpu_training, "gradient_checkpointing": True}, tmp_path)
            model.config._attn_implementation = "flex_attention"  # only to take checkpointing_for's branch
            checkpointing_for(model, args)
            model.config._attn_implementation = "sdpa"  # flex_attention has no CPU backward
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert any("layers.0" in n for n in checkpointed)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, msg=name)
