"""kd.normalise=replies: the Trainer's num_items_in_batch counts the accumulated batch's replies, not its tokens."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

from distill.training.trainer import DistillTrainer, reply_starts

LABELS = torch.tensor([[-100, 5, 6, -100, -100, 7, -100],      # 2 replies, 3 tokens
                       [-100, -100, 8, 9, 10, -100, 11]])     # 2 replies, 4 tokens


class _Loss:
    def __init__(self, normalise: str) -> None:
        self.normalise = normalise

    def __call__(self, model, inputs, num_items_in_batch):  # never called here
        raise AssertionError


def _count(tmp_path, normalise: str) -> int:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = DistillTrainer(model=torch.nn.Linear(2, 2), args=args, loss_fn=_Loss(normalise))
    batch = {"input_ids": torch.zeros_like(LABELS), "labels": LABELS}
    return int(trainer._get_num_items_in_batch([batch, batch], torch.device("cpu")))


def test_reply_starts_keep_one_label_per_reply():
    starts = reply_starts(LABELS)
    assert starts.ne(-100).sum().item() == 4
    assert starts[0].tolist() == [-100, 5, -100, -100, -100, 7, -100]


def test_trainer_counts_tokens_or_replies_as_the_loss_normalises(tmp_path):
    assert _count(tmp_path, "tokens") == 14   # 7 response tokens in each of the two micro-batches
    assert _count(tmp_path, "replies") == 8   # 4 replies in each
