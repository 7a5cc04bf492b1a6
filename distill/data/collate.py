"""Turn checked records into model inputs, each model through its own processor and chat template.

A record's LLaVA turns become standard chat messages (an image part wherever the text had ``<image>``);
the model's processor renders them with its chat template, expands each image into that model's image tokens
(at that image's size) and returns every tensor its forward takes (``pixel_values``, ``image_grid_thw``,
``image_sizes``, ``pixel_attention_mask``, ``token_type_ids``, ...). Nothing here knows a model family's layout:
the batch is exactly what ``processor.apply_chat_template(messages, tokenize=True, return_dict=True)`` returns for
the same messages, plus ``labels``.

Labels come from the rendered conversation, for any template: each reply's characters are the difference between
the conversation rendered up to that reply and the same prefix rendered with the generation prompt; the
tokenizer's offsets (mapped back through the processor's image-token expansion) say which tokens they are. Labels
are ``-100`` everywhere but the replies and their end-of-turn marker (``train_on="responses"``), or everywhere
but padding and image tokens (``train_on="all"``). The model shifts labels itself; the KD losses shift the same way.

``SupervisedCollator`` batches records for the student and, when given a teacher encoder, for the teacher too
(``teacher_*`` keys), so a teacher with another vision tower, image-token layout or template sees its own inputs
over the same response tokens. With ``packed=True`` a batch is one padding-free row per model (``data.packing``).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from PIL import Image
from transformers import ProcessorMixin

from distill.data.formats import (
    IMAGE_PLACEHOLDER,
    DataError,
    image_store,
    open_image,
    read_image_store,
    record_images,
    resolve_image,
)
from distill.data.templates import ChatTemplate

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")
"""Processor outputs with one value per token ([rows, tokens]): padded, truncated and packed with the text."""
_BOOKKEEPING = ("offset_mapping", "text_replacement_offsets", "labels")
"""Processor outputs that are not model inputs (PaliGemma's processor makes its own ``labels``: ours replace them)."""


def image_token_id(processor: ProcessorMixin) -> int:
    """The id of the token that stands for image features (Gemma3's processor names its begin-of-image token
    ``image_token`` but keeps the feature token's id in ``image_token_id``)."""
    token_id = getattr(processor, "image_token_id", None)
    if isinstance(token_id, int):
        return token_id
    return processor.tokenizer.convert_tokens_to_ids(processor.image_token)


def count_image_tokens(processor: ProcessorMixin, size: tuple[int, int] = (32, 32)) -> int:
    """How many image-feature tokens one image of ``size`` (width, height) becomes, asked of the processor."""
    image = Image.new("RGB", size)
    encoded = processor(text=[processor.image_token], images=[[image]], return_tensors="pt")
    return int((encoded["input_ids"] == image_token_id(processor)).sum())


def render_chat(processor: ProcessorMixin, messages: list[dict[str, Any]], chat_template: str | None = None,
                add_generation_prompt: bool = False) -> str:
    """``processor.apply_chat_template(messages, tokenize=False)``. A processor loaded without its video part
    (no torchvision, distill/models/processors.py) renders through the base class's method: SmolVLM's override
    only adds video-sampling defaults, read from the video processor it does not have."""
    apply = processor.apply_chat_template
    if getattr(processor, "video_processor", ...) is None:
        apply = functools.partial(ProcessorMixin.apply_chat_template, processor)
    return apply(messages, chat_template=chat_template, tokenize=False, add_generation_prompt=add_generation_prompt)


def to_messages(conversations: Sequence[dict[str, str]],
                images: Sequence[Image.Image] | None = None) -> list[dict[str, Any]]:
    """LLaVA turns (``from``: human / gpt) as standard chat messages, each ``<image>`` an image part where it stood.

    The newline LLaVA data puts next to ``<image>`` is dropped: each template places its image parts itself.
    ``images``, if given, are attached to the image parts in order (for ``apply_chat_template(tokenize=True)``).
    """
    attached = iter(images or ())
    messages = []
    for turn in conversations:
        role = "user" if turn["from"] == "human" else "assistant"
        pieces = turn["value"].split(IMAGE_PLACEHOLDER)
        content: list[dict[str, Any]] = []
        for i, piece in enumerate(pieces):
            if i > 0:
                part = {"type": "image"}
                if images is not None:
                    part["image"] = next(attached)
                content.append(part)
            text = piece.strip("\n") if len(pieces) > 1 else piece
            if text:
                content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages


@dataclasses.dataclass(frozen=True)
class Fit:
    """A record against ``max_length`` for one model."""

    replies: int | None
    """Its reply tokens (the trained tokens); None for a record too short to be cut (not tokenized)."""
    kept: int | None
    """Those inside ``max_length``."""
    image_cut: bool
    """``max_length`` would cut image tokens: the record cannot be used."""


FITS = Fit(None, None, False)
"""A record too short to reach ``max_length`` (``ConversationEncoder._surely_fit``)."""
FIT_SLACK = 4
"""Tokens per turn the length bound allows beyond the parts' own: merges across a turn's edges, BOS / EOS."""


class ConversationEncoder:
    """Encodes conversations for one model with its processor and chat template.

    ``template`` is used only when the processor has no chat template of its own (an assembled student before its
    first artifact, a checkpoint saved without one); a model's own template always wins, so each model is prompted
    the way it was trained.
    """

    def __init__(self, processor: ProcessorMixin, template: ChatTemplate | None, max_length: int,
                 train_on: str = "responses") -> None:
        if train_on not in ("responses", "all"):
            raise ValueError(f"train_on={train_on!r}: expected 'responses' or 'all'")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_length = max_length
        self.train_on = train_on
        own = getattr(processor, "chat_template", None)
        self.chat_template = own if own else (template.jinja if template is not None else None)
        if not self.chat_template:
            raise ValueError(f"{type(processor).__name__} has no chat template and none was given (data.template)")
        self.image_token_id = image_token_id(processor)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        bos = self.tokenizer.bos_token
        self._bos = bos if isinstance(bos, str) and bos else None
        self._frames: dict[tuple, int | None] = {}
        """The template's own tokens per conversation shape (``_surely_fit``); None: not bounded."""

    # -- rendering -------------------------------------------------------------------------------------------
    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        return render_chat(self.processor, messages, self.chat_template, add_generation_prompt)

    def render_with_spans(self, messages: list[dict[str, Any]], rid: Any = None) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each reply (end-of-turn marker included,
        the whitespace a template puts after it excluded).

        By definition a reply spans from the end of the conversation rendered up to it with the generation prompt
        to the end of the conversation rendered up to and including it (``exact_spans``: two renders per reply).
        The fast path renders once and finds each reply after the template's assistant header, as a probe
        conversation showed the template to render it; any reply not found exactly so takes the exact path.
        """
        text = self.render(messages)
        fast = self._fast_spans(text, messages)
        return text, fast if fast is not None else self.exact_spans(text, messages, rid)

    def exact_spans(self, text: str, messages: list[dict[str, Any]], rid: Any = None) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise DataError(f"record {rid}: the chat template does not render the conversation as a sequence of "
                                "turns (a prefix renders differently), so replies cannot be located in it")
            spans.append((len(prompt), len(upto.rstrip())))
        return spans

    @functools.cached_property
    def _reply_layout(self) -> tuple[str, str, str] | None:
        """``(header, separator, end)`` of an assistant turn as the template renders a probe conversation: the
        generation prompt's addition, whitespace before the reply, the end-of-turn marker; None if the template
        does not render the probe as plain turns."""
        user = {"role": "user", "content": [{"type": "text", "text": "\x01"}]}
        reply = {"role": "assistant", "content": [{"type": "text", "text": "\x02"}]}
        try:
            plain, prompt = self.render([user]), self.render([user], add_generation_prompt=True)
            full = self.render([user, reply])
        except Exception:  # a template that refuses the probe: every record takes the exact path
            return None
        at = full.find("\x02", len(prompt))
        if not (prompt.startswith(plain) and full.startswith(prompt)) or at < 0 or full[len(prompt):at].strip():
            return None
        return prompt[len(plain):], full[len(prompt):at], full[at + 1:].rstrip()

    def _fast_spans(self, text: str, messages: list[dict[str, Any]]) -> list[tuple[int, int]] | None:
        layout = self._reply_layout
        if layout is None or not layout[0]:
            return None
        header, sep, end = layout
        spans, pos = [], 0
        for message in messages:
            if message["role"] != "assistant":
                continue
            parts = message["content"]
            if len(parts) != 1 or parts[0].get("type") != "text":
                return None
            at = text.find(header, pos)
            if at < 0:
                return None
            start = at + len(header)
            stop = start + len(sep) + len(parts[0]["text"])
            if text[start:stop] != sep + parts[0]["text"] or not text.startswith(end, stop):
                return None
            spans.append((start, len(text[: stop + len(end)].rstrip())))  # as the exact path strips the turn
            pos = stop + len(end)
        return spans

    # -- encoding --------------------------------------------------------------------------------------------
    def _call_processor(self, texts: list[str], images: Sequence[Sequence[Image.Image]],
                        padding_side: str, with_offsets: bool) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"text": texts, "padding": True, "padding_side": padding_side,
                                  "return_tensors": "pt"}
        if with_offsets:
            kwargs.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
        if any(images):
            kwargs["images"] = [list(im) for im in images]
        if self._bos is not None and all(t.startswith(self._bos) for t in texts):
            kwargs["add_special_tokens"] = False  # the template wrote it, as apply_chat_template assumes
        return dict(self.processor(**kwargs))

    def encode(self, records: Sequence[dict[str, Any]], images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """Padded (right) processor outputs for ``records`` with ``labels``; rows cut to ``max_length``."""
        texts, spans = [], []
        for record in records:
            text, reply_spans = self.render_with_spans(to_messages(record["conversations"]), record.get("id"))
            texts.append(text)
            spans.append(reply_spans)
        try:
            out = self._call_processor(texts, images, "right", with_offsets=True)
        except DataError:
            raise
        except Exception as err:  # the processor's own message (token/image counts, sizes), with the records named
            ids = [r.get("id") for r in records]
            raise DataError(f"records {ids}: {type(self.processor).__name__} refused them: {err}") from err
        labels = torch.full_like(out["input_ids"], IGNORE_INDEX)
        image_cut = []
        for row, record in enumerate(records):
            trained, image = self._token_roles(out, row, spans[row])
            ids = out["input_ids"][row]
            labels[row, trained] = ids[trained]
            if image.numel() and int(image.max()) >= self.max_length:
                image_cut.append(record.get("id"))
        if image_cut:
            raise DataError(f"record {image_cut[0]}: max_length={self.max_length} would cut image tokens")
        for key in _BOOKKEEPING:
            out.pop(key, None)
        out["labels"] = labels
        trained = (labels != IGNORE_INDEX).sum(1)
        out = _truncate(out, self.max_length)
        kept = (out["labels"] != IGNORE_INDEX).sum(1)
        for row in (trained - kept).nonzero().flatten().tolist():
            _warn_cut(records[row].get("id"), self.max_length, int(trained[row]), int(kept[row]))
        return out

    def _token_roles(self, out: dict[str, Any], row: int, spans: list[tuple[int, int]]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices of the trained tokens and of the image tokens of one row, from the tokenizer's offsets mapped
        back through the processor's image expansions to the rendered text."""
        offsets = out["offset_mapping"][row].tolist()
        mask = out["attention_mask"][row].tolist() if "attention_mask" in out else [1] * len(offsets)
        replacements = (out.get("text_replacement_offsets") or [[]] * (row + 1))[row]
        new_starts = [r["new_span"][0] for r in replacements]
        trained, image = [], []
        starts = [s for s, _ in spans]
        for pos, ((start, end), real) in enumerate(zip(offsets, mask)):
            if not real:
                continue
            k = bisect.bisect_right(new_starts, start) - 1
            if k >= 0 and start < replacements[k]["new_span"][1]:
                image.append(pos)  # inside an image's expansion: never a target
                continue
            if end == start:  # a token the tokenizer added (no text): not part of any reply
                original = -1
            else:
                gained = sum(r["new_span"][1] - r["new_span"][0] - (r["span"][1] - r["span"][0])
                             for r in replacements[: k + 1])
                original = start - gained
            if self.train_on == "all":
                trained.append(pos)
                continue
            j = bisect.bisect_right(starts, original) - 1
            if original >= 0 and j >= 0 and original < spans[j][1]:
                trained.append(pos)
        return torch.tensor(trained, dtype=torch.long), torch.tensor(image, dtype=torch.long)

    # -- fitting into max_length, before training ------------------------------------------------------------
    def fit(self, conversations: Sequence[dict[str, str]], sizes: Sequence[tuple[int, int]], rid: Any = None
            ) -> Fit:
        """How a record fits ``max_length`` for this model (``fit_many`` for one record; raises its refusal)."""
        result = self.fit_many([(conversations, sizes, rid)], bound=False)[0]
        if isinstance(result, str):
            raise DataError(result)
        return result

    def fit_many(self, records: Sequence[tuple[Sequence[dict[str, str]], Sequence[tuple[int, int]], Any]],
                 bound: bool = True) -> list[Fit | str]:
        """How each ``(conversations, image sizes, id)`` fits ``max_length`` for this model: its reply tokens, how
        many are kept, whether image tokens would be cut (what ``encode`` refuses), or why the template or processor
        refuses it (a string). The texts are rendered and tokenized in one batch, each image standing for as many
        tokens as the processor expands one image of that size to (asked once per size); where that is not how
        this processor builds its inputs (the probe in ``_expansion_is_exact``), the processor runs on blank
        images of the record's sizes, one record at a time. ``bound``: a record too short to be cut is answered
        ``FITS`` without rendering (``_surely_fit``)."""
        results: list[Fit | str | None] = [None] * len(records)
        rendered = {}
        short = self._surely_fit(records) if bound else [False] * len(records)
        for i, (conversations, _, rid) in enumerate(records):
            if short[i]:
                results[i] = FITS
                continue
            try:
                rendered[i] = self.render_with_spans(to_messages(conversations), rid)
            except Exception as err:  # the template's refusal, named
                results[i] = _refusal(err)
        tokens = self._tokenize({i: text for i, (text, _) in rendered.items()}) if self._expansion_is_exact else {}
        for i, (text, spans) in rendered.items():
            sizes = records[i][1]
            try:
                layout = self._layout_from_tokens(*tokens[i], spans, sizes) if i in tokens else None
                if layout is None:
                    layout = self._layout_from_processor(text, spans, sizes)
            except Exception as err:  # the processor's own refusal (token / image counts, sizes)
                results[i] = _refusal(err)
                continue
            trained, image_end = layout
            results[i] = Fit(len(trained), sum(1 for pos in trained if pos < self.max_length),
                             image_end >= self.max_length)
        return results

    def _surely_fit(self, records: Sequence[tuple[Sequence[dict[str, str]], Sequence[tuple[int, int]], Any]]
                    ) -> list[bool]:
        """Which records are too short to reach ``max_length``: their turns' own tokens (one batch), the template's
        tokens for a conversation of that shape (roles, images per turn: measured once from a render with
        one-character contents), each image's expansion, ``FIT_SLACK`` per turn for merges across a turn's edges
        and tokens added without text. A shape's bound is checked once against a real render (a template that
        repeats or rewrites contents is never bounded)."""
        if not self._expansion_is_exact:
            return [False] * len(records)
        values = [t["value"].replace(IMAGE_PLACEHOLDER, " ") for conversations, _, _ in records
                  for t in conversations]
        backend = getattr(self.tokenizer, "backend_tokenizer", None)  # (the Rust batch, without the wrapping)
        if backend is not None:
            counts = [len(e.ids) for e in backend.encode_batch(values, add_special_tokens=False)] if values else []
        else:
            counts = [len(ids) for ids in self.tokenizer(values, add_special_tokens=False)["input_ids"]]
        lengths = iter(counts)
        out = []
        for conversations, sizes, _ in records:
            shape = tuple((t["from"], t["value"].count(IMAGE_PLACEHOLDER)) for t in conversations)
            content = sum(next(lengths) for _ in conversations)
            frame = self._frame(shape, conversations, content)
            images = sum(self._expansion(tuple(size)) for size in sizes)
            out.append(frame is not None and
                       frame + content + images + FIT_SLACK * (len(conversations) + 1) < self.max_length)
        return out

    def _frame(self, shape: tuple, conversations: Sequence[dict[str, str]], content: int) -> int | None:
        if shape not in self._frames:
            skeleton = [{"from": role, "value": "x" + f"{IMAGE_PLACEHOLDER}x" * n} for role, n in shape]
            try:
                frame = len(self._tokenize({0: self.render(to_messages(skeleton))})[0][0])
                real = len(self._tokenize({0: self.render(to_messages(conversations))})[0][0])
            except Exception:  # the full check names the refusal
                return None
            self._frames[shape] = frame if real <= frame + content + FIT_SLACK * (len(shape) + 1) else None
        return self._frames[shape]

    def _tokenize(self, texts: dict[int, str]) -> dict[int, tuple[list[int], list[tuple[int, int]]]]:
        """Token ids and character offsets of each text, as ``encode`` tokenizes it (no second BOS)."""
        out = {}
        for add in (True, False):
            keys = [i for i, t in texts.items() if (self._bos is None or not t.startswith(self._bos)) == add]
            if keys:
                enc = self.tokenizer([texts[i] for i in keys], add_special_tokens=add, return_offsets_mapping=True)
                out.update({i: (enc["input_ids"][n], enc["offset_mapping"][n]) for n, i in enumerate(keys)})
        return out

    def _layout_from_processor(self, text: str, spans: list[tuple[int, int]], sizes: Sequence[tuple[int, int]]
                               ) -> tuple[list[int], int]:
        """(trained token positions, last image token position or -1) as ``encode`` finds them."""
        images = [[Image.new("RGB", tuple(size)) for size in sizes]]
        out = self._call_processor([text], images, "right", with_offsets=True)
        trained, image = self._token_roles(out, 0, spans)
        return trained.tolist(), int(image.max()) if image.numel() else -1

    def _layout_from_tokens(self, ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                            sizes: Sequence[tuple[int, int]]) -> tuple[list[int], int] | None:
        """(trained token positions, last image token position or -1) from the text's own tokens, each image's
        placeholder widened to its expansion; None if the placeholders do not match the images."""
        marks = [i for i, t in enumerate(ids) if t == self._placeholder_id]
        if len(marks) != len(sizes):
            return None
        widths = [self._expansion(tuple(size)) for size in sizes]
        starts = [s for s, _ in spans]
        trained, shift, k, image_end = [], 0, 0, -1
        for pos, (start, end) in enumerate(offsets):
            if k < len(marks) and pos == marks[k]:
                image_end = pos + shift + widths[k] - 1
                shift += widths[k] - 1
                k += 1
                continue
            if end == start:
                continue
            if self.train_on == "all":
                trained.append(pos + shift)
                continue
            j = bisect.bisect_right(starts, start) - 1
            if j >= 0 and start < spans[j][1]:
                trained.append(pos + shift)
        return trained, image_end

    @functools.cached_property
    def _placeholder_id(self) -> int:
        """The token the chat template writes for an image (Gemma3's begin-of-image, not its feature token)."""
        return self.tokenizer.convert_tokens_to_ids(self.processor.image_token)

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one encoder per model per stage)
    def _expansion(self, size: tuple[int, int]) -> int:
        """How many tokens the processor puts where the text has one image of ``size`` (width, height)."""
        token = self.processor.image_token
        alone = len(self.tokenizer(token, add_special_tokens=False)["input_ids"])
        out = self.processor(text=[token], images=[[Image.new("RGB", size)]], add_special_tokens=False)
        return len(out["input_ids"][0]) - alone + 1

    @functools.cached_property
    def _expansion_is_exact(self) -> bool:
        """Whether counting each image as its expansion's width gives the processor's own layout: checked on a
        probe conversation with two images of other sizes, a text-only turn and two replies."""
        conversation = [{"from": "human", "value": "<image>\nWhat is this, in a few words?"},
                        {"from": "gpt", "value": "A small test picture."},
                        {"from": "human", "value": "And this one: <image> is it the same?"},
                        {"from": "gpt", "value": "No, it is wider."}]
        sizes = [(40, 30), (96, 48)]
        try:
            text, spans = self.render_with_spans(to_messages(conversation))
            ids, offsets = self._tokenize({0: text})[0]
            return self._layout_from_tokens(ids, offsets, spans, sizes) == \
                self._layout_from_processor(text, spans, sizes)
        except Exception:  # a processor that refuses the probe: every record takes the processor path
            return False

    def batch(self, records: Sequence[dict[str, Any]], images: Sequence[Sequence[Image.Image]], prefix: str = "",
              packed: bool = False) -> dict[str, Any]:
        """The model's inputs and labels for ``records`` (``images[i]``: record i's images, in order), keys prefixed.

        ``packed``: the records concatenated into one row with no padding and no attention mask; ``position_ids``
        restart at 0 for each record, from which transformers builds the mask that keeps attention inside each
        record. Each record's first label is ignored, so no position predicts across a record boundary: the same
        predictions as the padded batch.
        """
        out = self.encode(records, images)
        if packed:
            out = _pack(out)
        return {prefix + k: v for k, v in out.items()}

    def prompts(self, conversations: Sequence[Sequence[dict[str, str]]],
                images: Sequence[Sequence[Image.Image]]) -> dict[str, Any]:
        """Left-padded generation prompts (each conversation so far, then the assistant's turn opened)."""
        texts = [self.render(to_messages(c), add_generation_prompt=True) for c in conversations]
        out = self._call_processor(texts, images, "left", with_offsets=False)
        for key in _BOOKKEEPING:
            out.pop(key, None)
        return out


