"""Modality experts (Mono-InternVL style): image tokens take a visual FFN, text tokens the LLM's own FFN.

    cfg = ModalityExpertsConfig(layers="all", train="visual_only")
    model = add_modality_experts(model, cfg)                        # in place; the same function as before
    apply_trainability(model, cfg.trainable_modes(stage_modes))     # visual_only: nothing but the visual experts
    model.save_pretrained(path)
    model = load_with_modality_experts(path, dtype="auto")          # what load_vlm calls

Routing is static, by modality: a token is visual iff its input id is the image token id. In each chosen decoder
layer the FFN (``layer.mlp``) gets a child ``visual_expert``, a copy of itself made at conversion, so the converted
model computes the dense model's function (as sparse upcycling does; equal up to float rounding, since the matmuls
then run over fewer rows). From then on the layer's own FFN runs on the text rows only and the visual expert on the
image rows only (gather / scatter by row index): no token pays for both. The FFN keeps its class's forward and its
parameter names: it becomes an instance of a subclass that adds the routing (the way ``torch.nn.utils.parametrize``
swaps a module's class), so upcycling, the trainability views and LoRA find the text FFN where they always did; the
new tensors are ``...layers.{i}.mlp.visual_expert.*``.

Which rows are which: a forward pre-hook on the VLM's inner model (``model.model``, the module that receives
``input_ids``) computes the row indices once per forward pass and stores them where the routed FFNs read them.
Under ``generate()`` the decoding steps feed only the new tokens, which are text; the image rows were routed at
prefill and live on in the KV cache. Gradient checkpointing recomputes a layer during backward with the rows of the
latest forward pass, which are the right ones as long as each backward follows its own forward (as the Trainer
does).

Persistence: the artifact is a transformers checkpoint plus ``config.modality_experts`` (the layers, and the dense
text config the visual FFNs are built from) and the visual experts' tensors. transformers' classes do not know
them, so ``load_with_modality_experts`` loads through a subclass that adds the structure before the weights are
read. (A plain ``AutoModelForImageTextToText`` load would give the dense model and report the visual experts as
unexpected keys.)

With D2S: ``upcycle()`` turns each text FFN into the MoE block and rebuilds the visual experts as the dense FFNs
they were (``restore_modality_experts``), so the conversion stays exact and image rows stay off the router: they
have their own expert already, they are many (hundreds per image) and stay at the cost of one dense FFN, and the
text experts specialise on text. The routers then see the text rows only: ``router_token_masks`` lines the loss
masks up with their rows.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

from distill.models.layer_spec import check_layer_spec, select_layers

log = logging.getLogger(__name__)

CONFIG_KEY = "modality_experts"
"""Attribute of the VLM's config that records the modality experts (absent: none)."""
TRAIN_MODES = ("visual_only", "all")


@dataclass
class ModalityExpertsConfig:
    """Where the visual experts go and what trains (a student option, e.g. ``student.modality_experts``)."""

    layers: str | list[int] = "all"
    """``all``, ``every_other`` (0, 2, 4, ...) or an explicit list of decoder layer indices."""
    train: str = "all"
    """``visual_only``: only the visual experts learn, everything else stays frozen (Mono-InternVL's visual
    pre-training); ``all``: the visual experts learn along with whatever the stage trains."""

    def __post_init__(self) -> None:
        self.layers = check_layer_spec(self.layers, "modality_experts.layers")
        if self.train not in TRAIN_MODES:
            raise ValueError(f"modality_experts.train={self.train!r}: expected one of {TRAIN_MODES}")

    def expert_layers(self, num_layers: int) -> list[int]:
        return select_layers(self.layers, num_layers, "modality_experts.layers")

    def trainable_modes(self, stage_modes: dict[str, str]) -> dict[str, str]:
        """The per-component modes of a stage that builds the student from parts (adapter init, SFT).

        ``all`` adds the visual experts to the stage's own modes: they are new and should learn even where the
        stage keeps the rest of the LLM frozen (adapter init). ``visual_only`` opens them alone, plus the projector
        if the stage trains it (a freshly initialised projector must learn for the experts to see anything).
        Stages that load an artifact (D2D, D2S, preference) take their own ``trainable.modes``: list
        ``visual_experts: full`` there to keep training them.
        """
        if self.train == "visual_only":
            return {"visual_experts": "full", "projector": stage_modes.get("projector", "frozen")}
        return {**stage_modes, "visual_experts": stage_modes.get("visual_experts", "full")}


