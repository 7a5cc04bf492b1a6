"""Evaluation benchmarks from local files, read into one item form, with every record checked before generation.

Items: ``{"question_id", "image", "question", "answer" (str or list of str), "question_type"}``; POPE items carry
``"label"`` ("yes"/"no") instead of ``answer`` and ``question_type``. ``question`` is the prompt sent to the model.

Formats (``format`` of a benchmark):

- ``vqa``: this project's JSONL, ``{"question_id", "image", "question", "answer", "question_type"}`` (``image``
  and ``question_type`` optional).
- ``pope``: the public POPE JSONL, ``{"question_id", "image", "text", "label"}`` (COCO val2014 file names for
  the official files; ``image_root`` is then the COCO image folder).
- ``gqa``: LLaVA's GQA questions JSONL (``question_id``, ``image``, ``text``, optional ``category``) plus GQA's
  answers file, e.g. ``testdev_balanced_questions.json`` (qid -> ``{"answer", "types": {"structural", "semantic",
  "detailed"}}``). ``question_type`` is ``types.structural`` (verify, query, choose, logical, compare: GQA's own
  breakdown, few enough to be table columns), else ``types.detailed``, else ``types.semantic``, else ``all``.
- ``textvqa``: LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` (``question_id``, ``image``, ``text``) plus
  ``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "answers": [10 strings], ...}]}``); ``question_type`` is
  ``all``. LLaVA's ``text`` already holds the prompt as LLaVA evaluates it: the question, a ``Reference OCR token:
  ...`` line, and ``Answer the question using a single word or phrase.``; it is sent unchanged. The 10 human
  answers are scored ``min(matches / 3, 1)`` (see ``eval.metrics.vqa_accuracy``).

A bad record (a missing field, a question id absent from the answers file, an image not found under
``image_root``) raises ``DataError`` naming the file and the record.

    bench = Benchmark.from_spec("gqa", {"format": "gqa", "questions": "gqa/llava_gqa_testdev_balanced.jsonl",
                                        "answers": "gqa/testdev_balanced_questions.json", "image_root": "gqa/images"},
                                data_dir="/data/eval", image_root="/data/eval/images")
    items = bench.load(limit=100)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import paths as fs
from distill.data.formats import DataError, resolve_image

Item = dict[str, Any]


def read_jsonl(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first ``limit`` records of a JSONL file (all when None); each must be a JSON object."""
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if limit is not None and len(rows) >= limit:
            break
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {n}: not valid JSON: {err}") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}: line {n}: not a JSON object")
        rows.append(row)
    return rows


def _get(row: dict[str, Any], key: str, path: Path, idx: int, kind: type | tuple[type, ...] = str) -> Any:
    if not isinstance(row.get(key), kind):
        rid = row.get("question_id", f"#{idx}")
        raise DataError(f"{path}: record {rid}: '{key}' is missing or of the wrong type")
    return row[key]


def _questions(path: Path, limit: int | None, text_key: str) -> list[tuple[Item, dict[str, Any]]]:
    """``(item, raw record)`` pairs; the item holds ``question_id``, ``image`` (optional) and ``question``, read
    from the record's ``text_key``."""
    out = []
    for i, row in enumerate(read_jsonl(path, limit)):
        image = row.get("image")
        if image is not None and not isinstance(image, str):
            raise DataError(f"{path}: record {row.get('question_id', f'#{i}')}: 'image' is not a path string")
        item = {"question_id": _get(row, "question_id", path, i, (str, int)), "image": image,
                "question": _get(row, text_key, path, i)}
        out.append((item, row))
    return out


def _is_answer(answer: Any) -> bool:
    return isinstance(answer, str) or (isinstance(answer, list) and bool(answer)
                                       and all(isinstance(a, str) for a in answer))


def read_vqa(path: Path, limit: int | None = None) -> list[Item]:
    items = []
    for item, row in _questions(path, limit, "question"):
        if not _is_answer(row.get("answer")):
            raise DataError(f"{path}: record {item['question_id']}: 'answer' must be a string or a list of strings")
        items.append({**item, "answer": row["answer"], "question_type": str(row.get("question_type", "all"))})
    return items


def read_pope(path: Path, limit: int | None = None) -> list[Item]:
    items = []
    for item, row in _questions(path, limit, "text"):
        label = row.get("label")
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise DataError(f"{path}: record {item['question_id']}: label {label!r} is neither 'yes' nor 'no'")
        items.append({**item, "label": label.strip().lower()})
    return items


def _load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None


def _answer_for(answers: dict[str, Any], item: Item, questions: Path, answers_path: Path) -> Any:
    qid = str(item["question_id"])
    if qid not in answers:
        raise DataError(f"{questions}: record {qid}: question id not found in the answers file {answers_path}")
    return answers[qid]


