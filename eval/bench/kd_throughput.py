"""KD throughput, MFU and peak memory on one GPU: the project's D2D / D2S / preference steps side by side with a
naive LLaVA-MoD-style step, TRL's GKD trainer and a bare loop running the project's own loss objects.

Models (random weights, built from configs by ``eval/bench/zero_step.py``'s ``llava`` and ``SHAPES``): a Llava
teacher with a Qwen2-7B-shaped LLM (vocabulary 152,064) and a CLIP-L/336-shaped tower (576 image tokens), bf16;
a Llava student with the same tower shape and a Qwen2-1.5B- or Qwen2-0.5B-shaped LLM (vocabulary 151,936), fp32
master weights under bf16 autocast, as the stages load it. D2S and preference use the student upcycled to 4
experts, top-2, on every other layer (the project's ``UpcycleConfig`` defaults, built from the MoE config
directly), experts implementation ``eager`` (the D2S default). Trainable parts are the stages' defaults: D2D
LLM + projector; D2S and preference experts + routers + projector (``SPARSE_TRAINABLE``). Loss settings are the
stage configs' defaults, read from their dataclasses: D2D ``KDConfig()`` (forward KL, chunk 1,024) with alpha 1;
D2S alpha 0.5 (KD + CE), router aux 0.01; preference ``kto_pair``, beta 0.1, aux 0.01, the teacher as reference.

Data (fixed seed; the first records are the same for every micro-batch, so every variant sees the same batches):
LLaVA-instruction-like samples, one 576-token image each (a 640x480 JPEG, decoded and resized by the
processor) plus text whose length is log-normal with median 160 tokens and sigma 0.9, clipped to [32, 1400]
(mean about 240; total sequence 600 to 2,000 tokens, under ``max_length`` 2,048). The text is split into 1 to 4
turns (at most one per 64 tokens); in each turn the question is 1/4 and the answer 3/4, and the answers are the
labelled response tokens. Preference pairs: question log-normal (median 24, sigma 0.6, [8, 128]), chosen and
rejected responses each log-normal (median 120, sigma 0.7, [16, 600]). Text is random words of a word-level
tokenizer (``w0`` ... ``w999``, one token each, ChatML specials at Qwen2's ids), built in memory, so that the
project's real data path runs: ``load_llava_json`` / ``load_preference`` on JSON files, the ``LlavaProcessor``
(CLIP image processor, image-token expansion) and the stage's collator (``build_collator`` /
``PairCollator``), which pads each micro-batch to its longest sample.

Variants (each invocation is one process, so the peak memory is its own):

- ``ours``: the stage's real path: ``DistillTrainer`` with the stage's loss object (``KDLoss``, ``SparseKDLoss``,
  ``PreferenceLoss``), the stage's collator in ``--workers`` DataLoader workers (default 2, the recipe's), the
  tracking callbacks and TrainingArguments the stages add (``include_num_input_tokens_seen="non_padding"``,
  throughput, expert load), AdamW (the Trainer's default, fused), gradient clipping 1.0. Only
  ``train_sampling_strategy`` is set to ``sequential`` (so that the batches are the same as the other variants').
- ``bare``: the same loss object, models and batches (collated beforehand) in a hand loop: forward + loss,
  backward, clip, the optimizer class and settings the Trainer builds. Mixed precision is placed as the Trainer
  (accelerate's ``prepare_model``) places it: autocast inside the student's forward only, its outputs upcast to
  fp32; the loss itself runs unautocast, its student-head GEMMs in bf16 (``KDConfig.head_dtype: auto``).
  ``ours / bare`` is the framework's overhead; their first-step losses are equal.
- ``naive``: the LLaVA-MoD-style step on the same models and batches: the teacher's (bf16) and the student's full
  logits, both upcast to fp32, log-softmax over the full vocabulary at every position, KL(teacher || student)
  masked to the response tokens (D2S adds CE and the router loss as ours does; preference computes full fp32
  sequence log-probs of both models); the whole step under bf16 autocast, fp32 master weights as ours (not
  LLaVA-MoD's DeepSpeed bf16 weights). Batches are padded to the longest sample, as LLaVA's and LLaVA-MoD's
  ``DataCollatorForSupervisedDataset`` do (``pad_sequence``); ``--pad max`` pads every batch to ``max_length``.
- ``trl_gkd``: TRL's ``GKDTrainer`` (``trl.experimental.gkd``) with ``lmbda=0`` (no on-policy generation) and
  ``beta=0`` (forward KL), on the text LLMs only (``Qwen2ForCausalLM`` / ``Qwen2MoeForCausalLM`` from the same
  text configs, same trainable parts), fed the same token sequences without images (the image positions are
  ordinary tokens, so the lengths match), padded by the project encoder's ``batch``. GKD refuses teachers whose
  vocabulary differs from the student's, so its teacher LLM has the student's 151,936 rows instead of 152,064
  (0.1% of the teacher's LM head). Its accelerator upcasts both models' full logits to fp32 and the loss runs
  on them unautocast, and it calls ``torch.cuda.empty_cache()`` every step: TRL's own behaviour, kept.
  ``--trl-loop`` runs TRL's ``generalized_jsd_loss`` in a plain loop instead (models wrapped as GKDTrainer's).
  Not defined for the preference stage (it reports ``n/a``; TRL's preference trainer is DPOTrainer).

``--kd-autocast`` (ours / bare, D2D / D2S) also wraps ``chunked_kd_loss`` in bf16 autocast (before
``head_dtype``, the loss's head GEMMs ran in fp32; kept to compare).

Metrics: step time is the wall time between consecutive optimizer-step ends (CUDA-synchronised), so data loading
and every framework callback count; the first ``--warmup`` steps are dropped. Real tokens/s = the timed steps'
non-padding tokens (image tokens included; chosen and rejected rows for preference) / their total time; padding =
1 - real / padded tokens. MFU = model FLOPs / time / peak, where the model FLOPs of a step are those the task
needs, on real tokens only: teacher forward 2 N_t T + student forward and backward 6 N_s T (N without embeddings,
MoE counting the top-k experts only; ``6 N`` for the whole student even where parameters are frozen), LM heads on
the response positions only (``mfu_all_positions``: on every real token), attention 4 L d t^2 per sequence of t
real tokens forward (x3 for the student), vision towers (forward, 577 tokens per image) and projectors. The peak
is measured in the same process (bf16 8192^3 matmuls) unless ``--peak-flops`` is given; ``mfu_spec`` uses the
card's datasheet peak (``distill.training.tracking.PEAK_FLOPS``). Peak memory is ``torch.cuda.max_memory_allocated``
over the whole run (max RSS on CPU). Loss cost: after training, the variant's loss is run forward + backward on
random tensors of the median timed step's shapes (median of 3); for ours/bare the bf16 LM-head GEMMs that the
chunked loss contains (and that naive/TRL do inside the model) are timed the same way and subtracted:
``loss_share`` = (loss - heads) / median step. ``loss_insitu_ms``: CUDA events around ``chunked_kd_loss`` inside
the real steps (ours/bare, D2D/D2S; includes the heads).

Output: one markdown row (``--header`` for the header) and one JSON line per run; ``--out FILE`` appends the JSON.

    python eval/bench/kd_throughput.py --measure-peak                                   # once per card, ~15 s
    python eval/bench/kd_throughput.py --variant ours --stage d2d --student 1.5b --micro-batch 8 --header
    python eval/bench/kd_throughput.py --sweep d2d-1.5b --out runs/kd_throughput.jsonl  # a plan, one process a row
    python eval/bench/kd_throughput.py --sweep d2d-1.5b --dry-run                       # print the plan's commands
    python eval/bench/kd_throughput.py --tiny --variant naive --stage d2s               # CPU, seconds

    # the whole table, plan by plan (each under 10 minutes on an H100/H200)
    P=$(python eval/bench/kd_throughput.py --measure-peak --quiet)       # the peak FLOP/s alone
    for plan in d2d-1.5b d2d-0.5b d2s-0.5b d2s-1.5b preference-0.5b preference-1.5b; do
        python eval/bench/kd_throughput.py --sweep $plan --peak-flops $P --out runs/kd_throughput.jsonl; done
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import faulthandler
import gc
import json
import logging
import math
import os
import resource
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, not only as an installed package
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from eval.bench.zero_step import SHAPES, llava  # noqa: E402

log = logging.getLogger("kd_throughput")

VARIANTS = ("ours", "bare", "naive", "trl_gkd")
STAGES = ("d2d", "d2s", "preference")
# Student LLMs by name; "1.5b" is zero_step's student. Qwen2-0.5B: 24 layers, hidden 896, 14 heads, 2 KV heads.
STUDENTS = {
    "real": {
        "1.5b": SHAPES["real"]["student"],
        "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    },
    "tiny": {
        "1.5b": SHAPES["tiny"]["student"],
        "0.5b": dict(vocab_size=512, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True),
    },
}
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>")
"""Pad, ChatML markers and the image token, given the ids just below and at the model's image-token id."""


# ---- data: lengths, records, processor ----


@dataclasses.dataclass(frozen=True)
class LengthDist:
    """Log-normal token counts: ``exp(N(log median, sigma))`` rounded and clipped to ``[lo, hi]``."""

    median: float
    sigma: float
    lo: int
    hi: int

    def draw(self, rng: np.random.Generator) -> int:
        return int(np.clip(round(rng.lognormal(math.log(self.median), self.sigma)), self.lo, self.hi))


