"""Stand-ins for public checkpoints, trained on the Shapes world's own text and images.

LLaVA-MoD's student starts from CLIP and Qwen; ours starts from these, written as ordinary transformers
checkpoints so that the real loading code paths are the ones exercised:

- ``tokenizer/``: a byte-level BPE trained with ``tokenizers`` on the world's corpus, ChatML special tokens;
- ``llm_small/`` and ``llm_large/``: Qwen2-architecture causal LMs pretrained on the corpus;
- ``vision_tower/``: a CLIP-architecture vision tower, trained contrastively (CLIP's loss) on image-caption
  pairs plus a dense auxiliary loss (each patch token predicts the colour and shape of the object under its
  centre, or "none"), saved as ``CLIPVisionModel`` with its image processor. The dense term stands in for
  what 400M pairs give real CLIP: patch features in which objects' attributes are linearly readable with
  wide margins. Contrastive training alone on a thousand pairs leaves them readable but ill-conditioned, and
  a small VLM on top then needs far more steps than a CPU demo has to learn to read them.
- ``vision_tower_siglip/`` (when ``vision_towers`` lists ``siglip``): the same, SigLIP architecture and SigLIP's
  pairwise sigmoid loss; no CLS token, so a student built on it uses ``vision_feature_select_strategy=full``.
- ``teacher_init/`` (``teacher_init: true``): the teacher's starting point, a LLaVA VLM of ``vision_tower/`` and
  ``llm_large/`` whose projector maps each patch to the large LLM's input embeddings of its object's colour and
  shape words (zero for an empty cell), fitted by regression on the world's scenes. It stands in for what
  LLaVA's alignment stage on 558k caption pairs gives a real VLM: image tokens in the LLM's word-embedding space.
  Without it the teacher never learnt to find a named object among the image tokens (existence questions
  stayed at chance, shapes were read at 0.20); with it, the same SFT reads shapes at 0.55 and captions with no
  hallucinated object. The teacher's SFT keeps this projector frozen: trained along with the LLM at the LLM's
  learning rate it drifted out of the embedding space and the gain was lost.

    python -m data_prep.standins --world runs/demo/world/data --out runs/demo/world

Each checkpoint is written to a temporary folder and renamed into place when complete, so an interrupted
build is redone, never half-used.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionModel,
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipTextConfig,
    SiglipVisionModel,
    Trainer,
    TrainingArguments,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from distill.data.templates import TEMPLATES
from distill.models.tiny import LLMSize, VisionSize

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION_ARCHS = {"clip": "vision_tower", "siglip": "vision_tower_siglip"}
"""Vision stand-in architectures and the folder each is written to."""


@dataclass
class StandinConfig:
    vocab_size: int = 512
    small: LLMSize = field(default_factory=lambda: LLMSize(hidden_size=64, intermediate_size=192, num_hidden_layers=2))
    large: LLMSize = field(
        default_factory=lambda: LLMSize(hidden_size=128, intermediate_size=384, num_hidden_layers=4)
    )
    vision: VisionSize = field(default_factory=VisionSize)
    block_size: int = 128
    llm_steps: int = 150
    llm_batch_size: int = 16
    llm_lr: float = 3e-3
    llm_init_std: float = 0.05
    """Normal-init std of the stand-in LLMs' weights. transformers' 0.02 suits wide models; at 64-128 wide it leaves
    attention nearly uniform and slow to sharpen: a text probe (scene description in place of the image) reached
    colour accuracy 0.49 after 100 steps from 0.05 and 0.12 from 0.02; the demo teacher after 1,000 steps read
    shapes 0.37 vs 0.22 (all questions 0.49 vs 0.45)."""
    vision_steps: int = 300
    vision_batch_size: int = 64
    vision_lr: float = 2e-3
    vision_towers: tuple[str, ...] = ("clip",)
    """Which vision stand-ins to build: ``clip`` (``vision_tower/``) and/or ``siglip`` (``vision_tower_siglip/``)."""
    teacher_init: bool = True
    """Write ``teacher_init/``: ``vision_tower/`` + ``llm_large/`` with a projector aligned to the word embeddings."""
    teacher_vision_feature_layer: int = -1
    """The vision layer ``teacher_init`` reads (the recipe's ``vision_feature_layer``; the 2-layer stand-in's last)."""
    projector_steps: int = 2000
    projector_batch_size: int = 64
    projector_lr: float = 3e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name, cls in (("small", LLMSize), ("large", LLMSize), ("vision", VisionSize)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls(**value))
        self.vision_towers = tuple(self.vision_towers)
        unknown = set(self.vision_towers) - set(VISION_ARCHS)
        if unknown or not self.vision_towers:
            raise ValueError(f"standins.vision_towers={list(self.vision_towers)}: expected a non-empty subset of "
                             f"{list(VISION_ARCHS)}")


def _done(path: Path) -> bool:
    return (path / "config.json").is_file() or (path / "tokenizer.json").is_file()


def _publish(tmp: Path, final: Path) -> Path:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def _fresh_tmp(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    return tmp


def chat_documents(world: Path) -> list[str]:
    """The world's captions and conversations rendered with the ChatML template, image placeholders removed.

    The stand-in LLMs play chat-tuned LLMs (as Qwen2-Instruct): they see responses where a chat puts them,
    right after ``<|im_start|>assistant\n``, so a response's first word is tokenized and trained as it will
    be in the VLM. (Plain sentences alone would teach only the word after a space.)
    """
    template = TEMPLATES["chatml"]
    docs = []
    for name in ("captions.json", "instruct.json"):
        for record in json.loads((world / name).read_text()):
            turns = [{"from": t["from"], "value": t["value"].replace("<image>\n", "").replace("<image>", "")}
                     for t in record["conversations"]]
            docs.append("".join(text for text, _ in template.segments(turns)))
    docs.extend((world / "corpus.txt").read_text(encoding="utf-8").splitlines())
    return docs


def train_tokenizer(documents: list[str], out: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE over the documents, ChatML specials, the ChatML chat template (Qwen2-like)."""
    if _done(out):
        return PreTrainedTokenizerFast.from_pretrained(out)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(documents, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", model_max_length=4096
    )
    fast.chat_template = TEMPLATES["chatml"].jinja
    tmp = _fresh_tmp(out)
    fast.save_pretrained(tmp)
    _publish(tmp, out)
    return fast


