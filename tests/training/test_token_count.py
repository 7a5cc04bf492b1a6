"""DistillTrainer counts the tokens seen without reading the GPU every micro-batch: the count waits on the device
until the next log or checkpoint, which must still see every token up to their step."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset

from distill.training.trainer import DistillTrainer, training_arguments

LENGTHS = [3, 7, 5, 8, 2, 6, 4, 1]  # real tokens of each record; rows are padded to 8


def _collate(rows):
    mask = torch.zeros(len(rows), 8, dtype=torch.long)
    for i, r in enumerate(rows):
        mask[i, : r["n"]] = 1
    return {"input_ids": torch.ones(len(rows), 8, dtype=torch.long), "attention_mask": mask,
            "x": torch.tensor([[float(r["n"])] for r in rows])}


@pytest.mark.parametrize("mode", ["non_padding", "all"])
def test_tokens_seen_are_exact_at_each_log_and_checkpoint(tmp_path, cpu_training, mode):
    data = Dataset.from_list([{"n": n} for n in LENGTHS])
    per_step = []  # what each micro-batch (one per step here) holds, as the Trainer's own count would read it

    def loss_fn(model, inputs, num_items_in_batch):
        mask = inputs["attention_mask"]
        per_step.append(int(mask.sum()) if mode == "non_padding" else mask.numel())
        loss = model(inputs["x"]).pow(2).mean()
        return loss, {"mse": loss.detach()}

    training = {**cpu_training, "max_steps": 4, "per_device_train_batch_size": 2, "logging_steps": 2,
                "save_strategy": "steps", "save_steps": 3, "include_num_input_tokens_seen": mode}
    args, _ = training_arguments(training, tmp_path / "checkpoints")
    assert args.logging_nan_inf_filter is False  # our compute_loss skips non-finite losses itself
    trainer = DistillTrainer(model=torch.nn.Linear(1, 1), args=args, train_dataset=data, data_collator=_collate,
                             loss_fn=loss_fn, token_normalised=False)
    trainer.train()
    assert len(per_step) == 4
    logged = {h["step"]: h["num_input_tokens_seen"] for h in trainer.state.log_history if "loss" in h}
    assert logged == {2: sum(per_step[:2]), 4: sum(per_step)}
    assert trainer.state.num_input_tokens_seen == sum(per_step)
    state = json.loads((tmp_path / "checkpoints" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["num_input_tokens_seen"] == sum(per_step[:3])
    if mode == "non_padding":
        assert sum(per_step) == sum(LENGTHS)  # one epoch: every record once