_WARNED: set[Any] = set()


def _warn_cut(rid: Any, max_length: int, trained: int, kept: int) -> None:
    """Once per record: ``max_length`` cut some (or all) of its reply tokens (``max_length`` 0: the teacher's and
    the student's cuts differ, both keep the shorter)."""
    if rid in _WARNED:
        return
    _WARNED.add(rid)
    what = "all of them: it trains on nothing" if kept == 0 else f"{kept} are kept"
    if max_length == 0:
        log.warning("record %s: data.max_length left the teacher and the student different numbers of reply tokens; "
                    "both keep the first %d of %d (%s)", rid[1], kept, trained, what)
        return
    log.warning("record %s: max_length=%d cuts %d of its %d reply tokens (%s); raise data.max_length to keep them",
                rid, max_length, trained - kept, trained, what)


def _truncate(out: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Cut the per-token outputs to ``max_length`` (image tokens were checked to fit) and drop all-padding columns."""
    width = out["input_ids"].shape[1]
    if "attention_mask" in out:
        width = min(width, int(out["attention_mask"].sum(1).max()))
    width = min(width, max_length)
    for key in TEXT_KEYS + ("labels",):
        if key in out and out[key].shape[1] > width:
            out[key] = out[key][:, :width]
    return out


def _pack(out: dict[str, Any]) -> dict[str, Any]:
    lengths = (out["attention_mask"].sum(1) if "attention_mask" in out
               else torch.full((out["input_ids"].shape[0],), out["input_ids"].shape[1])).tolist()
    packed = {}
    for key in TEXT_KEYS:
        if key in out and key != "attention_mask":
            packed[key] = torch.cat([out[key][i, :n] for i, n in enumerate(lengths)]).unsqueeze(0)
    labels = [out["labels"][i, :n].clone() for i, n in enumerate(lengths)]
    for row in labels:
        if row.numel():
            row[0] = IGNORE_INDEX  # would be predicted from the previous record's last token
    packed["labels"] = torch.cat(labels).unsqueeze(0)
    packed["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    # The image inputs stay as they are: every supported model scatters its image features into the image-token
    # positions in order over the whole batch, so one row takes the same images. (3-D rope models are refused at
    # stage start: ``prepare_packing``.)
    packed.update({k: v for k, v in out.items() if k not in TEXT_KEYS and k != "labels"})
    return packed


def _segments(batch: dict[str, Any], prefix: str, n: int) -> list[tuple[int, int, int]]:
    """``(row, start, end)`` of each record: a row each when padded, position-id restarts in a packed row."""
    labels = batch[prefix + "labels"]
    if prefix + "position_ids" in batch and labels.shape[0] == 1 and n > 1:
        starts = (batch[prefix + "position_ids"][0] == 0).nonzero().flatten().tolist()
        return [(0, a, b) for a, b in zip(starts, [*starts[1:], labels.shape[1]])]
    return [(i, 0, labels.shape[1]) for i in range(labels.shape[0])]


def _pair_replies(batch: dict[str, Any], records: Sequence[dict[str, Any]]) -> None:
    """Teacher and student are cut at the same ``max_length`` but their image tokens and templates differ, so one
    may lose more reply tokens than the other: keep, per record, only the reply tokens both still have (the first
    ones), so that KD pairs the same tokens instead of stopping on unequal counts."""
    for (sr, sa, sb), (tr, ta, tb), record in zip(_segments(batch, "", len(records)),
                                                  _segments(batch, "teacher_", len(records)), records, strict=True):
        s_pos = (batch["labels"][sr, sa:sb] != IGNORE_INDEX).nonzero().flatten() + sa
        t_pos = (batch["teacher_labels"][tr, ta:tb] != IGNORE_INDEX).nonzero().flatten() + ta
        k = min(len(s_pos), len(t_pos))
        if len(s_pos) != len(t_pos):
            batch["labels"][sr, s_pos[k:]] = IGNORE_INDEX
            batch["teacher_labels"][tr, t_pos[k:]] = IGNORE_INDEX
            _warn_cut(("pair", record.get("id")), 0, max(len(s_pos), len(t_pos)), k)


class SupervisedCollator:
    """Batches LLaVA-format records for the student (and the teacher, if its encoder is given)."""

    def __init__(self, student: ConversationEncoder, image_root: str | Path | None,
                 teacher: ConversationEncoder | None = None, with_ids: bool = False, packed: bool = False,
                 host_labels: bool = False) -> None:
        self.student = student
        self.teacher = teacher
        self.with_ids = with_ids
        """Also return ``record_ids`` (a list of str): a teacher cache looks its targets up by record id."""
        self.host_labels = host_labels
        """Also return ``host_labels``: the labels (and teacher labels) as numpy arrays, which stay on the host when
        the batch moves to the GPU; the KD losses find their positions there without reading the GPU back."""
        self.packed = packed
        """One padding-free row per batch for each model (``ConversationEncoder.batch``)."""
        self.image_root = Path(image_root) if image_root is not None else None

    def load_images(self, record: dict[str, Any]) -> list[Image.Image]:
        images = []
        for path, data in record_images(record):
            try:
                images.append(open_image(self.image_root, path, data))
            except Exception as err:
                raise DataError(f"record {record.get('id')}: cannot read image {path!r}: {err}") from err
        return images

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, Any]:
        images = [self.load_images(r) for r in records]
        batch = self.student.batch(records, images, packed=self.packed)
        if self.teacher is not None:
            batch.update(self.teacher.batch(records, images, prefix="teacher_", packed=self.packed))
            _pair_replies(batch, records)
        if self.with_ids:
            batch["record_ids"] = [str(r["id"]) for r in records]
        if self.host_labels:
            batch["host_labels"] = {k: batch[k].numpy().copy() for k in ("labels", "teacher_labels") if k in batch}
        return batch


def _conversation(record: dict[str, Any]) -> list[Sequence[dict[str, str]]]:
    return [record["conversations"]]


def _refusal(err: Exception) -> str:
    if isinstance(err, DataError):
        return str(err).split(": ", 1)[1] if str(err).startswith("record ") else str(err)
    return f"refused by the processor: {type(err).__name__}: {err}"


FIT_BATCH = 512  # records rendered and tokenized together


def check_fit(
    dataset: Any,
    encoders: dict[str, ConversationEncoder],
    image_root: str | Path | None,
    on_bad_record: str,
    source: str,
    conversations_of: Callable[[dict[str, Any]], list[Sequence[dict[str, str]]]] = _conversation,
    cache_dir: str | Path | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Every record as each model (``encoders``, by name) will see it, checked before training: a record whose
    image tokens ``max_length`` would cut, whose replies it cuts away entirely (it would train on nothing), or that
    a model's template or processor refuses is an error naming it (``on_bad_record=error``) or is skipped and
    counted (``skip``). Records that lose part of their replies are kept and counted. Returns the usable records
    and a report. With ``cache_dir`` each model's answers for this dataset are kept there and reused (the stages
    of a run that share data and a processor check it once)."""
    sizes = _ImageSizes(image_root, cache_dir)
    per_model = {name: _fits(dataset, encoder, sizes, conversations_of, cache_dir)
                 for name, encoder in encoders.items()}
    refused: dict[int, str] = {}
    report = Counter()
    for idx in range(len(dataset)):
        lost = 0
        for name, fits in per_model.items():
            max_length = encoders[name].max_length
            for replies, kept, image_cut, error in fits[idx]:
                if replies is None and error is None:  # too short to be cut
                    continue
                if error is not None:
                    refused.setdefault(idx, f"{error} ({name})")
                elif image_cut:
                    refused.setdefault(idx, f"max_length={max_length} would cut the {name}'s image tokens")
                elif kept == 0:
                    refused.setdefault(idx, f"max_length={max_length} leaves the {name} no reply token (all "
                                            f"{replies} lie beyond it: the record would train on nothing)")
                else:
                    lost = max(lost, replies - kept)
        if lost and idx not in refused:
            report["records_cut"] += 1
            report["reply_tokens_cut"] += lost
    return _apply_fit(dataset, refused, {"records": len(dataset), **report}, on_bad_record, source)


def _fits(dataset: Any, encoder: ConversationEncoder, sizes: _ImageSizes,
          conversations_of: Callable[[dict[str, Any]], list[Sequence[dict[str, str]]]],
          cache_dir: str | Path | None) -> list[list[tuple[int, int, bool, str | None]]]:
    """Per record, per conversation: (reply tokens, kept, image tokens cut, refusal or None) for one model. With a
    cache folder, the first process of a launch computes it while the others wait for its file. (Parallel parts in
    spawned processes were tried: on 2 CPUs, 66.5k records took 41.7 s against 26.3 s in one process, the
    workers' imports and set-up costing more than they saved.)"""
    if cache_dir is None:
        return _fit_records(dataset, encoder, sizes, conversations_of)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    path = Path(cache_dir) / f"fit-{_fit_key(dataset, encoder, conversations_of)}.json"
    with FileLock(str(path) + ".lock"):
        if path.is_file():
            return json.loads(path.read_text())
        fits = _fit_records(dataset, encoder, sizes, conversations_of)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(fits, separators=(",", ":")))
        os.replace(tmp, path)
    return fits


