"""Preference stage: the teacher really is the reference, stays untouched, and precomputed == online."""

from __future__ import annotations

import pytest
import torch
from transformers import set_seed

from distill.data.collate import ConversationEncoder, SupervisedCollator
from distill.data.formats import load_preference
from distill.data.templates import get_template
from distill.models.student import StudentParts, build_student, load_vlm, save_artifact
from distill.models.teacher import load_teacher
from distill.models.upcycle import UpcycleConfig, upcycle
from distill.stages.preference import PairCollator, PreferenceConfig, PreferenceLoss, precompute
from distill.training.context import StageContext
from distill.training.moe import RouterRecorder


@pytest.fixture(scope="module")
def artifacts(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    set_seed(0)
    teacher, tproc = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_large"])))
    save_artifact(teacher, tproc, root / "teacher")
    dense, sproc = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_small"])))
    save_artifact(upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, layers="all")), sproc, root / "student")
    return root


def _cfg(tiny_world, artifacts, training, **kw):
    return PreferenceConfig(
        model=kw.pop("model", {"artifact": str(artifacts / "student")}), teacher={"path": str(artifacts / "teacher")},
        data={"train": [str(tiny_world["data"] / "preference.json")], "image_root": str(tiny_world["images"])},
        training=training, **kw)


def _batch_and_collator(tiny_world, student_proc, teacher_proc):
    template = get_template("chatml")
    collator = PairCollator(SupervisedCollator(ConversationEncoder(student_proc, template, 512),
                                               tiny_world["images"],
                                               teacher=ConversationEncoder(teacher_proc, template, 512)))
    ds, _ = load_preference(tiny_world["data"] / "preference.json", tiny_world["images"])
    return ds, collator


def test_precomputed_equals_online_and_reference_matters(tiny_world, artifacts):
    cfg = _cfg(tiny_world, artifacts, {})
    student, sproc = load_vlm(artifacts / "student")
    teacher, tproc = load_teacher(artifacts / "teacher")
    student.eval()
    ds, collator = _batch_and_collator(tiny_world, sproc, tproc)
    ds = ds.select(range(6))
    recorder = RouterRecorder(student)
    online = PreferenceLoss(cfg, teacher, recorder, 2)(student, collator(list(ds)), None)[0]
    pre = precompute(ds, collator, teacher, average=False)
    offline = PreferenceLoss(cfg, None, recorder, 2)(student, collator(list(pre)), None)[0]
    torch.testing.assert_close(online, offline, rtol=1e-5, atol=1e-6)
    # The reference is really the teacher: scoring against the student itself gives another loss.
    self_ref = PreferenceLoss(cfg, student, recorder, 2)(student, collator(list(ds)), None)[0]
    assert not torch.allclose(online, self_ref)


@pytest.mark.parametrize("precompute_reference", [False, True])
def test_stage_trains_student_and_leaves_teacher(tiny_world, artifacts, tmp_path, cpu_training, precompute_reference):
    teacher_before = load_vlm(artifacts / "teacher")[0].state_dict()
    cfg = _cfg(tiny_world, artifacts, {**cpu_training, "max_steps": 4, "learning_rate": 1e-3},
               precompute_reference=precompute_reference, loss_type="sigmoid")
    metrics = cfg.run(StageContext(name="pref", run_dir=tmp_path, training=cfg.training))
    for name, value in load_vlm(artifacts / "teacher")[0].state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    before = load_vlm(artifacts / "student")[0].state_dict()
    after = load_vlm(tmp_path / "pref" / "model")[0].state_dict()
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed and all(".mlp." in n or "multi_modal_projector" in n for n in changed)
    last = metrics["last_logged"]
    assert {"loss/pref", "loss/rewards/chosen", "loss/rewards/accuracy", "loss/aux"} <= set(last)


def test_stage_runs_with_frozen_parts_in_bf16(tiny_world, artifacts, tmp_path, cpu_training):
    """model.frozen_dtype=bfloat16 freezes the LM head in bf16; the reference and policy log-probs take bf16 rows
    outside the forward's autocast (fp32 rows into a bf16 head would raise)."""
    cfg = _cfg(tiny_world, artifacts, {**cpu_training, "max_steps": 2, "learning_rate": 1e-3, "bf16": True},
               model={"artifact": str(artifacts / "student"), "frozen_dtype": "bfloat16"}, loss_type="sigmoid")
    metrics = cfg.run(StageContext(name="pref", run_dir=tmp_path, training=cfg.training))
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    before = load_vlm(artifacts / "student")[0].state_dict()
    after = load_vlm(tmp_path / "pref" / "model", dtype=torch.float32)[0].state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before if ".mlp." in n)
