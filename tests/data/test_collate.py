"""The collator trains on responses only, expands the image token, and batches mixed image/text records."""

from __future__ import annotations

import pytest

from distill.data.collate import IGNORE_INDEX, ConversationEncoder, SupervisedCollator, count_image_tokens
from distill.data.formats import DataError, load_llava_json
from distill.data.templates import get_template
from distill.models.student import StudentParts, build_student


@pytest.fixture(scope="module")
def processor(tiny_world):
    return build_student(StudentParts(str(tiny_world["vision_tower"]), str(tiny_world["llm_small"])))[1]


def test_labels_cover_exactly_the_responses(processor, tiny_world):
    ds, _ = load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])
    record = next(r for r in ds if r["image"] is not None)
    enc = ConversationEncoder(processor, get_template("chatml"), max_length=1024)
    batch = SupervisedCollator(enc, tiny_world["images"])([record])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    n_img = count_image_tokens(processor)
    assert n_img == (32 // 8) ** 2  # 4x4 patches; CLS dropped by the "default" strategy
    assert int((ids == enc.image_token_id).sum()) == n_img
    tok = processor.tokenizer
    trained = tok.decode(ids[labels != IGNORE_INDEX])
    expected = "".join(t["value"] + "<|im_end|>" for t in record["conversations"] if t["from"] == "gpt")
    assert trained == expected
    assert (labels[labels != IGNORE_INDEX] == ids[labels != IGNORE_INDEX]).all()
    assert batch["pixel_values"].shape == (1, 3, 32, 32)


def test_mixed_batch_pads_and_stacks_images_in_order(processor, tiny_world):
    ds, _ = load_llava_json(tiny_world["data"] / "instruct.json", tiny_world["images"])
    with_image = [r for r in ds if r["image"] is not None][:2]
    text_only = [r for r in ds if r["image"] is None][:1]
    assert text_only, "the world has text-only records"
    enc = ConversationEncoder(processor, get_template("chatml"), max_length=1024)
    batch = SupervisedCollator(enc, tiny_world["images"])([with_image[0], text_only[0], with_image[1]])
    assert batch["pixel_values"].shape[0] == 2
    lengths = batch["attention_mask"].sum(1)
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert int(lengths.max()) == batch["input_ids"].shape[1]
    assert int((batch["input_ids"][1] == enc.image_token_id).sum()) == 0


def test_truncation_never_cuts_image_tokens(processor, tiny_world):
    ds, _ = load_llava_json(tiny_world["data"] / "captions.json", tiny_world["images"])
    enc = ConversationEncoder(processor, get_template("chatml"), max_length=8)
    with pytest.raises(DataError, match="cut image tokens"):
        enc.encode(ds[0], None)


def test_unreadable_image_at_collate_time_names_record(processor, tiny_world, tmp_path):
    enc = ConversationEncoder(processor, get_template("chatml"), max_length=1024)
    (tmp_path / "gone.png").write_bytes(b"junk")
    record = {"id": "x9", "image": "gone.png", "conversations": [
        {"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
    with pytest.raises(DataError, match="record x9"):
        SupervisedCollator(enc, tmp_path)([record])


def test_chat_template_matches_jinja(processor):
    template = get_template("chatml")
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Q"}]
    processor.tokenizer.chat_template = template.jinja
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]} for t in conv]
    rendered = processor.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == template.prompt(conv)
