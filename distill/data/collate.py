"""Turn checked records into model inputs: chat template, image tokens, response-only labels, padding.

``ConversationEncoder`` renders one record for one model (its processor decides the image-token count and
the pixel values). ``SupervisedCollator`` batches records for the student and, when given a teacher encoder,
for the teacher too (``teacher_*`` keys), so a teacher with another vision tower or image-token count sees its
own inputs over the same response tokens.

Labels are ``-100`` everywhere but the responses (``train_on="responses"``) or everywhere but padding and
image tokens (``train_on="all"``). The model shifts labels itself; the KD losses shift the same way.
With ``packed=True`` a batch is one padding-free row per model (``data.packing``).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin

from distill.data.formats import IMAGE_PLACEHOLDER, DataError, open_image
from distill.data.templates import ChatTemplate

IGNORE_INDEX = -100


@functools.cache
def _blank_image(size: int = 32) -> Image.Image:
    return Image.new("RGB", (size, size))


def count_image_tokens(processor: ProcessorMixin) -> int:
    """How many tokens one image becomes for this processor (asked of the processor, not computed by hand)."""
    encoded = processor(text=IMAGE_PLACEHOLDER, images=_blank_image(), return_tensors="pt")
    image_token_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int((encoded["input_ids"] == image_token_id).sum())


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    image: Image.Image | None


class ConversationEncoder:
    """Encodes conversations for one model: text through the template, ``<image>`` expanded to its tokens."""

    def __init__(self, processor: ProcessorMixin, template: ChatTemplate, max_length: int,
                 train_on: str = "responses") -> None:
        if train_on not in ("responses", "all"):
            raise ValueError(f"train_on={train_on!r}: expected 'responses' or 'all'")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.max_length = max_length
        self.train_on = train_on
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self.n_image_tokens = count_image_tokens(processor)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def tokenize(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if self.image_token_id not in ids:
            return ids
        out: list[int] = []
        for tok in ids:
            out.extend([tok] * self.n_image_tokens if tok == self.image_token_id else [tok])
        return out

    def encode(self, record: dict[str, Any], image: Image.Image | None) -> Encoded:
        input_ids: list[int] = []
        labels: list[int] = []
        for text, is_response in self.template.segments(record["conversations"]):
            ids = self.tokenize(text)
            input_ids.extend(ids)
            trained = is_response or self.train_on == "all"
            labels.extend(t if trained and t != self.image_token_id else IGNORE_INDEX for t in ids)
        if len(input_ids) > self.max_length:
            if self.image_token_id in input_ids[self.max_length:]:
                raise DataError(f"record {record.get('id')}: max_length={self.max_length} would cut image tokens")
            input_ids, labels = input_ids[: self.max_length], labels[: self.max_length]
        return Encoded(input_ids, labels, image)

    def encode_prompt(self, conversation: list[dict[str, str]]) -> list[int]:
        """Token ids of a generation prompt (the conversation so far, then the assistant prefix)."""
        return self.tokenize(self.template.prompt(conversation))

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]

    def batch(self, items: Sequence[Encoded], prefix: str = "", packed: bool = False) -> dict[str, torch.Tensor]:
        """Right-padded tensors; ``pixel_values`` holds one row per record that has an image, in order.

        ``packed``: the records concatenated into one row with no padding and no attention mask; ``position_ids``
        restart at 0 for each record, from which transformers builds the mask that keeps attention inside each
        record. Each record's first label is ignored, so no position predicts across a record boundary: the same
        predictions as the padded batch.
        """
        if packed:
            labels_of = [[IGNORE_INDEX, *e.labels[1:]] if e.labels else [] for e in items]
            out = {
                f"{prefix}input_ids": torch.tensor([[t for e in items for t in e.input_ids]]),
                f"{prefix}position_ids": torch.tensor([[p for e in items for p in range(len(e.input_ids))]]),
                f"{prefix}labels": torch.tensor([[t for labels in labels_of for t in labels]]),
            }
        else:
            width = max(len(e.input_ids) for e in items)
            ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
            labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(items), width), dtype=torch.long)
            for i, e in enumerate(items):
                n = len(e.input_ids)
                ids[i, :n] = torch.tensor(e.input_ids)
                labels[i, :n] = torch.tensor(e.labels)
                mask[i, :n] = 1
            out = {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask, f"{prefix}labels": labels}
        images = [e.image for e in items if e.image is not None]
        if images:
            out[f"{prefix}pixel_values"] = self.pixel_values(images)
        return out


class SupervisedCollator:
    """Batches LLaVA-format records for the student (and the teacher, if its encoder is given)."""

    def __init__(self, student: ConversationEncoder, image_root: str | Path | None,
                 teacher: ConversationEncoder | None = None, with_ids: bool = False, packed: bool = False) -> None:
        self.student = student
        self.teacher = teacher
        self.with_ids = with_ids
        """Also return ``record_ids`` (a list of str): a teacher cache looks its targets up by record id."""
        self.packed = packed
        """One padding-free row per batch for each model (``ConversationEncoder.batch``)."""
        self.image_root = Path(image_root) if image_root is not None else None

    def load_image(self, record: dict[str, Any]) -> Image.Image | None:
        if record.get("image") is None and record.get("image_bytes") is None:
            return None
        try:
            return open_image(self.image_root, record.get("image"), record.get("image_bytes"))
        except Exception as err:
            raise DataError(f"record {record.get('id')}: cannot read image {record.get('image')!r}: {err}") from err

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [self.load_image(r) for r in records]
        batch = self.student.batch([self.student.encode(r, im) for r, im in zip(records, images)], packed=self.packed)
        if self.teacher is not None:
            teacher_items = [self.teacher.encode(r, im) for r, im in zip(records, images)]
            batch.update(self.teacher.batch(teacher_items, prefix="teacher_", packed=self.packed))
        if self.with_ids:
            batch["record_ids"] = [str(r["id"]) for r in records]
        return batch
