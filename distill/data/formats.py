"""Loaders for the public formats, into ``datasets.Dataset``, with every record checked up front.

- LLaVA conversation JSON: a JSON list of ``{"id", "image", "conversations": [{"from": "human", "value":
  "<image>\\n..."}, {"from": "gpt", "value": ...}, ...]}`` plus an image folder; ``image`` may be a list (one
  ``<image>`` per image, in the human turns, as LLaVA-OneVision's data); text-only records (no ``image``) are
  allowed.
- RLAIF-V preference pairs, parquet or JSON: ``question``, ``chosen``, ``rejected`` and ``image`` (a path in
  the image folder, or the HF ``{"bytes": ..., "path": ...}`` struct).

A bad record raises ``DataError`` naming the file and the record id, or, with ``on_bad_record="skip"``, is
skipped and counted in the returned ``LoadStats`` (and logged). Nothing is dropped silently.

    ds, stats = load_llava_json("data/instruct.json", image_root="data/images", on_bad_record="skip")
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
ON_BAD_RECORD = ("error", "skip")


class DataError(ValueError):
    """A record that cannot be trained on; the message names the file and the record."""


@dataclass
class LoadStats:
    path: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "total": self.total, "kept": self.kept, "skipped": dict(self.skipped)}


def resolve_image(image_root: Path, rel: str) -> Path:
    """The image's path under the image folder. Refused: absolute paths and paths that climb out of the folder
    (``..``): the threat is a record's path string. Links the user placed inside the folder are followed wherever
    they point (``images/coco -> /datasets/coco``, shared storage): they are the folder's own layout."""
    if not isinstance(rel, str) or not rel:
        raise DataError(f"image path {rel!r} is not a relative path")
    if os.path.isabs(rel) or rel.startswith("~"):
        raise DataError(f"image path {rel!r} is absolute: paths are relative to the image folder {image_root}")
    norm = os.path.normpath(rel)
    if norm == ".." or norm.startswith("../"):
        raise DataError(f"image path {rel!r} points outside the image folder {image_root}")
    return image_root / norm


def open_image(image_root: Path | None, image: str | None, image_bytes: bytes | None = None) -> Image.Image:
    """Open a record's image as RGB, from bytes or from a path inside ``image_root``."""
    if image_bytes is not None:
        return Image.open(io.BytesIO(image_bytes)).convert("RGB")
    if image_root is None:
        raise DataError(f"record has image {image!r} but no image folder is configured")
    return Image.open(resolve_image(image_root, image)).convert("RGB")


class ImageFolder:
    """An image folder listed once, so that checking tens of thousands of records costs a set lookup each.

    A record's path found in the listing (a plain file reached without links) is known to exist; any other path
    (through links, with ``./`` or ``..``, files added after the listing) takes ``resolve_image``'s check and a
    stat, so the answer is the same, only faster.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.real = root.resolve()
        self.files = set(_plain_files(self.real)) if self.real.is_dir() else set()

    def path(self, rel: str) -> Path:
        if rel in self.files:
            return self.real / rel
        return resolve_image(self.root, rel)


def _plain_files(folder: Path | str, prefix: str = "") -> Iterator[str]:
    try:
        entries = os.scandir(folder)
    except OSError:  # unreadable or gone: its records take the full check and fail (or are skipped) one by one
        return
    with entries:
        for entry in entries:
            if entry.is_symlink():
                continue
            if entry.is_dir():
                yield from _plain_files(entry.path, f"{prefix}{entry.name}/")
            elif entry.is_file():
                yield prefix + entry.name


def _check_image(folder: ImageFolder | None, image: str | None, image_bytes: bytes | None, verify: bool) -> None:
    try:
        if image_bytes is not None:
            if verify:
                Image.open(io.BytesIO(image_bytes)).verify()
            return
        if folder is None:
            raise DataError("an image is given but no image folder is configured")
        path = folder.path(image)
        if not path.is_file():
            raise DataError(f"image {image!r} not found under {folder.root}")
        if verify:
            with Image.open(path) as im:
                im.verify()
    except DataError:
        raise
    except Exception as err:  # PIL raises several types for unreadable files
        raise DataError(f"image {image!r} is unreadable: {err}") from err


def check_conversation(conversations: Any, n_images: int) -> None:
    """Roles alternate human/gpt starting with human, replies are non-empty, one ``<image>`` per image, in the
    human turns (LLaVA's single-image records have it in the first one; multi-image records anywhere)."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError("'conversations' must be a non-empty list")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise DataError(f"turn {i} must be an object with a string 'value'")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise DataError(f"turn {i} is from {turn.get('from')!r}, expected {expected!r} (roles out of order)")
        if expected == "gpt" and not turn["value"].strip():
            raise DataError(f"turn {i} has an empty response")
    if len(conversations) % 2:
        raise DataError("the conversation ends with a human turn (no response to train on)")
    counts = [t["value"].count(IMAGE_PLACEHOLDER) for t in conversations]
    if any(counts[1::2]):
        raise DataError(f"{IMAGE_PLACEHOLDER} inside a response")
    if sum(counts) != n_images:
        raise DataError(f"{IMAGE_PLACEHOLDER} placeholders do not match the images: {sum(counts)} placeholders, "
                        f"{n_images} images")


def image_list(image: Any) -> list[str]:
    """A record's ``image`` field as a list of relative paths (LLaVA JSON: a string, a list, or absent)."""
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    if isinstance(image, list) and all(isinstance(x, str) for x in image):
        return list(image)
    raise DataError("'image' must be a relative path string or a list of them")


def record_images(record: dict[str, Any]) -> list[tuple[str | None, bytes | None]]:
    """``(path, bytes)`` of each image of a loaded record, in order: the ``images`` column of LLaVA JSON, or the
    ``image`` / ``image_bytes`` of a preference pair or a hand-made record."""
    if record.get("images") is not None:
        return [(path, None) for path in record["images"]]
    if record.get("image_bytes") is not None:
        return [(record.get("image"), record["image_bytes"])]
    return [(path, None) for path in image_list(record.get("image"))]


def _validate_records(
    records: list[dict[str, Any]],
    path: Path,
    check: Any,
    on_bad_record: str,
) -> tuple[list[dict[str, Any]], LoadStats]:
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"data.on_bad_record={on_bad_record!r}: expected one of {ON_BAD_RECORD}")
    stats = LoadStats(path=str(path), total=len(records))
    kept = []
    for idx, record in enumerate(records):
        rid = record.get("id", f"#{idx}") if isinstance(record, dict) else f"#{idx}"
        try:
            if not isinstance(record, dict):
                raise DataError("record is not an object")
            kept.append(check(record))
        except DataError as err:
            if on_bad_record == "error":
                raise DataError(f"{path}: record {rid}: {err}") from None
            reason = str(err).split(":")[0]
            stats.skipped[reason] += 1
            log.warning("%s: record %s skipped: %s", path, rid, err)
    stats.kept = len(kept)
    if stats.skipped:
        log.warning("%s: skipped %d of %d records: %s", path, sum(stats.skipped.values()), stats.total,
                    dict(stats.skipped))
    if not kept:
        raise DataError(f"{path}: no usable records ({stats.total} read)")
    return kept, stats


