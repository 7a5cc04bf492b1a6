"""Llava with a token-compressing projector: MobileVLM-v2's LDP or a perceiver resampler in place of the MLP.

    config = DistillLlavaConfig(vision_config=..., text_config=..., projector_type="ldp",
                                projector_config={"stride": 2})
    model = DistillLlavaForConditionalGeneration(config)      # a 3x3 patch grid becomes 2x2 = 4 image tokens

Everything but the projector is transformers' Llava: the projector sits where Llava's MLP does
(``model.multi_modal_projector``), maps the ``[images, patches, vision hidden]`` features to ``[images, tokens,
LLM hidden]`` with fewer tokens, and Llava's own ``get_image_features`` and placeholder check then work on the
compressed count. ``DistillLlavaProcessor`` is a LlavaProcessor that writes ``image_seq_length`` placeholders per
image (LlavaProcessor derives one per patch from ``patch_size``, which no compressing projector matches).

``register()`` (run when ``distill.models`` is imported) tells transformers' Auto classes about the
``distill_llava`` model type, so ``load_vlm`` / ``AutoModelForImageTextToText`` / ``AutoProcessor`` reload such
artifacts in any process that imported ``distill``; without that import the model type is unknown to
transformers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
    LlavaProcessor,
)
from transformers.processing_utils import MultiModalData

MODEL_TYPE = "distill_llava"


@dataclass(frozen=True)
class LDPOptions:
    """MobileVLM v2's LDP (LDPv2): pointwise MLP, average pooling of the patch grid, positional enhancement."""

    stride: int = 2
    """Pool ``stride x stride`` patches into one token: a g x g grid becomes ceil(g / stride) squared (v2: 24 -> 12)."""
    pooled_grid: int | None = None
    """The pooled grid's side, given directly (overrides ``stride``)."""

    def __post_init__(self) -> None:
        _check_int("stride", self.stride)
        if self.pooled_grid is not None:
            _check_int("pooled_grid", self.pooled_grid)

    def pooled_side(self, grid: int) -> int:
        side = self.pooled_grid if self.pooled_grid is not None else math.ceil(grid / self.stride)
        if side > grid:
            raise ValueError(f"projector_config.pooled_grid={side} exceeds the vision tower's {grid}x{grid} patch grid")
        return side

    def num_tokens(self, grid: int) -> int:
        return self.pooled_side(grid) ** 2


@dataclass(frozen=True)
class ResamplerOptions:
    """A perceiver resampler: learned queries cross-attend to the projected patch features."""

    num_queries: int = 64
    """Image tokens per image, whatever the patch count."""
    num_layers: int = 2
    """Cross-attention + MLP blocks."""
    num_heads: int | None = None
    """Attention heads; ``None`` takes the LLM's ``num_attention_heads``."""

    def __post_init__(self) -> None:
        _check_int("num_queries", self.num_queries)
        _check_int("num_layers", self.num_layers)
        if self.num_heads is not None:
            _check_int("num_heads", self.num_heads)

    def num_tokens(self, grid: int) -> int:
        return self.num_queries


PROJECTOR_OPTIONS: dict[str, type[LDPOptions] | type[ResamplerOptions]] = {
    "ldp": LDPOptions,
    "resampler": ResamplerOptions,
}


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"projector_config.{name}={value!r}: a positive integer is needed")


def projector_options(projector_type: str, projector_config: dict[str, Any] | None) -> LDPOptions | ResamplerOptions:
    """The checked options of a compressing projector; unknown types and keys are refused by name."""
    if projector_type not in PROJECTOR_OPTIONS:
        raise ValueError(f"projector_type={projector_type!r}: expected one of {sorted(PROJECTOR_OPTIONS)}")
    cls = PROJECTOR_OPTIONS[projector_type]
    given = dict(projector_config or {})
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"projector_config for {projector_type!r}: unknown keys {unknown}; expected some of "
                         f"{sorted(known)}")
    return cls(**given)


@strict
class DistillLlavaConfig(LlavaConfig):
    """LlavaConfig plus the projector's type and options (stored in full, defaults included).

    ``image_seq_length`` (image tokens per image) is derived here from the projector and the patch grid.
    """

    model_type = MODEL_TYPE

    projector_type: str = "ldp"
    projector_config: dict[str, Any] | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        options = projector_options(self.projector_type, self.projector_config)
        self.projector_config = asdict(options)
        super().__post_init__(**kwargs)
        self.image_seq_length = options.num_tokens(patch_grid(self))


def patch_grid(config: LlavaConfig) -> int:
    """Side of the vision tower's (square) patch grid."""
    return config.vision_config.image_size // config.vision_config.patch_size


def _check_patches(features: torch.Tensor, grid: int) -> None:
    if features.shape[1] != grid * grid:
        raise ValueError(f"the projector expects the {grid}x{grid} patch grid ({grid * grid} tokens), got "
                         f"{features.shape[1]}: a CLS token must be dropped (vision_feature_select_strategy=default)")


