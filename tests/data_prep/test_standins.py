"""The stand-in checkpoints load through the ordinary transformers entry points and fit the chat format."""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoProcessor, AutoTokenizer


def test_standins_are_plain_transformers_checkpoints(tiny_world):
    tok = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    for name in ("llm_small", "llm_large"):
        llm = AutoModelForCausalLM.from_pretrained(tiny_world[name])
        assert llm.config.model_type == "qwen2"
        assert llm.get_input_embeddings().num_embeddings > len(tok)  # room for the image token
    vision = AutoModel.from_pretrained(tiny_world["vision_tower"])
    processor = AutoProcessor.from_pretrained(tiny_world["vision_tower"])
    assert vision.config.model_type == "clip_vision_model"
    from PIL import Image

    pixels = processor(Image.new("RGB", (50, 50)), return_tensors="pt")["pixel_values"]
    assert pixels.shape[-1] == vision.config.image_size
    with torch.no_grad():
        patches = (vision.config.image_size // vision.config.patch_size) ** 2
        assert vision(pixels).last_hidden_state.shape[1] == patches + 1


def test_tokenizer_knows_chat_format_and_answer_words(tiny_world, tmp_path):
    from data_prep.standins import chat_documents, train_tokenizer

    docs = chat_documents(tiny_world["data"])
    assert any("<|im_start|>assistant\nyes<|im_end|>" in d for d in docs)
    assert not any("<image>" in d for d in docs)
    tok = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    for special in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    # A reply's first word comes right after "assistant\n": trained on chat-formatted text, a tokenizer with
    # room for it makes the common answers single tokens there, as a real tokenizer would.
    tok = train_tokenizer(docs, tmp_path / "tok", vocab_size=1000)
    for word in ("yes", "no"):
        assert len(tok(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_siglip_standin_builds_and_assembles(tiny_world, tmp_path):
    """``vision_towers: [siglip]`` writes a SigLIP tower (no CLS token) that a student assembles with 'full'."""
    import shutil

    from data_prep.standins import StandinConfig, build_standins
    from distill.data.collate import count_image_tokens
    from distill.models.student import StudentParts, build_student
    from tests.conftest import TINY_STANDINS

    out = tmp_path / "standins"
    out.mkdir()
    for name in ("tokenizer", "llm_small", "llm_large"):  # reuse the session's; only the tower is new
        shutil.copytree(tiny_world[name], out / name)
    paths = build_standins(tiny_world["data"], out, StandinConfig(**{**TINY_STANDINS, "vision_towers": ["siglip"]}))
    assert "vision_tower" not in paths
    vision = AutoModel.from_pretrained(paths["vision_tower_siglip"])
    assert vision.config.model_type == "siglip_vision_model"
    patches = (vision.config.image_size // vision.config.patch_size) ** 2
    with torch.no_grad():
        pixels = torch.zeros(1, 3, vision.config.image_size, vision.config.image_size)
        assert vision(pixel_values=pixels).last_hidden_state.shape[1] == patches
    _, processor = build_student(StudentParts(paths["vision_tower_siglip"], str(tiny_world["llm_small"]),
                                              vision_feature_select_strategy="full"))
    assert count_image_tokens(processor) == patches


def test_unknown_vision_standin_is_rejected():
    import pytest

    from data_prep.standins import StandinConfig

    with pytest.raises(ValueError, match="vision_towers"):
        StandinConfig(vision_towers=["vit"])


def test_word_embedding_targets_follow_the_scene(tiny_world):
    """Each patch's target is its object's colour-word plus shape-word embedding; an empty cell's is zero."""
    from data_prep.standins import word_embedding_targets

    tok = AutoTokenizer.from_pretrained(tiny_world["tokenizer"])
    emb = torch.randn(len(tok), 8, generator=torch.Generator().manual_seed(0))
    scene = {"objects": [{"shape": "circle", "color": "red", "row": 0, "col": 0},
                         {"shape": "square", "color": "blue", "row": 2, "col": 1}]}
    targets = word_embedding_targets([scene], 3, emb, tok)[0]

    def word(w):
        return emb[tok(" " + w, add_special_tokens=False)["input_ids"]].mean(0)

    assert torch.allclose(targets[0], word("red") + word("circle"))  # top left
    assert torch.allclose(targets[7], word("blue") + word("square"))  # bottom centre
    assert torch.count_nonzero(targets[[1, 2, 3, 4, 5, 6, 8]]) == 0


def test_teacher_init_keeps_the_standins_and_fits_its_projector(tiny_world):
    """``teacher_init`` is the vision stand-in and the large LLM, bit for bit, plus a projector that was fitted."""
    import json

    from safetensors.torch import load_file

    from distill.models.student import load_vlm

    model, _ = load_vlm(str(tiny_world["teacher_init"]))
    vision = AutoModel.from_pretrained(tiny_world["vision_tower"])
    llm = AutoModelForCausalLM.from_pretrained(tiny_world["llm_large"])
    for name, value in vision.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[name], value), name
    llm_weights = load_file(tiny_world["llm_large"] / "model.safetensors")
    own = {**{f"model.{k}": v for k, v in model.model.language_model.state_dict().items()},
           **{f"lm_head.{k}": v for k, v in model.lm_head.state_dict().items()}}
    for name, value in llm_weights.items():
        rows = value.shape[0] if value.dim() else None  # the VLM's vocab may have room for the image token
        assert torch.equal(own[name][:rows], value), name
    assert llm.config.hidden_size == model.config.text_config.hidden_size
    fit = json.loads((tiny_world["teacher_init"] / "alignment.json").read_text())
    assert fit["squared_error"] < fit["first_step_squared_error"]


def test_pixel_cache_rows_equal_the_processors_own(tiny_world):
    """Each image is processed once per processor settings; a cached row equals a fresh batch's."""
    import json

    from PIL import Image

    from data_prep.standins import PixelCache

    processor = AutoProcessor.from_pretrained(tiny_world["vision_tower"])  # the image processor itself
    root = tiny_world["data"] / "images"
    names = [json.loads(line)["image"] for line in (tiny_world["data"] / "scenes" / "train.jsonl").read_text()
             .splitlines()][:5]
    cache = PixelCache(root)
    first = cache(processor, names[:3])
    again = cache(processor, [names[4], names[0], names[4]])
    fresh = processor([Image.open(root / n).convert("RGB") for n in names], return_tensors="pt")["pixel_values"]
    assert torch.equal(first, fresh[:3])
    assert torch.equal(again, fresh[[4, 0, 4]])
    assert len(cache._tables) == 1 and len(next(iter(cache._tables.values()))) == 4