def load_llava_json(
    path: str | Path,
    image_root: str | Path | None = None,
    on_bad_record: str = "error",
    verify_images: bool = True,
    limit: int | None = None,
) -> tuple[Dataset, LoadStats]:
    """Read LLaVA conversation JSON (or JSONL) into a Dataset with columns id, images (a list of paths, empty for
    text-only records), conversations."""
    path = Path(path)
    records = _read_json_records(path)
    if limit is not None:
        records = records[:limit]
    folder = ImageFolder(Path(image_root)) if image_root is not None else None

    def check(record: dict[str, Any]) -> dict[str, Any]:
        images = image_list(record.get("image"))
        check_conversation(record.get("conversations"), n_images=len(images))
        for image in images:
            _check_image(folder, image, None, verify_images)
        return {
            "id": str(record.get("id", "")),
            "images": images,
            "conversations": [{"from": t["from"], "value": t["value"]} for t in record["conversations"]],
        }

    kept, stats = _validate_records(records, path, check, on_bad_record)
    return Dataset.from_list(kept), stats


def load_preference(
    path: str | Path,
    image_root: str | Path | None = None,
    on_bad_record: str = "error",
    verify_images: bool = True,
    limit: int | None = None,
) -> tuple[Dataset, LoadStats]:
    """Read RLAIF-V-style pairs (parquet, JSON or JSONL) into id, image, image_bytes, question, chosen, rejected."""
    path = Path(path)
    if path.suffix == ".parquet":
        records = Dataset.from_parquet(str(path)).to_list()
    else:
        records = _read_json_records(path)
    if limit is not None:
        records = records[:limit]
    folder = ImageFolder(Path(image_root)) if image_root is not None else None

    def check(record: dict[str, Any]) -> dict[str, Any]:
        for key in ("question", "chosen", "rejected"):
            if not isinstance(record.get(key), str) or not record[key].strip():
                raise DataError(f"'{key}' is missing or empty")
        if record["chosen"].strip() == record["rejected"].strip():
            raise DataError("'chosen' and 'rejected' are identical")
        if IMAGE_PLACEHOLDER in record["chosen"] or IMAGE_PLACEHOLDER in record["rejected"]:
            raise DataError(f"{IMAGE_PLACEHOLDER} inside a response")
        image, image_bytes = record.get("image"), None
        if isinstance(image, dict):  # the HF Image feature as stored in parquet
            image_bytes, image = image.get("bytes"), image.get("path")
            if image_bytes is None and image is None:
                raise DataError("'image' struct has neither bytes nor path")
        elif isinstance(image, bytes):
            image_bytes, image = image, None
        if image is None and image_bytes is None and record.get("image_path"):
            image = record["image_path"]
        if image is not None or image_bytes is not None:
            _check_image(folder, image, image_bytes, verify_images)
        question = record["question"].replace(IMAGE_PLACEHOLDER, "").strip()
        return {
            "id": str(record.get("id", record.get("idx", ""))),
            "image": image if image_bytes is None else None,
            "image_bytes": image_bytes,
            "question": question,
            "chosen": record["chosen"].strip(),
            "rejected": record["rejected"].strip(),
        }

    kept, stats = _validate_records(records, path, check, on_bad_record)
    return Dataset.from_list(kept), stats


def _read_json_records(path: Path) -> list[Any]:
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return data
