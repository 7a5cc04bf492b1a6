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

import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from stat import S_ISREG
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Dataset, concatenate_datasets
from datasets.table import InMemoryTable
from filelock import FileLock
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
ON_BAD_RECORD = ("error", "skip")
PART_BYTES = 64 << 20  # a JSON list this large (per worker process) is read in parallel parts
MAX_LOAD_WORKERS = 8
CACHE_FORMAT = 1  # bump when the cached columns or the checks change
BATCH_ROWS = 8192  # records per Arrow record batch
READ_CHARS = 1 << 22  # characters read from a JSON list at a time
MAX_EXAMPLES = 20  # skipped records named in the stats


class DataError(ValueError):
    """A record that cannot be trained on; the message names the file and the record."""


@dataclass
class LoadStats:
    path: str
    total: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    """The first skipped records, ``"<id>: <reason>"``."""
    cached: bool = False
    """Read from the cache folder (checked by an earlier load)."""

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "total": self.total, "kept": self.kept, "skipped": dict(self.skipped),
                "examples": self.examples}


def resolve_image(image_root: Path, rel: str) -> Path:
    """The image's path under the image folder. Refused: absolute paths and paths that climb out of the folder
    (``..``): the threat is a record's path string. Links the user placed inside the folder are followed wherever
    they point (``images/coco -> /datasets/coco``, shared storage): they are the folder's own layout."""
    if not isinstance(rel, str) or not rel:
        raise DataError(f"image path {rel!r} is not a relative path")
    if os.path.isabs(rel) or rel.startswith("~"):
        raise DataError(f"image path {rel!r} is absolute: paths are relative to the image folder {image_root}")
    clean = not rel.startswith(".") and "/." not in rel and "//" not in rel
    norm = rel if clean else os.path.normpath(rel)  # (most paths have nothing to normalise: a faster check)
    if norm == ".." or norm.startswith("../"):
        raise DataError(f"image path {rel!r} points outside the image folder {image_root}")
    return Path(os.path.join(image_root, norm))


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


def _verify_image(image: str | None, image_bytes: bytes | None = None, path: Path | None = None
                  ) -> tuple[int, int]:
    """Decode the image's header and check its structure (catches truncated and non-image files); its size."""
    try:
        with Image.open(io.BytesIO(image_bytes) if image_bytes is not None else path) as im:
            im.verify()
            return im.size
    except Exception as err:  # PIL raises several types for unreadable files
        raise DataError(f"image {image!r} is unreadable: {err}") from err


def check_conversation(conversations: Any, n_images: int) -> None:
    """Roles alternate human/gpt starting with human, replies are non-empty, one ``<image>`` per image, in the
    human turns (LLaVA's single-image records have it in the first one; multi-image records anywhere)."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError("'conversations' must be a non-empty list")
    placeholders = 0
    for i, turn in enumerate(conversations):  # one pass: this runs once per record of files of 10^6 records
        value = turn.get("value") if isinstance(turn, dict) else None
        if not isinstance(value, str):
            raise DataError(f"turn {i} must be an object with a string 'value'")
        expected = "gpt" if i & 1 else "human"
        if turn.get("from") != expected:
            raise DataError(f"turn {i} is from {turn.get('from')!r}, expected {expected!r} (roles out of order)")
        if i & 1:
            if not value.strip():
                raise DataError(f"turn {i} has an empty response")
            if IMAGE_PLACEHOLDER in value:
                raise DataError(f"{IMAGE_PLACEHOLDER} inside a response")
        else:
            placeholders += value.count(IMAGE_PLACEHOLDER)
    if len(conversations) % 2:
        raise DataError("the conversation ends with a human turn (no response to train on)")
    if placeholders != n_images:
        raise DataError(f"{IMAGE_PLACEHOLDER} placeholders do not match the images: {placeholders} placeholders, "
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


def image_store(cache_dir: Path, root: Path) -> Path:
    """The file remembering an image folder's checked files: ``{path: [bytes, mtime_ns, width, height]}``."""
    return Path(cache_dir) / f"images-{hashlib.sha256(str(Path(root).resolve()).encode()).hexdigest()[:16]}.json"


def read_image_store(store: Path) -> dict[str, list[int]]:
    try:
        return json.loads(store.read_text()) if store.is_file() else {}
    except (OSError, ValueError):  # a damaged cache is only a slower load
        return {}


