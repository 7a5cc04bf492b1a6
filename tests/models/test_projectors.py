"""Token-compressing projectors (LDP, resampler): image-token counts, training, reload, upcycling, KD, generation.

A 3x3-patch CLIP tower (24 px, 8 px patches) makes the compression visible: 9 patches become 4 image tokens.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    set_seed,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from distill.data.collate import ConversationEncoder, SupervisedCollator, count_image_tokens
from distill.data.formats import load_llava_json
from distill.data.templates import get_template
from distill.losses.ce import response_ce
from distill.models.student import StudentParts, build_student, load_vlm, save_artifact
from distill.models.teacher import freeze
from distill.models.trainable import apply_trainability, parameter_table
from distill.models.upcycle import UpcycleConfig, moe_blocks, upcycle
from distill.models.vlm import DistillLlavaForConditionalGeneration, DistillLlavaProcessor
from distill.training.kd import KDConfig, KDLoss
from eval.generate import Generator

COMPRESSING = {"ldp": {}, "resampler": {"num_queries": 4}}


@pytest.fixture(scope="module")
def tower(tmp_path_factory) -> str:
    """A random 3x3-patch CLIP vision tower with its image processor."""
    path = tmp_path_factory.mktemp("tower3x3")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=24, patch_size=8)
    CLIPVisionModel(config).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}).save_pretrained(path)
    return str(path)


def _student(tower, tiny_world, projector="ldp", llm="llm_small", **options):
    set_seed(0)
    config = {**COMPRESSING.get(projector, {}), **options}
    return build_student(StudentParts(tower, str(tiny_world[llm]), projector=projector, projector_config=config,
                                      vision_feature_layer=-1))


def _inputs(processor, color=(200, 30, 30)):
    image = Image.new("RGB", (24, 24), color)
    return processor(text="<image>\nWhat color is the circle?", images=image, return_tensors="pt")


def _n_image_features(model, pixel_values) -> list[int]:
    with torch.no_grad():
        return [f.shape[0] for f in model.get_image_features(pixel_values=pixel_values).pooler_output]


@pytest.mark.parametrize(("projector", "options", "tokens"), [
    ("ldp", {}, 4),                      # 3x3 -> ceil(3/2)^2
    ("ldp", {"stride": 3}, 1),
    ("ldp", {"pooled_grid": 3}, 9),
    ("resampler", {}, 4),
    ("resampler", {"num_queries": 2, "num_layers": 1, "num_heads": 4}, 2),
])
def test_image_tokens_match_projector_output(tower, tiny_world, projector, options, tokens):
    model, processor = _student(tower, tiny_world, projector, **options)
    assert type(model) is DistillLlavaForConditionalGeneration and type(processor) is DistillLlavaProcessor
    assert count_image_tokens(processor) == tokens == model.config.image_seq_length
    inputs = _inputs(processor)
    assert _n_image_features(model, inputs["pixel_values"]) == [tokens]
    with torch.no_grad():
        out = model(**inputs)
    features = out.image_hidden_states  # one tensor per image in newer transformers 5.x, stacked in 5.17
    features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features
    assert features.shape == (tokens, model.config.text_config.hidden_size)


def test_mlp_projector_stays_plain_llava(tower, tiny_world):
    model, processor = _student(tower, tiny_world, "mlp2x_gelu")
    assert type(model) is LlavaForConditionalGeneration and type(processor) is LlavaProcessor
    assert count_image_tokens(processor) == 9 == _n_image_features(model, _inputs(processor)["pixel_values"])[0]


def test_bad_projector_options_are_refused(tower, tiny_world):
    llm = str(tiny_world["llm_small"])
    with pytest.raises(ValueError, match="mlp2x_gelu takes no options"):
        StudentParts(tower, llm, projector_config={"stride": 2})
    with pytest.raises(ValueError, match="unknown keys \\['num_queries'\\]"):
        StudentParts(tower, llm, projector="ldp", projector_config={"num_queries": 4})
    with pytest.raises(ValueError, match="stride=0"):
        StudentParts(tower, llm, projector="ldp", projector_config={"stride": 0})
    with pytest.raises(ValueError, match="num_queries='4'"):
        StudentParts(tower, llm, projector="resampler", projector_config={"num_queries": "4"})
    with pytest.raises(ValueError, match="exceeds the vision tower's 3x3"):
        _student(tower, tiny_world, "ldp", pooled_grid=4)
    with pytest.raises(ValueError, match="num_heads=3 does not divide"):
        _student(tower, tiny_world, "resampler", num_heads=3)
    with pytest.raises(ValueError, match="drop this tower's CLS token"):
        build_student(StudentParts(tower, llm, projector="ldp", vision_feature_select_strategy="full"))


@pytest.mark.parametrize("projector", sorted(COMPRESSING))
def test_adapter_init_trains_only_the_projector(tower, tiny_world, projector):
    model, processor = _student(tower, tiny_world, projector)
    apply_trainability(model, {"vision_tower": "frozen", "projector": "full", "llm": "frozen"})
    projector_params = dict(model.model.multi_modal_projector.named_parameters())
    assert projector_params and all(p.requires_grad for p in projector_params.values())
    assert f"{sum(p.numel() for p in projector_params.values()):,}" in parameter_table(model)
    inputs = _inputs(processor)
    labels = inputs["input_ids"].clone()
    labels[labels == model.config.image_token_index] = -100
    response_ce(model(**inputs).logits, labels, None).backward()
    for name, param in model.named_parameters():
        if name.startswith("model.multi_modal_projector."):
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name


@pytest.mark.parametrize("projector", sorted(COMPRESSING))
def test_round_trip_gives_identical_logits(tower, tiny_world, tmp_path, projector):
    model, processor = _student(tower, tiny_world, projector)
    with torch.no_grad():
        before = model.eval()(**_inputs(processor)).logits
    save_artifact(model, processor, tmp_path / "student")
    loaded, loaded_proc = load_vlm(tmp_path / "student")
    assert type(loaded) is DistillLlavaForConditionalGeneration and type(loaded_proc) is DistillLlavaProcessor
    assert loaded.config.projector_config == model.config.projector_config
    assert count_image_tokens(loaded_proc) == 4
    with torch.no_grad():
        assert torch.equal(before, loaded.eval()(**_inputs(loaded_proc)).logits)
    # load_vlm is nothing but the Auto classes, which the import of distill.models taught the new model type.
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path / "student")) is type(loaded)
    assert type(AutoProcessor.from_pretrained(tmp_path / "student")) is DistillLlavaProcessor


@pytest.mark.parametrize("projector", sorted(COMPRESSING))
def test_upcycle_keeps_class_projector_and_logits(tower, tiny_world, tmp_path, projector):
    dense, processor = _student(tower, tiny_world, projector)
    moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2)).eval()
    assert type(moe) is type(dense) and moe.config.projector_config == dense.config.projector_config
    assert moe.config.text_config.model_type == "qwen2_moe" and [i for i, _ in moe_blocks(moe)] == [0]
    for name, value in dense.model.multi_modal_projector.state_dict().items():
        assert torch.equal(moe.model.multi_modal_projector.state_dict()[name], value), name
    with torch.no_grad():
        expected = dense.eval()(**_inputs(processor)).logits
        torch.testing.assert_close(moe(**_inputs(processor)).logits, expected, rtol=1e-5, atol=1e-5)
    apply_trainability(moe, {"vision_tower": "frozen", "projector": "full", "experts": "full", "router": "full"})
    assert all(p.requires_grad for p in moe.model.multi_modal_projector.parameters())
    save_artifact(moe, processor, tmp_path / "moe")
    reloaded, _ = load_vlm(tmp_path / "moe")
    assert type(reloaded) is type(dense)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**_inputs(processor)).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("projector", sorted(COMPRESSING))
def test_kd_step_with_fewer_student_image_tokens(tower, tiny_world, projector):
    """The student sees 4 image tokens, the teacher 9: KD pairs their response positions, not raw positions."""
    student, sproc = _student(tower, tiny_world, projector)
    teacher, tproc = _student(tower, tiny_world, "mlp2x_gelu", llm="llm_large")
    freeze(teacher)
    template = get_template("chatml")
    collator = SupervisedCollator(ConversationEncoder(sproc, template, 256), tiny_world["images"],
                                  teacher=ConversationEncoder(tproc, template, 256))
    ds, _ = load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])
    batch = collator([ds[i] for i in range(4)])
    image_id = student.config.image_token_index
    assert (batch["input_ids"] == image_id).sum(1).tolist() == [4] * 4
    assert (batch["teacher_input_ids"] == image_id).sum(1).tolist() == [9] * 4
    apply_trainability(student, {"vision_tower": "frozen", "projector": "full", "llm": "full"})
    loss, parts = KDLoss(teacher, KDConfig(chunk_size=16), alpha=0.5)(student, batch, None)
    assert torch.isfinite(loss) and parts["kd"] > 0 and parts["ce"] > 0
    loss.backward()
    assert all(p.grad is not None for p in student.model.multi_modal_projector.parameters())
    assert all(p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("projector", sorted(COMPRESSING))
def test_generation(tower, tiny_world, projector):
    model, processor = _student(tower, tiny_world, projector)
    gen = Generator(model, processor, "chatml", batch_size=2, device="cpu", progress=False)
    ds, _ = load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])
    items = [(r["images"][0], "How many shapes are there?") for r in ds.select(range(3))] + [(None, "Hello?")]
    answers = gen.answer(items, tiny_world["images"], max_new_tokens=4)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    assert 0 < gen.stats.new_tokens <= 4 * 4
