"""What the collator would refuse at training time is known when the data is checked: a record whose image tokens
``max_length`` would cut, or whose replies it cuts away entirely, stops a strict run before the first step and is
skipped and counted with ``on_bad_record=skip``; records that lose part of their replies are counted."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from distill.data.collate import IGNORE_INDEX, ConversationEncoder, SupervisedCollator, check_fit
from distill.data.formats import DataError, load_llava_json
from distill.data.templates import get_template
from distill.models.student import load_vlm
from distill.stages.adapter_init import AdapterInitConfig
from distill.training.context import StageContext

MAX_LENGTH = 96
LONG = " ".join(["word"] * 120)


def _records(image: str) -> list[dict]:
    def rec(rid, question, reply, with_image=True):
        out = {"id": rid, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]}
        return {**out, "image": image} if with_image else out

    return [
        rec("ok-1", "<image>\nWhat is it?", "a red circle"),
        rec("late-image", f"{LONG}\n<image>\nWhat is it?", "a red circle"),  # fine for the up-front format check
        rec("no-reply-left", LONG + " " + LONG, "gone", with_image=False),
        rec("reply-cut", "<image>\nDescribe it.", LONG),
        rec("ok-2", "<image>\nAnd the colour?", "red"),
    ]


@pytest.fixture
def data(tiny_world, tmp_path):
    image = json.loads((tiny_world["data"] / "captions.json").read_text())[0]["image"]
    (tmp_path / "d.json").write_text(json.dumps(_records(image)))
    return tmp_path / "d.json"


def test_refusals_are_known_before_training(tiny_artifacts, tiny_world, data, tmp_path, monkeypatch):
    _, processor = load_vlm(tiny_artifacts / "student")
    enc = ConversationEncoder(processor, get_template("chatml"), MAX_LENGTH)
    ds, _ = load_llava_json(data, tiny_world["images"])  # the format check passes every record
    collator = SupervisedCollator(enc, tiny_world["images"])
    with pytest.raises(DataError, match=r"image tokens"):  # what training would have stopped on, and when
        collator([ds[1]])

    with pytest.raises(DataError, match=r"record late-image: max_length=96 would cut the student's image tokens.*"
                                        r"on_bad_record=skip.*2 of 5"):
        check_fit(ds, {"student": enc}, tiny_world["images"], "error", str(data))

    kept, report = check_fit(ds, {"student": enc}, tiny_world["images"], "skip", str(data), cache_dir=tmp_path / "c")
    assert kept["id"] == ["ok-1", "reply-cut", "ok-2"]
    assert report["refused"] == 2 and report["records_cut"] == 1
    assert set(report["refused_reasons"]) == {"max_length=96 would cut the student's image tokens",
                                              "max_length=96 leaves the student no reply token"}
    batch = collator([kept[i] for i in range(len(kept))])  # every kept record trains
    labelled = (batch["labels"] != IGNORE_INDEX).sum(1)
    size = Image.open(tiny_world["images"] / ds[3]["images"][0]).size
    assert labelled.tolist()[0] > 0 and report["reply_tokens_cut"] == enc.fit(ds[3]["conversations"],
                                                                               [size]).replies - int(labelled[1])

    monkeypatch.setattr(ConversationEncoder, "fit_many", lambda *a, **k: pytest.fail("not reused"))
    again, cached = check_fit(ds, {"student": enc}, tiny_world["images"], "skip", str(data), cache_dir=tmp_path / "c")
    assert again["id"] == kept["id"] and cached == report


def test_a_strict_stage_stops_before_its_first_step(tiny_world, data, tmp_path, cpu_training):
    parts = {"vision_tower": str(tiny_world["vision_tower"]), "llm": str(tiny_world["llm_small"])}
    cfg = AdapterInitConfig(model={"parts": parts}, training=cpu_training,
                            data={"train": [str(data)], "image_root": str(tiny_world["images"]),
                                  "max_length": MAX_LENGTH})
    with pytest.raises(DataError, match="record late-image"):
        cfg.run(StageContext(name="adapter_init", run_dir=tmp_path, training=cfg.training))
    assert not (tmp_path / "adapter_init" / "checkpoints").exists()

    cfg.data.on_bad_record = "skip"
    metrics = cfg.run(StageContext(name="adapter_init", run_dir=tmp_path / "skip", training=cfg.training))
    assert metrics["global_step"] == 4 and metrics["fit"]["refused"] == 2 and metrics["fit"]["records"] == 5


@pytest.mark.parametrize("max_length", [32, 64, 96])
def test_records_skipped_by_the_length_bound_are_those_that_fit(tiny_artifacts, tiny_world, max_length):
    """The check tokenizes only records that could reach max_length: on the world's data it refuses and counts
    exactly what the record-by-record exact fit does."""
    _, processor = load_vlm(tiny_artifacts / "student")
    enc = ConversationEncoder(processor, get_template("chatml"), max_length)
    ds, _ = load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])
    kept, report = check_fit(ds, {"student": enc}, tiny_world["images"], "skip", "instruct")
    exact_refused, exact_cut, bounded = [], 0, 0
    for record in ds:
        sizes = [Image.open(tiny_world["images"] / p).size for p in record["images"]]
        fit = enc.fit(record["conversations"], sizes)
        bounded += enc._surely_fit([(record["conversations"], sizes, None)])[0]
        if fit.image_cut or fit.kept == 0:
            exact_refused.append(record["id"])
        elif fit.kept < fit.replies:
            exact_cut += 1
    assert sorted(set(ds["id"]) - set(kept["id"])) == sorted(exact_refused)
    assert report.get("records_cut", 0) == exact_cut
    # each setting exercises the paths it is for: refusals and cuts (32), cuts (64), records the bound passes (96)
    assert {32: exact_refused and exact_cut, 64: exact_cut and not bounded, 96: 0 < bounded < len(ds)}[max_length]