class ImageChecks:
    """Each unique image file checked once: within a load (records sharing an image cost a dict lookup) and, with a
    cache folder, across loads (a verified file is remembered by its path, size and modification time, so a changed
    data file or another file naming the same images does not open them again)."""

    def __init__(self, root: Path | None, verify: bool, cache_dir: Path | None) -> None:
        self.root, self.verify = root, verify
        self.folder = ImageFolder(root) if root is not None and not verify else None  # verify stats each file
        self.results: dict[str, str | None] = {}
        self.store = None
        self.known: dict[str, list[int]] = {}
        self.added: dict[str, list[int]] = {}
        if cache_dir is not None and root is not None and verify:
            self.store = image_store(cache_dir, root)
            self.known = read_image_store(self.store)

    def check(self, image: str) -> None:
        if image not in self.results:
            try:
                self._check(image)
                self.results[image] = None
            except DataError as err:
                self.results[image] = str(err)
        if self.results[image] is not None:
            raise DataError(self.results[image])

    def _check(self, image: str) -> None:
        if self.root is None:
            raise DataError("an image is given but no image folder is configured")
        if self.folder is not None:  # no decoding: the folder's listing answers most paths
            if image not in self.folder.files and not self.folder.path(image).is_file():
                raise DataError(f"image {image!r} not found under {self.root}")
            return
        path = resolve_image(self.root, image)
        try:
            stat = os.stat(path)
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            raise DataError(f"image {image!r} not found under {self.root}")
        key = [stat.st_size, stat.st_mtime_ns]
        if self.known.get(image, [])[:2] != key:
            self.added[image] = key + list(_verify_image(image, path=path))

    def save(self) -> None:
        """Add this load's newly verified files to the cache (merged with what other processes wrote meanwhile)."""
        if self.store is None or not self.added:
            return
        with FileLock(str(self.store) + ".lock"):
            known = read_image_store(self.store)
            known.update(self.added)
            tmp = self.store.with_name(f"{self.store.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(known, separators=(",", ":")))
            os.replace(tmp, self.store)


def _check_records(
    path: Path,
    records: Iterator[Any],
    check: Callable[[dict[str, Any]], dict[str, Any]],
    schema: pa.Schema,
    on_bad_record: str,
    write: Callable[[pa.RecordBatch], None],
    where: str = "",
) -> LoadStats:
    """Check ``records`` one by one into Arrow record batches handed to ``write`` as they fill (a few MB of Python
    objects alive at a time). ``where`` names the part of the file in a record without an id."""
    stats = LoadStats(path=str(path))
    rows = []
    idx = -1
    for idx, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise DataError("record is not an object")
            rows.append(check(record))
        except DataError as err:
            rid = record.get("id", f"#{idx}{where}") if isinstance(record, dict) else f"#{idx}{where}"
            if on_bad_record == "error":
                raise DataError(f"{path}: record {rid}: {err}") from None
            stats.skipped[str(err).split(":")[0]] += 1
            if len(stats.examples) < MAX_EXAMPLES:
                stats.examples.append(f"{rid}: {err}")
            log.warning("%s: record %s skipped: %s", path, rid, err)
        if len(rows) == BATCH_ROWS:
            write(pa.RecordBatch.from_pylist(rows, schema=schema))
            stats.kept, rows = stats.kept + len(rows), []
    if rows:
        write(pa.RecordBatch.from_pylist(rows, schema=schema))
        stats.kept += len(rows)
    stats.total = idx + 1
    return stats


def _log_skips(stats: LoadStats) -> None:
    if stats.skipped:
        log.warning("%s: skipped %d of %d records: %s", stats.path, sum(stats.skipped.values()), stats.total,
                    dict(stats.skipped))


@dataclass(frozen=True)
class _Job:
    """One loader run over a file, or over one part of it (picklable: the parts run in worker processes)."""

    kind: str  # "llava" | "preference"
    path: Path
    image_root: Path | None
    on_bad_record: str
    verify_images: bool
    limit: int | None
    cache_dir: Path | None

    def read(self, write: Callable[[pa.RecordBatch], None], part: tuple[int, int, bool] | None = None) -> LoadStats:
        images = ImageChecks(self.image_root, self.verify_images, self.cache_dir)
        check = _llava_check(images) if self.kind == "llava" else _preference_check(images, self.verify_images)
        if part is not None:
            records, where = _iter_json_part(self.path, *part), f" after byte {part[0]}"
        elif self.path.suffix == ".parquet":
            records, where = _iter_parquet_records(self.path), ""
        else:
            records, where = _iter_json_records(self.path), ""
        stats = _check_records(self.path, islice(records, self.limit), check, SCHEMAS[self.kind],
                               self.on_bad_record, write, where)
        images.save()
        return stats

    def read_to_file(self, part: tuple[int, int, bool], out: str) -> dict[str, Any]:
        """Worker entry: one part into its own Arrow file; a refused record comes back as the error's text."""
        try:
            with pa.OSFile(out, "wb") as sink, pa.ipc.new_stream(sink, SCHEMAS[self.kind]) as writer:
                return {"stats": self.read(writer.write_batch, part).as_dict()}
        except DataError as err:
            return {"error": str(err)}


def _run(job: _Job, settings: dict[str, Any]) -> tuple[Dataset, LoadStats]:
    """The checked records of ``job.path`` as a Dataset: from the cache folder when this file (path, size,
    modification time) was read with the same ``settings`` before, else read, checked and written there once, a
    large JSON list in parallel parts (``_parts``). Processes that ask at the same time (a multi-GPU launch) wait
    for the first to finish and then memory-map its files: the data is parsed and checked once, the pages shared."""
    if job.on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"data.on_bad_record={job.on_bad_record!r}: expected one of {ON_BAD_RECORD}")
    if not job.path.is_file():
        raise FileNotFoundError(f"data file not found: {job.path}")
    if job.cache_dir is None:
        batches = []
        stats = job.read(batches.append)
        return _finish(Dataset(InMemoryTable(pa.Table.from_batches(batches, schema=SCHEMAS[job.kind]))), stats)
    job.cache_dir.mkdir(parents=True, exist_ok=True)
    stat = job.path.stat()
    key = json.dumps({"format": CACHE_FORMAT, "path": str(job.path.resolve()), "size": stat.st_size,
                      "mtime_ns": stat.st_mtime_ns, **settings}, sort_keys=True)
    entry = job.cache_dir / f"{job.path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    with FileLock(str(entry) + ".lock"):
        if (entry / "stats.json").is_file():
            saved = json.loads((entry / "stats.json").read_text())
            stats = LoadStats(path=str(job.path), total=saved["total"], kept=saved["kept"],
                              skipped=Counter(saved["skipped"]), examples=saved["examples"], cached=True)
            log.info("%s: %d records, checked before (%s)", job.path, stats.kept, entry)
            return _finish(_open_files(entry, saved["files"]), stats)
        tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            parts = _parts(job.path) if job.limit is None and job.kind == "llava" else None
            files = [f"data-{i:05d}.arrow" for i in range(len(parts) if parts else 1)]
            stats = _read_parallel(job, parts, [str(tmp / f) for f in files]) if parts else None
            if stats is None:  # small file, or a part boundary that was not one: read in one pass
                files = files[:1]
                with pa.OSFile(str(tmp / files[0]), "wb") as sink, \
                        pa.ipc.new_stream(sink, SCHEMAS[job.kind]) as writer:
                    stats = job.read(writer.write_batch)
            if stats.kept:
                (tmp / "stats.json").write_text(json.dumps({**stats.as_dict(), "files": files,
                                                            "key": json.loads(key)}, indent=1))
                shutil.rmtree(entry, ignore_errors=True)
                os.replace(tmp, entry)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("%s: %d records checked, kept in %s", job.path, stats.kept, entry)
        return _finish(_open_files(entry, files) if stats.kept else None, stats)


