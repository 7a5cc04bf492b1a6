"""Adapter init changes only the projector (everything else bit-identical) and lowers the caption loss."""

from __future__ import annotations

import torch
from transformers import set_seed

from distill.data.collate import ConversationEncoder, SupervisedCollator
from distill.data.formats import load_llava_json
from distill.data.templates import get_template
from distill.losses.ce import response_ce
from distill.models.student import StudentParts, build_student, load_vlm
from distill.stages.adapter_init import AdapterInitConfig
from distill.training.context import StageContext


def _caption_loss(model, processor, tiny_world) -> float:
    ds, _ = load_llava_json(tiny_world["data"] / "captions.json", tiny_world["images"])
    enc = ConversationEncoder(processor, get_template("chatml"), max_length=512)
    batch = SupervisedCollator(enc, tiny_world["images"])([ds[i] for i in range(16)])
    labels = batch.pop("labels")
    with torch.no_grad():
        return float(response_ce(model.eval()(**batch).logits, labels))


def test_adapter_init_trains_only_the_projector(tiny_world, tmp_path, cpu_training):
    parts = {"vision_tower": str(tiny_world["vision_tower"]), "llm": str(tiny_world["llm_small"])}
    set_seed(0)
    before, processor = build_student(StudentParts(**parts))
    loss_before = _caption_loss(before, processor, tiny_world)

    cfg = AdapterInitConfig(
        model={"parts": parts},
        data={"train": [str(tiny_world["data"] / "captions.json")], "image_root": str(tiny_world["images"])},
        training={**cpu_training, "max_steps": 12},
    )
    set_seed(0)
    metrics = cfg.run(StageContext(name="adapter_init", run_dir=tmp_path, training=cfg.training))
    after, processor_after = load_vlm(tmp_path / "adapter_init" / "model")

    changed, same = [], []
    after_state = after.state_dict()
    for name, value in before.state_dict().items():
        (same if torch.equal(value, after_state[name]) else changed).append(name)
    assert changed and all("multi_modal_projector" in n for n in changed)
    assert all(any(n.startswith(p) for p in ("model.vision_tower", "model.language_model", "lm_head"))
               for n in same if "multi_modal_projector" not in n)
    assert not [n for n in before.state_dict() if "multi_modal_projector" in n and n in same]
    assert _caption_loss(after, processor_after, tiny_world) < loss_before
    assert metrics["global_step"] == 12


def test_adapter_init_with_modality_experts_trains_projector_and_visual_experts(tiny_world, tmp_path, cpu_training):
    """``parts.modality_experts`` (train: all): the student is built with visual FFN experts, adapter init opens
    them next to the projector, the text FFNs and the rest stay bit-identical, and the artifact reloads with them."""
    parts = {"vision_tower": str(tiny_world["vision_tower"]), "llm": str(tiny_world["llm_small"]),
             "modality_experts": {"layers": "all", "train": "all"}}
    set_seed(0)
    before, _ = build_student(StudentParts(**parts))
    cfg = AdapterInitConfig(
        model={"parts": parts},
        data={"train": [str(tiny_world["data"] / "captions.json")], "image_root": str(tiny_world["images"])},
        training={**cpu_training, "max_steps": 4},
    )
    set_seed(0)
    cfg.run(StageContext(name="adapter_init", run_dir=tmp_path, training=cfg.training))
    after, _ = load_vlm(tmp_path / "adapter_init" / "model")

    after_state = after.state_dict()
    assert set(after_state) == set(before.state_dict())  # the visual experts came back with the artifact
    changed = {n for n, v in before.state_dict().items() if not torch.equal(v, after_state[n])}
    assert any("visual_expert" in n for n in changed) and any("multi_modal_projector" in n for n in changed)
    assert all("visual_expert" in n or "multi_modal_projector" in n for n in changed)