def _fit_records(dataset: Any, encoder: ConversationEncoder, sizes: _ImageSizes,
                 conversations_of: Callable[[dict[str, Any]], list[Sequence[dict[str, str]]]]
                 ) -> list[list[tuple[int, int, bool, str | None]]]:
    fits: list[list[tuple[int, int, bool, str | None]]] = []
    for start in range(0, len(dataset), FIT_BATCH):
        rows = dataset[start:start + FIT_BATCH]
        records = [dict(zip(rows, values)) for values in zip(*rows.values())]
        items, owners = [], []
        for record in records:
            fits.append([])
            try:
                shapes = [sizes(path_, data) for path_, data in record_images(record)]
            except Exception as err:
                fits[-1].append((0, 0, False, f"cannot read its image: {err}"))
                continue
            for conversation in conversations_of(record):
                items.append((conversation, shapes, record.get("id")))
                owners.append(len(fits) - 1)
        for owner, result in zip(owners, encoder.fit_many(items)):
            fits[owner].append((0, 0, False, result) if isinstance(result, str) else
                               (result.replies, result.kept, result.image_cut, None))
    return fits


def _apply_fit(dataset: Any, refused: dict[int, str], report: dict[str, Any], on_bad_record: str, source: str
               ) -> tuple[Any, dict[str, Any]]:
    if refused and on_bad_record == "error":
        idx, reason = min(refused.items())
        raise DataError(f"{source}: record {dataset[idx].get('id')}: {reason}; raise data.max_length, or set "
                        f"data.on_bad_record=skip to skip such records ({len(refused)} of {len(dataset)})")
    if report.get("records_cut"):
        log.warning("%s: data.max_length cuts the replies of %d of %d records (%d reply tokens lost in all)", source,
                    report["records_cut"], report["records"], report["reply_tokens_cut"])
    if not refused:
        return dataset, {**report, "refused": 0}
    reasons = Counter(reason.split(" (")[0].split(";")[0] for reason in refused.values())
    log.warning("%s: skipped %d of %d records that cannot be trained on as they are: %s", source, len(refused),
                len(dataset), dict(reasons))
    if len(refused) == len(dataset):
        raise DataError(f"{source}: no record fits data.max_length ({len(dataset)} checked)")
    keep = [i for i in range(len(dataset)) if i not in refused]
    return dataset.select(keep), {**report, "refused": len(refused), "refused_reasons": dict(reasons)}


