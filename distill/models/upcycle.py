"""Sparse upcycling: turn the dense student's LLM into its native transformers MoE sibling, exactly.

    moe_model = upcycle(dense_model, UpcycleConfig(num_experts=4, top_k=2, layers="every_other"))

Every expert starts as a copy of the layer's dense FFN and the top-k gates are normalised to sum to one, so at
the moment of conversion the MoE model computes the same function as the dense one (a test holds the logits
equal, fp32, 1e-5, for every supported family). Families (by the text config's ``model_type``):

| dense | MoE | layer choice |
|---|---|---|
| qwen2 | qwen2_moe | any (``mlp_only_layers``); routed experts only (LLaVA-MoD's architecture, the default: the
  shared expert has width 0 and adds nothing), or ``shared_expert=true``: a copy of the FFN whose output is zeroed |
| qwen3 | qwen3_moe | any (``mlp_only_layers``) |
| llama, mistral | mixtral | all layers only (Mixtral has no dense layers) |

Router initialisation (``router_init``): ``normal`` draws N(0, ``router_std``) weights, so routing starts varied
but close to uniform; ``zeros`` starts every token with equal scores (top-k then falls back to the first experts
until the router learns). Neither changes the output at conversion, since all experts are equal.
The result is a plain transformers model: it saves and reloads with ``AutoModelForImageTextToText``.
A student with modality experts (distill/models/modality.py) keeps them (the text FFN is upcycled, the visual
expert stays the dense FFN it was) and reloads with ``load_with_modality_experts``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import MixtralConfig, PretrainedConfig, PreTrainedModel, Qwen2MoeConfig, Qwen3MoeConfig

from distill.models.layer_spec import check_layer_spec, select_layers
from distill.models.modality import restore_modality_experts
from distill.models.trainable import text_model

log = logging.getLogger(__name__)


@dataclass
class UpcycleConfig:
    num_experts: int = 4
    top_k: int = 2
    layers: str | list[int] = "every_other"
    """``all``, ``every_other`` (0, 2, 4, ... as LLaVA-MoD) or an explicit list of layer indices."""
    router_init: str = "normal"
    router_std: float = 0.02
    seed: int = 0
    shared_expert: bool = False
    """Qwen2 -> Qwen2-MoE only: also an always-active shared expert (a copy of the FFN, output zeroed at conversion,
    trainable): one more FFN per MoE layer (about 157M parameters for a Qwen2-0.5B student). LLaVA-MoD has routed
    experts only, so the default gives Qwen2-MoE a shared expert of width 0 (no parameters but its 1-wide gate, no
    effect): still the native class, reloading with the Auto classes."""

    def __post_init__(self) -> None:
        if self.num_experts < 2:
            raise ValueError("upcycle.num_experts must be at least 2")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"upcycle.top_k={self.top_k} must lie in [1, num_experts={self.num_experts}]")
        self.layers = check_layer_spec(self.layers, "upcycle.layers")
        if self.router_init not in ("normal", "zeros"):
            raise ValueError(f"upcycle.router_init={self.router_init!r}: 'normal' or 'zeros'")

    def moe_layers(self, num_layers: int) -> list[int]:
        return select_layers(self.layers, num_layers, "upcycle.layers")


@dataclass(frozen=True)
class MoEFamily:
    config_cls: type[PretrainedConfig]
    moe_fields: Callable[[PretrainedConfig, UpcycleConfig, list[int]], dict[str, Any]]
    shared_expert: bool = False
    """The MoE class always has a shared expert (Qwen2-MoE): written as a zeroed copy, or with width 0."""


def _qwen_moe_fields(dense: PretrainedConfig, cfg: UpcycleConfig, moe_layers: list[int]) -> dict[str, Any]:
    return {
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "norm_topk_prob": True,  # gates sum to one: the upcycled layer equals the dense FFN
        "moe_intermediate_size": dense.intermediate_size,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(dense.num_hidden_layers) if i not in moe_layers],
        "router_aux_loss_coef": 0.0,  # our stage adds the router loss itself, counted once
        "output_router_logits": False,
    }


def _qwen2_moe_fields(dense: PretrainedConfig, cfg: UpcycleConfig, moe_layers: list[int]) -> dict[str, Any]:
    width = dense.intermediate_size if cfg.shared_expert else 0
    return {**_qwen_moe_fields(dense, cfg, moe_layers), "shared_expert_intermediate_size": width, "qkv_bias": True}


def _mixtral_fields(dense: PretrainedConfig, cfg: UpcycleConfig, moe_layers: list[int]) -> dict[str, Any]:
    if len(moe_layers) != dense.num_hidden_layers:
        raise ValueError("a Llama/Mistral LLM upcycles to Mixtral, whose layers are all MoE: use upcycle.layers=all")
    if getattr(dense, "attention_bias", False) or getattr(dense, "mlp_bias", False):
        raise ValueError("Mixtral has no attention or MLP biases; this Llama checkpoint uses them")
    return {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": 0.0,
            "output_router_logits": False, "router_jitter_noise": 0.0}


FAMILIES: dict[str, MoEFamily] = {
    "qwen2": MoEFamily(Qwen2MoeConfig, _qwen2_moe_fields, shared_expert=True),
    "qwen3": MoEFamily(Qwen3MoeConfig, _qwen_moe_fields),
    "llama": MoEFamily(MixtralConfig, _mixtral_fields),
    "mistral": MoEFamily(MixtralConfig, _mixtral_fields),
}

_DROP = {"model_type", "architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"}


def moe_text_config(dense: PretrainedConfig, cfg: UpcycleConfig) -> tuple[PretrainedConfig, list[int]]:
    family = FAMILIES.get(dense.model_type)
    if family is None:
        raise ValueError(f"no MoE sibling known for LLM type {dense.model_type!r}; supported: {sorted(FAMILIES)}")
    if cfg.shared_expert and not family.shared_expert:
        raise ValueError(f"upcycle.shared_expert: {family.config_cls.__name__} has no shared expert")
    moe_layers = cfg.moe_layers(dense.num_hidden_layers)
    fields = {k: v for k, v in dense.to_dict().items() if k not in _DROP}
    fields.update(family.moe_fields(dense, cfg, moe_layers))
    return family.config_cls(**fields), moe_layers


def _router_weight(cfg: UpcycleConfig, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    if cfg.router_init == "zeros":
        return torch.zeros(shape, dtype=like.dtype)
    gen = torch.Generator().manual_seed(cfg.seed)
    return (torch.randn(shape, generator=gen) * cfg.router_std).to(like.dtype)


def _convert_state(dense_state: dict[str, torch.Tensor], prefix: str, moe_layers: list[int], cfg: UpcycleConfig,
                   shared_expert: bool) -> dict[str, torch.Tensor]:
    """Map dense FFN weights of the MoE layers onto experts (+ router, + zeroed shared expert)."""
    out = dict(dense_state)
    for i in moe_layers:
        mlp = f"{prefix}layers.{i}.mlp."
        gate, up, down = (out.pop(f"{mlp}{n}_proj.weight") for n in ("gate", "up", "down"))
        e = cfg.num_experts
        out[f"{mlp}experts.gate_up_proj"] = torch.cat([gate, up], 0).unsqueeze(0).repeat(e, 1, 1).contiguous()
        out[f"{mlp}experts.down_proj"] = down.unsqueeze(0).repeat(e, 1, 1).contiguous()
        gen_cfg = UpcycleConfig(**{**cfg.__dict__, "seed": cfg.seed + i})
        out[f"{mlp}gate.weight"] = _router_weight(gen_cfg, (e, gate.shape[1]), gate)
        if shared_expert:
            # A copy with zeroed output (exact at conversion, trainable: its inputs are not zero), or width 0.
            width = gate.shape[0] if cfg.shared_expert else 0
            out[f"{mlp}shared_expert.gate_proj.weight"] = gate[:width].clone()
            out[f"{mlp}shared_expert.up_proj.weight"] = up[:width].clone()
            out[f"{mlp}shared_expert.down_proj.weight"] = torch.zeros_like(down[:, :width])
            out[f"{mlp}shared_expert_gate.weight"] = torch.zeros((1, gate.shape[1]), dtype=gate.dtype)
    return out


def upcycle(model: PreTrainedModel, cfg: UpcycleConfig) -> PreTrainedModel:
    """A new model of the same VLM class whose text model is the MoE sibling of ``model``'s."""
    dense_text = model.config.text_config
    moe_text, moe_layers = moe_text_config(dense_text, cfg)
    family = FAMILIES[dense_text.model_type]
    config = model.config.__class__(**{**model.config.to_dict(), "text_config": moe_text.to_dict()})
    config.text_config = moe_text
    new = type(model)(config).to(model.dtype)
    restore_modality_experts(new)  # their weights pass through _convert_state under their own names
    decoder = text_model(model)
    prefix = next(name for name, mod in model.named_modules() if mod is decoder) + "."
    state = _convert_state(model.state_dict(), prefix, moe_layers, cfg, family.shared_expert)
    missing, unexpected = new.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"upcycling left weights unmapped: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False) or getattr(moe_text, "tie_word_embeddings", False):
        new.tie_weights()
    total, active = parameter_counts(new, cfg.top_k)
    log.info("upcycled %d of %d layers into %d experts (top-%d): %.1fM parameters, %.1fM active per token",
             len(moe_layers), dense_text.num_hidden_layers, cfg.num_experts, cfg.top_k, total / 1e6, active / 1e6)
    return new


def moe_blocks(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """``(layer index, sparse MLP block)`` for every MoE layer of the model's LLM."""
    lm = text_model(model)
    return [(i, layer.mlp) for i, layer in enumerate(lm.layers) if hasattr(layer.mlp, "experts")]


def parameter_counts(model: torch.nn.Module, top_k: int) -> tuple[int, int]:
    """Total parameters, and those active for one token (top_k of each MoE layer's experts)."""
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for _, block in moe_blocks(model):
        per_expert = sum(p.numel() for p in block.experts.parameters()) // block.experts.num_experts
        inactive += per_expert * (block.experts.num_experts - top_k)
    return total, total - inactive
