"""Config pieces shared by several stages, validated in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    kernels: list[str] = field(default_factory=list)
    """Opt-in GPU kernels for the LLM (distill/training/kernels.py): ``liger`` (liger-kernel's fused RMSNorm,
    SwiGLU and RoPE), ``compile`` (regional torch.compile of the decoder layers). Empty: transformers' own."""

    def __post_init__(self) -> None:
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation={self.attn_implementation!r}: expected one of "
                             f"{ATTN_IMPLEMENTATIONS}")
        self.kernels = check_kernels(self.kernels, "model.kernels")
        if isinstance(self.parts, dict):
            self.parts = StudentParts(**self.parts)
        if (self.artifact is None) == (self.parts is None):
            raise ValueError("model: give exactly one of 'artifact' (a checkpoint folder) or 'parts'")
        if self.artifact is not None and not fs.is_file(Path(self.artifact) / "config.json"):
            raise FileNotFoundError(f"model.artifact: no checkpoint at {self.artifact}")


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
