"""Tiny checkpoints of real VLM families (``data_prep.tiny_families``): each builds, reloads with the stock loaders
(``load_processor`` on this machine, which has no torchvision), renders chat messages with its own template,
runs its processor on single images and on a batch of two sizes, and its model's forward on the result."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoTokenizer, ProcessorMixin
from transformers.utils import is_num2words_available

from data_prep.tiny_families import FAMILIES, FamilyUnavailable, build_family, special_tokens
from distill.models.processors import has_torchvision, load_processor

MESSAGES = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]},
    {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
]
# What each family's real template makes of MESSAGES (Mistral 3's carries today's date: only its end is pinned).
RENDERED = {
    "llava": "USER: <image>\nWhat colour is it? ASSISTANT: red ",
    "llava_next": "[INST] <image>\nWhat colour is it? [/INST] red</s> ",
    "llava_onevision": "<|im_start|>user\n<image>\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\n"
                       "red<|im_end|>\n",
    "qwen2_vl": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|image_pad|><|vision_end|>What colour is it?<|im_end|>\n<|im_start|>assistant\n"
                "red<|im_end|>\n",
    "qwen3_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What colour is it?<|im_end|>\n"
                "<|im_start|>assistant\nred<|im_end|>\n",
    "internvl": "<|im_start|>user\n<IMG_CONTEXT>\nWhat colour is it?<|im_end|>\n<|im_start|>assistant\nred<|im_end|>\n",
    "idefics3": "<|begin_of_text|>User:<image>What colour is it?<end_of_utterance>\nAssistant: red<end_of_utterance>\n",
    "smolvlm": "<|im_start|>User:<image>What colour is it?<end_of_utterance>\nAssistant: red<end_of_utterance>\n",
    "gemma3": "<bos><start_of_turn>user\n<start_of_image>What colour is it?<end_of_turn>\n<start_of_turn>model\n"
              "red<end_of_turn>\n",
}
RENDERED["qwen2_5_vl"] = RENDERED["qwen2_vl"]
ORDINARY_TEXT = ["red", " red", "What colour is it?"]

_SMOLVLM_NEEDS = pytest.mark.xfail(
    not is_num2words_available(), raises=FamilyUnavailable, strict=True,
    reason="SmolVLMProcessor needs the num2words package, which is not a dependency of this project")
FAMILY_PARAMS = [pytest.param(f, marks=_SMOLVLM_NEEDS) if f == "smolvlm" else f for f in FAMILIES]


def _render(processor: ProcessorMixin, family: str) -> str:
    if family == "paligemma":  # no chat template: PaliGemma's own prompt, the processor adds bos and "\n"
        return "<image>What colour is it?"
    if getattr(processor, "video_processor", 0) is None and (
            type(processor).apply_chat_template is not ProcessorMixin.apply_chat_template):
        # SmolVLM's override reads its video processor's frame defaults before rendering; without one the base
        # implementation renders the same text.
        return ProcessorMixin.apply_chat_template(processor, MESSAGES, tokenize=False)
    return processor.apply_chat_template(MESSAGES, tokenize=False)


def _call(processor: ProcessorMixin, family: str, text: str, images: list[list[Image.Image]], **kwargs):
    extra = {"suffix": ["red"] * len(images)} if family == "paligemma" else {}
    return processor(text=[text] * len(images), images=images, **extra, **kwargs)


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_family_builds_loads_and_runs(family, tiny_world, tmp_path):
    out = build_family(family, tmp_path / family, tiny_world["tokenizer"])
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = load_processor(out)
    assert type(model).__name__ == type(AutoModelForImageTextToText.from_config(model.config)).__name__
    if not has_torchvision():
        assert all(getattr(processor, a) is None for a in type(processor).get_attributes() if "video" in a)

    text = _render(processor, family)
    if family in RENDERED:
        assert text == RENDERED[family]
    elif family == "mistral3":
        assert text.startswith("<s>[SYSTEM_PROMPT]") and text.endswith("[INST][IMG]What colour is it?[/INST]red</s>")

    image_token_id = model.config.image_token_id
    counts = []
    for size in [(40, 30), (64, 64)]:
        inputs = _call(processor, family, text, [[Image.new("RGB", size, (200, 30, 30))]], return_tensors="pt")
        counts.append(int((inputs["input_ids"] == image_token_id).sum()))
        with torch.no_grad():
            logits = model(**inputs).logits
        assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    assert min(counts) > 0 and max(counts) <= 100, counts

    batch = _call(processor, family, text, [[Image.new("RGB", (40, 30), (200, 30, 30))],
                                            [Image.new("RGB", (64, 64), (30, 30, 200))]],
                  return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[0] == 2 and torch.isfinite(logits).all()
    assert [int(n) for n in (batch["input_ids"] == image_token_id).sum(1)] == counts

    # Where the processor put each image's tokens, in the text it tokenized.
    spans = _call(processor, family, text, [[Image.new("RGB", (40, 30))]], return_offsets_mapping=True,
                  return_text_replacement_offsets=True)
    assert [r["type"] for r in spans["text_replacement_offsets"][0]] == ["image"]

    # Ordinary text has the shared tokenizer's ids in every family.
    base = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    for piece in ORDINARY_TEXT:
        assert processor.tokenizer(piece, add_special_tokens=False)["input_ids"] == \
            base(piece, add_special_tokens=False)["input_ids"]


def test_special_tokens_have_one_id_in_every_family(tiny_world):
    """Every family's tokenizer adds the same ordered list, so a special token's id does not depend on the family."""
    from data_prep.tiny_families import family_tokenizer

    ids = {f: family_tokenizer(spec, tiny_world["tokenizer"]).convert_tokens_to_ids(special_tokens())
           for f, spec in FAMILIES.items()}
    assert len({tuple(v) for v in ids.values()}) == 1
    base = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    new = [token_id for token, token_id in zip(special_tokens(), ids["llava"]) if token not in base.get_vocab()]
    assert new == list(range(len(base), len(base) + len(new)))  # appended after the base vocabulary, in order


def test_unknown_family_is_refused(tiny_world, tmp_path):
    with pytest.raises(KeyError, match="unknown family"):
        build_family("llava_17", tmp_path / "x", tiny_world["tokenizer"])
