"""The student VLM: a vision tower + a projector + a small text LLM, as a standard transformers Llava model.

Built from local checkpoints only:

    model, processor = build_student(StudentParts(vision_tower="ckpt/clip", llm="ckpt/qwen2-small"))
    save_artifact(model, processor, "runs/x/adapter_init/model")
    model, processor = load_vlm("runs/x/adapter_init/model")   # plain AutoModelForImageTextToText

The image token is added to the LLM's tokenizer (and the embedding matrix grows to match) when it lacks one.
``projector="mlp2x_gelu"`` (LLaVA's) gives a plain ``LlavaForConditionalGeneration``; the token-compressing
``ldp`` and ``resampler`` give a ``DistillLlavaForConditionalGeneration`` (distill/models/vlm.py), which
``load_vlm`` reloads once ``distill.models`` is imported.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoProcessor,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from distill import paths as fs
from distill.models.modality import ModalityExpertsConfig, add_modality_experts, load_with_modality_experts
from distill.models.processors import has_torchvision, image_only_processors, load_processor
from distill.models.vlm import (
    DistillLlavaConfig,
    DistillLlavaForConditionalGeneration,
    DistillLlavaProcessor,
    projector_options,
)

log = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
# mlp2x_gelu keeps one token per patch (a plain Llava model); ldp and resampler compress (distill/models/vlm.py).
PROJECTORS = ("mlp2x_gelu", "ldp", "resampler")


@dataclass
class StudentParts:
    """Where the student's parts come from (local paths) and how they are joined."""

    vision_tower: str
    llm: str
    projector: str = "mlp2x_gelu"
    """``mlp2x_gelu`` (LLaVA-1.5), ``ldp`` (MobileVLM v2, pools the patch grid) or ``resampler`` (learned queries)."""
    projector_config: dict[str, Any] = field(default_factory=dict)
    """Options of ``ldp`` (``stride``, ``pooled_grid``) or ``resampler`` (``num_queries``, ``num_layers``,
    ``num_heads``); see distill/models/vlm.py. ``mlp2x_gelu`` takes none."""
    vision_feature_layer: int = -2
    """LLaVA takes the second-to-last layer's patch features."""
    vision_feature_select_strategy: str = "default"
    """``default`` drops the CLS token, ``full`` keeps it."""
    modality_experts: ModalityExpertsConfig | None = None
    """Mono-InternVL-style visual FFN experts (image tokens to copies of the text FFNs, static routing), e.g.
    ``{layers: all, train: all}``; see distill/models/modality.py. None: a plain LLM."""

    def __post_init__(self) -> None:
        if isinstance(self.modality_experts, dict) or hasattr(self.modality_experts, "keys"):
            self.modality_experts = ModalityExpertsConfig(**dict(self.modality_experts))
        for name in ("vision_tower", "llm"):
            path = Path(getattr(self, name))
            if not fs.is_file(path / "config.json"):
                raise FileNotFoundError(f"student.{name}: no transformers checkpoint at {path} (config.json missing)")
        if self.projector not in PROJECTORS:
            raise ValueError(f"student.projector={self.projector!r}: expected one of {PROJECTORS}")
        self.projector_config = dict(self.projector_config or {})  # hydra hands over a DictConfig
        if self.projector == "mlp2x_gelu" and self.projector_config:
            raise ValueError(f"student.projector_config={self.projector_config}: mlp2x_gelu takes no options")
        if self.projector != "mlp2x_gelu":
            try:
                projector_options(self.projector, self.projector_config)
            except ValueError as err:
                raise ValueError(f"student.{err}") from err
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError("student.vision_feature_select_strategy must be 'default' or 'full'")


ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "flash_attention_2", "flex_attention", "eager")


def resolve_attn_implementation(requested: str) -> str:
    """``auto`` is flash_attention_2 when the flash-attn package is installed and a GPU is present, else sdpa
    (which itself runs FlashAttention kernels on recent GPUs); any other value is taken as given."""
    if requested != "auto":
        return requested
    has_flash = importlib.util.find_spec("flash_attn") is not None
    return "flash_attention_2" if has_flash and torch.cuda.is_available() else "sdpa"


FLEX_RECOMPILE_LIMIT = 64
"""TorchDynamo's recompile limit while a model attends with ``flex_attention`` (torch's default: 8). transformers
compiles ``flex_attention`` and ``create_block_mask`` once for every process, and each model, grad mode, autocast
state and (until they turn dynamic) shape adds an entry: on CPU, 20 packed D2S batches of the tiny student and
teacher, forward only, already made 6 entries of each. Past the limit Dynamo runs the function uncompiled, and
flex attention uncompiled is dense math over the whole packed row (its memory quadratic in the row's length)."""


def use_attn_implementation(model: PreTrainedModel, requested: str) -> str:
    """Set ``model``'s attention (vision tower and LLM alike) to ``resolve_attn_implementation(requested)``; for
    ``flex_attention`` raise Dynamo's recompile limit to at least ``FLEX_RECOMPILE_LIMIT``. Returns the name set."""
    attn = resolve_attn_implementation(requested)
    model.set_attn_implementation(attn)
    if attn == "flex_attention" and torch._dynamo.config.recompile_limit < FLEX_RECOMPILE_LIMIT:
        log.info("flex_attention: TorchDynamo's recompile limit %d -> %d (each model and grad mode compiles its own "
                 "flex attention; past the limit it would run uncompiled)", torch._dynamo.config.recompile_limit,
                 FLEX_RECOMPILE_LIMIT)
        torch._dynamo.config.recompile_limit = FLEX_RECOMPILE_LIMIT
    return attn


