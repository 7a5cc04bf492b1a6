"""kd.normalise=replies: the Trainer's num_items_in_batch counts the accumulated batch's replies, not its tokens,
in the frame the loss uses (a VLM's shifted labels), and D2S's router terms are shared out in the same unit."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainingArguments

from distill.losses.kd import reply_starts, reply_weights, shifted_response_mask
from distill.models.student import load_vlm
from distill.training.moe import router_share
from distill.training.trainer import DistillTrainer

LABELS = torch.tensor([[-100, 5, 6, -100, -100, 7, -100],      # 2 replies, 3 tokens
                       [-100, -100, 8, 9, 10, -100, 11]])     # 2 replies, 4 tokens


class _Loss:
    def __init__(self, normalise: str) -> None:
        self.normalise = normalise

    def __call__(self, model, inputs, num_items_in_batch):  # never called here
        raise AssertionError


@pytest.fixture(scope="module")
def vlm(tiny_artifacts):
    return load_vlm(tiny_artifacts / "student")[0]


def _count(vlm, tmp_path, normalise: str) -> int:
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = DistillTrainer(model=vlm, args=args, loss_fn=_Loss(normalise))
    batch = {"input_ids": torch.zeros_like(LABELS), "labels": LABELS}
    return int(trainer._get_num_items_in_batch([batch, batch], torch.device("cpu")))


def test_reply_starts_keep_one_label_per_reply():
    starts = reply_starts(LABELS)
    assert starts.ne(-100).sum().item() == 4
    assert starts[0].tolist() == [-100, 5, -100, -100, -100, 7, -100]


def test_trainer_counts_what_the_loss_divides_by(vlm, tmp_path):
    weights = reply_weights(shifted_response_mask(LABELS))
    assert _count(vlm, tmp_path, "replies") == 8 == round(2 * weights.sum().item())  # 4 replies a micro-batch
    assert _count(vlm, tmp_path, "tokens") == 14 == 2 * int(shifted_response_mask(LABELS).sum())


@pytest.mark.parametrize("normalise", ["tokens", "replies"])
def test_router_shares_of_a_step_add_up_to_one(normalise):
    micro = [LABELS, LABELS[:1]]
    count = sum(int((reply_starts(m) if normalise == "replies" else m)[..., 1:].ne(-100).sum()) for m in micro)
    assert sum(float(router_share(m, count, normalise)) for m in micro) == pytest.approx(1.0)


def test_kd_config_refuses_replies_without_replies():
    from distill.training.kd import KDConfig

    assert KDConfig(normalise="replies").normalise == "replies"
    with pytest.raises(ValueError, match="no replies"):
        KDConfig(normalise="replies", distill_all_tokens=True)
    with pytest.raises(ValueError, match="kd.normalise"):
        KDConfig(normalise="sequences")
