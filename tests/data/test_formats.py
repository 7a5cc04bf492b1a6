"""Loaders read the public formats, and every kind of bad record gets a clear error or a counted skip."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image

from distill.data.formats import DataError, load_llava_json, load_preference


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (10, 200, 10)).save(path)


def _good(rid="r1", image="a.png"):
    return {"id": rid, "image": image, "conversations": [
        {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "green"},
        {"from": "human", "value": "And the shape?"}, {"from": "gpt", "value": "square"}]}


@pytest.fixture
def root(tmp_path):
    _image(tmp_path / "images" / "a.png")
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "secret.png").write_bytes(b"x")
    _image(tmp_path / "elsewhere" / "c.png")
    (tmp_path / "images" / "leak.png").symlink_to(tmp_path / "elsewhere" / "c.png")
    (tmp_path / "images" / "leakdir").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    return tmp_path


def test_llava_json_reads_public_format(root):
    text_only = {"id": "t1", "conversations": [{"from": "human", "value": "How many sides has a square?"},
                                               {"from": "gpt", "value": "4"}]}
    (root / "d.json").write_text(json.dumps([_good(), text_only]))
    ds, stats = load_llava_json(root / "d.json", root / "images")
    assert len(ds) == 2 and stats.kept == 2
    assert ds[0]["images"] == ["a.png"] and ds[1]["images"] == []
    assert ds[0]["conversations"][1] == {"from": "gpt", "value": "green"}


def test_llava_json_multi_image_records(root):
    _image(root / "images" / "b.png")
    record = {"id": "m1", "image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nFirst."}, {"from": "gpt", "value": "green"},
        {"from": "human", "value": "Now <image> this?"}, {"from": "gpt", "value": "also green"}]}
    (root / "d.json").write_text(json.dumps([record, _good()]))
    ds, _ = load_llava_json(root / "d.json", root / "images")
    assert ds[0]["images"] == ["a.png", "b.png"] and ds[1]["images"] == ["a.png"]


BAD = {
    "missing image": (_good("b1", "nope.png"), "not found"),
    "unreadable image": (_good("b2", "broken.png"), "unreadable"),
    "no <image> with image": ({**_good("b3"), "conversations": [
        {"from": "human", "value": "What color?"}, {"from": "gpt", "value": "green"}]}, "0 placeholders, 1 images"),
    "two <image>": ({**_good("b4"), "conversations": [
        {"from": "human", "value": "<image>\n<image>\nWhat?"}, {"from": "gpt", "value": "green"}]},
                     "2 placeholders, 1 images"),
    "<image> in a reply": ({**_good("b11"), "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "<image>"}]}, "inside a response"),
    "image not a path": (_good("b12", 3), "relative path string"),
    "roles out of order": ({**_good("b5"), "conversations": [
        {"from": "gpt", "value": "hi"}, {"from": "human", "value": "<image>\nWhat?"}]}, "out of order"),
    "empty response": ({**_good("b6"), "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "  "}]}, "empty response"),
    "outside image folder": (_good("b7", "../secret.png"), "outside the image folder"),
    "absolute path": (_good("b9", "/etc/passwd"), "is absolute"),
    "climbing out through a subfolder": (_good("b10", "train/../../secret.png"), "outside the image folder"),
    "<image> without image": ({"id": "b8", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "x"}]}, "1 placeholders, 0 images"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_error_names_file_and_record(root, case):
    record, needle = BAD[case]
    (root / "d.json").write_text(json.dumps([_good(), record]))
    with pytest.raises(DataError) as err:
        load_llava_json(root / "d.json", root / "images")
    msg = str(err.value)
    assert str(root / "d.json") in msg and f"record {record['id']}" in msg and needle in msg


def test_images_in_subfolders_and_links_within_the_folder_are_accepted(root):
    # The loader lists the folder once; paths it did not list (links, files added later) take the full check.
    # Links the user placed in the folder are followed, also to shared storage outside it (images/coco ->
    # /datasets/coco): the threat is a record's path string, not the folder's layout.
    _image(root / "images" / "train" / "b.png")
    (root / "images" / "alias.png").symlink_to(root / "images" / "a.png")
    records = [_good("r1", "train/b.png"), _good("r2", "alias.png"), _good("r3", "./a.png"),
               _good("r4", "leak.png"), _good("r5", "leakdir/c.png"), _good("r6", "train/../a.png")]
    (root / "d.json").write_text(json.dumps(records))
    ds, stats = load_llava_json(root / "d.json", root / "images")
    assert stats.kept == 6 and ds["images"][:3] == [["train/b.png"], ["alias.png"], ["./a.png"]]


def test_an_unlistable_subfolder_does_not_stop_the_load(root, monkeypatch):
    import os

    import distill.data.formats as formats

    _image(root / "images" / "locked" / "c.png")
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(formats.os, "scandir", scandir)
    (root / "d.json").write_text(json.dumps([_good("r1"), _good("r2", "locked/c.png"), _good("r3", "locked/no.png")]))
    ds, stats = load_llava_json(root / "d.json", root / "images", on_bad_record="skip")
    assert ds["id"] == ["r1", "r2"] and sum(stats.skipped.values()) == 1  # the listing's gap takes the full check


def test_bad_records_skipped_and_counted(root):
    records = [_good()] + [rec for rec, _ in BAD.values()]
    (root / "d.json").write_text(json.dumps(records))
    ds, stats = load_llava_json(root / "d.json", root / "images", on_bad_record="skip")
    assert len(ds) == 1 and stats.kept == 1
    assert sum(stats.skipped.values()) == len(BAD)
    assert stats.total == len(records)


def test_preference_json_and_parquet(root):
    from datasets import Dataset
    from datasets import Image as ImageFeature

    pairs = [{"id": "p1", "image": "a.png", "question": "Describe.", "chosen": "a green square.",
              "rejected": "a green square and a red star."}]
    (root / "p.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    ds, _ = load_preference(root / "p.jsonl", root / "images")
    assert ds[0]["chosen"] == "a green square." and ds[0]["image"] == "a.png"

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (1, 2, 3)).save(buf, format="PNG")
    hf = Dataset.from_dict({"ds_name": ["x"], "question": ["What is it?"], "chosen": ["a square"],
                            "rejected": ["a star"], "image": [{"bytes": buf.getvalue(), "path": None}],
                            "idx": [7]}).cast_column("image", ImageFeature())
    hf.to_parquet(str(root / "p.parquet"))
    ds, stats = load_preference(root / "p.parquet")
    assert stats.kept == 1 and ds[0]["image_bytes"] == buf.getvalue() and ds[0]["id"] == "7"


def test_preference_bad_records(root):
    pairs = [{"id": "p1", "image": "a.png", "question": "Q?", "chosen": "same", "rejected": "same"},
             {"id": "p2", "image": "nope.png", "question": "Q?", "chosen": "a", "rejected": "b"},
             {"id": "p3", "question": "Q?", "chosen": "", "rejected": "b"}]
    (root / "p.json").write_text(json.dumps(pairs))
    with pytest.raises(DataError, match="record p1"):
        load_preference(root / "p.json", root / "images")
    with pytest.raises(DataError, match="no usable records"):
        load_preference(root / "p.json", root / "images", on_bad_record="skip")
