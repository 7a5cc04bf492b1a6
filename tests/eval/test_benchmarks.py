"""Benchmark readers: GQA and TextVQA as LLaVA ships them, POPE with its own image folder, checked up front."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from distill.data.formats import DataError
from eval.benchmarks import Benchmark, read_gqa, read_pope, read_textvqa

SUFFIX = "\nAnswer the question using a single word or phrase."


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def images(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    for name, color in [("n1.png", "red"), ("n2.png", "blue")]:
        Image.new("RGB", (8, 8), color).save(root / name)
    return root


def _gqa(tmp_path: Path) -> tuple[Path, Path]:
    questions = _write_jsonl(tmp_path / "llava_gqa_testdev_balanced.jsonl", [
        {"question_id": "201", "image": "n1.png", "text": "Is the square red?" + SUFFIX, "category": "default"},
        {"question_id": "202", "image": "n2.png", "text": "What color is it?" + SUFFIX, "category": "default"},
        {"question_id": "203", "image": "n2.png", "text": "Which is bigger?" + SUFFIX},
    ])
    answers = tmp_path / "testdev_balanced_questions.json"
    answers.write_text(json.dumps({
        "201": {"answer": "yes", "imageId": "n1", "types": {"structural": "verify", "semantic": "attr",
                                                            "detailed": "verifyAttr"}},
        "202": {"answer": "blue", "types": {"detailed": "chooseAttr"}},
        "203": {"answer": "left", "types": {}},
        "999": {"answer": "unused", "types": {"structural": "query"}},
    }))
    return questions, answers


def test_gqa_reader_joins_answers_and_types(tmp_path):
    questions, answers = _gqa(tmp_path)
    assert read_gqa(questions, answers) == [
        {"question_id": "201", "image": "n1.png", "question": "Is the square red?" + SUFFIX, "answer": "yes",
         "question_type": "verify"},
        {"question_id": "202", "image": "n2.png", "question": "What color is it?" + SUFFIX, "answer": "blue",
         "question_type": "chooseAttr"},
        {"question_id": "203", "image": "n2.png", "question": "Which is bigger?" + SUFFIX, "answer": "left",
         "question_type": "all"},
    ]
    assert [r["question_id"] for r in read_gqa(questions, answers, limit=2)] == ["201", "202"]


def test_textvqa_reader_keeps_the_llava_prompt_and_ten_answers(tmp_path):
    prompt = "what brand is the camera?\nReference OCR token: dakota, digital" + SUFFIX
    questions = _write_jsonl(tmp_path / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": 34602, "image": "n1.png", "text": prompt},
        {"question_id": 34603, "image": "n2.png", "text": "what number is shown?" + SUFFIX},
    ])
    human = ["dakota"] * 7 + ["dakota digital"] * 3
    answers = tmp_path / "TextVQA_0.5.1_val.json"
    answers.write_text(json.dumps({"dataset_name": "textvqa", "data": [
        {"question_id": 34603, "image_id": "b", "answers": ["7"] * 10, "question": "what number is shown?"},
        {"question_id": 34602, "image_id": "a", "answers": human, "question": "what brand is the camera?"},
    ]}))
    items = read_textvqa(questions, answers)
    assert items[0] == {"question_id": 34602, "image": "n1.png", "question": prompt, "answer": human,
                        "question_type": "all"}
    assert items[1]["answer"] == ["7"] * 10


def test_missing_answer_id_names_the_file_and_the_id(tmp_path):
    questions, answers = _gqa(tmp_path)
    _write_jsonl(questions, [{"question_id": "777", "image": "n1.png", "text": "Where?"}])
    with pytest.raises(DataError, match=r"llava_gqa_testdev_balanced\.jsonl: record 777: .*not found in the "
                                        r"answers file .*testdev_balanced_questions\.json"):
        read_gqa(questions, answers)


def test_bad_records_name_the_file_and_record(tmp_path):
    path = _write_jsonl(tmp_path / "pope.jsonl", [
        {"question_id": 1, "image": "n1.png", "text": "Is there a dog?", "label": "yes"},
        {"question_id": 2, "image": "n1.png", "text": "Is there a cat?", "label": "maybe"},
    ])
    with pytest.raises(DataError, match=r"pope\.jsonl: record 2: label 'maybe'"):
        read_pope(path)
    _write_jsonl(path, [{"question_id": 5, "image": "n1.png", "label": "yes"}])
    with pytest.raises(DataError, match=r"pope\.jsonl: record 5: 'text' is missing"):
        read_pope(path)


def test_pope_images_resolve_under_its_own_image_root(tmp_path, images):
    coco = tmp_path / "coco" / "val2014"
    coco.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(coco / "COCO_val2014_000000310196.jpg")
    _write_jsonl(tmp_path / "coco_pope_random.jsonl", [
        {"question_id": 1, "image": "COCO_val2014_000000310196.jpg", "text": "Is there a snowboard?", "label": "yes"},
    ])
    spec = {"format": "pope", "questions": "coco_pope_random.jsonl", "image_root": "coco/val2014"}
    bench = Benchmark.from_spec("coco", spec, data_dir=tmp_path, image_root=images)
    assert bench.image_root == coco and bench.kind == "pope"
    assert bench.load() == [{"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
                             "question": "Is there a snowboard?", "label": "yes"}]
    # Without its own folder the stage's is used, where the COCO image is not: the error names file, record, image.
    bench = Benchmark.from_spec("coco", {**spec, "image_root": None}, data_dir=tmp_path, image_root=images)
    with pytest.raises(DataError, match=r"coco_pope_random\.jsonl: record 1: image 'COCO_val2014_000000310196"
                                        r"\.jpg' not found under .*images"):
        bench.load()


def test_spec_paths_resolve_against_data_dir_unless_absolute(tmp_path, images):
    questions, answers = _gqa(tmp_path)
    spec = {"format": "gqa", "questions": questions.name, "answers": str(answers)}
    bench = Benchmark.from_spec("gqa", spec, data_dir=tmp_path, image_root=images)
    assert (bench.questions, bench.answers, bench.image_root) == (tmp_path / questions.name, answers, images)
    assert [r["answer"] for r in bench.load()] == ["yes", "blue", "left"]


@pytest.mark.parametrize(("spec", "error", "match"), [
    ({"format": "vizwiz", "questions": "q.jsonl"}, ValueError, r"eval\.benchmarks\.b\.format='vizwiz'"),
    ({"format": "gqa", "questions": "q.jsonl"}, ValueError, r"eval\.benchmarks\.b\.answers: format 'gqa' needs"),
    ({"format": "pope", "questions": "q.jsonl", "answers": "a.json"}, ValueError, r"'pope' takes no answers"),
    ({"format": "vqa", "questions": "nope.jsonl"}, FileNotFoundError,
     r"eval\.benchmarks\.b\.questions: file .*nope\.jsonl not found"),
    ({"format": "gqa", "questions": "q.jsonl", "answers": "gone.json"}, FileNotFoundError,
     r"eval\.benchmarks\.b\.answers: file .*gone\.json not found"),
    ({"format": "vqa", "questions": "q.jsonl", "image_root": "nowhere"}, FileNotFoundError,
     r"eval\.benchmarks\.b\.image_root: folder .*nowhere not found"),
    ({"format": "vqa", "questions": "q.jsonl", "split": "val"}, ValueError, r"unknown keys \['split'\]"),
])
def test_bad_specs_name_the_key_and_path(tmp_path, images, spec, error, match):
    _write_jsonl(tmp_path / "q.jsonl", [])
    with pytest.raises(error, match=match):
        Benchmark.from_spec("b", spec, data_dir=tmp_path, image_root=images)