DATA = {
    "real": {"text": LengthDist(160, 0.9, 32, 1400), "question": LengthDist(24, 0.6, 8, 128),
             "response": LengthDist(120, 0.7, 16, 600), "max_length": 2048, "words": 1000, "image_hw": (480, 640),
             "images": 16},
    "tiny": {"text": LengthDist(12, 0.6, 4, 40), "question": LengthDist(4, 0.5, 2, 8),
             "response": LengthDist(8, 0.6, 3, 20), "max_length": 96, "words": 400, "image_hw": (30, 40),
             "images": 4},
}


def _words(rng: np.random.Generator, n: int, vocab: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(0, vocab, n))


def conversation_records(n: int, data: dict, seed: int = 0) -> list[dict[str, Any]]:
    """LLaVA conversation records: text split into 1-4 turns, each a 1/4 question and a 3/4 answer."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        total = data["text"].draw(rng)
        turns = int(rng.integers(1, max(1, min(4, total // 64)) + 1))
        sizes = [total // turns + (1 if t < total % turns else 0) for t in range(turns)]
        conv = []
        for t, size in enumerate(sizes):
            q = max(1, round(size / 4))
            question = _words(rng, q, data["words"])
            conv.append({"from": "human", "value": f"<image>\n{question}" if t == 0 else question})
            conv.append({"from": "gpt", "value": _words(rng, max(1, size - q), data["words"])})
        out.append({"id": str(i), "image": f"img{i % data['images']}.jpg", "conversations": conv})
    return out


def preference_records(n: int, data: dict, seed: int = 0) -> list[dict[str, Any]]:
    """RLAIF-V-style pairs: a question and two different responses of independent lengths."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        question = _words(rng, data["question"].draw(rng), data["words"])
        chosen = _words(rng, data["response"].draw(rng), data["words"])
        rejected = chosen
        while rejected == chosen:
            rejected = _words(rng, data["response"].draw(rng), data["words"])
        out.append({"id": str(i), "image": f"img{i % data['images']}.jpg", "question": question, "chosen": chosen,
                    "rejected": rejected})
    return out


