"""The KD training loss: student and frozen teacher on their own inputs, paired response positions, chunked KD.

Both models are called through their normal forward (so DDP / DeepSpeed hooks run) with
``output_hidden_states=True`` and ``logits_to_keep=1``: the full [tokens, vocab] logits are never built there;
the chunked loss applies each model's LM head to the paired response positions only.

Offline teacher: ``teacher: {cache: DIR}`` instead of ``{path: ...}`` reads the teacher's top-k log-probs that
``python -m data_prep.teacher_cache`` wrote (``TeacherCache``); no teacher is loaded. The collator then carries
each record's id (``record_ids``) and the loss looks its targets up by id, since the Trainer shuffles records.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import ProcessorMixin

from distill import paths as fs
from distill.losses.kd import (
    KDOptions,
    chunked_kd_loss,
    chunked_sparse_kd_loss,
    flat_positions,
    paired_positions,
    reply_weights,
    select_positions,
    shifted_response_mask,
)
from distill.models.student import ATTN_IMPLEMENTATIONS
from distill.models.teacher import load_teacher
from distill.training.distributed import gathered, is_zero3_engine, prepare_teacher, run_in_forward, unwrap
from distill.training.kernels import apply_kernels, check_kernels

NON_MODEL_KEYS = ("labels", "record_ids", "ref_logps", "host_labels")
"""Batch entries that are not model inputs; everything else the collator returns goes to the forward."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KDConfig(KDOptions):
    """The loss settings of KDOptions (divergence, temperature, beta, top_k, tail_bucket) plus how to run it."""

    chunk_size: int = 1024
    """Tokens per chunk of the LM-head + loss computation; 0 computes all at once."""
    distill_all_tokens: bool = False
    """KD (and CE) on every text token, prompt included, instead of the responses only."""
    head_dtype: str = "auto"
    """dtype of the student's LM-head products inside the loss: ``auto`` is bf16 when the Trainer trains in bf16
    (the loss runs outside the forward's autocast, on fp32 hidden states and master weights) and the hidden
    states' dtype otherwise; or ``bf16`` / ``fp32``. Softmaxes and divergences are fp32 in every case."""
    normalise: str = "tokens"
    """How the summed loss is averaged: ``tokens`` (each response token counts once: long replies such as
    captions dominate) or ``replies`` (each token weighted 1 / its reply's length, the sum divided by the number
    of replies: a one-token answer counts as much as a caption; ``losses.kd.reply_weights``). Both are exact under
    gradient accumulation (the Trainer counts tokens or replies over the accumulated batch)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk_size < 0:
            raise ValueError("kd.chunk_size must be >= 0")
        if self.normalise not in ("tokens", "replies"):
            raise ValueError(f"kd.normalise={self.normalise!r}: expected 'tokens' or 'replies'")
        if self.normalise == "replies" and self.distill_all_tokens:
            raise ValueError("kd.normalise=replies with kd.distill_all_tokens: every text token is labelled, so there "
                             "are no replies to weight; use one or the other")
        if self.head_dtype not in HEAD_DTYPES:
            raise ValueError(f"kd.head_dtype={self.head_dtype!r}: expected one of {sorted(HEAD_DTYPES)}")

    def matmul_dtype(self, bf16_training: bool) -> torch.dtype | None:
        if self.head_dtype == "auto":
            return torch.bfloat16 if bf16_training else None
        return HEAD_DTYPES[self.head_dtype]


HEAD_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class TeacherConfig:
    path: str | None = None
    """A teacher checkpoint (run live); exactly one of ``path`` and ``cache``."""
    cache: str | None = None
    """A teacher cache folder from ``python -m data_prep.teacher_cache`` (no teacher in memory)."""
    dtype: str = "auto"
    """``auto`` (bf16 on GPU, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``. Under DeepSpeed the
    teacher takes the student's dtype (bf16 when ``training.bf16``)."""
    attn_implementation: str = "auto"
    """``auto`` (flash_attention_2 when flash-attn is installed and a GPU is present, else sdpa), ``sdpa``,
    ``flash_attention_2``, ``flex_attention`` (with ``data.packing`` on a GPU) or ``eager``."""
    fp8: bool = False
    """Run the teacher's LLM linear layers as rowwise-scaled fp8 products (distill/models/fp8.py): an opt-in
    approximation for Hopper-class GPUs; not with DeepSpeed (its engines would cast the fp8 weights)."""
    kernels: list[str] = field(default_factory=list)
    """Opt-in GPU kernels for the teacher's LLM, as ``model.kernels`` (distill/training/kernels.py)."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.cache is None):
            raise ValueError("teacher: give exactly one of path (a checkpoint) and cache (a teacher cache folder)")
        if self.cache is not None and not fs.is_file(Path(self.cache) / MANIFEST):
            raise FileNotFoundError(f"teacher.cache: no {MANIFEST} in {self.cache} (unfinished cache? rerun "
                                    "python -m data_prep.teacher_cache with the same arguments to complete it)")
        if self.path is not None and not fs.is_file(Path(self.path) / "config.json"):
            raise FileNotFoundError(f"teacher.path: no checkpoint at {self.path}")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ValueError(f"teacher.dtype={self.dtype!r}")
        if self.fp8 and self.cache is not None:
            raise ValueError("teacher.fp8 applies to a live teacher (teacher.path), not to a teacher cache")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"teacher.attn_implementation={self.attn_implementation!r}: expected one of "
                             f"{ATTN_IMPLEMENTATIONS}")
        self.kernels = check_kernels(self.kernels, "teacher.kernels", self.attn_implementation)
        if self.kernels and self.cache is not None:
            raise ValueError("teacher.kernels applies to a live teacher (teacher.path), not to a teacher cache")

    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if torch.cuda.is_available() else torch.float32
        return getattr(torch, self.dtype)


MANIFEST = "manifest.json"
CACHE_FORMAT = "distill-teacher-cache/1"


class TeacherCache:
    """Read side of a teacher cache: per record id, the teacher's top-k targets on its response tokens.

    A shard ``shard-NNNNN.safetensors`` holds, for its records in order: ``offsets`` [n + 1] (each record's
    first token row), ``ids`` [T, k] int32 and ``logp`` [T, k] (fp16 or fp32) the teacher's k most likely tokens
    and log-probs at the manifest's temperature, ``tail`` [T] fp32 the log of the remaining mass, ``targets``
    [T] int32 the response token ids (checked against the student's); its metadata ``record_ids`` (JSON) names
    the records. Shards stay loaded in a small LRU.
    """

    def __init__(self, root: str | Path, max_loaded_shards: int = 8) -> None:
        self.root = Path(root)
        self.manifest = json.loads((self.root / MANIFEST).read_text())
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"{self.root}: format {self.manifest.get('format')!r}, expected {CACHE_FORMAT!r}")
        self.top_k, self.vocab_size = int(self.manifest["top_k"]), int(self.manifest["vocab_size"])
        self.temperature = float(self.manifest["temperature"])
        self.index: dict[str, tuple[int, int]] = {}
        for shard_no, shard in enumerate(self.manifest["shards"]):
            with safe_open(self.root / shard["file"], framework="pt") as f:
                for row, rid in enumerate(json.loads(f.metadata()["record_ids"])):
                    self.index[rid] = (shard_no, row)
        self.max_loaded = max_loaded_shards
        self.loaded: OrderedDict[int, dict[str, torch.Tensor]] = OrderedDict()

    def check(self, kd: KDConfig, template: str, max_length: int) -> None:
        """Refuse a cache written for other loss or data settings (its targets would silently be wrong)."""
        want = {"temperature": kd.temperature, "template": template, "max_length": max_length,
                "train_on": "all" if kd.distill_all_tokens else "responses"}
        wrong = {k: (self.manifest.get(k), v) for k, v in want.items() if self.manifest.get(k) != v}
        if wrong:
            raise ValueError(f"teacher cache {self.root} was written with other settings (cache, config): {wrong}; "
                             "rebuild it with python -m data_prep.teacher_cache")
        if kd.top_k is not None and kd.top_k > self.top_k:
            raise ValueError(f"kd.top_k={kd.top_k} exceeds the cache's top_k={self.top_k}")

    def _shard(self, shard_no: int) -> dict[str, torch.Tensor]:
        if shard_no in self.loaded:
            self.loaded.move_to_end(shard_no)
        else:
            self.loaded[shard_no] = load_file(self.root / self.manifest["shards"][shard_no]["file"])
            if len(self.loaded) > self.max_loaded:
                self.loaded.popitem(last=False)
        return self.loaded[shard_no]

    def lookup(self, record_ids: Sequence[str]) -> dict[str, torch.Tensor]:
        """The records' targets concatenated in order (``ids``, ``logp``, ``tail``, ``targets``), plus
        ``lengths`` [B]: how many response tokens each record has in the cache."""
        parts: dict[str, list[torch.Tensor]] = {"ids": [], "logp": [], "tail": [], "targets": []}
        lengths = []
        for rid in record_ids:
            if rid not in self.index:
                raise KeyError(f"record {rid!r} is not in the teacher cache {self.root}")
            shard_no, row = self.index[rid]
            shard = self._shard(shard_no)
            lo, hi = int(shard["offsets"][row]), int(shard["offsets"][row + 1])
            for key in parts:
                parts[key].append(shard[key][lo:hi])
            lengths.append(hi - lo)
        out = {k: torch.cat(v) for k, v in parts.items()}
        out["lengths"] = torch.tensor(lengths, dtype=torch.long)
        return out


def split_inputs(inputs: dict[str, Any], prefix: str = "", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """One model's inputs from a batch: every entry its processor returned (``prefix`` ``""`` the student's,
    ``"teacher_"`` the teacher's), whatever the family needs (``image_grid_thw``, ``image_sizes``,
    ``pixel_attention_mask``, ``token_type_ids``, ...). ``dtype``: floating tensors (pixels) cast to the model's."""
    out = {}
    for key, value in inputs.items():
        if not key.startswith(prefix) or (not prefix and key.startswith("teacher_")):
            continue
        name = key[len(prefix):]
        if name in NON_MODEL_KEYS:
            continue
        if dtype is not None and isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.to(dtype)
        out[name] = value
    return out


def last_hidden(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The final (normed) hidden states, without the [tokens, vocab] logits.

    Through the wrapper's forward (DDP needs it to reduce the gradients), except for a ZeRO-3 engine: the loss
    already runs as that engine's forward (``run_in_forward``), so its backbone is called directly. The text
    decoder's output is taken by a forward hook on it rather than with ``output_hidden_states=True``: that flag
    makes transformers install output-capturing hooks on every decoder layer and attention module, which read a
    ``ContextVar`` (a graph break inside each compiled layer, ``kernels: [compile]``) and keep every layer's
    hidden states until the forward returns (the teacher's, under no_grad, otherwise freed layer by layer).
    """
    if is_zero3_engine(model):
        return unwrap(model).base_model(**inputs, use_cache=False).last_hidden_state
    captured = []
    hook = unwrap(model).get_decoder().register_forward_hook(lambda _m, _a, out: captured.append(out[0]))
    try:
        model(**inputs, logits_to_keep=1, use_cache=False)
    finally:
        hook.remove()
    if len(captured) != 1:
        raise RuntimeError(f"last_hidden: the text decoder of {type(unwrap(model)).__name__} ran {len(captured)} "
                           "times in one forward; expected once")
    return captured[0]


class KDLoss:
    """``alpha * KD + (1 - alpha) * CE`` for the DistillTrainer; holds the frozen teacher (never trained), or a
    ``TeacherCache`` of its top-k targets in its place."""

    def __init__(self, teacher: torch.nn.Module | TeacherCache, cfg: KDConfig, alpha: float) -> None:
        self.teacher = teacher
        self.cfg = cfg
        self.alpha = alpha
        self.placed = False
        self.matmul_dtype = cfg.matmul_dtype(bf16_training=False)
        self.normalise = cfg.normalise  # what the DistillTrainer counts for num_items_in_batch

    def prepare(self, trainer: Any) -> None:
        """Place the teacher once the Trainer exists: partitioned under ZeRO-3, a replica otherwise; and pick the
        LM-head products' dtype from the Trainer's precision."""
        self.matmul_dtype = self.cfg.matmul_dtype(bool(getattr(trainer.args, "bf16", False)))
        if not self.placed and not isinstance(self.teacher, TeacherCache):
            self.teacher = prepare_teacher(self.teacher, trainer.accelerator)
            self.placed = True

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any):
        if isinstance(self.teacher, TeacherCache):
            return run_in_forward(model, self.cached_loss, model, inputs, num_items_in_batch)
        if not self.placed:  # no prepare(trainer) call: follow the student onto its device, once
            self.teacher.to(inputs["input_ids"].device)
            self.placed = True
        # The LM heads are applied outside the models' forwards; under ZeRO-3 the student's must be gathered inside
        # its engine's forward for DeepSpeed to reduce its gradient (elsewhere this is a plain call).
        return run_in_forward(model, self.loss, model, inputs, num_items_in_batch)

    def loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: Any):
        # The positions, targets and weights come from the labels on the host (the collator's ``host_labels``):
        # on the GPU, finding them would stop the host several times a step, waiting for the GPU to drain.
        # With distill_all_tokens the collator labelled every text token, so "labels" covers them.
        s_mask, t_mask, targets = paired_positions(_host(inputs, "labels"), _host(inputs, "teacher_labels"))
        device = inputs["input_ids"].device
        s_idx, t_idx = _to(flat_positions(s_mask), device), _to(flat_positions(t_mask), device)
        targets, weights = _to(targets, device), _to(self.weights(s_mask), device)
        t_inputs = {k: v.to(device) for k, v in split_inputs(inputs, "teacher_", self.teacher.dtype).items()}
        with torch.no_grad():
            h_t = select_positions(last_hidden(self.teacher, t_inputs), t_idx, t_mask.shape)
        h_s = select_positions(last_hidden(model, split_inputs(inputs)), s_idx, s_mask.shape)
        head_s = unwrap(model).get_output_embeddings().weight
        head_t = unwrap(self.teacher).get_output_embeddings().weight
        chunk = self.cfg.chunk_size or max(h_s.size(0), 1)
        with gathered(head_s, head_t):  # ZeRO-3 shards: full weights for the loss only
            loss, kd, ce = chunked_kd_loss(
                h_s, head_s, h_t.to(h_s.device), head_t.to(h_s.device), targets, self.cfg,
                self.alpha, chunk, num_items_in_batch, self.matmul_dtype, weights,
            )
        return loss, ({"kd": kd, "ce": ce} if self.alpha < 1.0 else {"kd": kd})

    def weights(self, s_mask: torch.Tensor) -> torch.Tensor | None:
        """Per-token weights of the student's response positions: 1 / reply length under ``normalise=replies``."""
        return reply_weights(s_mask) if self.normalise == "replies" else None

    def cached_loss(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch: Any):
        """As ``loss``, with the teacher's targets looked up in the cache by record id."""
        labels = _host(inputs, "labels")
        s_mask = shifted_response_mask(labels)
        targets = labels[:, 1:][s_mask[:, :-1]]
        cached = self.teacher.lookup(inputs["record_ids"])
        expected = cached["lengths"]
        if expected.numel() != labels.size(0):  # a packed batch: one row holds every record
            expected = expected.sum(0, keepdim=True)
        if not torch.equal(expected, s_mask.sum(1)) or not torch.equal(cached["targets"].long(), targets):
            raise ValueError(f"teacher cache {self.teacher.root}: the cached response tokens differ from the "
                             "student's for these records (another tokenizer, template or max_length?)")
        dev = inputs["input_ids"].device
        h_s = select_positions(last_hidden(model, split_inputs(inputs)), _to(flat_positions(s_mask), dev), s_mask.shape)
        head_s = unwrap(model).get_output_embeddings().weight
        chunk = self.cfg.chunk_size or max(h_s.size(0), 1)
        with gathered(head_s):
            loss, kd, ce = chunked_sparse_kd_loss(
                h_s, head_s, _to(cached["ids"], dev), _to(cached["logp"], dev), _to(cached["tail"], dev),
                _to(targets, dev), self.cfg, self.alpha, chunk, num_items_in_batch,
                vocab_size=self.teacher.vocab_size, matmul_dtype=self.matmul_dtype,
                weights=_to(self.weights(s_mask), dev),
            )
        return loss, ({"kd": kd, "ce": ce} if self.alpha < 1.0 else {"kd": kd})


def _host(inputs: dict[str, Any], key: str) -> torch.Tensor:
    """``inputs[key]`` on the host: the collator's numpy copy (``host_labels``) when there is one, else copied back
    (a host synchronisation when the batch is on a GPU)."""
    host = inputs.get("host_labels")
    if host is not None and key in host:
        return torch.from_numpy(host[key])
    t = inputs[key]
    return t if t.device.type == "cpu" else t.cpu()


def _to(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A host tensor sent to ``device`` without the host waiting for the copy (pinned first, for a GPU)."""
    if t is None or t.device == torch.device(device):
        return t
    if t.device.type == "cpu" and torch.device(device).type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def open_teacher(
    cfg: TeacherConfig, kd: KDConfig, template: str, max_length: int
) -> tuple[torch.nn.Module | TeacherCache, ProcessorMixin | None]:
    """``(teacher, teacher_processor)``: the frozen live teacher and its processor, or a checked
    ``TeacherCache`` and ``None`` (the collator then needs no teacher inputs)."""
    if cfg.cache is not None:
        cache = TeacherCache(cfg.cache)
        cache.check(kd, template, max_length)
        if not kd.tail_bucket:
            # Measured on the demo world (k = 64 of 512): renormalising over the cached tokens leaves the student's
            # mass outside them unconstrained, KL(teacher || D2D student) 0.49 against 0.12 live; with the tail
            # bucket 0.12, as live.
            log.warning("teacher.cache without kd.tail_bucket=true: the student's probability outside the cached "
                        "top-%d is not trained; set +stages.<stage>.kd.tail_bucket=true", cache.top_k)
        return cache, None
    teacher, processor = load_teacher(cfg.path, cfg.torch_dtype(), cfg.attn_implementation)
    if cfg.fp8:
        from distill.models.fp8 import convert_to_fp8

        log.info("teacher.fp8: %s", convert_to_fp8(teacher))
    apply_kernels(teacher, cfg.kernels)
    return teacher, processor
