"""Every supported family reads inputs built by its own processor and chat template.

For tiny random models of real architectures (data_prep/tiny_families.py, real processor classes, faithful copies
of the hub chat templates, one shared base tokenizer): the collator's inputs equal what
``processor.apply_chat_template(messages, tokenize=True, return_dict=True)`` builds for the same messages (ids
and every tensor), the labels cover the replies only, images of different sizes and several images per record
work, and the KD loss and the preference stage's reference scoring run on a teacher of that family.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from transformers import ProcessorMixin

from data_prep.tiny_families import FAMILIES, FamilyUnavailable, build_family
from distill.data.collate import IGNORE_INDEX, ConversationEncoder, SupervisedCollator, to_messages
from distill.data.templates import get_template
from distill.models.student import load_vlm
from distill.models.teacher import freeze
from distill.stages.preference import reference_logps
from distill.training.blockmask import block_mask_refusal
from distill.training.kd import KDConfig, KDLoss, last_hidden
from distill.training.kernels import decoder_layers
from distill.training.supervised import prepare_packing

CONVERSATION = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"},
                {"from": "human", "value": "And how many shapes?"}, {"from": "gpt", "value": "three shapes"}]
SIZES = {"a.png": (40, 30), "b.png": (64, 64), "c.png": (30, 52)}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for i, (name, size) in enumerate(SIZES.items()):
        Image.new("RGB", size, (40 * i, 200 - 50 * i, 90)).save(root / name)
    return root


@pytest.fixture(scope="module")
def families(tiny_world, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


def _family(families: Path, tiny_world, name: str, seed: int = 0) -> Path:
    out = families / f"{name}-{seed}"
    if not (out / "config.json").is_file():
        try:
            build_family(name, out, tiny_world["tokenizer"], seed=seed)
        except FamilyUnavailable as err:
            pytest.skip(str(err))
    return out


def _encoder(processor) -> ConversationEncoder:
    return ConversationEncoder(processor, get_template("chatml"), max_length=4096)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_inputs_equal_the_processors_own(families, tiny_world, images, name):
    model, processor = load_vlm(_family(families, tiny_world, name))
    enc = _encoder(processor)
    record = {"id": "r1", "image": "a.png", "conversations": CONVERSATION}
    ours = SupervisedCollator(enc, images)([record])
    image = Image.open(images / "a.png").convert("RGB")
    # (SmolVLM's own apply_chat_template needs the video processor that is not loaded without torchvision; the base
    # class's is the same rendering, and the tokenization is still the processor's own call.)
    apply = processor.apply_chat_template if getattr(processor, "video_processor", ...) is not None else \
        functools.partial(ProcessorMixin.apply_chat_template, processor)
    theirs = apply(to_messages(CONVERSATION, [image]), chat_template=enc.chat_template, tokenize=True,
                   return_dict=True, return_tensors="pt")
    theirs.pop("labels", None)  # PaliGemma's processor labels every token; ours labels the replies
    assert set(theirs) <= set(ours), f"keys the collator dropped: {set(theirs) - set(ours)}"
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    trained = processor.tokenizer.decode(ours["input_ids"][0][ours["labels"][0] != IGNORE_INDEX])
    assert "red" in trained and "three shapes" in trained and "colour" not in trained and "how many" not in trained
    inputs = {k: v for k, v in ours.items() if k != "labels"}
    head_input = []
    hook = model.get_output_embeddings().register_forward_hook(lambda _m, args, _o: head_input.append(args[0]))
    with torch.no_grad():
        logits = model(**inputs).logits
        hook.remove()
        hidden = last_hidden(model, inputs)  # what the KD and preference losses apply the head to
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(hidden, head_input[0], rtol=0, atol=0)
    # and without transformers' output-capturing hooks in the text layers (a graph break in each compiled layer)
    assert not any(layer._forward_hooks for layer in decoder_layers(model))
    assert not any(m._forward_hooks for m in model.get_decoder().modules())


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_mixed_sizes_several_images_and_kd(families, tiny_world, images, name):
    """One batch: images of three sizes, a two-image record and a text-only one; KD against a student of the same
    family runs on it, and so does the preference stage's reference scoring."""
    teacher, tproc = load_vlm(_family(families, tiny_world, name))
    student, sproc = load_vlm(_family(families, tiny_world, name, seed=1))
    freeze(teacher)
    two = {"id": "two", "image": ["b.png", "c.png"], "conversations": [
        {"from": "human", "value": "<image>\nCompare it with <image> please."}, {"from": "gpt", "value": "same"}]}
    text = {"id": "text", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "hi"}]}
    records = [{"id": "r1", "image": "a.png", "conversations": CONVERSATION}, two, text]
    collator = SupervisedCollator(_encoder(sproc), images, teacher=_encoder(tproc))
    try:
        batch = collator(records)
    except Exception as err:  # a processor that refuses multi-image or text-only rows must say so by name
        pytest.xfail(f"{type(tproc).__name__}: {err}")
    alone = collator([records[0]])
    n = int((alone["labels"] != IGNORE_INDEX).sum())
    assert int((batch["labels"][0] != IGNORE_INDEX).sum()) == n  # the same reply tokens in a mixed batch
    loss, parts = KDLoss(teacher, KDConfig(chunk_size=8), alpha=0.5)(student, batch, None)
    assert torch.isfinite(loss) and parts["kd"] > 0
    loss.backward()
    assert any(p.grad is not None for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    ref = reference_logps(teacher, batch, average=False, device=torch.device("cpu"))
    assert ref.shape == (3,) and torch.isfinite(ref).all() and (ref < 0).all()


def _packing(block_mask: bool = True) -> SimpleNamespace:
    return SimpleNamespace(packing=True, packing_block_mask=block_mask)  # the DataConfig fields prepare_packing reads


def test_packing_is_refused_for_3d_rope_models(families, tiny_world):
    qwen, _ = load_vlm(_family(families, tiny_world, "qwen2_vl"))
    llava, _ = load_vlm(_family(families, tiny_world, "llava"))
    prepare_packing(_packing(), llava)
    prepare_packing(SimpleNamespace(packing=False), qwen)
    with pytest.raises(ValueError, match="3-D"):
        prepare_packing(_packing(), llava, qwen)


# 20-40 s each on CPU in a fresh clone (inductor compiles flex attention for their shapes; its cache is cold there):
# llava (takes the mask) and paligemma (refused) stay in the default suite
SLOW_FLEX = {"gemma3", "idefics3", "internvl", "llava_next", "llava_onevision"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_FLEX else n
                                  for n in sorted(FAMILIES)])
