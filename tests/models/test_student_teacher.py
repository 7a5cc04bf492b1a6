"""The student assembles from parts, round-trips through save/load, and the teacher is frozen by construction."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from distill.models.student import StudentParts, build_student, load_vlm, save_artifact
from distill.models.teacher import load_teacher
from distill.models.trainable import apply_trainability, merge_lora, parameter_table


def _inputs(processor):
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    return processor(text="<image>\nWhat color is the circle?", images=image, return_tensors="pt")


def test_student_keeps_pretrained_parts(tiny_world):
    from transformers import AutoModel, AutoModelForCausalLM

    model, processor = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_small"])))
    vision = AutoModel.from_pretrained(tiny_world["vision_tower"])
    llm = AutoModelForCausalLM.from_pretrained(tiny_world["llm_small"])
    for k, v in vision.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[k], v), k
    for k, v in llm.model.state_dict().items():
        assert torch.equal(model.model.language_model.state_dict()[k], v), k
    assert torch.equal(model.lm_head.weight, llm.lm_head.weight)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_index


def test_student_round_trip_identical_logits(tiny_world, tmp_path):
    model, processor = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_small"])))
    model.eval()
    inputs = _inputs(processor)
    with torch.no_grad():
        before = model(**inputs).logits
    save_artifact(model, processor, tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").is_file()
    loaded, loaded_proc = load_vlm(tmp_path / "student")
    with torch.no_grad():
        after = loaded.eval()(**_inputs(loaded_proc)).logits
    assert torch.equal(before, after)


def test_teacher_is_frozen_and_round_trips(tiny_world, tmp_path):
    model, processor = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_large"])))
    save_artifact(model, processor, tmp_path / "teacher")
    teacher, tproc = load_teacher(tmp_path / "teacher")
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()  # a trainer calling train() must not switch dropout back on
    assert not teacher.training
    with torch.no_grad():
        assert torch.equal(model.eval()(**_inputs(processor)).logits, teacher(**_inputs(tproc)).logits)


def test_trainability_modes_and_table(tiny_world):
    model, _ = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_small"])))
    apply_trainability(model, {"vision_tower": "frozen", "projector": "full", "llm": "lora"})
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector" in n for n in trainable)
    assert all("lora_" in n for n in trainable if "language_model" in n)
    assert any("lora_" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    table = parameter_table(model)
    assert "projector" in table and "vision_tower" in table and "total" in table
    assert merge_lora(model) > 0
    assert not any("lora_" in n for n, _ in model.named_parameters())


def test_siglip_tower_student(tiny_world, tmp_path):
    """A SigLIP-style tower (no CLS token) assembles with the 'full' strategy and round-trips."""
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    vision = SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=2, image_size=32, patch_size=8))
    vision.save_pretrained(tmp_path / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "siglip")
    with pytest.raises(ValueError, match="no CLS token"):
        build_student(StudentParts(str(tmp_path / "siglip"), str(tiny_world["llm_small"])))
    model, processor = build_student(StudentParts(str(tmp_path / "siglip"), str(tiny_world["llm_small"]),
                                                  vision_feature_select_strategy="full"))
    inputs = processor(text="<image>\nWhat?", images=Image.new("RGB", (32, 32)), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 16
    save_artifact(model, processor, tmp_path / "student")
    loaded, loaded_proc = load_vlm(tmp_path / "student")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, loaded.eval()(**inputs).logits)
    assert type(loaded_proc.image_processor).__name__.startswith("Siglip")


@pytest.mark.parametrize("attn, limit", [("sdpa", 8), ("flex_attention", 64)])
def test_flex_attention_raises_the_recompile_limit(tiny_world, tmp_path, attn, limit):
    """Each model and grad mode compiles its own flex attention; past Dynamo's limit (torch's default 8) it would
    run uncompiled, as dense math over the whole packed row. Loading a flex-attention model raises the limit."""
    model, processor = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_small"])))
    save_artifact(model, processor, tmp_path / "teacher")
    with torch._dynamo.config.patch(recompile_limit=8):
        teacher, _ = load_teacher(tmp_path / "teacher", attn_implementation=attn)
        assert teacher.config.get_text_config()._attn_implementation == attn
        assert torch._dynamo.config.recompile_limit == limit
