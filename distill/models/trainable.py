"""Per-component trainability: each of vision tower / projector / LLM is ``frozen``, ``full`` or ``lora``.

    apply_trainability(model, {"vision_tower": "frozen", "projector": "full", "llm": "lora"}, lora=LoraSpec())
    log.info("\n%s", parameter_table(model))
    ...train...
    merge_lora(model)          # before save_pretrained: the artifact stays a plain transformers model

Components are found the way transformers names them, not by one family's attribute paths: the LLM is the base
model's ``get_decoder()`` plus the output embeddings, the vision tower its ``get_encoder(modality="image")``, and
the projector what the base model holds besides the two (Llava's ``multi_modal_projector``, Idefics3's
``connector``) or, where that is nothing, the encoder's trailing children that map into the LLM's width
(Qwen2-VL's ``merger``); see ``vision_parts``. MoE students add ``experts`` (every MoE layer's experts, shared expert
included), ``router`` (every MoE layer's router) and ``dense_ffn`` (the FFNs of the layers left dense) views inside
the LLM; students with modality experts
(distill/models/modality.py) add ``visual_experts`` (every layer's visual FFN). ``frozen`` means "not opened": with
``{llm: frozen, experts: full}`` only the experts of the LLM train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from distill.models.modality import visual_experts

MODES = ("frozen", "full", "lora")
COMPONENTS = ("vision_tower", "projector", "llm")


@dataclass
class LoraSpec:
    """LoRA settings used for components whose mode is ``lora``."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


MOE_COMPONENTS = ("experts", "router")
DENSE_FFN = "dense_ffn"
"""The FFNs of an MoE student's dense (non-MoE) layers; LLaVA-MoD's D2S trains them with the experts."""
VISUAL_EXPERTS = "visual_experts"
VIEWS = (*MOE_COMPONENTS, DENSE_FFN, VISUAL_EXPERTS)
"""Components inside the LLM, opened on top of (or instead of) the whole ``llm``."""


def text_model(model: nn.Module) -> nn.Module:
    """The VLM's language model (its decoder stack), as transformers' ``get_decoder`` finds it."""
    base = model.base_model
    decoder = base.get_decoder()
    if decoder is base and not hasattr(base, "layers"):  # a text-only model's base is its decoder
        raise ValueError(f"{type(model).__name__}: transformers finds no language model in it (get_decoder)")
    return decoder