def build_student(
    parts: StudentParts, dtype: torch.dtype = torch.float32
) -> tuple[LlavaForConditionalGeneration, ProcessorMixin]:
    """Assemble a Llava student from a vision tower checkpoint and a text LLM checkpoint.

    The vision tower and the LLM keep their pretrained weights; the projector is freshly initialised
    (adapter init trains it).
    """
    tokenizer = AutoTokenizer.from_pretrained(parts.llm)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # AutoProcessor, not AutoImageProcessor: the latter insists on torchvision even for PIL processors.
    image_processor = AutoProcessor.from_pretrained(parts.vision_tower)

    vision = AutoModel.from_pretrained(parts.vision_tower, dtype=dtype)
    vision_config = vision.config
    patch_tokens = (vision_config.image_size // vision_config.patch_size) ** 2
    extra = _extra_vision_tokens(vision, patch_tokens)
    if extra == 0 and parts.vision_feature_select_strategy == "default":
        raise ValueError("this vision tower has no CLS token (SigLIP-style): use vision_feature_select_strategy=full")
    compressing = parts.projector != "mlp2x_gelu"
    if compressing and extra > 0 and parts.vision_feature_select_strategy == "full":
        raise ValueError(f"student.projector={parts.projector} works on the patch grid: use "
                         "vision_feature_select_strategy=default to drop this tower's CLS token")

    llm = AutoModelForCausalLM.from_pretrained(parts.llm, dtype=dtype)
    if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
        # Keep the padded size when the checkpoint already has room (Qwen pads its vocab to a multiple of 128).
        llm.resize_token_embeddings(len(tokenizer))

    llava_fields = dict(
        vision_config=vision_config,
        text_config=llm.config,
        image_token_index=image_token_id,
        vision_feature_layer=parts.vision_feature_layer,
        vision_feature_select_strategy=parts.vision_feature_select_strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=llm.config.tie_word_embeddings,
    )
    if compressing:
        config = DistillLlavaConfig(**llava_fields, projector_type=parts.projector,
                                    projector_config=parts.projector_config)
        model = DistillLlavaForConditionalGeneration(config).to(dtype)
    else:
        model = LlavaForConditionalGeneration(LlavaConfig(**llava_fields)).to(dtype)
        config = model.config
    _load_exact(model.model.vision_tower, vision.state_dict(), "vision tower")
    _load_exact(model.model.language_model, llm.model.state_dict(), "LLM")
    _load_exact(model.lm_head, llm.lm_head.state_dict(), "LM head")
    if config.tie_word_embeddings:
        model.tie_weights()

    if compressing:
        # The projector's output count, which LlavaProcessor's one-per-patch rule would not give.
        processor = DistillLlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                          image_token=IMAGE_TOKEN, image_seq_length=config.image_seq_length)
    else:
        processor = LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=vision_config.patch_size,
            vision_feature_select_strategy=parts.vision_feature_select_strategy,
            image_token=IMAGE_TOKEN,
            num_additional_image_tokens=extra,  # CLIP's CLS token (dropped again by "default"); none for SigLIP
        )
    if parts.modality_experts is not None:
        add_modality_experts(model, parts.modality_experts)  # exact at initialisation: copies of the text FFNs
    log.info("student assembled: %s projector, %d patches, vocab %d", parts.projector, patch_tokens, len(tokenizer))
    return model, processor


@torch.no_grad()
def _extra_vision_tokens(vision: PreTrainedModel, patch_tokens: int) -> int:
    """Tokens the tower emits besides its patches (1 for CLIP's CLS, 0 for SigLIP), asked of the tower itself."""
    size = vision.config.image_size
    param = next(vision.parameters())
    out = vision(pixel_values=torch.zeros(1, 3, size, size, dtype=param.dtype, device=param.device))
    return out.last_hidden_state.shape[1] - patch_tokens


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    # Buffers such as position_ids may be absent from a checkpoint; real weights may not.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{what}: checkpoint does not fit the student (missing {missing}, unexpected {unexpected})")


def load_vlm(path: str | Path, dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load any image-text-to-text checkpoint and its processor from a local folder."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no transformers checkpoint at {path} (config.json missing)")
    # A plain AutoModelForImageTextToText load, unless the config records modality experts to rebuild first.
    model = load_with_modality_experts(path, dtype=dtype or "auto")
    return model, load_processor(path)


def save_artifact(model: PreTrainedModel, processor: ProcessorMixin, path: str | Path) -> Path:
    """Write a model and its processor as a plain transformers checkpoint (safetensors)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    save_processor(processor, path)
    return path


def save_processor(processor: ProcessorMixin, path: str | Path) -> None:
    """``processor.save_pretrained``; one loaded without its video part (no torchvision here) saves without it."""
    with nullcontext() if has_torchvision() else image_only_processors():
        processor.save_pretrained(path)
