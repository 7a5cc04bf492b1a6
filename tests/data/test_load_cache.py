"""Large files: the JSON list is read as a stream, each unique image is checked once, and a checked file is kept as a
memory-mapped Arrow file that later loads (and the other processes of a launch) reuse instead of checking again."""

from __future__ import annotations

import json
import multiprocessing
import os

import pytest
from PIL import Image

import distill.data.formats as formats
from distill.data.formats import DataError, load_llava_json, load_preference


def _record(i, image="a.png"):
    rec = {"id": f"r{i}", "conversations": [
        {"from": "human", "value": f"<image>\nQuestion {i} \u00e9\u4e2d \\\" {{[,]}}?"},
        {"from": "gpt", "value": "answer " * (i % 7 + 1)}]}
    return {**rec, "image": image} if image else {**rec, "conversations": [
        {"from": "human", "value": f"Question {i}?"}, {"from": "gpt", "value": "text only"}]}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images").mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 12), (10, 200, 10)).save(tmp_path / "images" / name)
    return tmp_path


@pytest.mark.parametrize("indent", [None, 2])
def test_stream_reader_matches_json_module_at_any_chunk_size(root, monkeypatch, indent):
    records = [_record(i, image=("a.png" if i % 3 else None)) for i in range(40)]
    (root / "d.json").write_text(json.dumps(records, indent=indent, ensure_ascii=False) + "\n\n")
    for chars in (1, 7, 64, 1 << 22):  # records cut at every possible place by the read chunks
        monkeypatch.setattr(formats, "READ_CHARS", chars)
        assert list(formats._iter_json_records(root / "d.json")) == records
    ds, stats = load_llava_json(root / "d.json", root / "images")
    assert stats.kept == 40 and ds["id"] == [r["id"] for r in records]
    assert ds[1]["conversations"] == records[1]["conversations"] and ds[0]["images"] == []


@pytest.mark.parametrize("text, needle", [
    ('[{"id": 1}, {"id": 2', "record #1 is not valid JSON"),
    ('[{"id": 1} {"id": 2}]', "expected ',' or ']' after record #0"),
    ('[{"id": 1}] trailing', "text after the end of the JSON list"),
    ('{"id": 1}', "expected a JSON list of records"),
    ('', "expected a JSON list of records"),
])
def test_stream_reader_names_the_file_for_broken_json(root, monkeypatch, text, needle):
    monkeypatch.setattr(formats, "READ_CHARS", 5)
    (root / "d.json").write_text(text)
    with pytest.raises(DataError, match=needle) as err:  # a broken file stops even when bad records are skipped
        load_llava_json(root / "d.json", root / "images", on_bad_record="skip")
    assert str(root / "d.json") in str(err.value)


def test_each_unique_image_is_opened_once_and_remembered_across_loads(root, monkeypatch):
    opened = []
    real = formats._verify_image
    monkeypatch.setattr(formats, "_verify_image", lambda image, *a, **k: (opened.append(image), real(image, *a, **k)))
    (root / "d.json").write_text(json.dumps([_record(i, ("a.png", "b.png")[i % 2]) for i in range(50)]))
    cache = root / "cache"
    load_llava_json(root / "d.json", root / "images", cache_dir=cache)
    assert sorted(opened) == ["a.png", "b.png"]  # 50 records, 2 files
    opened.clear()
    (root / "e.json").write_text(json.dumps([_record(i) for i in range(5)]))  # another file, same images
    load_llava_json(root / "e.json", root / "images", cache_dir=cache)
    assert opened == []
    Image.new("RGB", (8, 8)).save(root / "images" / "a.png")  # a replaced file is checked again
    os.utime(root / "images" / "a.png", ns=(1, 1))
    load_llava_json(root / "e.json", root / "images", cache_dir=cache, limit=3)
    assert opened == ["a.png"]


