"""Memory savers: frozen parts in bf16 (``model.frozen_dtype``), bf16 weights with a stochastic-rounding 8-bit
AdamW (``model.weights_dtype`` + torchao's ``adamw_torch_8bit``), and the settings refused before any work."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from distill.models.student import load_vlm
from distill.stages.imitation import ImitationConfig
from distill.training.config import ModelInit, check_precision
from distill.training.context import StageContext


def _init(tiny_artifacts, **kw) -> ModelInit:
    return ModelInit(artifact=str(tiny_artifacts / "student"), **kw)


@pytest.mark.parametrize(
    ("model", "training", "message"),
    [
        ({"frozen_dtype": "bfloat16"}, {}, "needs bf16 mixed precision"),
        ({"weights_dtype": "bfloat16"}, {"bf16": True}, "rounded away"),
        ({"weights_dtype": "bfloat16"}, {"bf16": True, "optim": "adamw_torch_8bit"}, "rounded away"),
        ({"weights_dtype": "bfloat16"}, {"bf16": True, "deepspeed": "ds.json"}, "DeepSpeed"),
        ({"weights_dtype": "float16"}, {}, "expected one of"),
    ],
)
def test_refused_settings(tiny_artifacts, model, training, message):
    with pytest.raises(ValueError, match=message):
        check_precision(_init(tiny_artifacts, **model), training)


def test_accepted_settings_and_missing_torchao(tiny_artifacts, monkeypatch):
    check_precision(_init(tiny_artifacts), {})
    check_precision(_init(tiny_artifacts, frozen_dtype="bfloat16"), {"bf16": True})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ValueError, match="torchao"):
        check_precision(_init(tiny_artifacts, weights_dtype="bfloat16"),
                        {"bf16": True, "optim": "adamw_torch_8bit", "optim_args": "bf16_stochastic_round=True"})


def test_stage_config_checks_precision_at_construction(tiny_world, tiny_artifacts):
    with pytest.raises(ValueError, match="rounded away"):
        ImitationConfig(model={"artifact": str(tiny_artifacts / "student"), "weights_dtype": "bfloat16"},
                        teacher={"path": str(tiny_artifacts / "teacher")},
                        data={"train": [str(tiny_world["data"] / "instruct.json")]}, training={"bf16": True})


def _d2d(tiny_world, tiny_artifacts, tmp_path, training, **model):
    cfg = ImitationConfig(
        model={"artifact": str(tiny_artifacts / "student"), **model},
        teacher={"path": str(tiny_artifacts / "teacher")},
        data={"train": [str(tiny_world["data"] / "instruct.json")], "image_root": str(tiny_world["images"])},
        training=training,
    )
    metrics = cfg.run(StageContext(name="d2d", run_dir=tmp_path, training=cfg.training))
    out = tmp_path / "d2d" / "model"
    saved = {name: t.dtype for name, t in load_file(out / "model.safetensors").items()}  # as saved, not cast
    return metrics, load_vlm(out, dtype=torch.float32)[0].state_dict(), saved


def test_frozen_bf16_keeps_frozen_parts_rounded_and_trains_the_rest(tiny_world, tiny_artifacts, tmp_path,
                                                                    cpu_training):
    before = load_vlm(tiny_artifacts / "student")[0].state_dict()
    metrics, after, saved = _d2d(tiny_world, tiny_artifacts, tmp_path,
                                 {**cpu_training, "bf16": True, "max_steps": 3}, frozen_dtype="bfloat16")
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert {n for n, d in saved.items() if d == torch.bfloat16} == {n for n in saved if "vision_tower" in n}
    tower = [n for n in before if n.startswith("model.vision_tower")]
    assert tower
    for name in tower:  # frozen: the original weight rounded to bf16, nothing more
        assert torch.equal(after[name], before[name].to(torch.bfloat16).float()), name
    trained = [n for n in before if n.startswith("model.language_model") or "multi_modal_projector" in n]
    assert any(not torch.equal(before[n], after[n]) for n in trained)


@pytest.mark.slow  # torchao compiles its update once per parameter shape: about a minute on CPU
@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao not installed")
def test_bf16_weights_with_stochastic_rounding_8bit_adamw(tiny_world, tiny_artifacts, tmp_path, cpu_training):
    before = load_vlm(tiny_artifacts / "student")[0].state_dict()
    training = {**cpu_training, "bf16": True, "max_steps": 3, "learning_rate": 1e-5, "optim": "adamw_torch_8bit",
                "optim_args": "bf16_stochastic_round=True"}
    metrics, after, saved = _d2d(tiny_world, tiny_artifacts, tmp_path, training, weights_dtype="bfloat16")
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))
    assert set(saved.values()) == {torch.bfloat16}
    rounded = {n: v.to(torch.bfloat16).float() for n, v in before.items()}
    trained = [n for n in before if n.startswith("model.language_model") or "multi_modal_projector" in n]
    # lr 1e-5 moves a weight (std 0.05, bf16 step about 2e-4) far less than half a step: rounding to nearest
    # would keep every weight as it was; stochastic rounding lets some updates land
    assert any(not torch.equal(rounded[n], after[n]) for n in trained)
    for name in (n for n in before if n.startswith("model.vision_tower")):
        assert torch.equal(after[name], rounded[name]), name