def write_images(root: Path, n: int, hw: tuple[int, int], seed: int = 0) -> None:
    """Smooth random JPEGs (upsampled noise): photo-like to decode and resize."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        small = (rng.random((max(hw[0] // 32, 2), max(hw[1] // 32, 2), 3)) * 255).astype(np.uint8)
        Image.fromarray(small).resize((hw[1], hw[0]), Image.BICUBIC).save(root / f"img{k}.jpg", quality=90)


def make_processor(shapes: dict, n_words: int):
    """A LlavaProcessor built in memory: a word-level tokenizer (``w<i>`` is id i, one token per word, ChatML
    specials and ``<image>`` at the model's image-token id and just below) and a CLIP image processor."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessorPil, LlavaProcessor, PreTrainedTokenizerFast

    image_id = shapes["image_token"]
    vocab = {f"w{i}": i for i in range(n_words)}
    vocab.update({"user": n_words, "assistant": n_words + 1, "system": n_words + 2, "[UNK]": n_words + 3})
    vocab.update({tok: image_id - len(SPECIALS) + 1 + k for k, tok in enumerate(SPECIALS)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                   unk_token="[UNK]")
    size = shapes["vision"]["image_size"]
    images = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return LlavaProcessor(image_processor=images, tokenizer=fast, patch_size=shapes["vision"]["patch_size"],
                          vision_feature_select_strategy="default", image_token="<image>",
                          num_additional_image_tokens=1)


@dataclasses.dataclass
class Data:
    dataset: Any
    """The records as the stage loads them (a datasets.Dataset)."""
    collator: Callable
    """The stage's collator (student + teacher inputs)."""
    batches: list[dict[str, torch.Tensor]]
    """``collator`` applied to consecutive micro-batches of ``dataset``, in order: what every variant sees."""
    processor: Any
    encoder: Any
    """The student's ConversationEncoder (the text-only TRL variant pads with its ``batch``)."""


def build_data(stage: str, tiny: bool, micro_batch: int, n_steps: int, root: Path, packing: bool = False) -> Data:
    """Records written as the public formats, loaded and collated by the project's own data path."""
    from distill.data.collate import ConversationEncoder, SupervisedCollator
    from distill.data.formats import load_llava_json, load_preference
    from distill.data.templates import get_template
    from distill.stages.imitation import build_collator
    from distill.stages.preference import PairCollator
    from distill.training.config import DataConfig
    from distill.training.kd import KDConfig

    key = "tiny" if tiny else "real"
    data, shapes = DATA[key], SHAPES[key]
    n = micro_batch * n_steps
    images = root / "images"
    write_images(images, data["images"], data["image_hw"])
    processor = make_processor(shapes, data["words"])
    teacher_processor = make_processor(shapes, data["words"])  # the teacher's own (same tokenizer and tower)
    path = root / ("pairs.json" if stage == "preference" else "train.json")
    records = preference_records(n, data) if stage == "preference" else conversation_records(n, data)
    path.write_text(json.dumps(records))
    cfg = DataConfig(train=[str(path)], image_root=str(images), max_length=data["max_length"], packing=packing)
    template = get_template(cfg.template)
    encoder = ConversationEncoder(processor, template, cfg.max_length)
    if stage == "preference":
        dataset, _ = load_preference(path, cfg.image_root, cfg.on_bad_record, cfg.verify_images, cfg.limit)
        collator = PairCollator(SupervisedCollator(
            encoder, cfg.image_root, teacher=ConversationEncoder(teacher_processor, template, cfg.max_length)))
    else:
        dataset, _ = load_llava_json(path, cfg.image_root, cfg.on_bad_record, cfg.verify_images, cfg.limit)
        collator = build_collator(cfg, KDConfig(), processor, teacher_processor)
    batches = [collator([dataset[j] for j in range(i, i + micro_batch)]) for i in range(0, n, micro_batch)]
    return Data(dataset, collator, batches, processor, encoder)


def pad_to(batch: dict[str, torch.Tensor], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad every [B, T] tensor to ``width`` (ids with ``pad_id``, labels with -100, masks with 0)."""
    out = {}
    for k, v in batch.items():
        if k == "host_labels":  # the KD losses' host copy: padded the same way
            v = {name: pad_to({name: torch.from_numpy(a)}, width, pad_id)[name].numpy() for name, a in v.items()}
        elif (isinstance(v, torch.Tensor) and v.dim() == 2 and k.endswith(("input_ids", "labels", "attention_mask"))
              and v.size(1) < width):
            fill = pad_id if k.endswith("input_ids") else (-100 if k.endswith("labels") else 0)
            v = torch.cat([v, v.new_full((v.size(0), width - v.size(1)), fill)], 1)
        out[k] = v
    return out


# ---- models ----


def stage_defaults(stage: str) -> dict[str, Any]:
    """The stage configs' own defaults (so the benchmark follows the project when they change)."""
    from distill.models.upcycle import UpcycleConfig
    from distill.stages.imitation import ImitationConfig
    from distill.stages.preference import PreferenceConfig
    from distill.stages.sparse_imitation import SparseImitationConfig

    def default(cls: type, name: str) -> Any:
        f = cls.__dataclass_fields__[name]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    if stage == "d2d":
        return {"kd": default(ImitationConfig, "kd"), "alpha": default(ImitationConfig, "alpha")}
    if stage == "d2s":
        return {k: default(SparseImitationConfig, k) for k in ("kd", "alpha", "aux_coef", "z_coef", "aux_layers",
                                                               "upcycle", "experts_implementation")}
    return {**{k: default(PreferenceConfig, k) for k in ("loss_type", "beta", "average_logps", "nll_coef",
                                                         "aux_coef", "aux_layers")},
            "upcycle": UpcycleConfig(), "experts_implementation": default(SparseImitationConfig,
                                                                        "experts_implementation")}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_models(stage: str, student_size: str, tiny: bool, text_only: bool, device: torch.device, attn: str,
                 teacher_dtype: torch.dtype, experts: str | None = None):
    """Student (fp32 master weights) and frozen teacher (``teacher_dtype``), random weights, built on ``device``.

    ``text_only``: their LLMs alone (CausalLM classes from the same text configs); the teacher then takes the
    student's vocabulary size (TRL's GKD requires equal vocabularies)."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration, set_seed

    from distill.models.experts import set_experts_implementation
    from distill.models.student import use_attn_implementation
    from distill.models.teacher import freeze
    from distill.models.trainable import apply_trainability
    from distill.stages.sparse_imitation import SPARSE_TRAINABLE

    key = "tiny" if tiny else "real"
    shapes = SHAPES[key]
    student_text = STUDENTS[key][student_size]
    teacher_text = dict(shapes["teacher"])
    moe = stage_defaults(stage)["upcycle"] if stage in ("d2s", "preference") else None
    if text_only:
        teacher_text["vocab_size"] = student_text["vocab_size"]
    s_cfg = llava(student_text, shapes["vision"], shapes["image_token"], moe)
    t_cfg = llava(teacher_text, shapes["vision"], shapes["image_token"])
    set_seed(0)
    with device:  # built in place: a 7B model initialised on the host takes minutes
        if text_only:
            student = AutoModelForCausalLM.from_config(s_cfg.text_config)
            with default_dtype(teacher_dtype):  # never a full fp32 copy of the teacher
                teacher = AutoModelForCausalLM.from_config(t_cfg.text_config)
        else:
            student = LlavaForConditionalGeneration(s_cfg)
            with default_dtype(teacher_dtype):
                teacher = LlavaForConditionalGeneration(t_cfg)
    student.float()
    freeze(teacher)
    for model in (student, teacher):
        use_attn_implementation(model, attn)
    if moe is not None:  # the MoE experts' forward: ``experts`` or the D2S stage's default
        set_experts_implementation(student, experts or stage_defaults(stage)["experts_implementation"])
    if text_only:
        for name, p in student.named_parameters():  # the same parts as the Llava student's trainability
            moe_part = any(f".mlp.{part}" in name for part in ("experts", "gate.", "shared_expert"))
            p.requires_grad_(moe_part if moe is not None else True)
    elif moe is not None:
        apply_trainability(student, dict(SPARSE_TRAINABLE))
    else:
        apply_trainability(student, {"vision_tower": "frozen", "projector": "full", "llm": "full"})
    return student, teacher, (moe.top_k if moe is not None else 0)


# ---- FLOPs ----


@dataclasses.dataclass(frozen=True)
class FlopSpec:
    """What the FLOP count needs of one model: LLM body (active, no embeddings, no head), head, attention, vision."""

    body: int
    head: int
    layers: int
    attn_dim: int
    vision: int = 0
    vision_layers: int = 0
    vision_dim: int = 0
    vision_tokens: int = 0
    projector: int = 0


def flop_spec(model: torch.nn.Module, top_k: int) -> FlopSpec:
    inner = model.model
    is_vlm = hasattr(inner, "vision_tower")
    lm = inner.language_model if is_vlm else inner
    body = sum(p.numel() for n, p in lm.named_parameters() if not n.startswith("embed_tokens"))
    for layer in lm.layers:
        experts = getattr(layer.mlp, "experts", None)
        if experts is not None:
            per_expert = sum(p.numel() for p in experts.parameters()) // experts.num_experts
            body -= per_expert * (experts.num_experts - top_k)
    cfg = lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    spec = FlopSpec(body=body, head=model.get_output_embeddings().weight.numel(), layers=cfg.num_hidden_layers,
                    attn_dim=cfg.num_attention_heads * head_dim)
    if not is_vlm:
        return spec
    v = model.config.vision_config
    return dataclasses.replace(
        spec, vision=sum(p.numel() for p in inner.vision_tower.parameters()), vision_layers=v.num_hidden_layers,
        vision_dim=v.hidden_size, vision_tokens=(v.image_size // v.patch_size) ** 2 + 1,
        projector=sum(p.numel() for p in inner.multi_modal_projector.parameters()))


def step_flops(student: FlopSpec, teacher: FlopSpec, lengths: Sequence[int], responses: int, images: int,
               all_positions: bool = False) -> float:
    """Model FLOPs of one KD / preference step: teacher forward, student forward + backward (x3), on real tokens."""
    tokens, squares = sum(lengths), sum(t * t for t in lengths)
    head_tokens = tokens if all_positions else responses

    def llm(spec: FlopSpec) -> float:
        return 2 * spec.body * tokens + 2 * spec.head * head_tokens + 4 * spec.layers * spec.attn_dim * squares

    def vision(spec: FlopSpec) -> float:
        return images * (2 * spec.vision * spec.vision_tokens
                         + 4 * spec.vision_layers * spec.vision_dim * spec.vision_tokens ** 2)

    def projector(spec: FlopSpec) -> float:
        return images * 2 * spec.projector * max(spec.vision_tokens - 1, 0)

    return 3 * llm(student) + vision(student) + 3 * projector(student) + llm(teacher) + vision(teacher) + \
        projector(teacher)


def batch_stats(batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    labels = batch["labels"]
    if "attention_mask" in batch:
        lengths = batch["attention_mask"].sum(1).tolist()
    else:  # packed (--packing): one row, a record starts wherever the position ids restart at 0
        starts = [*(batch["position_ids"][0] == 0).nonzero().flatten().tolist(), labels.size(1)]
        lengths = [b - a for a, b in zip(starts, starts[1:])]
    return {"lengths": lengths, "real": sum(lengths), "padded": labels.numel(),
            "responses": int((labels[:, 1:] != -100).sum()),
            "images": int(batch["pixel_values"].size(0)) if "pixel_values" in batch else 0,
            "shape": tuple(labels.shape)}


# ---- timing helpers ----


class Clock:
    """Synchronised time marks; a step's time is the gap between consecutive marks. With a ``torch.profiler``
    profile, each mark is also a profiler step (its schedule picks which steps are recorded)."""

    def __init__(self, cuda: bool, profiler: Any = None, graphs: Callable[[], int] | None = None,
                 progress: bool = False) -> None:
        self.cuda, self.marks, self.profiler, self.progress = cuda, [], profiler, progress
        self.graphs, self.graph_marks = graphs, []
        """``graphs``: the number of graphs torch.compile has built so far, read at each mark (``--kernels
        compile``: recompilations inside the timed steps)."""

    def mark(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append(time.perf_counter())
        if self.progress and self.cuda and len(self.marks) > 1:  # for a run that stalls (its reads add to the step)
            stats = torch.cuda.memory_stats()
            print(f"step {len(self.marks) - 1}: {self.marks[-1] - self.marks[-2]:.3f} s, "
                  f"{stats.get('allocated_bytes.all.peak', 0) / 2**30:.1f} GiB peak, "
                  f"{stats.get('num_alloc_retries', 0)} allocator retries", file=sys.stderr, flush=True)
        if self.graphs is not None:
            self.graph_marks.append(self.graphs())
        if self.profiler is not None:
            self.profiler.step()

    def durations(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


PHASE_MARKS = ("distill::teacher_forward", "distill::student_forward", "distill::kd_loss", "distill::optimizer")
"""``record_function`` ranges of a profiled run: both models' forwards (hooks), the loss probe, the loop's optimizer."""
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
            "aten::_grouped_mm", "aten::_scaled_mm", "aten::_scaled_grouped_mm")


def kernel_category(op: str, kernel: str) -> str:
    """A GPU kernel's kind, from its name and the operator that launched it."""
    k = kernel.lower()
    if k.startswith(("memcpy", "memset")):
        return "memcpy/memset"
    if any(s in k for s in ("flex_attention", "attention", "fmha", "flash")) or k.startswith("triton_tem") \
            or "scaled_dot_product" in op or "flex_attention" in op:
        return "attention"
    if any(s in k for s in ("gemm", "nvjet", "cutlass", "xmma", "splitk", "cublas")) or op in GEMM_OPS:
        return "gemm"
    if any(s in k for s in ("_rms_norm", "_swiglu", "_triton_rope", "_geglu")):
        return "liger (fused norm / swiglu / rope)"
    if k.startswith("triton_"):
        return "triton (compiled, fused)"
    if "multi_tensor" in k or "adam" in k:
        return "optimizer multi-tensor"
    if "copy_kernel" in k or op in ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous"):
        return "cast/copy"
    if "reduce_kernel" in k or op in ("aten::mean", "aten::sum", "aten::norm", "aten::_foreach_norm"):
        return "reduction"
    if "elementwise" in k or "vectorized" in k or "index" in k or "scatter" in k or "gather" in k or "cat" in k:
        return "elementwise/index"
    return "other"


def _phase(event: Any) -> str:
    node = event
    while node is not None:
        if node.name in PHASE_MARKS:
            return node.name.split("::")[1]
        if node.name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if node.name.startswith("Optimizer.") or node.name.startswith("Optimizer#"):
            return "optimizer"
        node = node.cpu_parent
    return "other"


def phase_summary(prof: Any, steps: int) -> str:
    """Device time of the profiled steps by phase x kernel kind, by (phase, operator) and by kernel, in ms per step;
    GPU busy time against wall time; host synchronisations."""
    by_kind: dict[tuple[str, str], float] = {}
    by_op: dict[tuple[str, str], float] = {}
    by_kernel: dict[str, list[float]] = {}
    syncs: dict[str, int] = {}
    for e in prof.events():
        if "Synchronize" in e.name:
            syncs[e.name] = syncs.get(e.name, 0) + 1
        if getattr(e, "device_type", None) is None or str(e.device_type) != "DeviceType.CPU" or not e.kernels:
            continue
        phase = _phase(e)
        for k in e.kernels:
            ms = k.duration / 1000 / steps
            kind = kernel_category(e.name, k.name)
            by_kind[phase, kind] = by_kind.get((phase, kind), 0.0) + ms
            by_op[phase, e.name] = by_op.get((phase, e.name), 0.0) + ms
            entry = by_kernel.setdefault(k.name, [0.0, 0])
            entry[0] += ms
            entry[1] += 1
    total = sum(by_kind.values())
    phases = sorted({p for p, _ in by_kind}, key=lambda p: -sum(v for (q, _), v in by_kind.items() if q == p))
    kinds = sorted({k for _, k in by_kind}, key=lambda k: -sum(v for (_, q), v in by_kind.items() if q == k))
    lines = [f"GPU kernel time per step: {total:.1f} ms over {steps} profiled steps (ms per step; share of the "
             "kernel time)", "", "| kind | " + " | ".join(phases) + " | total | share |",
             "|---|" + "---:|" * (len(phases) + 2)]
    for kind in kinds:
        row = [by_kind.get((p, kind), 0.0) for p in phases]
        lines.append(f"| {kind} | " + " | ".join(f"{v:.1f}" for v in row) + f" | {sum(row):.1f} | "
                     f"{sum(row) / total:.1%} |")
    col = [sum(by_kind.get((p, k), 0.0) for k in kinds) for p in phases]
    lines.append("| all | " + " | ".join(f"{v:.1f}" for v in col) + f" | {total:.1f} | 100% |")
    lines += ["", "Top operators (innermost op launching the kernels) by device time, ms per step:", "",
              "| phase | operator | ms | share |", "|---|---|---:|---:|"]
    for (phase, op), ms in sorted(by_op.items(), key=lambda kv: -kv[1])[:40]:
        lines.append(f"| {phase} | {op} | {ms:.2f} | {ms / total:.1%} |")
    lines += ["", "Top kernels, ms per step (calls per step):", ""]
    for name, (ms, n) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:30]:
        lines.append(f"{ms:8.2f} ms {n / steps:6.0f}x  {name[:160]}")
    lines += ["", "Host synchronisations per step: " + (", ".join(f"{k} {v / steps:.0f}" for k, v in
                                                            sorted(syncs.items())) or "none")]
    return "\n".join(lines)


def step_profiler(out_dir: Path, warmup: int, cuda: bool, trace: bool = True):
    """``--profile``: records two steps after the warm-up; writes ``summary.md`` (device time by phase x kernel
    kind, top operators and kernels; ``phase_summary``), ``ops.txt`` (operators by self device time, then by
    self CPU time) and, with ``trace``, ``trace.json`` (chrome://tracing, Perfetto) under ``out_dir``."""
    from torch.profiler import ProfilerActivity, profile, schedule

    out_dir.mkdir(parents=True, exist_ok=True)
    active = 2

    def write(prof) -> None:
        if trace:
            prof.export_chrome_trace(str(out_dir / "trace.json"))
        ops = prof.key_averages()
        tables = [ops.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=40)]
        if cuda:
            tables.append(ops.table(sort_by="self_cpu_time_total", row_limit=25))
        (out_dir / "ops.txt").write_text("\n\n".join(tables))
        if cuda:
            try:
                (out_dir / "summary.md").write_text(phase_summary(prof, active) + "\n")
            except Exception as err:  # the tables above stay useful if the event tree differs in this torch
                log.warning("phase summary failed: %r", err)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    # Marks: one before the first step, then one per step; warm-up steps end at mark ``warmup``.
    return profile(activities=activities, schedule=schedule(wait=warmup, warmup=1, active=active, repeat=1),
                   on_trace_ready=write, record_shapes=False)


def mark_phases(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """``record_function`` ranges around each model's forward (for ``phase_summary``)."""
    from torch.autograd.profiler import record_function

    for name, module in (("distill::teacher_forward", teacher), ("distill::student_forward", student)):
        ranges: list[Any] = []

        def enter(*_, name=name, ranges=ranges) -> None:
            ranges.append(record_function(name).__enter__())

        def leave(*_, ranges=ranges) -> None:
            ranges.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def trainer_clock(clock: Clock):
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock.marks = []
            clock.mark()

        def on_step_end(self, args, state, control, **kwargs):
            clock.mark()

    return StepClock()


class LossProbe:
    """Times every ``chunked_kd_loss`` call inside the steps (CUDA events; no extra synchronisation)."""

    def __init__(self, cuda: bool, autocast: Any = None) -> None:
        self.cuda, self.calls = cuda, []
        self.autocast = autocast or contextlib.nullcontext
        """``--kd-autocast``: a bf16 autocast context around the call (the fix this flag measures)."""
        self.spec: dict[str, Any] = {}

    def install(self) -> None:
        import distill.training.kd as kd_module

        original = kd_module.chunked_kd_loss

        def timed(h_s, w_s, h_t, w_t, *rest, **kwargs):
            with torch.autograd.profiler.record_function("distill::kd_loss"):
                return call(h_s, w_s, h_t, w_t, *rest, **kwargs)

        def call(h_s, w_s, h_t, w_t, *rest, **kwargs):
            self.spec = {"h_s": h_s.dtype, "h_t": h_t.dtype}
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                with self.autocast():
                    out = original(h_s, w_s, h_t, w_t, *rest, **kwargs)
                end.record()
                self.calls.append((start, end))
            else:
                t0 = time.perf_counter()
                with self.autocast():
                    out = original(h_s, w_s, h_t, w_t, *rest, **kwargs)
                self.calls.append(time.perf_counter() - t0)
            return out

        kd_module.chunked_kd_loss = timed

    def times_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) for s, e in self.calls]
        return [t * 1000 for t in self.calls]