def _fit_key(dataset: Any, encoder: ConversationEncoder, conversations_of: Callable) -> str:
    tokenizer = encoder.tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = [getattr(dataset, "_fingerprint", None) or str(id(dataset)), conversations_of.__qualname__,
             encoder.max_length, encoder.train_on, encoder.chat_template, type(encoder.processor).__name__,
             encoder.processor.to_json_string(),
             backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:20]
class _ImageSizes:
    """(width, height) of each image from its header, once per file, or from the loader's record of the files it
    checked (``formats.image_store``: a stat instead of opening the file)."""

    def __init__(self, image_root: str | Path | None, cache_dir: str | Path | None = None) -> None:
        self.root = Path(image_root) if image_root is not None else None
        self.known: dict[str, tuple[int, int]] = {}
        self.checked = read_image_store(image_store(cache_dir, self.root)) if cache_dir and self.root else {}

    def __call__(self, path: str | None, data: bytes | None) -> tuple[int, int]:
        if data is not None:
            with Image.open(io.BytesIO(data)) as im:
                return im.size
        if path not in self.known:
            if self.root is None:
                raise DataError(f"record has image {path!r} but no image folder is configured")
            file = resolve_image(self.root, path)
            entry = self.checked.get(path)
            if entry and len(entry) == 4:
                stat = os.stat(file)
                if entry[:2] == [stat.st_size, stat.st_mtime_ns]:
                    self.known[path] = (entry[2], entry[3])
                    return self.known[path]
            with Image.open(file) as im:
                self.known[path] = im.size
        return self.known[path]