@dataclass(frozen=True)
class Rows:
    """Row indices into the flattened ``[batch * seq, hidden]`` states of one forward pass."""

    text: torch.Tensor
    visual: torch.Tensor
    total: int


class ModalityRouting:
    """The forward pre-hook on the VLM's inner model: keeps the text / image rows of the latest forward pass."""

    def __init__(self, image_token_id: int) -> None:
        self.image_token_id = image_token_id
        self.rows: Rows | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is not None:
            visual = input_ids == self.image_token_id
        else:  # as Llava's own placeholder mask does for inputs_embeds: compare with the image token's embedding
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                raise ValueError("modality experts need input_ids or inputs_embeds to tell image tokens apart")
            image = module.get_input_embeddings()(torch.tensor(self.image_token_id, device=embeds.device))
            visual = (embeds == image).all(-1)
        flat = visual.reshape(-1)
        n_visual = int(flat.sum())  # the one host sync per forward pass; the layers reuse these indices
        order = torch.argsort(flat.to(torch.int8), stable=True)  # text rows first, each group in sequence order
        self.rows = Rows(text=order[: flat.numel() - n_visual], visual=order[flat.numel() - n_visual:],
                         total=flat.numel())


class ModalityRoutedFFN(nn.Module):
    """Mixed into an FFN's class: text rows go through the FFN's own forward, image rows through ``visual_expert``."""

    visual_expert: nn.Module
    routing: ModalityRouting

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        rows = self.routing.rows
        if rows is None or rows.total != hidden_states.shape[:-1].numel():
            raise RuntimeError("modality experts: no token rows for this input; call the VLM itself (its inner "
                               "model's pre-hook finds the image tokens), not its language model")
        if rows.visual.numel() == 0:  # text-only batches and the decoding steps of generate()
            return super().forward(hidden_states)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        text, visual = rows.text.to(flat.device), rows.visual.to(flat.device)
        # Row batches of shape [1, rows, hidden]: MoE blocks expect [batch, seq, hidden].
        text_out = super().forward(flat.index_select(0, text).unsqueeze(0)).squeeze(0)
        visual_out = self.visual_expert(flat.index_select(0, visual).unsqueeze(0)).squeeze(0)
        out = flat.new_empty(flat.shape).index_copy(0, text, text_out).index_copy(0, visual, visual_out)
        return out.view_as(hidden_states)


_ROUTED_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _route(ffn: nn.Module, visual_expert: nn.Module, routing: ModalityRouting) -> None:
    cls = type(ffn)
    if cls not in _ROUTED_CLASSES:
        _ROUTED_CLASSES[cls] = type(f"ModalityRouted{cls.__name__}", (ModalityRoutedFFN, cls), {"__module__": __name__})
    ffn.__class__ = _ROUTED_CLASSES[cls]
    ffn.visual_expert = visual_expert
    ffn.routing = routing


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.get_decoder().layers


def _image_token_id(model: PreTrainedModel) -> int:
    token_id = getattr(model.config, "image_token_id", None)
    if token_id is None:
        raise ValueError(f"{type(model).__name__}'s config has no image_token_id: modality experts route by it")
    return token_id


