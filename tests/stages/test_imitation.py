"""D2D imitation: lowers KL to the teacher, keeps frozen parts and the teacher bit-identical, and gives the
same loss and update for batch 8 x accumulation 1 as for batch 2 x accumulation 4."""

from __future__ import annotations

import pytest
import torch
from transformers import set_seed

from distill.data.formats import load_llava_json
from distill.losses.kd import kd_loss, paired_positions
from distill.models.student import load_vlm
from distill.stages.imitation import ImitationConfig, build_collator
from distill.training.context import StageContext
from distill.training.kd import KDConfig, KDLoss, split_inputs


@pytest.fixture(scope="module")
def artifacts(tiny_artifacts):
    return tiny_artifacts


def _config(tiny_world, artifacts, training, **kw):
    return ImitationConfig(
        model={"artifact": str(artifacts / "student")},
        teacher={"path": str(artifacts / "teacher")},
        data={"train": [str(tiny_world["data"] / "instruct.json")], "image_root": str(tiny_world["images"]),
              "limit": kw.pop("limit", None)},
        training=training,
        **kw,
    )


def _kl_to_teacher(student_dir, teacher_dir, tiny_world) -> float:
    student, sproc = load_vlm(student_dir)
    teacher, tproc = load_vlm(teacher_dir)
    ds, _ = load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])
    collator = build_collator(_config(tiny_world, teacher_dir.parent, {}).data, KDConfig(), sproc, tproc)
    batch = collator([ds[i] for i in range(16)])
    s_mask, t_mask, _ = paired_positions(batch["labels"], batch["teacher_labels"])
    with torch.no_grad():
        s = student.eval()(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        t = teacher.eval()(**{k: batch["teacher_" + k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
    return float(kd_loss(s[s_mask], t[t_mask]))


@pytest.mark.parametrize("normalise", ["tokens", "replies"])
def test_the_loss_reads_the_collators_host_labels(tiny_world, artifacts, normalise):
    """The KD collator carries the labels as host arrays (no GPU read-back to find the response positions); they
    are not model inputs, and the loss gives the same value with them as without (labels copied back)."""
    student, sproc = load_vlm(artifacts / "student")
    teacher, tproc = load_vlm(artifacts / "teacher")
    ds, _ = load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])
    kd = KDConfig(normalise=normalise, chunk_size=8)
    batch = build_collator(_config(tiny_world, artifacts, {}).data, kd, sproc, tproc)([ds[i] for i in range(6)])
    for key in ("labels", "teacher_labels"):
        assert torch.equal(torch.from_numpy(batch["host_labels"][key]), batch[key])
    assert "host_labels" not in split_inputs(batch) and "host_labels" not in split_inputs(batch, "teacher_")
    loss_fn = KDLoss(teacher, kd, alpha=0.5)
    with_host = loss_fn(student, batch, None)
    without = loss_fn(student, {k: v for k, v in batch.items() if k != "host_labels"}, None)
    torch.testing.assert_close(with_host[0], without[0], rtol=0, atol=0)
    assert with_host[1]["kd"] > 0


def test_d2d_lowers_kl_and_keeps_frozen_parts(tiny_world, artifacts, tmp_path, cpu_training):
    cfg = _config(tiny_world, artifacts, {**cpu_training, "max_steps": 15, "learning_rate": 3e-3})
    teacher_before = {k: v.clone() for k, v in load_vlm(artifacts / "teacher")[0].state_dict().items()}
    kl_before = _kl_to_teacher(artifacts / "student", artifacts / "teacher", tiny_world)
    metrics = cfg.run(StageContext(name="d2d", run_dir=tmp_path, training=cfg.training))
    out = tmp_path / "d2d" / "model"
    assert _kl_to_teacher(out, artifacts / "teacher", tiny_world) < kl_before
    before = load_vlm(artifacts / "student")[0].state_dict()
    after = load_vlm(out)[0].state_dict()
    for name, value in before.items():
        if name.startswith("model.vision_tower"):
            assert torch.equal(value, after[name]), name
    assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith("model.language_model"))
    assert any(not torch.equal(before[n], after[n]) for n in before if "multi_modal_projector" in n)
    for name, value in load_vlm(artifacts / "teacher")[0].state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    assert metrics["last_logged"]["loss/kd"] > 0 and "loss/ce" not in metrics["last_logged"]  # alpha = 1


@pytest.mark.parametrize("normalise", ["tokens", "replies"])
def test_batch_8_equals_batch_2_times_accumulation_4(tiny_world, artifacts, tmp_path, cpu_training, normalise):
    """One SGD step (lr 1, no clipping): the update is the gradient, so equal updates mean equal gradients. With
    kd.normalise=replies the Trainer counts the accumulated batch's replies instead of its tokens."""
    base = {**cpu_training, "max_steps": 1, "optim": "sgd", "learning_rate": 1.0, "max_grad_norm": 0.0,
            "weight_decay": 0.0, "lr_scheduler_type": "constant"}
    runs = {}
    for name, (bs, ga) in {"b8": (8, 1), "b2x4": (2, 4)}.items():
        cfg = _config(tiny_world, artifacts, {**base, "per_device_train_batch_size": bs,
                                              "gradient_accumulation_steps": ga}, alpha=0.5, limit=8,
                      kd={"normalise": normalise})
        set_seed(0)
        metrics = cfg.run(StageContext(name=name, run_dir=tmp_path, training=cfg.training))
        runs[name] = (metrics, load_vlm(tmp_path / name / "model")[0].state_dict())
    (m8, w8), (m2, w2) = runs["b8"], runs["b2x4"]
    assert m8["train_loss"] == pytest.approx(m2["train_loss"], rel=1e-5)
    assert m8["last_logged"]["loss/kd"] == pytest.approx(m2["last_logged"]["loss/kd"], rel=1e-4)
    start = load_vlm(artifacts / "student")[0].state_dict()
    moved = 0
    for name in w8:
        torch.testing.assert_close(w8[name] - start[name], w2[name] - start[name], rtol=1e-4, atol=1e-6)
        moved += int(not torch.equal(w8[name], start[name]))
    assert moved > 0