def _finish(dataset: Dataset | None, stats: LoadStats) -> tuple[Dataset, LoadStats]:
    _log_skips(stats)
    if not stats.kept:
        raise DataError(f"{stats.path}: no usable records ({stats.total} read)")
    return dataset, stats


def _open_files(entry: Path, files: list[str]) -> Dataset:
    parts = [Dataset.from_file(str(entry / f)) for f in files]
    parts = [p for p in parts if len(p)] or parts[:1]
    return concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def _read_parallel(job: _Job, parts: list[tuple[int, int, bool]], outs: list[str]) -> LoadStats | None:
    """The parts in worker processes; None when a part did not parse (its start was not a record boundary)."""
    ctx = multiprocessing.get_context("spawn")  # the caller may hold threads (torch): no fork
    with ctx.Pool(len(parts)) as pool:
        results = pool.starmap(job.read_to_file, list(zip(parts, outs)))
    errors = [result["error"] for result in results if "error" in result]
    unparsed = [e for e in errors if "is not valid JSON" in e or "expected ',' or ']'" in e]
    if unparsed:  # a part that did not start at a record, or a broken file: the one-pass read tells which
        log.info("%s: a part did not parse (%s); reading the file in one pass", job.path, unparsed[0])
        return None
    if errors:
        raise DataError(errors[0])  # the first refused record in file order (each part stopped at its first)
    stats = LoadStats(path=str(job.path))
    for result in results:
        part = result["stats"]
        stats.total += part["total"]
        stats.kept += part["kept"]
        stats.skipped.update(part["skipped"])
        stats.examples += part["examples"][: MAX_EXAMPLES - len(stats.examples)]
    return stats


