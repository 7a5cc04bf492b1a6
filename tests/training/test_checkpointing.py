"""Activation checkpointing with flex_attention is reentrant unless the recipe chose (non-reentrant checkpointing
of a flex_attention layer fails its first backward on the GPU), and a reentrant checkpoint still trains the
layers when the input embeddings are frozen."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from distill.training.trainer import CHECKPOINTING_KWARGS, DistillTrainer, checkpointing_for, training_arguments


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
    values = [getattr(args, f) for f in CHECKPOINTING_KWARGS if hasattr(args, f)]
    assert values and all(v == expected for v in values)  # every name the Trainer may read


def test_no_checkpointing_changes_nothing(tmp_path, cpu_training):
    args, _ = training_arguments(cpu_training, tmp_path)
    checkpointing_for(_llm("flex_attention"), args)
    assert args.gradient_checkpointing_kwargs is None


def _trained_grads(tmp_path, cpu_training, checkpoint: bool) -> tuple[dict[str, torch.Tensor], LlamaForCausalLM]:
    """One DistillTrainer step of a tiny LLM with frozen input embeddings; its gradients."""
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    model = _llm("sdpa")
    model.model.embed_tokens.requires_grad_(False)
    grads = {}

    def loss_fn(m, inputs, n):
        loss = m(input_ids=ids, labels=ids, use_cache=False).loss
        return loss, {"ce": loss.detach()}

    class Keep(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    training = {**cpu_training, "max_steps": 1, "per_device_train_batch_size": 1, "gradient_checkpointing": checkpoint}
    args, _ = training_arguments(training, tmp_path / str(checkpoint))
    if checkpoint:
        model.config._attn_implementation = "flex_attention"  # only to take checkpointing_for's branch
        checkpointing_for(model, args)
        model.config._attn_implementation = "sdpa"  # flex_attention has no CPU backward
    trainer = DistillTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"n": 0}]),
                             data_collator=lambda rows: {"x": torch.zeros(1)}, loss_fn=loss_fn,
                             token_normalised=False, callbacks=[Keep()])
    trainer.train()
    return grads, model


def test_the_trainer_checkpoints_reentrant_and_the_layers_still_train(tmp_path, cpu_training):
    """Through the Trainer (which reads the kwargs when train() starts): the layers checkpoint reentrant, and their
    gradients equal the plain forward's although nothing before the first layer requires grad (the case reentrant
    checkpointing can get wrong)."""
    plain, _ = _trained_grads(tmp_path, cpu_training, checkpoint=False)
    checkpointed, model = _trained_grads(tmp_path, cpu_training, checkpoint=True)
    layer = model.model.layers[0]
    assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords["use_reentrant"] is True
    assert plain.keys() == checkpointed.keys() and any("layers.0" in n for n in checkpointed)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, msg=name)


def test_a_trainable_vision_tower_is_refused(tmp_path, cpu_training, tiny_artifacts):
    """Reentrant checkpointing would give a trainable vision tower no gradients (pixels never require grad)."""
    from distill.models.student import load_vlm
    from distill.models.trainable import vision_parts

    model, _ = load_vlm(tiny_artifacts / "student")
    model.config.get_text_config()._attn_implementation = "flex_attention"
    args, _ = training_arguments({**cpu_training, "gradient_checkpointing": True}, tmp_path)
    with pytest.raises(ValueError, match="trainable vision tower"):
        checkpointing_for(model, args)
    for module in vision_parts(model)[0]:
        module.requires_grad_(False)
    checkpointing_for(model, args)
    assert args.gradient_checkpointing_kwargs == {"use_reentrant": True}