def _out_width(module: nn.Module) -> int | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def vision_parts(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(vision tower modules, projector modules)`` of a VLM.

    The tower is ``get_encoder(modality="image")`` of the base model. The projector is every other child of the base
    model but the language model; a family that keeps it inside the encoder (Qwen2-VL's patch merger) has the
    encoder's trailing children whose last linear layer outputs the LLM's width instead, and the tower is then the
    encoder's other children.
    """
    base = model.base_model
    encoder = base.get_encoder(modality="image")
    if encoder is base:
        raise ValueError(f"{type(model).__name__}: transformers finds no vision encoder in it (get_encoder('image'))")
    decoder = text_model(model)
    projector = [m for m in base.children() if m is not encoder and m is not decoder]
    if projector:
        return [encoder], projector
    width = model.config.get_text_config().hidden_size
    children = [c for c in encoder.children() if any(True for _ in c.parameters())]
    inner = []
    while children and _out_width(children[-1]) == width:
        inner.insert(0, children.pop())
    if not inner:
        raise ValueError(f"{type(model).__name__}: no projector found (no module between its vision encoder and its "
                         "language model, and none inside the encoder mapping to the LLM's width)")
    return children, inner


def _moe_parts(model: nn.Module, component: str) -> list[nn.Module]:
    mods = []
    for layer in text_model(model).layers:
        block = layer.mlp
        if not hasattr(block, "experts"):
            continue
        if component == "router":
            mods.append(block.gate)
        else:
            mods.append(block.experts)
            shared = ("shared_expert", "shared_expert_gate")
            mods.extend(getattr(block, name) for name in shared if hasattr(block, name))
    return mods


def _dense_ffns(model: nn.Module) -> list[nn.Module]:
    """The FFN parts of every layer that is not MoE (a modality-routed FFN's visual expert left out: it is
    ``visual_experts``)."""
    mods = []
    for layer in text_model(model).layers:
        if not hasattr(layer.mlp, "experts"):
            mods.extend(child for name, child in layer.mlp.named_children() if name != "visual_expert")
    return mods


def component_modules(model: nn.Module, component: str) -> list[nn.Module]:
    if component == DENSE_FFN:
        return _dense_ffns(model)
    if component == VISUAL_EXPERTS:
        mods = [m for _, m in visual_experts(model)]
        if not mods:
            raise ValueError(f"component {component!r} needs a student with modality experts "
                             "(distill/models/modality.py)")
        return mods
    if component in MOE_COMPONENTS:
        mods = _moe_parts(model, component)
        if not mods:
            raise ValueError(f"component {component!r} needs an MoE student (upcycle first)")
        return mods
    if component not in COMPONENTS:
        known = list(COMPONENTS) + list(VIEWS)
        raise ValueError(f"unknown component {component!r}; expected one of {known}")
    if component == "llm":
        head = model.get_output_embeddings()
        return [text_model(model), *([head] if head is not None else [])]
    tower, projector = vision_parts(model)
    return tower if component == "vision_tower" else projector


def validate_modes(modes: dict[str, str]) -> None:
    for comp, mode in modes.items():
        if comp not in COMPONENTS and comp not in VIEWS:
            raise ValueError(f"trainable.{comp}: unknown component; expected one of "
                             f"{list(COMPONENTS) + list(VIEWS)}")
        if mode not in MODES:
            raise ValueError(f"trainable.{comp}={mode!r}: expected one of {MODES}")


def apply_trainability(model: nn.Module, modes: dict[str, str], lora: LoraSpec | None = None) -> None:
    """Freeze everything, then open up each component as its mode says. Unlisted components stay frozen."""
    validate_modes(modes)
    model.requires_grad_(False)
    for comp, mode in modes.items():
        for mod in component_modules(model, comp):
            if mode == "full":
                mod.requires_grad_(True)
            elif mode == "lora":
                if comp in MOE_COMPONENTS:
                    raise ValueError(f"trainable.{comp}: lora is not supported for MoE parts (fused expert weights)")
                _add_lora(mod, lora or LoraSpec())


def _add_lora(module: nn.Module, spec: LoraSpec) -> None:
    from peft import LoraConfig, inject_adapter_in_model

    names = {n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, nn.Linear)}
    targets = [t for t in spec.target_modules if t in names]
    if not targets:
        return  # e.g. lm_head: no LoRA target inside; it stays frozen
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets)
    inject_adapter_in_model(config, module)
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and remove it; returns how many layers were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, mod.get_base_layer())
            merged += 1
    return merged


def parameter_table(model: nn.Module) -> str:
    """A table of total and trainable parameters per component (plus whatever sits outside them)."""
    seen: set[int] = set()
    rows = []
    # MoE parts and visual experts first, so the llm row counts what is left of the LLM.
    moe = [c for c in MOE_COMPONENTS if _moe_parts(model, c)] if hasattr(model, "model") else []
    if moe:
        moe.append(DENSE_FFN)
    visual = [VISUAL_EXPERTS] if hasattr(model, "model") and visual_experts(model) else []
    for comp in [*moe, *visual, *COMPONENTS]:
        total = trainable = 0
        for mod in component_modules(model, comp):
            for p in mod.parameters():
                if id(p) in seen:
                    continue
                seen.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        rows.append((comp, total, trainable))
    rest = [p for p in model.parameters() if id(p) not in seen]
    if rest:
        rows.append(("other", sum(p.numel() for p in rest), sum(p.numel() for p in rest if p.requires_grad)))
    rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
    lines = [f"{'component':<14}{'params':>14}{'trainable':>14}{'%':>8}"]
    for comp, total, trainable in rows:
        pct = 100.0 * trainable / total if total else 0.0
        lines.append(f"{comp:<14}{total:>14,}{trainable:>14,}{pct:>8.1f}")
    return "\n".join(lines)

