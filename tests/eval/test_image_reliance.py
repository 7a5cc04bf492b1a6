"""The image-reliance diagnostic: an image-blind model relies on the image by exactly zero, type by type."""

from __future__ import annotations

import torch

from distill.models.student import load_vlm
from eval.benchmarks import read_jsonl
from eval.image_reliance import answer_accuracy, reliance_table


def test_image_blind_model_has_zero_reliance(tiny_world, tiny_artifacts):
    model, processor = load_vlm(tiny_artifacts / "teacher")
    with torch.no_grad():  # the projector's output no longer depends on the image: every image looks the same
        last = model.model.multi_modal_projector.linear_2
        last.weight.zero_()
    items = read_jsonl(tiny_world["data"] / "eval" / "vqa.jsonl", 24)
    rows = {r["type"]: r for r in reliance_table(model, processor, items, tiny_world["images"], batch_size=8)}
    assert rows["all"]["n"] == len(items)
    assert sum(r["n"] for t, r in rows.items() if t != "all") == len(items)
    assert {t for t in rows if t != "all"} == {r["question_type"] for r in items}
    assert all(r["reliance"] == 0.0 for r in rows.values())


def test_other_image_never_hands_back_the_same_file():
    from eval.image_reliance import _other_image

    images = ["a", "a", "a", "b", "b", "c"]
    picks = _other_image(images)
    assert all(images[j] != images[i] for i, j in enumerate(picks))
    assert _other_image(["a", "a"]) == [0, 1]  # one image only: nothing to swap with


def test_wrong_image_really_swaps_the_images(tiny_world, tiny_artifacts):
    """With the images swapped, the untouched random model's logits move (the table's second column means what
    it says); with one image repeated, swapping changes nothing."""
    model, processor = load_vlm(tiny_artifacts / "teacher")
    items = read_jsonl(tiny_world["data"] / "eval" / "vqa.jsonl", 16)
    seen = []
    model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits.detach().clone()))
    answer_accuracy(model, processor, items, tiny_world["images"], batch_size=16)
    answer_accuracy(model, processor, items, tiny_world["images"], batch_size=16, wrong_image=True)
    assert not torch.allclose(seen[0], seen[1])
    same = [{**r, "image": items[0]["image"]} for r in items]
    seen.clear()
    answer_accuracy(model, processor, same, tiny_world["images"], batch_size=16)
    answer_accuracy(model, processor, same, tiny_world["images"], batch_size=16, wrong_image=True)
    assert torch.equal(seen[0], seen[1])
