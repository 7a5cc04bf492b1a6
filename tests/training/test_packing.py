"""Padding-free packing (``data.packing``): one row per micro-batch gives the same losses and gradients as the
padded batch, for the cross-entropy, the KD loss (both models packed) and the MoE student's router loss;
attention never crosses a record boundary."""

from __future__ import annotations

import pytest
import torch

from distill.data.collate import IGNORE_INDEX, ConversationEncoder, SupervisedCollator
from distill.data.formats import load_llava_json
from distill.data.templates import get_template
from distill.models.student import load_vlm
from distill.stages.imitation import build_collator
from distill.training.config import DataConfig
from distill.training.kd import KDConfig, KDLoss
from distill.training.supervised import ce_loss


@pytest.fixture(scope="module")
def records(tiny_world):
    ds, _ = load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])
    with_image = [r for r in ds if r["images"]]
    text_only = [r for r in ds if not r["images"]]
    # Different lengths (so the padded batch has padding) and a text-only record in the middle.
    return [with_image[0], text_only[0], with_image[1], with_image[2]]


def _data(tiny_world, packing):
    return DataConfig(train=[str(tiny_world["data"] / "instruct.json")], image_root=str(tiny_world["images"]),
                      packing=packing)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_packed_batch_is_the_records_end_to_end(tiny_artifacts, tiny_world, records):
    _, processor = load_vlm(tiny_artifacts / "student")
    enc = ConversationEncoder(processor, get_template("chatml"), max_length=1024)
    padded = SupervisedCollator(enc, tiny_world["images"])(records)
    packed = SupervisedCollator(enc, tiny_world["images"], packed=True)(records)
    lengths = padded["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert torch.equal(packed["input_ids"][0], padded["input_ids"][padded["attention_mask"].bool()])
    starts = torch.tensor([0, *lengths[:-1]]).cumsum(0)
    assert (packed["position_ids"][0][starts] == 0).all() and int(packed["position_ids"].max()) == max(lengths) - 1
    # No position predicts the next record's first token; every other label is the padded batch's.
    assert (packed["labels"][0][starts] == IGNORE_INDEX).all()
    assert torch.equal(packed["labels"][0], padded["labels"][padded["attention_mask"].bool()])
    assert torch.equal(packed["pixel_values"], padded["pixel_values"])
    # Training on every token labels each record's first token; packed, it must still not be a target.
    enc_all = ConversationEncoder(processor, get_template("chatml"), max_length=1024, train_on="all")
    packed_all = SupervisedCollator(enc_all, tiny_world["images"], packed=True)(records)
    assert (packed_all["labels"][0][starts] == IGNORE_INDEX).all()
    assert (SupervisedCollator(enc_all, tiny_world["images"])(records)["labels"][:, 0] != IGNORE_INDEX).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_ce_equals_padded(tiny_artifacts, tiny_world, records, attn):
    model, processor = load_vlm(tiny_artifacts / "student")
    model.set_attn_implementation(attn)
    # Real checkpoints ship with the cache on (the stand-ins were saved with it off by their Trainer); a cache in
    # the forward would replace the per-record mask with a plain causal one.
    model.config.text_config.use_cache = True
    enc = ConversationEncoder(processor, get_template("chatml"), max_length=1024)
    out = {}
    for packed in (False, True):
        model.zero_grad()
        batch = SupervisedCollator(enc, tiny_world["images"], packed=packed)(records)
        loss, _ = ce_loss(model, batch, None)
        loss.backward()
        out[packed] = (loss.detach(), _grads(model))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    for name, grad in out[False][1].items():
        torch.testing.assert_close(out[True][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_kd_equals_padded_and_attention_stays_in_each_record(tiny_artifacts, tiny_world, records):
    model, processor = load_vlm(tiny_artifacts / "student")
    teacher, teacher_processor = load_vlm(tiny_artifacts / "teacher")
    loss_fn = KDLoss(teacher.eval(), KDConfig(), alpha=0.5)
    out = {}
    for packed in (False, True):
        model.zero_grad()
        batch = build_collator(_data(tiny_world, packed), KDConfig(), processor, teacher_processor)(records)
        loss, parts = loss_fn(model, batch, None)
        loss.backward()
        out[packed] = (loss.detach(), parts["kd"].detach(), _grads(model))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-5, atol=1e-6)
    for name, grad in out[False][2].items():
        torch.testing.assert_close(out[True][2][name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # The same row without position ids is one long causal sequence: later records then see earlier ones.
    batch = build_collator(_data(tiny_world, True), KDConfig(), processor, teacher_processor)(records)
    leaky = {k: v for k, v in batch.items() if k not in ("position_ids", "teacher_position_ids")}
    with torch.no_grad():
        assert not torch.allclose(loss_fn(model, leaky, None)[0], out[True][0], rtol=1e-3)


def test_packed_moe_router_loss_equals_padded(tiny_artifacts, tiny_world, records):
    from distill.losses.router import load_balancing_loss
    from distill.models.upcycle import UpcycleConfig, upcycle
    from distill.training.moe import RouterRecorder

    model, processor = load_vlm(tiny_artifacts / "student")
    model = upcycle(model, UpcycleConfig(num_experts=4, top_k=2, layers="all"))
    recorder = RouterRecorder(model)
    enc = ConversationEncoder(processor, get_template("chatml"), max_length=1024)
    aux = {}
    for packed in (False, True):
        batch = SupervisedCollator(enc, tiny_world["images"], packed=packed)(records)
        with torch.no_grad():
            ce_loss(model, batch, None)
        aux[packed] = load_balancing_loss(recorder.take_valid(batch.get("attention_mask")), 2)
    torch.testing.assert_close(aux[True], aux[False], rtol=1e-5, atol=1e-7)


def test_preference_stage_refuses_packing(tiny_artifacts, tiny_world):
    from distill.stages.preference import PreferenceConfig

    data = {"train": [str(tiny_world["data"] / "preference.json")], "image_root": str(tiny_world["images"])}
    kw = {"model": {"artifact": str(tiny_artifacts / "student")}, "teacher": {"path": str(tiny_artifacts / "teacher")}}
    PreferenceConfig(data=data, **kw)
    with pytest.raises(ValueError, match="packing"):
        PreferenceConfig(data={**data, "packing": True}, **kw)