def test_packed_block_masks_give_transformers_own_logits(families, tiny_world, images, name):
    """data.packing_block_mask: a family whose text layers attend causally over each whole record gets the mask built
    from the records' boundaries, and its packed logits are those of transformers' own mask; a family with sliding
    or otherwise different text attention keeps transformers' mask (no hook)."""
    model, processor = load_vlm(_family(families, tiny_world, name))
    if hasattr(model.model, "get_rope_index"):
        pytest.skip("3-D rope positions: packing is refused (test above)")
    model.eval()
    model.set_attn_implementation({"text_config": "flex_attention"})  # the tower stays sdpa: no CPU compile for it
    text = {"id": "text", "conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "hi"}]}
    records = [{"id": "r1", "image": "a.png", "conversations": CONVERSATION}, text,
               {"id": "r2", "image": "b.png", "conversations": CONVERSATION[:2]}]
    batch = SupervisedCollator(_encoder(processor), images, packed=True)(records)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        own = model(**inputs, use_cache=False).logits
        hooks = len(model.get_decoder()._forward_pre_hooks)
        prepare_packing(_packing(), model)
        given = model(**inputs, use_cache=False).logits
    installed = len(model.get_decoder()._forward_pre_hooks) - hooks
    refusal = block_mask_refusal(model)
    assert installed == (refusal is None), refusal
    torch.testing.assert_close(given, own, rtol=1e-4, atol=1e-5)
    if refusal is None:  # and the mask does separate the records: the same row without position ids differs
        leaky = {k: v for k, v in inputs.items() if k != "position_ids"}
        with torch.no_grad():
            assert not torch.allclose(model(**leaky, use_cache=False).logits, own, atol=1e-3)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_family_checkpoint_opens_per_component(families, tiny_world, name):
    """Vision tower, projector and LLM are found as transformers names them, for every family: adapter init's
    setting (projector only) opens exactly the projector, wherever the family keeps it."""
    from distill.models.trainable import apply_trainability, component_modules

    model, _ = load_vlm(_family(families, tiny_world, name))
    parts = {c: {id(p) for m in component_modules(model, c) for p in m.parameters()}
             for c in ("vision_tower", "projector", "llm")}
    assert all(parts.values()) and not parts["projector"] & (parts["vision_tower"] | parts["llm"])
    apply_trainability(model, {"vision_tower": "frozen", "projector": "full", "llm": "frozen"})
    assert {id(p) for p in model.parameters() if p.requires_grad} == parts["projector"]


@pytest.mark.parametrize("name", ["qwen2_vl", "smolvlm"])
def test_family_student_through_adapter_init_d2d_and_preference(families, tiny_world, tmp_path, name):
    """A real small VLM checkpoint is the student of a larger same-family teacher: each stage trains what it
    should and leaves the rest (and the teacher) bit-identical."""
    from distill.stages.adapter_init import AdapterInitConfig
    from distill.stages.imitation import ImitationConfig
    from distill.stages.preference import PreferenceConfig
    from distill.training.context import StageContext

    teacher = _family(families, tiny_world, name)
    student = families / f"{name}-student"
    if not (student / "config.json").is_file():
        build_family(name, student, tiny_world["tokenizer"], seed=1)
    data = {"train": [str(tiny_world["data"] / "instruct.json")], "image_root": str(tiny_world["images"]), "limit": 8}
    training = {"max_steps": 2, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "use_cpu": True,
                "report_to": "none", "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True,
                "dataloader_num_workers": 0, "lr_scheduler_type": "constant", "seed": 0}
    stages = [  # built when their turn comes: each reads the artifact of the one before
        ("adapter_init", lambda: AdapterInitConfig(model={"artifact": str(student)}, data=data, training=training)),
        ("d2d", lambda: ImitationConfig(model={"artifact": str(tmp_path / "adapter_init" / "model")},
                                        teacher={"path": str(teacher)}, data=data, training=training)),
        ("preference", lambda: PreferenceConfig(
            model={"artifact": str(tmp_path / "d2d" / "model")}, teacher={"path": str(teacher)},
            data={"train": [str(tiny_world["data"] / "preference.json")], "image_root": str(tiny_world["images"]),
                  "limit": 8},
            trainable={"modes": {"projector": "full", "llm": "full"}}, training=training)),
    ]
    teacher_before = load_vlm(teacher)[0].state_dict()
    previous = load_vlm(student)[0]
    for stage, make in stages:
        cfg = make()
        metrics = cfg.run(StageContext(name=stage, run_dir=tmp_path, training=cfg.training))
        assert metrics["global_step"] == 2 and torch.isfinite(torch.tensor(metrics["train_loss"])), stage
        after = load_vlm(tmp_path / stage / "model")[0]
        changed = {n for n, p in after.state_dict().items() if not torch.equal(p, previous.state_dict()[n])}
        assert changed, f"{stage} trained nothing"
        if stage == "adapter_init":
            from distill.models.trainable import component_modules

            projector = {id(p) for m in component_modules(after, "projector") for p in m.parameters()}
            names = {n for n, p in after.named_parameters() if id(p) in projector}
            assert changed <= names, f"adapter init changed more than the projector: {sorted(changed - names)[:3]}"
        previous = after
    for n, p in load_vlm(teacher)[0].state_dict().items():
        assert torch.equal(p, teacher_before[n]), n


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fast_reply_spans_equal_the_exact_ones(families, tiny_world, name):
    """Replies found after the template's assistant header (one render per record) are exactly the spans that
    rendering each prefix gives (two renders per reply); a template the probe does not fit takes the exact path."""
    _, processor = load_vlm(_family(families, tiny_world, name))
    enc = _encoder(processor)
    conversations = [CONVERSATION, [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": " spaced  "}],
                     [{"from": "human", "value": "<image>\nSay assistant"}, {"from": "gpt", "value": "assistant"}]]
    for conv in conversations:
        messages = to_messages(conv)
        text = enc.render(messages)
        fast = enc._fast_spans(text, messages)
        assert fast is None or fast == enc.exact_spans(text, messages), (name, conv)
    if name in ("llava_onevision", "qwen2_vl", "gemma3", "smolvlm"):
        assert enc._reply_layout is not None  # the common templates take the fast path


def test_unequal_cuts_keep_the_reply_tokens_both_models_have(families, tiny_world, images):
    """A teacher with many more image tokens than the student loses more of a reply to the shared max_length: both
    keep the first reply tokens they still share, and KD runs on them (it stopped on unequal counts)."""
    from distill.losses.kd import paired_positions

    _, tproc = load_vlm(_family(families, tiny_world, "llava_onevision"))  # 88 tokens for a 64x64 image
    student, sproc = load_vlm(_family(families, tiny_world, "qwen2_vl", seed=1))  # 16
    record = {"id": "long", "image": "b.png", "conversations": [
        {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red circle " * 12}]}
    full = SupervisedCollator(ConversationEncoder(sproc, None, 4096), images)([record])
    n_student = int((full["labels"] != IGNORE_INDEX).sum())
    limit = int(full["input_ids"].shape[1]) + 20  # the student keeps its whole reply, the teacher does not
    collator = SupervisedCollator(ConversationEncoder(sproc, get_template("chatml"), limit), images,
                                  teacher=ConversationEncoder(tproc, get_template("chatml"), limit))
    batch = collator([record])
    s_mask, t_mask, targets = paired_positions(batch["labels"], batch["teacher_labels"])
    assert 0 < int(s_mask.sum()) == int(t_mask.sum()) < n_student
    kept = batch["labels"][batch["labels"] != IGNORE_INDEX].tolist()
    assert kept == full["labels"][full["labels"] != IGNORE_INDEX].tolist()[: len(kept)]  # the first reply tokens


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fit_before_training_equals_what_the_collator_does(families, tiny_world, images, name):
    """The check-time fit (text tokens + each image's expansion width, per size) agrees with the collator's own
    batches at every max_length: reply tokens kept, and refusal exactly where the collator would cut image tokens."""
    _, processor = load_vlm(_family(families, tiny_world, name))
    conversation = [{"from": "human", "value": "Some words first, then a picture <image> here."},
                    {"from": "gpt", "value": "I see it"}, {"from": "human", "value": "<image>\nAnd this one?"},
                    {"from": "gpt", "value": "another one, with more words in the reply"}]
    record = {"id": "f1", "image": ["b.png", "c.png"], "conversations": conversation}
    full = _encoder(processor)
    exact = full._layout_from_processor(*full.render_with_spans(to_messages(conversation)),
                                        [SIZES["b.png"], SIZES["c.png"]])
    length = len(full.tokenizer(full.render(to_messages(conversation)))["input_ids"]) + exact[1] + 8
    for max_length in sorted({3, exact[1], exact[1] + 1, exact[0][0] + 2, exact[0][-1], length}):
        enc = ConversationEncoder(processor, get_template("chatml"), max_length=max_length)
        fit = enc.fit(conversation, [SIZES["b.png"], SIZES["c.png"]])
        if enc._surely_fit([(conversation, [SIZES["b.png"], SIZES["c.png"]], "f1")])[0]:  # the bound is sound
            assert not fit.image_cut and fit.kept == fit.replies, max_length
        try:
            batch = SupervisedCollator(enc, images)([record])
        except Exception as err:
            assert fit.image_cut, (max_length, err)
            continue
        assert not fit.image_cut, max_length
        assert fit.kept == int((batch["labels"] != IGNORE_INDEX).sum()), max_length
    # The fast path covers the families whose image expansion depends on the image's size only; OneVision's depends
    # on the record's image count too, PaliGemma's processor places image tokens itself: both run the processor.
    assert full._expansion_is_exact == (name not in ("llava_onevision", "paligemma"))
    roomy = ConversationEncoder(processor, get_template("chatml"), max_length=2 * length + 64)
    assert roomy._surely_fit([(conversation, [SIZES["b.png"], SIZES["c.png"]], "f1")])[0] == full._expansion_is_exact
