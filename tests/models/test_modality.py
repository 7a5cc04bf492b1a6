"""Modality experts: exact at conversion, image rows only reach the visual FFN, visual-only training, save/reload,
generate() with a KV cache, and D2S upcycling on top of them."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from distill.models.modality import (
    ModalityExpertsConfig,
    add_modality_experts,
    load_with_modality_experts,
    router_token_masks,
    visual_experts,
)
from distill.models.trainable import apply_trainability, component_modules, parameter_table
from distill.models.upcycle import UpcycleConfig, moe_blocks, upcycle
from distill.training.moe import RouterRecorder

IMAGE = 95
TEXT = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _llava() -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=Qwen2Config(**TEXT),
                                                      image_token_index=IMAGE))
    with torch.no_grad():  # random non-trivial weights everywhere
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 90, (2, 12), generator=g)
    ids[:, 2:6] = IMAGE  # 4 image tokens (2x2 patches) after two text tokens
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def _logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _assert_same_function(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal up to float rounding: the FFNs' matmuls run over fewer rows after routing, which may round differently."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _with_experts(layers: str | list[int] = "all", perturb: bool = True) -> LlavaForConditionalGeneration:
    """A modality-expert student whose visual experts (unless ``perturb=False``) differ from the text FFNs."""
    model = add_modality_experts(_llava(), ModalityExpertsConfig(layers=layers))
    if perturb:
        with torch.no_grad():
            for _, expert in visual_experts(model):
                for p in expert.parameters():
                    p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize(("layers", "expected"), [("all", [0, 1, 2, 3]), ("every_other", [0, 2]), ([3, 1], [1, 3])])
def test_exact_at_conversion(layers, expected):
    dense = _llava()
    before = _logits(dense, _inputs())
    model = _with_experts(layers, perturb=False)
    _assert_same_function(_logits(model, _inputs()), before)
    assert [i for i, _ in visual_experts(model)] == expected
    assert model.config.modality_experts["layers"] == expected
    new = set(model.state_dict()) - set(dense.state_dict())
    assert new == {f"model.language_model.layers.{i}.mlp.visual_expert.{n}_proj.weight"
                   for i in expected for n in ("gate", "up", "down")}
    assert set(dense.state_dict()) <= set(model.state_dict())  # the text FFN keeps its parameter names


def test_image_rows_only_reach_the_visual_expert():
    dense, model, inputs = _llava(), _with_experts(), _inputs()
    image = inputs["input_ids"].reshape(-1) == IMAGE
    layer = model.model.language_model.layers[1].mlp
    seen: dict[str, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a: seen.__setitem__("hidden", a[0].reshape(-1, 32))),
             layer.gate_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("text", a[0].reshape(-1, 32))),
             layer.visual_expert.register_forward_pre_hook(
                 lambda m, a: seen.__setitem__("visual", a[0].reshape(-1, 32)))]
    after = _logits(model, inputs)
    for h in hooks:
        h.remove()
    assert torch.equal(seen["visual"], seen["hidden"][image])
    assert torch.equal(seen["text"], seen["hidden"][~image])
    # Causal attention: the perturbed visual experts change nothing before the first image token, everything after.
    before = _logits(dense, inputs)
    _assert_same_function(after[:, :2], before[:, :2])
    assert (after[:, 2:] - before[:, 2:]).abs().amax(-1).min() > 1e-4
    # Without image tokens the visual experts are never used.
    text_only = {"input_ids": inputs["input_ids"][:, 6:]}
    assert torch.equal(_logits(model, text_only), _logits(dense, text_only))


def test_visual_only_training_changes_only_the_visual_experts():
    model, inputs = _with_experts(), _inputs()
    cfg = ModalityExpertsConfig(train="visual_only")
    assert ModalityExpertsConfig(train="all").trainable_modes({"projector": "full"}) == {
        "projector": "full", "visual_experts": "full"}
    # visual_only keeps the stage's projector mode (a fresh projector must learn), opens nothing else
    assert cfg.trainable_modes({"projector": "full", "llm": "full"}) == {"visual_experts": "full", "projector": "full"}
    apply_trainability(model, cfg.trainable_modes({"vision_tower": "frozen", "llm": "full"}))
    assert "visual_experts" in parameter_table(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    logits = model(**inputs).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), inputs["input_ids"][:, 1:].reshape(-1))
    loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if ".visual_expert." in k}


def test_save_and_reload(tmp_path):
    model, inputs = _with_experts("every_other"), _inputs()
    model.save_pretrained(tmp_path / "modality")
    loaded = load_with_modality_experts(tmp_path / "modality", dtype=torch.float32)
    assert type(loaded) is LlavaForConditionalGeneration
    assert [i for i, _ in visual_experts(loaded)] == [0, 2]
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))
    _llava().save_pretrained(tmp_path / "plain")  # checkpoints without modality experts load as they always did
    assert not visual_experts(load_with_modality_experts(tmp_path / "plain"))


def test_generate_with_kv_cache():
    model, inputs = _with_experts(), _inputs()
    calls = []
    model.model.language_model.layers[0].mlp.visual_expert.register_forward_hook(lambda *_: calls.append(1))
    cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert len(calls) == 1  # prefill only: the decoding steps feed new (text) tokens, the cache holds image rows
    fresh = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, fresh)
    assert len(calls) == 1 + 6


def test_upcycle_keeps_the_visual_experts_dense_and_exact(tmp_path):
    model, inputs = _with_experts("all"), _inputs()
    moe = upcycle(model, UpcycleConfig(num_experts=4, top_k=2, layers="every_other")).eval()
    torch.testing.assert_close(_logits(moe, inputs), _logits(model, inputs), rtol=1e-5, atol=1e-5)
    assert [i for i, _ in moe_blocks(moe)] == [0, 2]
    assert [i for i, _ in visual_experts(moe)] == [0, 1, 2, 3]
    assert not any(hasattr(expert, "experts") for _, expert in visual_experts(moe))
    # The routers see the text rows only; router_token_masks lines the padding mask up with them.
    recorder = RouterRecorder(moe)
    _logits(moe, inputs)
    router_logits = recorder.take()
    recorder.remove()
    masks = router_token_masks(recorder.blocks, torch.ones_like(inputs["input_ids"]))
    n_text = int((inputs["input_ids"] != IMAGE).sum())
    assert [tuple(x.shape) for x in router_logits] == [(n_text, 4)] * 2
    assert [int(m.numel()) for m in masks] == [n_text] * 2
    # D2S trainability with the visual experts opened.
    apply_trainability(moe, {"experts": "full", "router": "full", "visual_experts": "full"})
    opened = {id(p) for comp in ("experts", "router", "visual_experts") for m in component_modules(moe, comp)
              for p in m.parameters()}
    assert {id(p) for p in moe.parameters() if p.requires_grad} == opened
    moe.save_pretrained(tmp_path)
    loaded = load_with_modality_experts(tmp_path)
    assert loaded.config.text_config.model_type == "qwen2_moe"
    assert torch.equal(_logits(loaded, inputs), _logits(moe, inputs))


def test_real_student_artifact(tiny_artifacts, tmp_path):
    """The tiny world's student (processor-made inputs) converts exactly and round-trips through save_artifact."""
    from PIL import Image

    from distill.models.student import load_vlm, save_artifact

    dense, processor = load_vlm(tiny_artifacts / "student")
    inputs = processor(text="<image>\nWhat color is the circle?", images=Image.new("RGB", (32, 32), (200, 30, 30)),
                       return_tensors="pt")
    before = _logits(dense.eval(), inputs)
    model = add_modality_experts(dense, ModalityExpertsConfig(layers="every_other"))
    converted = _logits(model, inputs)
    _assert_same_function(converted, before)
    save_artifact(model, processor, tmp_path / "student")
    loaded = load_with_modality_experts(tmp_path / "student")
    assert [i for i, _ in visual_experts(loaded)] == [0]
    assert torch.equal(_logits(loaded, inputs), converted)


def test_bad_settings_are_refused():
    for bad in ({"layers": "odd"}, {"layers": []}, {"layers": [True]}, {"train": "text_only"}):
        with pytest.raises(ValueError, match="modality_experts"):
            ModalityExpertsConfig(**bad)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        add_modality_experts(_llava(), ModalityExpertsConfig(layers=[4]))
    with pytest.raises(ValueError, match="already"):
        add_modality_experts(_with_experts(), ModalityExpertsConfig())
    moe = upcycle(_llava(), UpcycleConfig(layers="every_other"))
    with pytest.raises(ValueError, match="MoE already"):
        add_modality_experts(moe, ModalityExpertsConfig())
    with pytest.raises(ValueError, match="modality experts"):
        apply_trainability(_llava(), {"visual_experts": "full"})
    with pytest.raises(RuntimeError, match="call the VLM itself"):
        _with_experts().model.language_model(input_ids=_inputs()["input_ids"])