def _parts(path: Path) -> list[tuple[int, int, bool]] | None:
    """Byte ranges ``(start, end, last)`` of a large JSON list of LLaVA records, one per worker, each starting at a
    record: after each even split point, the first ``}, {`` followed by an object with ``conversations`` (not a
    turn of a record's own list). A part that does not start at a record leaves the part before it ending inside
    a record, which then fails to parse, and the file is read in one pass: a wrong guess costs time, not data."""
    size = path.stat().st_size
    workers = min(MAX_LOAD_WORKERS, len(os.sched_getaffinity(0)), size // PART_BYTES)
    if path.suffix != ".json" or workers < 2:
        return None
    decoder = json.JSONDecoder()
    with path.open("rb") as f:
        first = re.match(rb"\s*\[\s*", f.read(4096))
        if first is None:
            return None
        starts = [first.end()]
        for k in range(1, workers):
            f.seek(size * k // workers)
            window = f.read(1 << 20)
            for found in re.finditer(rb"\}\s*,\s*(\{)", window):
                try:
                    value, _ = decoder.raw_decode(window[found.start(1):].decode("utf-8", errors="ignore"))
                except json.JSONDecodeError:
                    continue
                if isinstance(value, dict) and "conversations" in value:
                    starts.append(size * k // workers + found.start(1))
                    break
            else:
                return None
    if sorted(set(starts)) != starts:
        return None
    ends = starts[1:] + [size]
    return [(a, b, b == size) for a, b in zip(starts, ends)]


def _llava_check(images: ImageChecks) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def check(record: dict[str, Any]) -> dict[str, Any]:
        paths = image_list(record.get("image"))
        conversations = record.get("conversations")
        check_conversation(conversations, n_images=len(paths))
        for image in paths:
            images.check(image)
        # The turns go to Arrow as they are: its struct type keeps "from" and "value" and drops other keys.
        return {"id": str(record.get("id", "")), "images": paths, "conversations": conversations}

    return check


def _preference_check(images: ImageChecks, verify_images: bool) -> Callable[[dict[str, Any]], dict[str, Any]]:
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
        if image_bytes is not None:
            if verify_images:
                _verify_image(image, image_bytes)
        elif image is not None:
            images.check(image)
        return {
            "id": str(record.get("id", record.get("idx", ""))),
            "image": image if image_bytes is None else None,
            "image_bytes": image_bytes,
            "question": record["question"].replace(IMAGE_PLACEHOLDER, "").strip(),
            "chosen": record["chosen"].strip(),
            "rejected": record["rejected"].strip(),
        }

    return check


LLAVA_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("images", pa.list_(pa.string())),
    ("conversations", pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))),
])
PREFERENCE_SCHEMA = pa.schema([
    ("id", pa.string()), ("image", pa.string()), ("image_bytes", pa.binary()), ("question", pa.string()),
    ("chosen", pa.string()), ("rejected", pa.string()),
])
SCHEMAS = {"llava": LLAVA_SCHEMA, "preference": PREFERENCE_SCHEMA}


def _job(kind: str, path: str | Path, image_root: str | Path | None, on_bad_record: str, verify_images: bool,
         limit: int | None, cache_dir: str | Path | None) -> tuple[Dataset, LoadStats]:
    root = Path(image_root) if image_root is not None else None
    job = _Job(kind, Path(path), root, on_bad_record, verify_images, limit,
               Path(cache_dir) if cache_dir is not None else None)
    settings = {"loader": kind, "image_root": str(root.resolve()) if root else None,
                "on_bad_record": on_bad_record, "verify_images": verify_images, "limit": limit}
    return _run(job, settings)


