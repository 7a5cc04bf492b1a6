"""Tiny model configs for tests, the demo and the synthetic world's stand-in checkpoints.

Every size here is a plain transformers config; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import CLIPVisionConfig, Qwen2Config


@dataclass(frozen=True)
class LLMSize:
    """Shape of a Qwen2-architecture text model."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False

    def qwen2_config(self, vocab_size: int, **overrides: object) -> Qwen2Config:
        fields = {**self.__dict__, **overrides}
        return Qwen2Config(vocab_size=vocab_size, rms_norm_eps=1e-6, rope_theta=10000.0, **fields)


@dataclass(frozen=True)
class VisionSize:
    """Shape of a CLIP-architecture vision tower."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    image_size: int = 96
    patch_size: int = 32
    """96 / 32: a 3x3 patch grid, one patch per cell of the Shapes world's grid."""
    projection_dim: int = 64

    def clip_vision_config(self) -> CLIPVisionConfig:
        return CLIPVisionConfig(**self.__dict__)