def read_gqa(questions: Path, answers: Path, limit: int | None = None) -> list[Item]:
    table = _load_json(answers)
    if not isinstance(table, dict):
        raise DataError(f"{answers}: expected GQA's object of question id -> question")
    items = []
    for item, _ in _questions(questions, limit, "text"):
        entry = _answer_for(table, item, questions, answers)
        if not isinstance(entry, dict) or not isinstance(entry.get("answer"), str):
            raise DataError(f"{answers}: question {item['question_id']}: no string 'answer'")
        types = entry.get("types") or {}
        qtype = types.get("structural") or types.get("detailed") or types.get("semantic") or "all"
        items.append({**item, "answer": entry["answer"], "question_type": str(qtype)})
    return items


def read_textvqa(questions: Path, answers: Path, limit: int | None = None) -> list[Item]:
    data = _load_json(answers)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{answers}: expected TextVQA's {{'data': [...]}}")
    table = {str(r.get("question_id")): r.get("answers") for r in data["data"] if isinstance(r, dict)}
    items = []
    for item, _ in _questions(questions, limit, "text"):
        human = _answer_for(table, item, questions, answers)
        if not (_is_answer(human) and isinstance(human, list)):
            raise DataError(f"{answers}: question {item['question_id']}: 'answers' is not a list of strings")
        items.append({**item, "answer": human, "question_type": "all"})
    return items


def check_images(items: list[Item], image_root: Path, path: Path) -> None:
    """Every item's image exists inside ``image_root``; else ``DataError`` naming the file, record and image."""
    for item in items:
        if item.get("image") is None:
            continue
        try:
            found = resolve_image(Path(image_root), item["image"]).is_file()
        except DataError as err:
            raise DataError(f"{path}: record {item['question_id']}: {err}") from None
        if not found:
            raise DataError(f"{path}: record {item['question_id']}: image {item['image']!r} not found under "
                            f"{image_root}")


READERS: dict[str, Callable[..., list[Item]]] = {"vqa": read_vqa, "pope": read_pope, "gqa": read_gqa,
                                                  "textvqa": read_textvqa}
NEEDS_ANSWERS = ("gqa", "textvqa")
SPEC_KEYS = ("format", "questions", "answers", "image_root")


@dataclass(frozen=True)
class Benchmark:
    label: str
    format: str
    questions: Path
    image_root: Path
    answers: Path | None = None

    @classmethod
    def from_spec(cls, label: str, spec: dict[str, Any], data_dir: str | Path, image_root: str | Path,
                  key: str | None = None) -> Benchmark:
        """Check a config entry ``{format, questions, answers?, image_root?}``; relative paths are under
        ``data_dir``, and ``image_root`` defaults to the stage's. ``key`` names the entry in errors."""
        key = key or f"eval.benchmarks.{label}"
        unknown = sorted(set(spec) - set(SPEC_KEYS))
        if unknown:
            raise ValueError(f"{key}: unknown keys {unknown}; expected {list(SPEC_KEYS)}")
        fmt = spec.get("format")
        if fmt not in READERS:
            raise ValueError(f"{key}.format={fmt!r}: expected one of {sorted(READERS)}")
        if spec.get("questions") is None:
            raise ValueError(f"{key}.questions: missing")
        if (spec.get("answers") is None) == (fmt in NEEDS_ANSWERS):
            need = "needs" if fmt in NEEDS_ANSWERS else "takes no"
            raise ValueError(f"{key}.answers: format {fmt!r} {need} answers file")
        root = Path(data_dir)
        paths = {k: root / spec[k] for k in ("questions", "answers") if spec.get(k) is not None}
        for k, path in paths.items():
            if not fs.is_file(path):
                raise FileNotFoundError(f"{key}.{k}: file {path} not found")
        images = Path(image_root)
        if spec.get("image_root") is not None:
            images = root / spec["image_root"]
            if not fs.is_dir(images):
                raise FileNotFoundError(f"{key}.image_root: folder {images} not found")
        return cls(label, fmt, image_root=images, **paths)

    @property
    def kind(self) -> str:
        """``pope`` (yes/no, scored by F1) or ``vqa`` (scored by accuracy)."""
        return "pope" if self.format == "pope" else "vqa"

    def load(self, limit: int | None = None) -> list[Item]:
        """The first ``limit`` items, with every image checked to exist."""
        args = (self.questions, self.answers) if self.format in NEEDS_ANSWERS else (self.questions,)
        items = READERS[self.format](*args, limit=limit)
        check_images(items, self.image_root, self.questions)
        return items