class PhaseTimer:
    """``--phases`` (bare loop): CUDA events around the teacher's and the student's forwards (module hooks), the
    backward pass and the optimizer (clip, step, zero_grad) of every step; the KD loss is ``LossProbe``'s."""

    PHASES = ("teacher_forward", "student_forward", "backward", "optimizer")

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        self.steps: list[dict[str, list[Any]]] = []
        self.handles = []
        for name, module in (("teacher_forward", teacher), ("student_forward", student)):
            self.handles.append(module.register_forward_pre_hook(lambda *_, n=name: self.start(n)))
            self.handles.append(module.register_forward_hook(lambda *_, n=name: self.end(n)))

    def new_step(self) -> None:
        self.steps.append({})

    def start(self, phase: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.steps[-1].setdefault(phase, []).append([event, None])

    def end(self, phase: str) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.steps[-1][phase][-1][1] = event

    def median_ms(self, skip: int) -> dict[str, float]:
        torch.cuda.synchronize()
        for handle in self.handles:
            handle.remove()
        per_step = [{p: sum(a.elapsed_time(b) for a, b in spans) for p, spans in step.items()}
                    for step in self.steps[skip:]]
        return {p: statistics.median(step.get(p, 0.0) for step in per_step) for p in self.PHASES}


class FirstLoss:
    """Wraps a stage loss object; keeps the value of its first call (one sync, in the first warm-up step)."""

    def __init__(self, fn: Callable) -> None:
        self.fn, self.first = fn, None

    def prepare(self, trainer: Any) -> None:
        prepare = getattr(self.fn, "prepare", None)
        if prepare is not None:
            prepare(trainer)

    def __call__(self, model, inputs, num_items_in_batch):
        loss, parts = self.fn(model, inputs, num_items_in_batch)
        if self.first is None:
            self.first = float(loss.detach())
        return loss, parts


def time_call(fn: Callable[[], Any], cuda: bool, repeats: int = 3) -> float:
    """Median milliseconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure_peak_flops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Best of 3 runs of ``iters`` bf16 n^3 matmuls: the card's achievable dense bf16 FLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.matmul(a, b, out=out)
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * iters / (time.perf_counter() - t0))
    del a, b, out
    torch.cuda.empty_cache()
    return best


# ---- the steps ----


def _autocast(cuda: bool, bf16: bool):
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16)


def amp_forward(model: torch.nn.Module, cuda: bool, bf16: bool) -> None:
    """Mixed precision as the Trainer applies it (accelerate's ``prepare_model``): autocast inside the model's
    forward only, its bf16 outputs upcast to fp32. Whatever a loss computes outside the forward runs unautocast."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    if bf16:
        forward = _autocast(cuda, bf16)(model.forward.__func__)
        model.forward = MethodType(convert_outputs_to_fp32(forward), model)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def naive_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             alpha: float) -> torch.Tensor:
    """LLaVA-MoD-style: both models' full logits upcast to fp32, log-softmax over the full vocabulary at every
    position, KL(teacher || student) summed over the vocabulary, then masked to the response predictions."""
    from distill.losses.kd import shifted_response_mask

    vocab = min(student_logits.size(-1), teacher_logits.size(-1))
    s = student_logits.float()
    s_logp = F.log_softmax(s[..., :vocab], dim=-1)
    t_logp = F.log_softmax(teacher_logits[..., :vocab].float(), dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
    mask = shifted_response_mask(labels)
    n = mask.sum().clamp_min(1)
    loss = alpha * (kl * mask).sum() / n
    if alpha < 1.0:
        ce = F.cross_entropy(s[:, :-1].reshape(-1, s.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100,
                             reduction="sum")
        loss = loss + (1.0 - alpha) * ce / n
    return loss


def naive_sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Full fp32 log-softmax of every position, then the labelled tokens' log-probs summed per row."""
    logp = logits.float().log_softmax(-1)[:, :-1]
    target = labels[:, 1:]
    mask = target != -100
    return (logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask).sum(-1)


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    stage_cfg: dict[str, Any]
    device: torch.device
    cuda: bool
    bf16: bool
    data: Data
    student: torch.nn.Module
    teacher: torch.nn.Module
    top_k: int
    out_dir: Path


def training_dict(ctx: Context) -> dict[str, Any]:
    """The TrainingArguments of a stage run (recipes/trainer/default.yaml's values where they matter for speed)."""
    args = ctx.args
    return {
        "per_device_train_batch_size": args.micro_batch, "gradient_accumulation_steps": 1,
        "max_steps": args.warmup + args.steps, "learning_rate": 1e-5, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "weight_decay": 0.0, "bf16": ctx.bf16, "use_cpu": not ctx.cuda, "report_to": "none",
        "save_strategy": "no", "logging_steps": 10, "disable_tqdm": True,
        "dataloader_num_workers": args.workers, "dataloader_pin_memory": ctx.cuda, "seed": 0,
        "gradient_checkpointing": args.grad_ckpt, "train_sampling_strategy": "sequential",
        **saver_training(args.savers),
    }


SAVERS = ("frozen_bf16", "adam8bit", "weights_bf16")
"""Memory savers (the stages' ``model.frozen_dtype=bfloat16``; ``training.optim=adamw_torch_8bit``;
``model.weights_dtype=bfloat16``, which needs that optimizer with bf16 stochastic rounding)."""


def saver_training(savers: Sequence[str]) -> dict[str, Any]:
    """The TrainingArguments the savers change: torchao's 8-bit AdamW, rounding stochastically into bf16 weights."""
    if "weights_bf16" in savers:
        return {"optim": "adamw_torch_8bit", "optim_args": "bf16_stochastic_round=True"}
    return {"optim": "adamw_torch_8bit"} if "adam8bit" in savers else {}


def apply_savers(student: torch.nn.Module, savers: Sequence[str]) -> None:
    """The student as the stages load it with these savers: all of it in bf16 (``weights_bf16``), then the frozen
    parameters in bf16 (``frozen_bf16``)."""
    from distill.training.supervised import cast_frozen

    if "weights_bf16" in savers:
        student.to(torch.bfloat16)
    if "frozen_bf16" in savers:
        cast_frozen(student, torch.bfloat16)


def make_loss(ctx: Context):
    """The stage's own loss object (what the stage passes to the Trainer)."""
    from distill.stages.preference import PreferenceLoss
    from distill.training.kd import KDConfig, KDLoss
    from distill.training.moe import RouterRecorder, SparseKDLoss

    cfg, stage = ctx.stage_cfg, ctx.args.stage
    if stage == "preference":
        pref = argparse.Namespace(**{k: cfg[k] for k in ("loss_type", "beta", "average_logps", "nll_coef",
                                                         "aux_coef", "aux_layers")})
        return PreferenceLoss(pref, ctx.teacher, RouterRecorder(ctx.student), ctx.top_k)
    kd = cfg["kd"] if ctx.args.chunk is None else dataclasses.replace(cfg["kd"], chunk_size=ctx.args.chunk)
    assert isinstance(kd, KDConfig)
    if stage == "d2s":
        loss = SparseKDLoss(ctx.teacher, kd, cfg["alpha"], RouterRecorder(ctx.student), ctx.top_k,
                            cfg["aux_coef"], cfg["z_coef"], cfg["aux_layers"])
    else:
        loss = KDLoss(ctx.teacher, kd, cfg["alpha"])
    loss.matmul_dtype = kd.matmul_dtype(ctx.bf16)  # what prepare(trainer) sets; the bare loop has no Trainer
    return loss


def run_ours(ctx: Context, clock: Clock) -> dict[str, Any]:
    """The stage's path: ``distill.training.supervised.train`` without the artifact saving and wandb."""
    from distill.training.resilience import PreemptionCallback
    from distill.training.tracking import add_tracking
    from distill.training.trainer import DistillTrainer, checkpointing_for, training_arguments

    training = {**training_dict(ctx), "include_num_input_tokens_seen": "non_padding"}  # tracking_arguments' change
    targs, ours = training_arguments(training, ctx.out_dir / "checkpoints")
    checkpointing_for(ctx.student, targs)
    loss_fn = FirstLoss(make_loss(ctx))
    trainer = DistillTrainer(
        model=ctx.student, args=targs, train_dataset=ctx.data.dataset, data_collator=ctx.data.collator,
        loss_fn=loss_fn, token_normalised=ctx.args.stage != "preference",
        callbacks=[PreemptionCallback(), trainer_clock(clock)], max_nonfinite_losses=ours["max_nonfinite_losses"])
    add_tracking(trainer, peak_flops=ours["peak_flops"], moe=ctx.args.stage != "d2s")
    state = {"trainer": trainer, "loss_fn": loss_fn}
    try:
        trainer.train()
    finally:
        state["first_loss"] = loss_fn.first
        state["tokens_seen"] = int(trainer.state.num_input_tokens_seen)
    return state


def _optimizer(ctx: Context, training: dict[str, Any]):
    """The optimizer the Trainer would build from these TrainingArguments (class and settings)."""
    from transformers import Trainer

    from distill.training.trainer import training_arguments

    targs, _ = training_arguments(training, ctx.out_dir / "checkpoints")
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(targs, ctx.student)
    params = [p for p in ctx.student.parameters() if p.requires_grad]
    return cls([{"params": params, "weight_decay": targs.weight_decay}], **kwargs), targs


def run_loop(ctx: Context, clock: Clock, step_loss: Callable, token_normalised: bool,
             loop_autocast: bool) -> dict[str, Any]:
    """A hand loop over the pre-collated batches: forward + loss (the whole of it under autocast with
    ``loop_autocast``, else as the models' forwards are wrapped), backward, clip, optimizer step."""
    training = training_dict(ctx)
    optimizer, targs = _optimizer(ctx, training)
    if targs.gradient_checkpointing:
        from distill.training.trainer import checkpointing_for

        checkpointing_for(ctx.student, targs)
        ctx.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=targs.gradient_checkpointing_kwargs)
    ctx.student.train()
    batches = ctx.data.batches
    if ctx.args.variant == "naive" and ctx.args.pad == "max":
        width = DATA["tiny" if ctx.args.tiny else "real"]["max_length"]
        batches = [pad_to(b, width, ctx.data.encoder.pad_id) for b in batches]
    state: dict[str, Any] = {"optimizer": optimizer, "first_loss": None, "batches": batches}
    phases = PhaseTimer(ctx.student, ctx.teacher) if ctx.args.phases else None
    clock.marks = []
    clock.mark()
    for batch in batches:
        if phases is not None:
            phases.new_step()
        batch = _to(batch, ctx.device)
        num_items = (batch["labels"][..., 1:] != -100).sum() if token_normalised else None
        with _autocast(ctx.cuda, ctx.bf16 and loop_autocast):
            loss = step_loss(batch, num_items)
        if state["first_loss"] is None:
            state["first_loss"] = float(loss.detach())
        if phases is not None:
            phases.start("backward")
        loss.backward()
        if phases is not None:
            phases.end("backward")
            phases.start("optimizer")
        with torch.autograd.profiler.record_function("distill::optimizer"):
            torch.nn.utils.clip_grad_norm_(ctx.student.parameters(), targs.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if phases is not None:
            phases.end("optimizer")
        clock.mark()
    if phases is not None:
        state["phases_ms"] = phases.median_ms(ctx.args.warmup)
    return state


def run_bare(ctx: Context, clock: Clock) -> dict[str, Any]:
    """The stage's loss object in a hand loop, mixed precision placed as the Trainer places it."""
    loss_fn = make_loss(ctx)
    amp_forward(ctx.student, ctx.cuda, ctx.bf16)

    def step_loss(batch, num_items):
        return loss_fn(ctx.student, batch, num_items)[0]

    return run_loop(ctx, clock, step_loss, token_normalised=ctx.args.stage != "preference", loop_autocast=False)


def run_naive(ctx: Context, clock: Clock) -> dict[str, Any]:
    from distill.losses.preference import preference_loss
    from distill.losses.router import load_balancing_loss
    from distill.training.kd import split_inputs
    from distill.training.moe import RouterRecorder

    cfg, stage = ctx.stage_cfg, ctx.args.stage
    recorder = RouterRecorder(ctx.student) if stage != "d2d" else None

    def step_loss(batch, num_items):
        t_inputs = split_inputs(batch, "teacher_", ctx.teacher.dtype)
        with torch.no_grad():
            t_logits = ctx.teacher(**t_inputs, use_cache=False).logits
        if recorder is not None:
            recorder.take()
        s_logits = ctx.student(**split_inputs(batch), use_cache=False).logits
        if stage == "preference":
            policy = naive_sequence_logps(s_logits, batch["labels"])
            ref = naive_sequence_logps(t_logits, batch["teacher_labels"])
            n = policy.size(0) // 2
            lengths = (batch["labels"][:, 1:] != -100).sum(-1).float()
            losses, _, _ = preference_loss(policy[:n], policy[n:], ref[:n], ref[n:], cfg["loss_type"], cfg["beta"],
                                           lengths[:n], lengths[n:])
            loss = losses.mean()
        else:
            loss = naive_kd(s_logits, t_logits, batch["labels"], cfg["alpha"])
        if recorder is not None and cfg["aux_coef"] > 0:
            loss = loss + cfg["aux_coef"] * load_balancing_loss(recorder.take(), ctx.top_k, batch["attention_mask"],
                                                                layers=cfg["aux_layers"])
        return loss

    return run_loop(ctx, clock, step_loss, token_normalised=False, loop_autocast=True)


def trl_dataset(ctx: Context):
    """Each record's student token ids and labels (the same ids the collator gives, image tokens included)."""
    from datasets import Dataset

    load = ctx.data.collator.inner.load_images if hasattr(ctx.data.collator, "inner") else \
        ctx.data.collator.load_images
    rows = [ctx.data.encoder.encode([r], [load(r)]) for r in ctx.data.dataset]
    return Dataset.from_dict({"input_ids": [e["input_ids"][0].tolist() for e in rows],
                              "labels": [e["labels"][0].tolist() for e in rows]})


class TextCollator:
    """Right-pads token-id rows to the longest in the batch (ids with the encoder's pad id, labels with -100)."""

    def __init__(self, encoder: Any) -> None:
        self.encoder = encoder

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.encoder.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def run_trl(ctx: Context, clock: Clock) -> dict[str, Any]:
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    dataset = trl_dataset(ctx)
    collator = TextCollator(ctx.data.encoder)
    first = collator([dataset[i] for i in range(ctx.args.micro_batch)])
    for key in ("input_ids", "labels", "attention_mask"):  # the same tokens as the other variants' batches
        if not torch.equal(first[key], ctx.data.batches[0][key]):
            raise RuntimeError(f"TRL batches differ from the collator's in {key}")
    if ctx.args.trl_loop:
        def step_loss(batch, num_items):
            s_logits = ctx.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            with torch.no_grad():
                t_logits = ctx.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return GKDTrainer.generalized_jsd_loss(s_logits[:, :-1], t_logits[:, :-1], batch["labels"][:, 1:],
                                                   beta=0.0, num_items_in_batch=num_items)

        for model in (ctx.student, ctx.teacher):  # GKDTrainer prepares both with the accelerator
            amp_forward(model, ctx.cuda, ctx.bf16)
        text_ctx = dataclasses.replace(ctx, data=dataclasses.replace(
            ctx.data, batches=[{k: b[k] for k in ("input_ids", "attention_mask", "labels")}
                               for b in ctx.data.batches]))
        return run_loop(text_ctx, clock, step_loss, token_normalised=True, loop_autocast=False)
    training = training_dict(ctx)
    cfg = GKDConfig(output_dir=str(ctx.out_dir / "trl"), **training, lmbda=0.0, beta=0.0, temperature=1.0,
                    seq_kd=False, max_length=None)
    trainer = GKDTrainer(model=ctx.student, teacher_model=ctx.teacher, args=cfg, train_dataset=dataset,
                         data_collator=collator, processing_class=ctx.data.processor.tokenizer,
                         callbacks=[trainer_clock(clock)])
    state = {"trainer": trainer}
    trainer.train()
    return state


# ---- loss cost, measured apart ----


def loss_cost(ctx: Context, batch: dict[str, Any], probe: LossProbe) -> dict[str, float]:
    """Milliseconds of the variant's loss (forward + backward) on random tensors of ``batch``'s shapes, with the
    dtypes and autocast state the loss sees in the step, and of the bf16 LM-head GEMMs that the chunked loss
    contains (ours / bare; naive and TRL compute their heads inside the models)."""
    from distill.losses.kd import chunked_kd_loss
    from distill.losses.preference import per_sequence, preference_loss, response_token_logps

    args, cfg, cuda, dev, bf16 = ctx.args, ctx.stage_cfg, ctx.cuda, ctx.device, ctx.bf16
    g = torch.Generator(device=dev).manual_seed(0)
    labels = batch["labels"].to(dev)
    b, t = labels.shape
    s_head = ctx.student.get_output_embeddings().weight
    t_head = ctx.teacher.get_output_embeddings().weight
    v_s, v_t = s_head.size(0), t_head.size(0)
    low = torch.bfloat16 if bf16 else torch.float32
    out: dict[str, float] = {"heads_ms": 0.0}
    if args.stage == "preference" and args.variant in ("ours", "bare"):
        # PreferenceLoss: the final hidden states, both heads on the response positions only (under the step's
        # autocast), the reference's without gradient and chunked.
        h_s = torch.randn(b, t, s_head.size(1), device=dev, generator=g).requires_grad_(True)
        h_t = torch.randn(b, t, t_head.size(1), device=dev, dtype=ctx.teacher.dtype, generator=g)

        def run_rows() -> None:
            with _autocast(cuda, bf16):
                tok, rows = response_token_logps(h_s, labels, lambda x: F.linear(x, s_head))
                policy = per_sequence(tok, rows, labels, cfg["average_logps"])
                with torch.no_grad():
                    ref = per_sequence(*response_token_logps(h_t, labels, lambda x: F.linear(x, t_head), 1024),
                                       labels, cfg["average_logps"])
                n = b // 2
                lengths = (labels[:, 1:] != -100).sum(-1).float()
                loss = preference_loss(policy[:n], policy[n:], ref[:n], ref[n:], cfg["loss_type"], cfg["beta"],
                                       lengths[:n], lengths[n:])[0].mean()
            loss.backward()
            h_s.grad = None

        out["loss_ms"] = time_call(run_rows, cuda)
        return out
    if args.stage == "preference" or args.variant in ("naive", "trl_gkd"):
        # naive: all under autocast, bf16 logits; TRL: both models' outputs upcast to fp32 by accelerate, loss
        # outside autocast.
        in_autocast = args.variant == "naive"
        s_dtype = low if in_autocast else torch.float32
        t_dtype = low if args.variant == "naive" else (torch.float32 if args.variant == "trl_gkd"
                                                        else ctx.teacher.dtype)
        s_logits = torch.randn(b, t, v_s, device=dev, dtype=s_dtype, generator=g).requires_grad_(True)
        t_logits = torch.randn(b, t, v_t, device=dev, dtype=t_dtype, generator=g)

        def run() -> None:
            with _autocast(cuda, bf16 and in_autocast):
                if args.variant == "trl_gkd":
                    from trl.experimental.gkd import GKDTrainer

                    n = (labels[:, 1:] != -100).sum()
                    loss = GKDTrainer.generalized_jsd_loss(s_logits[:, :-1], t_logits[:, :-1], labels[:, 1:],
                                                           beta=0.0, num_items_in_batch=n)
                elif args.stage == "preference":
                    policy, ref = naive_sequence_logps(s_logits, labels), naive_sequence_logps(t_logits, labels)
                    n = b // 2
                    lengths = (labels[:, 1:] != -100).sum(-1).float()
                    loss = preference_loss(policy[:n], policy[n:], ref[:n], ref[n:], cfg["loss_type"], cfg["beta"],
                                           lengths[:n], lengths[n:])[0].mean()
                else:
                    loss = naive_kd(s_logits, t_logits, labels, cfg["alpha"])
            loss.backward()
            s_logits.grad = None

        out["loss_ms"] = time_call(run, cuda)
        return out
    # ours / bare, D2D / D2S: the chunked loss from hidden states through both heads, called as KDLoss calls it.
    n = int((labels[:, 1:] != -100).sum())
    kd = cfg["kd"] if args.chunk is None else dataclasses.replace(cfg["kd"], chunk_size=args.chunk)
    chunk = kd.chunk_size or max(n, 1)
    h_s = torch.randn(n, s_head.size(1), device=dev, dtype=probe.spec.get("h_s", torch.float32),
                      generator=g).requires_grad_(True)
    h_t = torch.randn(n, t_head.size(1), device=dev, dtype=probe.spec.get("h_t", ctx.teacher.dtype), generator=g)
    targets = torch.randint(0, min(v_s, v_t), (n,), device=dev, generator=g)

    def run_loss() -> None:
        with _autocast(cuda, bf16 and args.kd_autocast):
            loss, _, _ = chunked_kd_loss(h_s, s_head, h_t, t_head, targets, kd, cfg["alpha"], chunk, n,
                                         kd.matmul_dtype(bf16))
        loss.backward()
        h_s.grad = None
        s_head.grad = None

    vocab = min(v_s, v_t)
    hs, ht = h_s.detach().to(low), h_t.to(low)
    ws, wt = s_head.detach()[:vocab].to(low), t_head.detach()[:vocab].to(low)
    want_w = s_head.requires_grad

    def run_heads() -> None:  # student logits, teacher logits, grad wrt hidden, grad wrt head: bf16 GEMMs
        for start in range(0, n, chunk):
            s = hs[start:start + chunk] @ ws.t()
            _ = ht[start:start + chunk] @ wt.t()
            _ = s @ ws
            if want_w:
                _ = s.t() @ hs[start:start + chunk]

    out["loss_ms"] = time_call(run_loss, cuda)
    out["heads_ms"] = time_call(run_heads, cuda)
    return out


# ---- one run ----


def memory_gib(cuda: bool) -> tuple[float, float | None]:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, None


def free_optimizer(state: dict[str, Any], student: torch.nn.Module) -> None:
    """Drop the optimizer states and gradients so the loss measurement after training has room."""
    opt = state.get("optimizer") or getattr(state.get("trainer"), "optimizer", None)
    if opt is not None:
        opt.state.clear()
    for p in student.parameters():
        p.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


HEADER = ("| variant | stage | student | micro-batch | real tokens/s | padding | MFU | peak GiB | loss share | "
          "step (s) | status |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")


def markdown_row(row: dict[str, Any]) -> str:
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)

    variant = row["variant"] + (" (loop)" if row.get("trl_mode") == "loop" else "") + \
        (" (pad max)" if row.get("pad") == "max" and row["variant"] == "naive" else "") + \
        (" (+kd autocast)" if row.get("kd_autocast") and row["variant"] in ("ours", "bare") else "") + \
        (" (packed)" if row.get("packing") else "") + \
        "".join(f" (+{k})" for k in row.get("kernels") or ()) + \
        "".join(f" (+{saver})" for saver in row.get("savers", []))
    return (f"| {variant} | {row['stage']} | {row['student']}{' MoE' if row['stage'] != 'd2d' else ''} | "
            f"{row['micro_batch']} | {num('tokens_per_s', ',.0f')} | {num('padding', '.1%')} | {num('mfu', '.1%')} | "
            f"{num('peak_gib', '.1f')} | {num('loss_share', '.1%')} | {num('step_s_median', '.3f')} | "
            f"{row['status']} |")


def base_row(args: argparse.Namespace, device_name: str) -> dict[str, Any]:
    return {"variant": args.variant, "stage": args.stage, "student": args.student, "micro_batch": args.micro_batch,
            "steps": args.steps, "warmup": args.warmup, "device": device_name, "attn": args.attn,
            "grad_ckpt": args.grad_ckpt, "experts": args.experts, "pad": args.pad, "tiny": args.tiny,
            "kd_autocast": args.kd_autocast, "packing": args.packing, "kernels": args.kernels,
            "savers": list(args.savers), "block_mask": args.block_mask,
            "trl_mode": ("loop" if args.trl_loop else "trainer") if args.variant == "trl_gkd" else None,
            "date": time.strftime("%Y-%m-%d %H:%M"), "status": "ok"}


@torch.no_grad()
def fp8_teacher(teacher: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]], device: torch.device,
                chunk: int = 1024) -> dict[str, Any]:
    """Convert the teacher to the fp8 forward (distill/models/fp8.py) and report its fidelity: the mean
    KL(bf16 teacher || fp8 teacher) over the response positions of ``batches``."""
    from distill.models.fp8 import convert_to_fp8, fp8_fidelity
    from distill.training.kd import split_inputs

    def response_logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v.to(device) for k, v in split_inputs(batch, "teacher_", teacher.dtype).items()}
        mask = batch["teacher_labels"][:, 1:].to(device) != -100
        return teacher(**inputs, use_cache=False).logits[:, :-1][mask]

    exact = [response_logits(b) for b in batches]
    counts = convert_to_fp8(teacher)
    kls, n = 0.0, 0
    for batch, ref in zip(batches, exact):
        approx = response_logits(batch)
        for i in range(0, ref.shape[0], chunk):
            rows = ref[i:i + chunk].shape[0]
            kls += fp8_fidelity(ref[i:i + chunk], approx[i:i + chunk]) * rows
            n += rows
    return {"fp8_linears": counts["converted"], "fp8_kept": counts["kept"], "fp8_kl": kls / max(n, 1),
            "fp8_kl_tokens": n}


