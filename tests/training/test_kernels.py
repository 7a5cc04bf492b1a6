"""The opt-in kernel settings (``model.kernels`` / ``teacher.kernels``): validation, and the clear error where they
cannot run (no GPU, no liger-kernel). The kernels themselves need a GPU: eval/bench/kd_throughput.py --kernels."""

from __future__ import annotations

import pytest
import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from distill.models.tiny import LLMSize, VisionSize
from distill.training import kernels as kernels_module
from distill.training.kernels import KERNELS, apply_kernels, check_kernels, decoder_layers


def tiny_llava() -> LlavaForConditionalGeneration:
    text = LLMSize().qwen2_config(vocab_size=96)
    return LlavaForConditionalGeneration(LlavaConfig(vision_config=VisionSize().clip_vision_config(),
                                                     text_config=text, image_token_index=95))


def test_check_kernels_accepts_known_names_and_strings():
    assert check_kernels([], "model.kernels") == []
    assert check_kernels(("liger", "compile"), "model.kernels") == ["liger", "compile"]
    assert check_kernels("liger", "model.kernels") == ["liger"]
    assert check_kernels("", "model.kernels") == []
    assert set(KERNELS) == {"liger", "compile"}


@pytest.mark.parametrize("bad", [["triton"], ["liger", "liger"], ["fused_linear_cross_entropy"]])
def test_check_kernels_rejects_unknown_or_repeated(bad):
    with pytest.raises(ValueError, match="teacher.kernels"):
        check_kernels(bad, "teacher.kernels")


def test_empty_kernels_change_nothing():
    model = tiny_llava()
    before = {n: type(m) for n, m in model.named_modules()}
    assert apply_kernels(model, []) == {}
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_decoder_layers_are_the_llms():
    model = tiny_llava()
    layers = decoder_layers(model)
    assert layers and all(type(layer).__name__.endswith("DecoderLayer") for layer in layers)
    assert len(layers) == model.config.text_config.num_hidden_layers


@pytest.mark.parametrize("kind", KERNELS)
def test_without_gpu_each_kernel_raises_a_clear_error(kind, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        apply_kernels(tiny_llava(), [kind])


def test_liger_missing_raises_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = kernels_module.importlib.util.find_spec
    monkeypatch.setattr(kernels_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    with pytest.raises(RuntimeError, match="liger-kernel package"):
        apply_kernels(tiny_llava(), ["liger"])


def test_model_and_teacher_configs_validate_kernels(tmp_path):
    from distill.training.config import ModelInit
    from distill.training.kd import TeacherConfig

    (tmp_path / "config.json").write_text("{}")
    assert ModelInit(artifact=str(tmp_path)).kernels == []
    assert ModelInit(artifact=str(tmp_path), kernels=["liger"]).kernels == ["liger"]
    with pytest.raises(ValueError, match="model.kernels"):
        ModelInit(artifact=str(tmp_path), kernels=["nope"])
    assert TeacherConfig(path=str(tmp_path), kernels=["liger", "compile"]).kernels == ["liger", "compile"]
    with pytest.raises(ValueError, match="teacher.kernels"):
        TeacherConfig(path=str(tmp_path), kernels=["compile", "compile"])


def test_stages_apply_the_configured_kernels(tiny_artifacts, monkeypatch):
    """The student's ``model.kernels`` reach the model the stages load (``load_model``), on top of its attention."""
    from distill.training import supervised
    from distill.training.config import ModelInit

    calls = []
    monkeypatch.setattr(supervised, "apply_kernels", lambda model, kernels: calls.append((type(model), kernels)))
    model, _ = supervised.load_model(ModelInit(artifact=str(tiny_artifacts / "student"), kernels=["compile"]))
    assert calls == [(type(model), ["compile"])]