def visual_experts(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(layer index, visual FFN)`` for every layer with modality experts."""
    return [(i, layer.mlp.visual_expert) for i, layer in enumerate(_decoder_layers(model))
            if isinstance(layer.mlp, ModalityRoutedFFN)]


def add_modality_experts(model: PreTrainedModel, cfg: ModalityExpertsConfig) -> PreTrainedModel:
    """Give ``model`` (in place) a visual expert, a copy of the text FFN, in each chosen layer; returns it."""
    if getattr(model.config, CONFIG_KEY, None) is not None or visual_experts(model):
        raise ValueError("the model has modality experts already")
    layers = _decoder_layers(model)
    chosen = cfg.expert_layers(len(layers))
    sparse = [i for i in chosen if hasattr(layers[i].mlp, "experts")]
    if sparse:
        raise ValueError(f"layers {sparse} are MoE already: add modality experts to the dense student; D2S then "
                         "upcycles the text FFN and keeps the visual expert dense")
    routing = ModalityRouting(_image_token_id(model))
    for i in chosen:
        _route(layers[i].mlp, copy.deepcopy(layers[i].mlp), routing)
    model.get_submodule("model").register_forward_pre_hook(routing, with_kwargs=True)
    setattr(model.config, CONFIG_KEY, {"layers": chosen, "ffn_config": model.config.text_config.to_dict()})
    log.info("modality experts: a visual FFN in %d of %d layers (%.1fM parameters)", len(chosen), len(layers),
             sum(p.numel() for _, m in visual_experts(model) for p in m.parameters()) / 1e6)
    return model


def _dense_ffns(ffn_config: dict[str, Any], layers: list[int]) -> dict[int, nn.Module]:
    """Uninitialised dense FFNs of ``layers``, built from the dense text config recorded at conversion (the text
    FFN may be an MoE block by now, so it cannot be copied)."""
    config = AutoConfig.for_model(**ffn_config)
    with torch.device("meta"):  # no memory for a whole text model; only the FFNs are kept
        dense = AutoModel.from_config(config)
    return {i: dense.layers[i].mlp for i in layers}


def restore_modality_experts(model: PreTrainedModel) -> PreTrainedModel:
    """Rebuild (in place) the modality-expert structure that ``model.config`` records; no-op if it records none.

    The visual experts' values are left for the caller to load (``from_pretrained``, ``load_state_dict``).
    """
    settings = getattr(model.config, CONFIG_KEY, None)
    if settings is None:
        return model
    if visual_experts(model):
        raise ValueError("the model has modality experts already")
    layers = _decoder_layers(model)
    routing = ModalityRouting(_image_token_id(model))
    for i, ffn in _dense_ffns(settings["ffn_config"], settings["layers"]).items():
        like = next(layers[i].mlp.parameters())
        _route(layers[i].mlp, ffn.to_empty(device=like.device).to(like.dtype), routing)
    model.get_submodule("model").register_forward_pre_hook(routing, with_kwargs=True)
    return model


def load_with_modality_experts(path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """``AutoModelForImageTextToText.from_pretrained(path, **kwargs)``, modality experts included when the
    checkpoint has them.

    transformers builds the model from its config and only then reads the weights, so the structure must exist
    by then: the load goes through a subclass whose ``__init__`` restores it, and the model is handed back as an
    instance of the plain class.
    """
    config = AutoConfig.from_pretrained(path)
    if getattr(config, CONFIG_KEY, None) is None:
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    cls = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[type(config)]

    def __init__(self: PreTrainedModel, config: Any, *args: Any, **init_kwargs: Any) -> None:
        cls.__init__(self, config, *args, **init_kwargs)
        restore_modality_experts(self)

    loader = type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})
    model = loader.from_pretrained(path, config=config, **kwargs)
    model.__class__ = cls
    return model


def router_token_masks(blocks: list[tuple[int, nn.Module]], attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """For each MoE block (as ``upcycle.moe_blocks`` lists them), the flat non-padding mask lined up with the rows
    its router saw in the latest forward pass: the text rows where the block is a text FFN behind modality experts,
    every row elsewhere. ``logits[mask]`` then keeps a router's valid rows."""
    flat = attention_mask.reshape(-1).bool()
    masks = []
    for _, block in blocks:
        rows = block.routing.rows if isinstance(block, ModalityRoutedFFN) else None
        masks.append(flat[rows.text.to(flat.device)] if rows is not None and rows.visual.numel() else flat)
    return masks