def test_a_checked_file_is_reused_until_it_or_the_settings_change(root):
    path, cache = root / "d.json", root / "cache"
    path.write_text(json.dumps([_record(i, "a.png" if i else "b.png") for i in range(20)]))
    ds, stats = load_llava_json(path, root / "images", cache_dir=cache)
    assert not stats.cached and len(ds) == 20
    assert ds.cache_files and ds.cache_files[0]["filename"].startswith(str(cache))  # memory-mapped from the cache
    (root / "images" / "b.png").unlink()  # not seen: the file was checked before
    ds, stats = load_llava_json(path, root / "images", cache_dir=cache)
    assert stats.cached and len(ds) == 20 and ds[19]["conversations"][0]["value"].startswith("<image>")
    ds, stats = load_llava_json(path, root / "images", cache_dir=cache, on_bad_record="skip")  # other settings
    assert not stats.cached and len(ds) == 19 and stats.examples == ["r0: image 'b.png' not found under " +
                                                                      str(root / "images")]
    ds, stats = load_llava_json(path, root / "images", cache_dir=cache, on_bad_record="skip")
    assert stats.cached and len(ds) == 19 and sum(stats.skipped.values()) == 1  # the skips are reported again
    os.utime(path, ns=(10**9, 10**9))  # a changed file is checked again
    with pytest.raises(DataError, match="record r0: image 'b.png' not found"):
        load_llava_json(path, root / "images", cache_dir=cache)
    assert not list(cache.glob("*.tmp-*"))  # a failed check leaves nothing half-written


def test_preference_pairs_are_cached_too(root):
    pairs = [{"id": f"p{i}", "image": "a.png", "question": "Describe.", "chosen": f"a square {i}.",
              "rejected": f"a star {i}."} for i in range(4)]
    (root / "p.json").write_text(json.dumps(pairs))
    first, stats = load_preference(root / "p.json", root / "images", cache_dir=root / "cache")
    again, cached = load_preference(root / "p.json", root / "images", cache_dir=root / "cache")
    assert not stats.cached and cached.cached and again.to_list() == first.to_list()
    assert first[3] == {"id": "p3", "image": "a.png", "image_bytes": None, "question": "Describe.",
                        "chosen": "a square 3.", "rejected": "a star 3."}


def _load_in_child(path, images, cache, out):
    import distill.data.formats as f

    checked = []
    real = f.check_conversation
    f.check_conversation = lambda *a, **k: (checked.append(1), real(*a, **k))
    ds, stats = f.load_llava_json(path, images, cache_dir=cache)
    out.put((stats.cached, len(checked), len(ds)))


def test_processes_of_a_launch_check_the_file_once(root):
    path = root / "d.json"
    path.write_text(json.dumps([_record(i) for i in range(3000)]))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_load_in_child, args=(path, root / "images", root / "cache", out)) for _ in range(3)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert results == [(False, 3000, 3000), (True, 0, 3000), (True, 0, 3000)]


@pytest.mark.parametrize("tricky", [False, True])
def test_a_large_list_read_in_parallel_parts_equals_one_pass(root, monkeypatch, tricky):
    """Parts start at a ``}, {`` followed by a record after even split points (the same text inside strings is
    passed over). Where the guess is wrong (``tricky``: each turn is an object with a ``conversations`` key too, so
    a part starts at a turn) the part before it does not parse and the file is read in one pass: same result."""
    records = [_record(i, "a.png") for i in range(600)]
    for i, rec in enumerate(records):
        rec["conversations"][1]["value"] = "x}, {\"id\": 1, \"conversations\": []}, {" * 5 + str(i)
        if tricky:
            rec["conversations"][1]["conversations"] = []
    records[450]["conversations"][0]["value"] = "no placeholder"  # a bad record in the last part
    (root / "d.json").write_text(json.dumps(records))
    one_pass, one_stats = load_llava_json(root / "d.json", root / "images", on_bad_record="skip")
    monkeypatch.setattr(formats, "PART_BYTES", 1024)
    monkeypatch.setattr(formats.os, "sched_getaffinity", lambda _: {0, 1, 2})
    parts = formats._parts(root / "d.json")
    assert len(parts) == 3 and parts[-1][1] == (root / "d.json").stat().st_size
    ds, stats = load_llava_json(root / "d.json", root / "images", on_bad_record="skip", cache_dir=root / "c")
    assert ds.to_list() == one_pass.to_list() and len(ds) == 599
    assert (stats.total, stats.kept, dict(stats.skipped)) == (600, 599, dict(one_stats.skipped))
    saved = json.loads(next((root / "c").glob("d-*/stats.json")).read_text())
    assert len(saved["files"]) == (1 if tricky else 3)  # the tricky file fell back to one pass
    with pytest.raises(DataError, match="record r450: <image> placeholders do not match"):
        load_llava_json(root / "d.json", root / "images", cache_dir=root / "c2")
