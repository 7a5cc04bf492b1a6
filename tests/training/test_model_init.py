"""The student's attention implementation is configurable and validated at construction."""

from __future__ import annotations

import pytest

from distill.training.config import ModelInit
from distill.training.supervised import load_model


def test_attn_implementation_is_validated_and_applied(tiny_world):
    parts = {"vision_tower": str(tiny_world["vision_tower"]), "llm": str(tiny_world["llm_small"])}
    with pytest.raises(ValueError, match="attn_implementation"):
        ModelInit(parts=parts, attn_implementation="flash")
    for impl in ("eager", "sdpa"):
        model, _ = load_model(ModelInit(parts=parts, attn_implementation=impl))
        assert model.config.text_config._attn_implementation == impl
        assert model.config.vision_config._attn_implementation == impl
    model, _ = load_model(ModelInit(parts=parts))  # auto: sdpa without flash-attn or a GPU
    assert model.config.text_config._attn_implementation == "sdpa"
