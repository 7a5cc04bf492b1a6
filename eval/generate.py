"""Batched greedy generation for any image-text-to-text artifact, prompted with its own chat template (``template``
names the one used when the artifact has none).

    gen = Generator.from_artifact("runs/demo/teacher/model", template="chatml")
    answers = gen.answer([("eval/000001.png", "How many shapes are there?")], image_root, max_new_tokens=8)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from distill.data.collate import ConversationEncoder
from distill.data.formats import IMAGE_PLACEHOLDER, open_image
from distill.data.templates import get_template
from distill.models.student import load_vlm

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    samples: int = 0
    new_tokens: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "tokens_per_s": self.new_tokens / self.seconds if self.seconds else 0.0,
            "latency_ms_per_sample": 1000 * self.seconds / self.samples if self.samples else 0.0,
        }


class Generator:
    def __init__(self, model: torch.nn.Module, processor, template: str, batch_size: int = 32,
                 device: str | None = None, progress: bool = True) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.encoder = ConversationEncoder(processor, get_template(template), max_length=1 << 20)
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.batch_size = batch_size
        self.progress = progress
        self.stats = GenerationStats()
        eos = self.tokenizer.convert_tokens_to_ids(get_template(template).assistant_suffix)
        self.eos_token_id = eos if isinstance(eos, int) and eos >= 0 else self.tokenizer.eos_token_id

    @classmethod
    def from_artifact(cls, path: str | Path, template: str, **kwargs) -> Generator:
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        model, processor = load_vlm(path, dtype=dtype)
        return cls(model, processor, template, **kwargs)

    @torch.no_grad()
    def answer(self, items: Sequence[tuple[str | None, str]], image_root: Path | None, max_new_tokens: int,
               desc: str = "generate") -> list[str]:
        """Greedy replies to ``(image path or None, question)`` pairs, in order."""
        out: list[str] = []
        batches = range(0, len(items), self.batch_size)
        for start in tqdm(batches, desc=desc, disable=not self.progress, leave=False):
            out.extend(self._batch(items[start : start + self.batch_size], image_root, max_new_tokens))
        return out

    def _batch(self, items: Sequence[tuple[str | None, str]], image_root: Path | None, max_new: int) -> list[str]:
        conversations, images = [], []
        for image, question in items:
            text = f"{IMAGE_PLACEHOLDER}\n{question}" if image is not None else question
            conversations.append([{"from": "human", "value": text}])
            images.append([open_image(image_root, image)] if image is not None else [])
        # Left padding (the processor's own prompt and tensors), so every row's next token is generated at the
        # same position.
        inputs = {k: v.to(self.device) for k, v in self.encoder.prompts(conversations, images).items()}
        inputs = {k: v.to(self.model.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        width = inputs["input_ids"].shape[1]
        pad = self.encoder.pad_id
        start = time.perf_counter()
        # The image token is never a reply: generated, it would be fed back as an image slot with no features.
        generated = self.model.generate(
            **inputs, max_new_tokens=max_new, do_sample=False, eos_token_id=self.eos_token_id, pad_token_id=pad,
            suppress_tokens=[self.encoder.image_token_id],
        )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.stats.seconds += time.perf_counter() - start
        new = generated[:, width:]
        self.stats.samples += len(items)
        self.stats.new_tokens += int(((new != pad) & (new != self.eos_token_id)).sum())
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
