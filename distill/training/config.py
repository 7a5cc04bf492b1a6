"""Config pieces shared by several stages, validated in ``__post_init__``."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distill import paths as fs
from distill.data.formats import ON_BAD_RECORD
from distill.data.templates import get_template
from distill.models.student import ATTN_IMPLEMENTATIONS, StudentParts
from distill.models.trainable import LoraSpec, validate_modes
from distill.training.kernels import check_kernels


@dataclass
class DataConfig:
    """A training set in LLaVA conversation JSON (one or several files sharing an image folder)."""

    train: list[str]
    image_root: str | None = None
    template: str = "chatml"
    max_length: int = 2048
    on_bad_record: str = "error"
    """``error``: stop at the first bad record, naming file and record; ``skip``: skip it and count it."""
    verify_images: bool = True
    """Open every image once when a file is first read (its header and structure: catches missing, empty and
    non-image files before training); a file checked once is remembered by path, size and modification time.
    False: only check that each file exists."""
    limit: int | None = None
    """Read at most this many records per file (quick runs)."""
    cache_dir: str | None = None
    """Where each file's checked records are kept as a memory-mapped Arrow file, reused while the file and these
    settings are unchanged, and shared by the processes of a launch (one parses and checks, the others wait and
    map it). None: ``<run.dir>/cache/data`` (a sweep's points share the base run folder's). Point several runs at
    one folder to check a large file once."""
    packing: bool = False
    """Concatenate each micro-batch's records into one row without padding (per-record ``position_ids``; attention
    stays inside each record). Same loss as padded batches; pays off where padding is a large share of the batch and
    the attention kernel skips the masked blocks (``flex_attention``, ``flash_attention_2``)."""
    packing_block_mask: bool = True
    """With ``packing`` and ``flex_attention``: build each packed row's flex block mask from its records' boundaries
    (``distill.training.blockmask``, a few tensor operations, exact) instead of the one transformers compiles in
    every forward (the first compile for a 10k-token row ran for minutes on an H200). Models whose text layers
    attend through a sliding window or chunks keep transformers' mask; false: every model keeps it."""

    def __post_init__(self) -> None:
        if isinstance(self.train, str):
            self.train = [self.train]
        if not self.train:
            raise ValueError("data.train: at least one file is needed")
        for path in self.train:
            if not fs.is_file(path):
                raise FileNotFoundError(f"data.train: {path} does not exist")
        if self.image_root is not None and not fs.is_dir(self.image_root):
            raise FileNotFoundError(f"data.image_root: {self.image_root} is not a folder")
        if self.on_bad_record not in ON_BAD_RECORD:
            raise ValueError(f"data.on_bad_record={self.on_bad_record!r}: expected one of {ON_BAD_RECORD}")
        if self.max_length <= 0:
            raise ValueError("data.max_length must be positive")
        get_template(self.template)


@dataclass
class ModelInit:
    """Where a stage's model comes from: an earlier artifact, or parts to assemble (exactly one)."""

    artifact: str | None = None
    parts: StudentParts | None = None
    attn_implementation: str = "auto"
    """``auto``: flash_attention_2 when flash-attn is installed and a GPU is present, else sdpa; or any of
    ``sdpa``, ``flash_attention_2``, ``flex_attention`` (GPU training: skips the other records' blocks of a packed
    batch, see ``data.packing``), ``eager``."""
    weights_dtype: str = "float32"
    """The dtype the model is loaded in, so the trainable parameters' (the optimizer's master weights and their
    gradients). ``bfloat16`` halves both, a memory saver: plain AdamW would then round away every update smaller
    than half a bf16 step of the weight, so it needs an optimizer that rounds stochastically:
    ``training.optim=adamw_torch_8bit`` with ``training.optim_args=bf16_stochastic_round=True`` (torchao)."""
    frozen_dtype: str | None = None
    """The dtype of the parameters the stage does not train (a frozen vision tower, the upcycled student's attention
    ...), cast after the trainable ones are chosen (LoRA base layers excepted); None: as ``weights_dtype``.
    ``bfloat16`` halves them. Under bf16 autocast their matrix products ran in bf16 already; what changes: fp32 ops
    (norms) read rounded weights, a frozen embedding table hands bf16 activations to the LLM (D2S and preference
    freeze it: the residual stream then starts in bf16), and the saved artifact holds those parts rounded to bf16."""
    kernels: list[str] = field(default_factory=list)
    """Opt-in GPU kernels for the LLM (distill/training/kernels.py): ``liger`` (liger-kernel's fused RMSNorm,
    SwiGLU and RoPE), ``compile`` (regional torch.compile of the decoder layers). Empty: transformers' own."""

    def __post_init__(self) -> None:
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation={self.attn_implementation!r}: expected one of "
                             f"{ATTN_IMPLEMENTATIONS}")
        for name in ("weights_dtype", "frozen_dtype"):
            value = getattr(self, name)
            if value is not None and value not in MODEL_DTYPES:
                raise ValueError(f"model.{name}={value!r}: expected one of {sorted(MODEL_DTYPES)}")
        self.kernels = check_kernels(self.kernels, "model.kernels", self.attn_implementation)
        if isinstance(self.parts, dict):
            self.parts = StudentParts(**self.parts)
        if (self.artifact is None) == (self.parts is None):
            raise ValueError("model: give exactly one of 'artifact' (a checkpoint folder) or 'parts'")
        if self.artifact is not None and not fs.is_file(Path(self.artifact) / "config.json"):
            raise FileNotFoundError(f"model.artifact: no checkpoint at {self.artifact}")


MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
STOCHASTIC_ROUNDING_OPTIMS = ("adamw_torch_8bit", "adamw_torch_4bit")
"""TrainingArguments ``optim`` values (torchao's low-bit AdamW) that can update bf16 weights with stochastic
rounding (``optim_args=bf16_stochastic_round=True``)."""


def _optim_args(training: dict[str, Any]) -> dict[str, str]:
    text = training.get("optim_args") or ""
    return dict(kv.split("=", 1) for kv in text.replace(" ", "").split(",") if "=" in kv)


def check_precision(model: ModelInit, training: dict[str, Any]) -> None:
    """The memory savers' settings against the stage's TrainingArguments, before any work: bf16 weights need a
    stochastic-rounding optimizer and no DeepSpeed (which keeps fp32 master weights itself), bf16 parts need bf16
    autocast, and torchao's optimizers need torchao."""
    optim = str(training.get("optim", "adamw_torch"))
    lowered = [name for name in ("weights_dtype", "frozen_dtype") if getattr(model, name) == "bfloat16"]
    if lowered and not training.get("bf16", False):
        raise ValueError(f"model.{lowered[0]}=bfloat16 needs bf16 mixed precision (training.bf16=true): without "
                         "autocast the fp32 and bf16 parts of the model cannot multiply each other")
    if model.weights_dtype == "bfloat16":
        if training.get("deepspeed"):
            raise ValueError("model.weights_dtype=bfloat16 with DeepSpeed: DeepSpeed's bf16 mode keeps fp32 master "
                             "weights itself; leave weights_dtype=float32 and let ZeRO partition the state")
        stochastic = _optim_args(training).get("bf16_stochastic_round", "").lower() in ("true", "1")
        if optim not in STOCHASTIC_ROUNDING_OPTIMS or not stochastic:
            raise ValueError(
                f"model.weights_dtype=bfloat16 with training.optim={optim!r}: updates smaller than half a bf16 step "
                "of a weight would be rounded away. Use training.optim=adamw_torch_8bit (or adamw_torch_4bit) with "
                "training.optim_args=bf16_stochastic_round=True (torchao), or keep weights_dtype=float32")
    if optim in STOCHASTIC_ROUNDING_OPTIMS and importlib.util.find_spec("torchao") is None:
        raise ValueError(f"training.optim={optim} needs the torchao package (the project's `gpu` extra: "
                         "pip install 'distill[gpu]')")


def as_dataclass(value: Any, cls: type) -> Any:
    """Hydra hands nested blocks over as dicts; turn them into their dataclass once."""
    return cls(**value) if isinstance(value, dict) else value


@dataclass
class Trainability:
    modes: dict[str, str] = field(default_factory=dict)
    lora: LoraSpec = field(default_factory=LoraSpec)

    def __post_init__(self) -> None:
        validate_modes(self.modes)
        self.lora = as_dataclass(self.lora, LoraSpec)