def run_once(args: argparse.Namespace) -> dict[str, Any]:
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    name = torch.cuda.get_device_name() if cuda else "cpu (--tiny)"
    row = base_row(args, name)
    if args.variant == "trl_gkd" and args.stage == "preference":
        return {**row, "status": "n/a", "note": "GKD is a KD trainer; TRL's preference trainer is DPOTrainer"}
    from distill.models.student import resolve_attn_implementation
    from distill.training.tracking import device_peak_flops

    attn = resolve_attn_implementation(args.attn)
    row["attn"] = attn
    peak = args.peak_flops or (measure_peak_flops(device) if cuda else None)
    bf16 = cuda or not args.fp32
    out_dir = Path(tempfile.mkdtemp(prefix="kd_throughput_"))
    n_steps = args.warmup + args.steps
    data = build_data(args.stage, args.tiny, args.micro_batch, n_steps, out_dir / "data", args.packing)
    text_only = args.variant == "trl_gkd"
    teacher_dtype = torch.bfloat16 if bf16 else torch.float32
    student, teacher, top_k = build_models(args.stage, args.student, args.tiny, text_only, device, attn,
                                           teacher_dtype, args.experts)
    if args.packing:  # the stages' own step, with the mask opt-in here so rows stay comparable with earlier ones
        from types import SimpleNamespace

        from distill.training.supervised import prepare_packing

        prepare_packing(SimpleNamespace(packing=True, packing_block_mask=args.block_mask), student, teacher)
    if args.recompile_limit is not None:  # after the models: flex attention raises the limit as the stages do
        torch._dynamo.config.recompile_limit = args.recompile_limit
    apply_savers(student, args.savers)
    s_spec, t_spec = flop_spec(student, top_k), flop_spec(teacher, 0)
    if args.teacher_fp8:
        row.update(fp8_teacher(teacher, data.batches[:2], device))
    if args.kernels:
        from distill.training.kernels import apply_kernels

        row["kernels_applied"] = {"student": apply_kernels(student, args.kernels),
                                  "teacher": apply_kernels(teacher, args.kernels)}
    graphs = None
    if "compile" in args.kernels:
        from torch._dynamo.utils import counters

        def graphs() -> int:
            return int(counters["stats"]["unique_graphs"])
    ctx = Context(args, stage_defaults(args.stage), device, cuda, bf16, data, student, teacher, top_k, out_dir)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    profiler = step_profiler(Path(args.profile), args.warmup, cuda, not args.profile_no_trace) if args.profile \
        else None
    if profiler is not None:
        mark_phases(student, teacher)
    clock = Clock(cuda, profiler, graphs, progress=args.progress)
    if profiler is not None:
        profiler.start()
    probe = LossProbe(cuda, (lambda: _autocast(cuda, bf16)) if args.kd_autocast else None)
    if args.variant in ("ours", "bare") and args.stage != "preference":
        probe.install()
    runner = {"ours": run_ours, "bare": run_bare, "naive": run_naive, "trl_gkd": run_trl}[args.variant]
    state: dict[str, Any] = {}
    try:
        state = runner(ctx, clock)
    except torch.OutOfMemoryError as oom:
        log.warning("out of memory after %d steps: %s", max(len(clock.marks) - 1, 0), str(oom).split(". ")[0])
        row["status"] = f"OOM at step {max(len(clock.marks), 1)}"
    if profiler is not None:
        profiler.stop()
    peak_gib, reserved_gib = memory_gib(cuda)
    durations = clock.durations()
    timed = durations[args.warmup:]
    batches = state.get("batches", data.batches)
    stats = [batch_stats(b) for b in batches[args.warmup:args.warmup + len(timed)]]
    if text_only:
        stats = [{**s, "images": 0} for s in stats]
    row.update({
        "params_student_m": sum(p.numel() for p in student.parameters()) / 1e6,
        "params_student_active_body_m": s_spec.body / 1e6,
        "trainable_m": sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6,
        "params_teacher_m": sum(p.numel() for p in teacher.parameters()) / 1e6,
        "peak_gib": peak_gib, "reserved_gib": reserved_gib, "peak_flops": peak, "first_loss": state.get("first_loss"),
        "alloc_retries": torch.cuda.memory_stats().get("num_alloc_retries", 0) if cuda else None,
        "timed_steps": len(timed), "recompile_limit": torch._dynamo.config.recompile_limit,
    })
    if clock.graph_marks:  # graphs compiled by the end of each step; after the warm-up = recompilations
        row["compiled_graphs"] = clock.graph_marks[-1]
        row["graphs_after_warmup"] = clock.graph_marks[-1] - clock.graph_marks[min(args.warmup, len(clock.graph_marks)
                                                                                   - 1)]
        row["graphs_per_step"] = [b - a for a, b in zip(clock.graph_marks, clock.graph_marks[1:])]
    if "tokens_seen" in state:
        expected = sum(batch_stats(b)["real"] for b in batches[:len(durations)])
        row["tokens_seen_check"] = state["tokens_seen"] == expected
    if not timed or row["status"] != "ok":
        return row
    total = sum(timed)
    real = sum(s["real"] for s in stats)
    flops = sum(step_flops(s_spec, t_spec, s["lengths"], s["responses"], s["images"]) for s in stats)
    flops_all = sum(step_flops(s_spec, t_spec, s["lengths"], s["responses"], s["images"], True) for s in stats)
    spec_peak = device_peak_flops() if cuda else None
    row.update({
        "step_s_median": statistics.median(timed), "step_s_mean": total / len(timed), "step_s": timed,
        "tokens_per_s": real / total, "padding": 1 - real / sum(s["padded"] for s in stats),
        "real_tokens": real, "response_tokens": sum(s["responses"] for s in stats),
        "model_tflop_per_step": flops / len(timed) / 1e12,
        "mfu": flops / total / peak if peak else None,
        "mfu_all_positions": flops_all / total / peak if peak else None,
        "mfu_spec": flops / total / spec_peak if spec_peak else None,
    })
    insitu = probe.times_ms()[args.warmup:]
    if insitu:
        row["loss_insitu_ms"] = statistics.median(insitu)
    if "phases_ms" in state:
        row["phases_ms"] = state["phases_ms"]
    median_index = sorted(range(len(stats)), key=lambda i: stats[i]["padded"])[len(stats) // 2]
    free_optimizer(state, student)
    state.clear()
    gc.collect()
    try:
        cost = loss_cost(ctx, batches[args.warmup + median_index], probe)
        step_ms = timed[median_index] * 1000
        row.update({**cost, "loss_share": (cost["loss_ms"] - cost["heads_ms"]) / step_ms,
                    "loss_share_incl_heads": cost["loss_ms"] / step_ms,
                    "loss_probe_shape": stats[median_index]["shape"]})
    except torch.OutOfMemoryError:
        row["loss_note"] = "loss measurement ran out of memory"
    return row


# ---- sweeps ----


def _plan(stage: str, student: str, rows: list[tuple[str, int]], extra: tuple[str, ...] = ()) -> list[list[str]]:
    return [["--variant", v, "--stage", stage, "--student", student, "--micro-batch", str(mb), *extra]
            for v, mb in rows]


PLANS: dict[str, list[list[str]]] = {
    # ours at two micro-batches, bare at ours' smaller one (the overhead at equal work), naive and TRL at two each
    # (their best, and the one equal to ours' for the memory target). 1.5b D2S / preference need an H200.
    "d2d-1.5b": _plan("d2d", "1.5b", [("ours", 4), ("ours", 8), ("bare", 4), ("naive", 2), ("naive", 4),
                                      ("trl_gkd", 2), ("trl_gkd", 4)]),
    "d2d-0.5b": _plan("d2d", "0.5b", [("ours", 8), ("ours", 16), ("bare", 8), ("naive", 4), ("naive", 8),
                                      ("trl_gkd", 4), ("trl_gkd", 8)]),
    "d2s-0.5b": _plan("d2s", "0.5b", [("ours", 4), ("ours", 8), ("bare", 4), ("naive", 4), ("trl_gkd", 4)]),
    "d2s-1.5b": _plan("d2s", "1.5b", [("ours", 2), ("ours", 4), ("bare", 2), ("naive", 2), ("trl_gkd", 2)]),
    "preference-0.5b": _plan("preference", "0.5b", [("ours", 2), ("ours", 4), ("bare", 2), ("naive", 2)]),
    "preference-1.5b": _plan("preference", "1.5b", [("ours", 2), ("ours", 4), ("bare", 2), ("naive", 2)]),
    "tiny": [["--tiny", *r] for stage in STAGES for r in _plan(stage, "1.5b", [(v, 2) for v in VARIANTS])],
}


def summarise(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, for each (stage, student) in ``rows``."""
    lines = []
    ok = [r for r in rows if r.get("status") == "ok" and r.get("tokens_per_s")]
    for stage, student in sorted({(r["stage"], r["student"]) for r in ok}):
        group = [r for r in ok if r["stage"] == stage and r["student"] == student]
        best = {v: max((r for r in group if r["variant"] == v), key=lambda r: r["tokens_per_s"], default=None)
                for v in VARIANTS}
        head = f"{stage} {student}:"
        if best["ours"] is None:
            continue
        for other, target in (("naive", 1.5), ("trl_gkd", 1.5)):
            if best[other] is not None:
                ratio = best["ours"]["tokens_per_s"] / best[other]["tokens_per_s"]
                lines.append(f"{head} ours (mb {best['ours']['micro_batch']}) / {other} (mb "
                             f"{best[other]['micro_batch']}) real tokens/s = {ratio:.2f}x (target >= {target}x)")
        for r in group:
            if r["variant"] != "ours":
                continue
            same = {v: next((x for x in group if x["variant"] == v and x["micro_batch"] == r["micro_batch"]), None)
                    for v in ("naive", "bare")}
            if same["naive"] is not None:
                lines.append(f"{head} mb {r['micro_batch']}: peak memory ours / naive = "
                             f"{r['peak_gib'] / same['naive']['peak_gib']:.0%} (target <= 50%)")
            if same["bare"] is not None:
                lines.append(f"{head} mb {r['micro_batch']}: ours / bare tokens/s = "
                             f"{r['tokens_per_s'] / same['bare']['tokens_per_s']:.1%} (target >= 90%)")
            if r.get("loss_share") is not None:
                lines.append(f"{head} mb {r['micro_batch']}: KD loss share of the step = {r['loss_share']:.1%} "
                             f"(with the LM heads {r['loss_share_incl_heads']:.1%}; target <= 5%)")
    return lines


def sweep(args: argparse.Namespace, passthrough: list[str]) -> None:
    script = str(Path(__file__).resolve())
    runs = PLANS[args.sweep]
    peak = args.peak_flops
    tiny = args.sweep == "tiny"
    if peak is None and not tiny and not args.dry_run:
        proc = subprocess.run([sys.executable, script, "--measure-peak"], capture_output=True, text=True, check=True)
        peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_flops"]
    common = [*passthrough, *(["--peak-flops", str(peak)] if peak else [])]
    if args.dry_run:
        for extra in runs:
            print(shlex.join([sys.executable, script, *extra, *common]))  # noqa: T201
        return
    print(HEADER, flush=True)  # noqa: T201
    rows = []
    for extra in runs:
        cmd = [sys.executable, script, *extra, *common]
        if args.out:
            cmd += ["--out", args.out]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"variant"')]
            if proc.returncode != 0 or not lines:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
                print(f"| {' '.join(extra)} | failed (rc {proc.returncode}): {' / '.join(tail)} |", flush=True)  # noqa: T201
                continue
            row = json.loads(lines[-1])
        except subprocess.TimeoutExpired:
            print(f"| {' '.join(extra)} | timed out after {args.run_timeout} s |", flush=True)  # noqa: T201
            continue
        rows.append(row)
        print(markdown_row(row), flush=True)  # noqa: T201
    for line in summarise(rows):
        print(line)  # noqa: T201


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=VARIANTS, default="ours")
    p.add_argument("--stage", choices=STAGES, default="d2d")
    p.add_argument("--student", choices=("1.5b", "0.5b"), default="1.5b")
    p.add_argument("--micro-batch", type=int, default=4, help="samples per step (pairs for preference)")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps (with the default warm-up, the "
                   "Trainer's log after step 10 (logging_steps, the recipe's 10) falls inside the timed window)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--attn", default="sdpa", help="attention implementation for every model (auto: the stages' "
                   "default, flash_attention_2 when flash-attn is installed)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the student (every variant)")
    p.add_argument("--progress", action="store_true", help="print each step's time, peak memory and allocator "
                   "retries to stderr, and every Python thread's stack every --stack-every seconds and on SIGTERM "
                   "(`timeout`): to find where a run stalls; not for timed rows")
    p.add_argument("--stack-every", type=float, default=60.0, help="--progress: seconds between stack dumps")
    p.add_argument("--block-mask", action="store_true", help="packed flex attention: each packed row's block mask "
                   "from its records' boundaries (data.packing_block_mask, the stages' default), not transformers' "
                   "compiled one")
    p.add_argument("--recompile-limit", type=int, default=None, help="torch._dynamo's recompile limit per function "
                   "(default: the stages' own, at least 64 with flex attention; torch's is 8; past it the function "
                   "runs uncompiled, flex attention as dense math)")
    p.add_argument("--chunk", type=int, default=None, help="KD chunk size (default: the stage's KDConfig)")
    p.add_argument("--kd-autocast", action="store_true", help="ours/bare D2D/D2S: run chunked_kd_loss under bf16 "
                   "autocast (the Trainer autocasts only the model's forward; measures that fix)")
    p.add_argument("--pad", choices=("longest", "max"), default="longest", help="naive: pad to the longest sample "
                   "(LLaVA's collator) or to max_length")
    p.add_argument("--trl-loop", action="store_true", help="trl_gkd: TRL's generalized_jsd_loss in a plain loop "
                   "instead of GKDTrainer")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers of the Trainer variants (default "
                   "2, the recipe's; 0 with --tiny)")
    p.add_argument("--peak-flops", type=float, default=None, help="bf16 peak FLOP/s for MFU (default: measured)")
    p.add_argument("--measure-peak", action="store_true", help="only measure the card's bf16 matmul peak")
    p.add_argument("--quiet", action="store_true", help="--measure-peak: print the number alone")
    p.add_argument("--tiny", action="store_true", help="tiny shapes on CPU (seconds; memory = max RSS, no MFU)")
    p.add_argument("--fp32", action="store_true", help="--tiny: fp32 everywhere instead of bf16 autocast")
    p.add_argument("--experts", choices=("eager", "sorted", "grouped_mm"), default=None,
                   help="D2S / preference: the MoE experts' forward (default: the D2S stage's)")
    p.add_argument("--teacher-fp8", action="store_true", help="the teacher's LLM linears as rowwise fp8 products "
                   "(teacher.fp8); reports fp8_kl, KL(bf16 || fp8 teacher) on the first two batches' responses")
    p.add_argument("--profile", default=None, help="record two timed steps with torch.profiler; write trace.json, "
                   "ops.txt (operators by self time) and, on GPU, summary.md (device time by phase x kernel kind, top "
                   "operators and kernels) into this folder (the profiled steps run slower)")
    p.add_argument("--profile-no-trace", action="store_true", help="--profile: skip trace.json (large, slow to "
                   "write)")
    p.add_argument("--kernels", nargs="*", choices=("liger", "compile"), default=[], help="both models' LLMs: "
                   "liger-kernel's RMSNorm / SwiGLU / RoPE, regional torch.compile of the decoder layers "
                   "(distill.training.kernels.apply_kernels; GPU)")
    p.add_argument("--packing", action="store_true", help="ours / bare, D2D / D2S: padding-free batches "
                   "(data.packing), both models; pair with --attn flex_attention so attention skips other records")
    p.add_argument("--phases", action="store_true", help="bare variant on GPU: median milliseconds per step of the "
                   "teacher forward, student forward, backward and optimizer (phases_ms; the loss: loss_insitu_ms)")
    p.add_argument("--savers", nargs="*", choices=SAVERS, default=[], help="memory savers: frozen_bf16 (frozen "
                   "parts in bf16), adam8bit (torchao's 8-bit AdamW), weights_bf16 (bf16 weights and gradients, "
                   "8-bit AdamW with stochastic rounding)")
    p.add_argument("--header", action="store_true", help="print the markdown header too")
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    p.add_argument("--sweep", choices=sorted(PLANS), default=None, help="run a plan, one process per row")
    p.add_argument("--dry-run", action="store_true", help="--sweep: print the commands only")
    p.add_argument("--run-timeout", type=int, default=540, help="--sweep: seconds per run")
    args = p.parse_args(argv)
    if args.packing and (args.variant not in ("ours", "bare") or args.stage == "preference"):
        p.error("--packing: only for the ours and bare variants of d2d and d2s (naive and TRL pad by definition)")
    if args.block_mask and not (args.packing and args.attn == "flex_attention"):
        p.error("--block-mask: flex attention's mask of packed rows (--packing --attn flex_attention)")
    if args.phases and (args.variant != "bare" or args.tiny):
        p.error("--phases: only for the bare variant on a GPU (CUDA events)")
    if args.workers is None:
        args.workers = 0 if args.tiny else 2
    passthrough = []
    for flag in ("--steps", "--warmup", "--attn", "--chunk"):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None and value != p.get_default(flag[2:].replace("-", "_")):
            passthrough += [flag, str(value)]
    if args.savers:
        passthrough += ["--savers", *args.savers]
    passthrough += [f for f in ("--grad-ckpt", "--fp32", "--kd-autocast", "--trl-loop", "--teacher-fp8", "--packing")
                    if getattr(args, f[2:].replace("-", "_"))]
    if args.kernels:
        passthrough += ["--kernels", *args.kernels]
    return args, passthrough


def main(argv: Sequence[str] | None = None) -> None:
    args, passthrough = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.sweep:
        sweep(args, passthrough)
        return
    if args.measure_peak:
        if not torch.cuda.is_available():
            raise SystemExit("--measure-peak needs a CUDA device")
        peak = measure_peak_flops(torch.device("cuda", 0))
        if args.quiet:
            print(f"{peak:.6g}")  # noqa: T201
        else:
            print(json.dumps({"device": torch.cuda.get_device_name(), "peak_flops": peak,  # noqa: T201
                              "date": time.strftime("%Y-%m-%d %H:%M")}))
        return
    if args.tiny:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.progress:  # a stalled run says where it is: periodically, and when `timeout` stops it
        faulthandler.dump_traceback_later(args.stack_every, repeat=True)
        faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    row = run_once(args)
    if args.header:
        print(HEADER)  # noqa: T201
    print(markdown_row(row))  # noqa: T201
    line = json.dumps(row, default=str)
    print(line, flush=True)  # noqa: T201
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