class LDPProjector(nn.Module):
    """MobileVLM v2's LDPv2: Linear-GELU-Linear per patch, average pooling of the grid, then a depthwise 3x3
    convolution added as a residual (PEG), which gives the pooled tokens back their position."""

    def __init__(self, config: DistillLlavaConfig) -> None:
        super().__init__()
        opts = LDPOptions(**config.projector_config)
        in_dim, out_dim = _vision_dim(config), config.text_config.hidden_size
        self.grid = patch_grid(config)
        self.pooled = opts.pooled_side(self.grid)
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim)
        self.peg = nn.Conv2d(out_dim, out_dim, kernel_size=3, padding=1, groups=out_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_patches(features, self.grid)
        x = self.linear_2(self.act(self.linear_1(features)))
        x = x.transpose(1, 2).reshape(x.shape[0], -1, self.grid, self.grid)
        # Adaptive pooling spreads the windows evenly (stride-s pooling when s divides the grid), as MobileVLM v2.
        x = F.adaptive_avg_pool2d(x, self.pooled)
        x = x + self.peg(x)
        return x.flatten(2).transpose(1, 2)


class ResamplerLayer(nn.Module):
    """Pre-norm cross-attention of the queries to the patch features, then a pre-norm MLP; both residual."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"resampler: num_heads={num_heads} does not divide the LLM hidden size {dim}")
        self.num_heads = num_heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, queries: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        q, kv = self.norm_q(queries), self.norm_kv(features)
        attn = F.scaled_dot_product_attention(self._heads(self.q_proj(q)), self._heads(self.k_proj(kv)),
                                              self._heads(self.v_proj(kv)))
        queries = queries + self.o_proj(attn.transpose(1, 2).flatten(2))
        return queries + self.mlp(self.norm_mlp(queries))


class ResamplerProjector(nn.Module):
    """A fixed number of learned queries read the projected patch features (with learned grid positions, without
    which cross-attention could not tell where a patch was) through a few cross-attention blocks."""

    def __init__(self, config: DistillLlavaConfig) -> None:
        super().__init__()
        opts = ResamplerOptions(**config.projector_config)
        dim = config.text_config.hidden_size
        self.grid = patch_grid(config)
        self.in_proj = nn.Linear(_vision_dim(config), dim)
        # Embeddings rather than bare Parameters: transformers' default weight init covers them.
        self.positions = nn.Embedding(self.grid * self.grid, dim)
        self.queries = nn.Embedding(opts.num_queries, dim)
        heads = opts.num_heads or config.text_config.num_attention_heads
        self.layers = nn.ModuleList(ResamplerLayer(dim, heads) for _ in range(opts.num_layers))
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        _check_patches(features, self.grid)
        kv = self.in_proj(features) + self.positions.weight
        out = self.queries.weight.expand(features.shape[0], -1, -1)
        for layer in self.layers:
            out = layer(out, kv)
        return self.out_proj(self.norm(out))


PROJECTORS: dict[str, type[LDPProjector] | type[ResamplerProjector]] = {
    "ldp": LDPProjector,
    "resampler": ResamplerProjector,
}


def _vision_dim(config: LlavaConfig) -> int:
    """Width of the features Llava hands its projector: one vision hidden size per selected layer."""
    layers = config.vision_feature_layer
    return config.vision_config.hidden_size * (1 if isinstance(layers, int) else len(layers))


class DistillLlavaModel(LlavaModel):
    """LlavaModel whose ``multi_modal_projector`` is the compressing projector that the config names."""

    config_class = DistillLlavaConfig

    def __init__(self, config: DistillLlavaConfig) -> None:
        # LlavaModel.__init__ would build (and initialise) an MLP projector only to throw it away.
        LlavaPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = PROJECTORS[config.projector_type](config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()


class DistillLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LlavaForConditionalGeneration over ``DistillLlavaModel``; forward, generation and the LM head are Llava's."""

    config_class = DistillLlavaConfig

    def __init__(self, config: DistillLlavaConfig) -> None:
        LlavaPreTrainedModel.__init__(self, config)
        self.model = DistillLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()


class DistillLlavaProcessor(LlavaProcessor):
    """LlavaProcessor writing a fixed ``image_seq_length`` placeholders per image: the projector's output count.

    Fixed, because the image processor resizes every image to the vision tower's one resolution.
    """

    def __init__(self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None,
                 image_token: str = "<image>", image_seq_length: int | None = None, **kwargs: Any) -> None:
        if isinstance(image_seq_length, bool) or not isinstance(image_seq_length, int) or image_seq_length < 1:
            raise ValueError(f"DistillLlavaProcessor: image_seq_length={image_seq_length!r}, a positive integer "
                             "(the projector's image tokens per image) is needed")
        # Listed here (not left to **kwargs) so that save_pretrained writes them to processor_config.json.
        self.image_seq_length = image_seq_length
        super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                         image_token=image_token, **kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.image_token * self.image_seq_length

    def _get_num_multimodal_tokens(self, image_sizes: list | None = None, **kwargs: Any) -> MultiModalData:
        if image_sizes is None:
            return MultiModalData()
        return MultiModalData(num_image_tokens=[self.image_seq_length] * len(image_sizes),
                              num_image_patches=[1] * len(image_sizes))


def register() -> None:
    """Make ``distill_llava`` artifacts loadable through transformers' Auto classes (idempotent)."""
    AutoConfig.register(MODEL_TYPE, DistillLlavaConfig, exist_ok=True)
    AutoModel.register(DistillLlavaConfig, DistillLlavaModel, exist_ok=True)
    AutoModelForImageTextToText.register(DistillLlavaConfig, DistillLlavaForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(DistillLlavaConfig, DistillLlavaProcessor, exist_ok=True)
