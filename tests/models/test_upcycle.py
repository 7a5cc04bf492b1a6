"""Upcycling is exact for every supported family, counts parameters, and reloads as a plain transformers model."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2Config,
    Qwen3Config,
)

from distill.models.upcycle import UpcycleConfig, moe_blocks, parameter_counts, upcycle

TEXT = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def _llava(text_config) -> LlavaForConditionalGeneration:
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=16, patch_size=8)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text_config,
                                                      image_token_index=95))
    with torch.no_grad():  # random non-trivial weights everywhere, biases included
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 90, (2, 12), generator=g)
    ids[:, 1:5] = 95  # 4 image tokens (2x2 patches)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


FAMILIES = {
    "qwen2": (Qwen2Config(**TEXT), "every_other", "qwen2_moe"),
    "qwen2+shared": (Qwen2Config(**TEXT), "every_other", "qwen2_moe"),
    "qwen3": (Qwen3Config(**TEXT, head_dim=8), [1, 3], "qwen3_moe"),
    "llama": (LlamaConfig(**TEXT), "all", "mixtral"),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_logits_equal_dense(family, top_k, tmp_path):
    text, layers, moe_type = FAMILIES[family]
    dense = _llava(text)
    shared = family.endswith("+shared")
    moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=top_k, layers=layers, shared_expert=shared)).eval()
    assert moe.config.text_config.model_type == moe_type
    with torch.no_grad():
        torch.testing.assert_close(moe(**_inputs()).logits, dense(**_inputs()).logits, rtol=1e-5, atol=1e-5)
    expected = {"every_other": [0, 2], "all": [0, 1, 2, 3]}.get(layers, layers) if isinstance(layers, str) else layers
    assert [i for i, _ in moe_blocks(moe)] == expected
    moe.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_inputs()).logits, dense(**_inputs()).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_parameter_counts_qwen2_0_5b_shape(shared):
    """A Qwen2-0.5B-shaped LLM with 4 experts on every other layer (config only, meta device); routed experts only
    (LLaVA-MoD) or with Qwen2-MoE's shared expert."""
    text = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14)
    with torch.device("meta"):
        dense = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text))
        moe = upcycle(dense, UpcycleConfig(num_experts=4, top_k=2, shared_expert=shared))
    total, active = parameter_counts(moe, 2)
    ffn = 3 * 896 * 4864
    # Per MoE layer: 3 more copies of the FFN, the router, the shared expert's 1-wide gate (+ the shared expert).
    assert total - sum(p.numel() for p in dense.parameters()) == 12 * (3 * ffn + 896 * 4 + 896 + shared * ffn)
    assert total - active == 12 * 2 * ffn


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="no shared expert"):
        upcycle(_llava(LlamaConfig(**TEXT)), UpcycleConfig(layers="all", shared_expert=True))
    with pytest.raises(ValueError, match="top_k"):
        UpcycleConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="use upcycle.layers=all"):
        upcycle(_llava(LlamaConfig(**TEXT)), UpcycleConfig(layers="every_other"))