def load_llava_json(
    path: str | Path,
    image_root: str | Path | None = None,
    on_bad_record: str = "error",
    verify_images: bool = True,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Dataset, LoadStats]:
    """Read LLaVA conversation JSON (or JSONL) into a Dataset with columns id, images (a list of paths, empty for
    text-only records), conversations. The file is read as a stream (memory grows with one batch of records, not
    with the file); with ``cache_dir`` the result is an Arrow file there, memory-mapped, reused while the file and
    the settings are unchanged, and a large file is read in parallel parts, one per CPU (up to 8)."""
    return _job("llava", path, image_root, on_bad_record, verify_images, limit, cache_dir)


def load_preference(
    path: str | Path,
    image_root: str | Path | None = None,
    on_bad_record: str = "error",
    verify_images: bool = True,
    limit: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Dataset, LoadStats]:
    """Read RLAIF-V-style pairs (parquet, JSON or JSONL) into id, image, image_bytes, question, chosen, rejected;
    streamed and cached as ``load_llava_json``."""
    return _job("preference", path, image_root, on_bad_record, verify_images, limit, cache_dir)


def _iter_parquet_records(path: Path) -> Iterator[dict[str, Any]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS):
        yield from batch.to_pylist()


_SPACE = re.compile(r"\s*")
_SEPARATOR = re.compile(r"\s*([,\]])\s*")


def _iter_json_records(path: Path) -> Iterator[Any]:
    """The records of a JSON list (or JSONL) file, decoded one at a time from a sliding text buffer."""
    with path.open(encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            for line_no, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{path}: line {line_no} is not valid JSON: {err}") from None
            return
        yield from _iter_list(f, path, inside=False, last=True)


def _iter_json_part(path: Path, start: int, end: int, last: bool) -> Iterator[Any]:
    """The records of bytes ``[start, end)`` of a JSON list: ``start`` at a record, ``end`` after the ``,`` that
    follows the part's last record (or the file's end)."""
    with path.open("rb") as raw:
        raw.seek(start)
        window = io.BufferedReader(_Window(raw, end - start), buffer_size=1 << 20)
        with io.TextIOWrapper(window, encoding="utf-8") as f:
            yield from _iter_list(f, path, inside=True, last=last)


class _Window(io.RawIOBase):
    """The next ``size`` bytes of an open file."""

    def __init__(self, raw: Any, size: int) -> None:
        self.raw, self.left = raw, size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self.raw.readinto(memoryview(buffer)[: min(len(buffer), self.left)]) if self.left else 0
        self.left -= n
        return n


def _iter_list(f: Any, path: Path, inside: bool, last: bool) -> Iterator[Any]:
    """Records decoded one at a time from a sliding buffer over ``f``: a whole JSON list, or (``inside``) a run of
    its records from one record's start, ending after a ``,`` (or with the list's ``]`` if ``last``)."""
    decoder = json.JSONDecoder()
    buf, pos, eof, n = "", 0, False, 0

    def fill() -> None:  # drop what was read, append the next chunk
        nonlocal buf, pos, eof
        chunk = f.read(READ_CHARS)
        eof = not chunk
        buf, pos = buf[pos:] + chunk, 0

    def skip_space() -> str:  # the next non-space character ("" at the end of the file)
        nonlocal pos
        while True:
            pos = _SPACE.match(buf, pos).end()
            if pos < len(buf) or eof:
                return buf[pos:pos + 1]
            fill()

    if not inside:
        if skip_space() != "[":
            raise DataError(f"{path}: expected a JSON list of records")
        pos += 1
        if skip_space() == "]":
            pos += 1
            if skip_space():
                raise DataError(f"{path}: text after the end of the JSON list")
            return
    while True:
        if not skip_space() and inside and not last and n:
            return  # a part ends after its last record's comma
        try:
            record, end = decoder.raw_decode(buf, pos)
            complete = end < len(buf) or eof  # a value touching the buffer's end may continue past it
        except json.JSONDecodeError as err:
            if eof:
                raise DataError(f"{path}: record #{n} is not valid JSON: {err.msg}: "
                                f"{buf[err.pos:err.pos + 40]!r}") from None
            complete = False
        if not complete:
            fill()
            continue
        n += 1
        yield record
        separator = _SEPARATOR.match(buf, end)  # (the common case, in one step)
        if separator and separator.end() < len(buf):
            pos = separator.end()
            if separator.group(1) == ",":
                continue
        pos = end
        sep = skip_space()
        if sep == "]" and last:
            pos += 1
            if skip_space():
                raise DataError(f"{path}: text after the end of the JSON list")
            return
        if sep != ",":
            raise DataError(f"{path}: not valid JSON: expected ',' or ']' after record #{n - 1}")
        pos += 1
