"""The collator builds each model's inputs with its own processor and chat template, trains on the replies only,
and batches mixed image/text and multi-image records."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from distill.data.collate import (
    IGNORE_INDEX,
    ConversationEncoder,
    SupervisedCollator,
    count_image_tokens,
    to_messages,
)
from distill.data.formats import DataError, load_llava_json
from distill.data.templates import default_chat_template, get_template
from distill.models.student import StudentParts, build_student


@pytest.fixture(scope="module")
def processor(tiny_world):
    processor = build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_small"])))[1]
    default_chat_template(processor, "chatml")
    return processor


@pytest.fixture(scope="module")
def records(tiny_world):
    return load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])[0]


def _replies(record) -> str:
    return "".join(t["value"] + "<|im_end|>" for t in record["conversations"] if t["from"] == "gpt")


def test_labels_cover_exactly_the_replies(processor, tiny_world, records):
    record = next(r for r in records if r["images"] and len(r["conversations"]) > 2)  # multi-turn
    enc = ConversationEncoder(processor, None, max_length=1024)
    batch = SupervisedCollator(enc, tiny_world["images"])([record])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert count_image_tokens(processor) == (32 // 8) ** 2  # 4x4 patches; CLS dropped by the "default" strategy
    assert int((ids == enc.image_token_id).sum()) == 16
    assert processor.tokenizer.decode(ids[labels != IGNORE_INDEX]) == _replies(record)
    assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_inputs_are_the_processors_own(processor, tiny_world, records):
    """What the collator builds equals processor.apply_chat_template(messages, tokenize=True) for the same
    messages: ids, mask and pixels."""
    record = next(r for r in records if r["images"])
    enc = ConversationEncoder(processor, None, max_length=1024)
    ours = SupervisedCollator(enc, tiny_world["images"])([record])
    image = Image.open(tiny_world["images"] / record["images"][0]).convert("RGB")
    theirs = processor.apply_chat_template(to_messages(record["conversations"], [image]), tokenize=True,
                                           return_dict=True, return_tensors="pt")
    assert set(theirs) <= set(ours)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


def test_mixed_batch_pads_and_keeps_images_in_order(processor, tiny_world, records):
    with_image = [r for r in records if r["images"]][:2]
    text_only = [r for r in records if not r["images"]][:1]
    assert text_only, "the world has text-only records"
    enc = ConversationEncoder(processor, None, max_length=1024)
    collator = SupervisedCollator(enc, tiny_world["images"])
    batch = collator([with_image[0], text_only[0], with_image[1]])
    assert batch["pixel_values"].shape[0] == 2
    lengths = batch["attention_mask"].sum(1)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert int(lengths.max()) == batch["input_ids"].shape[1]
    assert int((batch["input_ids"][1] == enc.image_token_id).sum()) == 0
    alone = collator([with_image[1]])
    assert torch.equal(batch["pixel_values"][1], alone["pixel_values"][0])
    assert processor.tokenizer.decode(batch["input_ids"][1][batch["labels"][1] != IGNORE_INDEX]) == \
        _replies(text_only[0])


def test_multi_image_record(processor, tiny_world, records):
    """LLaVA-OneVision-style data: a list of images, one <image> each, anywhere in the human turns."""
    paths = [r["images"][0] for r in records if r["images"]][:2]
    record = {"id": "multi", "images": paths, "conversations": [
        {"from": "human", "value": "<image>\nLeft."}, {"from": "gpt", "value": "ok"},
        {"from": "human", "value": "And <image> this one?"}, {"from": "gpt", "value": "a red circle"}]}
    enc = ConversationEncoder(processor, None, max_length=1024)
    batch = SupervisedCollator(enc, tiny_world["images"])([record])
    assert batch["pixel_values"].shape[0] == 2
    assert int((batch["input_ids"] == enc.image_token_id).sum()) == 32
    assert processor.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != IGNORE_INDEX]) == \
        "ok<|im_end|>a red circle<|im_end|>"


def test_train_on_all_labels_text_but_not_image_tokens(processor, tiny_world, records):
    record = next(r for r in records if r["images"])
    enc = ConversationEncoder(processor, None, max_length=1024, train_on="all")
    batch = SupervisedCollator(enc, tiny_world["images"])([record])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert ((labels == IGNORE_INDEX) == (ids == enc.image_token_id)).all()


def test_truncation_never_cuts_image_tokens(processor, tiny_world):
    ds, _ = load_llava_json(tiny_world["data"] / "captions.json", tiny_world["images"])
    enc = ConversationEncoder(processor, None, max_length=8)
    with pytest.raises(DataError, match="cut image tokens"):
        SupervisedCollator(enc, tiny_world["images"])([ds[0]])


def test_replies_cut_by_max_length_are_reported(processor, tiny_world, caplog):
    record = {"id": "long1", "conversations": [{"from": "human", "value": "Hi " * 20},
                                                 {"from": "gpt", "value": "a long answer " * 10}]}
    enc = ConversationEncoder(processor, None, max_length=24)
    with caplog.at_level("WARNING"):
        batch = SupervisedCollator(enc, tiny_world["images"])([record])
    assert (batch["labels"] == IGNORE_INDEX).all() and batch["input_ids"].shape[1] == 24
    assert "record long1: max_length=24 cuts" in caplog.text and "it trains on nothing" in caplog.text


def test_unreadable_image_at_collate_time_names_record(processor, tmp_path):
    enc = ConversationEncoder(processor, None, max_length=1024)
    (tmp_path / "gone.png").write_bytes(b"junk")
    record = {"id": "x9", "image": "gone.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
    with pytest.raises(DataError, match="record x9"):
        SupervisedCollator(enc, tmp_path)([record])


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_saved_template_renders_list_of_parts(processor, name):
    """The standard message form (content as a list of parts): image and text parts, several turns. The old
    template dropped the whole user turn (a Jinja loop variable does not outlive its loop)."""
    template = get_template(name)
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A circle."},
            {"from": "human", "value": "Colour?"}]
    rendered = processor.apply_chat_template(to_messages(conv), chat_template=template.jinja, tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == template.prompt(conv)
    plain = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conv]
    assert processor.apply_chat_template(plain, chat_template=template.jinja, tokenize=False,
                                         add_generation_prompt=True) == rendered


def test_a_models_own_template_wins(processor):
    proc = type(processor)(image_processor=processor.image_processor, tokenizer=processor.tokenizer,
                           patch_size=processor.patch_size, image_token=processor.image_token,
                           num_additional_image_tokens=processor.num_additional_image_tokens,
                           vision_feature_select_strategy=processor.vision_feature_select_strategy)
    default_chat_template(proc, "llama3")
    default_chat_template(proc, "chatml")  # it has one now: kept
    assert proc.chat_template == get_template("llama3").jinja
    enc = ConversationEncoder(proc, get_template("chatml"), max_length=64)
    assert enc.chat_template == get_template("llama3").jinja


def test_artifact_works_with_stock_transformers_chat_code(tiny_artifacts, tiny_world, tmp_path):
    """A saved student answers through ``apply_chat_template`` + ``generate`` and through
    ``pipeline("image-text-to-text")``, with the standard list-of-parts messages."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, pipeline

    from distill.models.student import load_vlm, save_artifact

    model, processor = load_vlm(tiny_artifacts / "student")
    default_chat_template(processor, "chatml")
    save_artifact(model, processor, tmp_path / "artifact")
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "artifact")
    processor = AutoProcessor.from_pretrained(tmp_path / "artifact")
    image = Image.open(next(tiny_world["images"].rglob("*.png"))).convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 16
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3
    reply = pipeline("image-text-to-text", model=model, processor=processor)(text=messages, max_new_tokens=3)
    assert isinstance(reply[0]["generated_text"], list) and reply[0]["generated_text"][-1]["role"] == "assistant"
