"""Batched generation: a model that prefers the image token still answers (the token is suppressed)."""

from __future__ import annotations

import torch

from distill.models.student import load_vlm
from eval.generate import Generator


def test_generation_never_emits_the_image_token(tiny_artifacts, tiny_world):
    model, processor = load_vlm(tiny_artifacts / "student")
    gen = Generator(model, processor, "chatml", device="cpu", progress=False)
    image_id = gen.encoder.image_token_id

    def favour_image_token(_module, _inputs, logits):
        logits = logits.clone()
        logits[..., image_id] += 1e4
        return logits

    model.lm_head.register_forward_hook(favour_image_token)
    image = next((tiny_world["images"]).rglob("*.png")).relative_to(tiny_world["images"]).as_posix()
    replies = gen.answer([(image, "Describe the image."), (None, "How many sides has a square?")],
                         tiny_world["images"], max_new_tokens=4)
    assert len(replies) == 2 and all(isinstance(r, str) for r in replies)
    # Without the suppression the hooked model would pick the image token at every step.
    with torch.no_grad():
        ids = gen.encoder.prompts([[{"from": "human", "value": "Hi"}]], [[]])["input_ids"]
        assert int(model(input_ids=ids).logits[0, -1].argmax()) == image_id