def _padded_vocab(tokenizer: PreTrainedTokenizerFast) -> int:
    # Room for the image token the student adds, rounded up as Qwen pads its vocab.
    return ((len(tokenizer) + 1 + 63) // 64) * 64


def token_blocks(documents: list[str], tokenizer_dir: Path, block_size: int) -> list[dict[str, list[int]]]:
    """The documents tokenized (one batched call), joined by ``<|endoftext|>`` and cut into blocks.

    The Rust tokenizer's ``encode_batch_fast`` gives the same ids as calling the tokenizer without the offsets
    and per-document Python encodings it builds (on the demo world's 48k documents: 2.4 s against 4.5 s)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch_fast(documents, add_special_tokens=False):
        ids.extend(encoding.ids + [eot])
    n = len(ids) // block_size
    return [{"input_ids": ids[i * block_size : (i + 1) * block_size]} for i in range(n)]


def pretrain_llm(blocks: list[dict[str, list[int]]], tokenizer_dir: Path, size: LLMSize, out: Path,
                 cfg: StandinConfig) -> Path:
    """Causal-LM pretraining on the world's text, packed into blocks (``token_blocks``)."""
    if _done(out):
        return out
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    n = len(blocks)
    config = size.qwen2_config(
        _padded_vocab(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        initializer_range=cfg.llm_init_std,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    tmp = _fresh_tmp(out)
    _fit(model, blocks, DataCollatorForLanguageModeling(tokenizer, mlm=False), tmp / "trainer",
         cfg.llm_steps, cfg.llm_batch_size, cfg.llm_lr, cfg.seed)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    log.info("pretrained %s: %d blocks of %d tokens", out.name, n, cfg.block_size)
    return _publish(tmp, out)


class _ClipWithPatchHeads(torch.nn.Module):
    """The dual encoder's own loss (CLIP's contrastive or SigLIP's sigmoid) plus per-patch colour and shape
    classification on the last layer's patch tokens (CLIP's CLS token excluded)."""

    def __init__(self, clip: CLIPModel | SiglipModel, n_colors: int, n_shapes: int) -> None:
        super().__init__()
        self.clip = clip
        hidden = clip.config.vision_config.hidden_size
        self.color_head = torch.nn.Linear(hidden, n_colors + 1)
        self.shape_head = torch.nn.Linear(hidden, n_shapes + 1)

    def forward(self, input_ids, attention_mask, pixel_values, patch_colors, patch_shapes, return_loss=True):
        text = {"input_ids": input_ids}
        if isinstance(self.clip, CLIPModel):  # SigLIP's text tower pools its last position: no attention mask
            text["attention_mask"] = attention_mask
        out = self.clip(**text, pixel_values=pixel_values, return_loss=True, output_hidden_states=True)
        hidden = out.vision_model_output.hidden_states[-1]
        patches = hidden[:, hidden.shape[1] - patch_colors.shape[1]:]
        dense = 0.0
        for head, labels in ((self.color_head, patch_colors), (self.shape_head, patch_shapes)):
            # Unit-norm class directions: a margin has to come from the features themselves, so each attribute
            # gets a high-variance direction a VLM reads as easily as colour (with a free-norm head, shape ended
            # up linearly readable but in directions too faint for the LLM to pick up within a demo's steps).
            logits = torch.nn.functional.linear(patches, torch.nn.functional.normalize(head.weight, dim=1), head.bias)
            dense = dense + torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return {"loss": out.loss + dense}


def _patch_labels(scene: dict[str, Any], grid: int) -> tuple[list[int], list[int]]:
    """Label of each patch: the object whose 3x3 cell holds the patch centre (0 = none)."""
    from data_prep.shapes import COLORS, SHAPES

    cells = {(o["row"], o["col"]): o for o in scene["objects"]}
    colors, shapes = [], []
    for i in range(grid):
        for j in range(grid):
            obj = cells.get((int((i + 0.5) * 3 / grid), int((j + 0.5) * 3 / grid)))
            colors.append(COLORS.index(obj["color"]) + 1 if obj else 0)
            shapes.append(SHAPES.index(obj["shape"]) + 1 if obj else 0)
    return colors, shapes


class PixelCache:
    """The world's images as pixel values under an image processor, each image opened and processed once per
    processor settings, however often it is read: the vision stand-in's 300 steps of 64 draw 19.2k images from
    the demo's 12k and ``teacher_init`` reads all 12k again (31.2k passes through the processor, at about 0.75 ms
    each on 2 CPUs, against 12k). The processor treats each image on its own, so a row is the same whichever
    batch computed it."""

    def __init__(self, image_root: Path) -> None:
        self.image_root = image_root
        self._tables: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, processor: Any, names: list[str]) -> torch.Tensor:
        """``[len(names), channels, height, width]``: ``processor(images)["pixel_values"]`` of the named images."""
        table = self._tables.setdefault(processor.to_json_string(), {})
        missing = [name for name in dict.fromkeys(names) if name not in table]
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            images = [Image.open(self.image_root / name).convert("RGB") for name in chunk]
            table.update(zip(chunk, processor(images, return_tensors="pt")["pixel_values"]))
        return torch.stack([table[name] for name in names])


class _ClipCollator:
    def __init__(self, tokenizer: PreTrainedTokenizerFast, processor: Any, pixels: PixelCache, grid: int,
                 fixed_width: int | None = None):
        self.tokenizer, self.processor, self.pixels, self.grid = tokenizer, processor, pixels, grid
        self.eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.fixed_width = fixed_width
        """SigLIP pads every caption to the full length, as its text tower pools the last position."""

    def __call__(self, records: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        captions = self.tokenizer([r["caption"] for r in records], add_special_tokens=False)["input_ids"]
        texts = [ids[:62] + [self.eot] for ids in captions]
        width = self.fixed_width or max(len(t) for t in texts)
        ids = torch.full((len(texts), width), self.eot, dtype=torch.long)
        mask = torch.zeros((len(texts), width), dtype=torch.long)
        for i, t in enumerate(texts):
            ids[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = 1
        pixels = self.pixels(self.processor, [r["image"] for r in records])
        labels = [_patch_labels(r["scene"], self.grid) for r in records]
        return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels,
                "patch_colors": torch.tensor([c for c, _ in labels]),
                "patch_shapes": torch.tensor([s for _, s in labels])}


def _dual_encoder(arch: str, tokenizer: PreTrainedTokenizerFast, size: VisionSize) -> tuple[PreTrainedModel, Any]:
    """A randomly initialised CLIP or SigLIP dual encoder (2-layer text tower) and its image processor."""
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    text = {"vocab_size": len(tokenizer), "hidden_size": size.hidden_size, "intermediate_size": size.intermediate_size,
            "num_hidden_layers": 2, "num_attention_heads": size.num_attention_heads, "max_position_embeddings": 64,
            "eos_token_id": eot, "pad_token_id": eot, "bos_token_id": eot}
    if arch == "clip":
        config = CLIPConfig(text_config=CLIPTextConfig(**text, projection_dim=size.projection_dim).to_dict(),
                            vision_config=size.clip_vision_config().to_dict(), projection_dim=size.projection_dim)
        processor = CLIPImageProcessorPil(size={"shortest_edge": size.image_size},
                                          crop_size={"height": size.image_size, "width": size.image_size})
        return CLIPModel(config), processor
    vision = {k: v for k, v in size.__dict__.items() if k != "projection_dim"}
    config = SiglipConfig(text_config=SiglipTextConfig(**text).to_dict(), vision_config=vision)
    processor = SiglipImageProcessorPil(size={"height": size.image_size, "width": size.image_size})
    return SiglipModel(config), processor


def pretrain_vision_tower(world: Path, tokenizer_dir: Path, size: VisionSize, out: Path, cfg: StandinConfig,
                          arch: str = "clip", pixels: PixelCache | None = None) -> Path:
    """Dual-encoder training on (image, caption) pairs with CLIP's or SigLIP's loss (``arch``) plus the dense
    patch heads; keeps the vision half as a ``CLIPVisionModel`` / ``SiglipVisionModel``. ``pixels``: a cache
    shared with the other stand-ins (one of its own if None)."""
    if _done(out):
        return out
    pixels = pixels or PixelCache(world / "images")
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(cfg.seed)
    dual, processor = _dual_encoder(arch, tokenizer, size)
    captions = json.loads((world / "captions.json").read_text())
    scenes = {}
    for line in (world / "scenes" / "train.jsonl").read_text().splitlines():
        scene = json.loads(line)
        scenes[scene["image"]] = scene
    records = [{"image": r["image"], "caption": r["conversations"][1]["value"], "scene": scenes[r["image"]]}
               for r in captions]
    from data_prep.shapes import COLORS, SHAPES

    model = _ClipWithPatchHeads(dual, len(COLORS), len(SHAPES))
    grid = size.image_size // size.patch_size
    collator = _ClipCollator(tokenizer, processor, pixels, grid, fixed_width=64 if arch == "siglip" else None)
    tmp = _fresh_tmp(out)
    _fit(model, records, collator, tmp / "trainer", cfg.vision_steps, cfg.vision_batch_size, cfg.vision_lr, cfg.seed)
    shutil.rmtree(tmp / "trainer", ignore_errors=True)
    vision = (CLIPVisionModel if arch == "clip" else SiglipVisionModel)(dual.config.vision_config)
    vision.load_state_dict(dual.vision_model.state_dict())
    vision.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    return _publish(tmp, out)


def word_embedding_targets(scenes: list[dict[str, Any]], grid: int, embeddings: torch.Tensor,
                           tokenizer: PreTrainedTokenizerFast) -> torch.Tensor:
    """``[n_scenes, grid*grid, hidden]``: for each patch, the input embedding of its object's colour word plus that
    of its shape word (a word of several tokens: their mean), zero where no object's cell holds the patch centre."""
    from data_prep.shapes import COLORS, SHAPES

    def table(words: list[str]) -> torch.Tensor:
        rows = [embeddings[tokenizer(" " + w, add_special_tokens=False)["input_ids"]].mean(0) for w in words]
        return torch.cat([embeddings.new_zeros(1, embeddings.shape[1]), torch.stack(rows)])

    colors, shapes = table(list(COLORS)), table(list(SHAPES))
    labels = torch.tensor([_patch_labels(scene, grid) for scene in scenes])  # [n, 2, grid*grid]
    return colors[labels[:, 0]] + shapes[labels[:, 1]]


def align_teacher_projector(world: Path, arch: str, standins: Path, out: Path, cfg: StandinConfig,
                            pixels: PixelCache | None = None) -> Path:
    """``teacher_init/``: a VLM of the ``arch`` vision stand-in and ``llm_large/`` whose projector is fitted (mean
    squared error, projector only) to map each patch's features to ``word_embedding_targets``; the vision tower
    and the LLM are the stand-ins, unchanged. ``pixels``: as in ``pretrain_vision_tower``."""
    if _done(out):
        return out
    pixels = pixels or PixelCache(world / "images")
    from distill.models.student import StudentParts, build_student, save_artifact

    torch.manual_seed(cfg.seed)
    model, processor = build_student(StudentParts(
        str(standins / VISION_ARCHS[arch]), str(standins / "llm_large"),
        vision_feature_layer=cfg.teacher_vision_feature_layer,
        vision_feature_select_strategy="full" if arch == "siglip" else "default",  # SigLIP has no CLS token
    ))
    model.eval()
    scenes = [json.loads(line) for line in (world / "scenes" / "train.jsonl").read_text().splitlines()]
    projector = model.model.multi_modal_projector
    captured: list[torch.Tensor] = []
    hook = projector.register_forward_pre_hook(lambda _module, args: captured.append(args[0].detach()))
    with torch.no_grad():  # the projector's inputs, exactly as the VLM selects them (layer, CLS dropped or not)
        for i in range(0, len(scenes), 256):
            names = [s["image"] for s in scenes[i : i + 256]]
            model.model.get_image_features(pixel_values=pixels(processor.image_processor, names))
    hook.remove()
    features = torch.cat(captured)
    grid = round(features.shape[1] ** 0.5)
    if grid * grid != features.shape[1]:
        raise ValueError(f"teacher_init: {features.shape[1]} image tokens per image are not a square patch grid")
    targets = word_embedding_targets(scenes, grid, model.get_input_embeddings().weight.detach(), processor.tokenizer)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.projector_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    losses = []
    for _ in range(cfg.projector_steps):
        batch = torch.randint(0, len(features), (cfg.projector_batch_size,), generator=generator)
        loss = (projector(features[batch]) - targets[batch]).pow(2).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = (projector(features) - targets).pow(2).sum(-1).mean().item()
    log.info("teacher_init projector: squared error %.4f (first step %.4f; targets' squared norm %.4f)",
             final, losses[0] if losses else float("nan"), targets.pow(2).sum(-1).mean().item())
    tmp = _fresh_tmp(out)
    save_artifact(model, processor, tmp)
    (tmp / "alignment.json").write_text(json.dumps({"steps": cfg.projector_steps, "squared_error": final,
                                                    "first_step_squared_error": losses[0] if losses else None}))
    return _publish(tmp, out)


def _fit(model: torch.nn.Module, records: list[dict[str, Any]], collator: Any, out: Path, steps: int,
         batch_size: int, lr: float, seed: int) -> None:
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
        lr_scheduler_type="cosine", warmup_steps=max(steps // 20, 1), weight_decay=0.0,
        logging_steps=max(steps // 5, 1),
        save_strategy="no", report_to="none", seed=seed, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(records), data_collator=collator)
    trainer.remove_callback(PrinterCallback)  # the losses are logged once below, not as raw dicts per log step
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    log.info("%s: loss %s", type(model).__name__, " -> ".join(f"{x:.3f}" for x in losses))


def build_standins(world: Path | str, out: Path | str, cfg: StandinConfig | None = None) -> dict[str, str]:
    """Tokenizer, small and large LLMs, the vision tower(s) and ``teacher_init``; already-built ones are kept."""
    cfg = cfg or StandinConfig()
    world, out = Path(world), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    documents = chat_documents(world)
    paths = {name: out / name for name in ("tokenizer", "llm_small", "llm_large")}
    train_tokenizer(documents, paths["tokenizer"], cfg.vocab_size)
    if not (_done(paths["llm_small"]) and _done(paths["llm_large"])):
        blocks = token_blocks(documents, paths["tokenizer"], cfg.block_size)
        pretrain_llm(blocks, paths["tokenizer"], cfg.small, paths["llm_small"], cfg)
        pretrain_llm(blocks, paths["tokenizer"], cfg.large, paths["llm_large"], cfg)
    pixels = PixelCache(world / "images")
    for arch in cfg.vision_towers:
        paths[VISION_ARCHS[arch]] = out / VISION_ARCHS[arch]
        pretrain_vision_tower(world, paths["tokenizer"], cfg.vision, paths[VISION_ARCHS[arch]], cfg, arch, pixels)
    if cfg.teacher_init:
        paths["teacher_init"] = out / "teacher_init"
        align_teacher_projector(world, cfg.vision_towers[0], out, paths["teacher_init"], cfg, pixels)
    (out / "standins.json").write_text(json.dumps(asdict(cfg), indent=1))
    return {k: str(v) for k, v in paths.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=Path, required=True, help="a folder written by data_prep.shapes")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(build_standins(args.world, args.out), indent=1))  # noqa: T201 - CLI output


if __name__ == "__main__":
    main()
