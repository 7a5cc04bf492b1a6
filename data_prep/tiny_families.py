"""Tiny random checkpoints of real vision-language architectures, one per family, for tests.

Each is a complete local checkpoint folder, as a hub checkpoint of that family is laid out: random weights
of the family's own model class (2-layer text model, 2-layer vision tower, images of 32-64 pixels, so that an
image gives a handful of image tokens), the family's own processor and image processor classes (the PIL image
processor when torchvision is absent), a chat template copied from the family's real checkpoints, and a
tokenizer. It loads with ``AutoModelForImageTextToText.from_pretrained(out)`` and
``distill.models.processors.load_processor(out)``.

Every family's tokenizer is the same small byte-level BPE (``data_prep.standins``) plus one shared, ordered
list of all families' special tokens, so ordinary text has the same ids in every family and so does every
special token: a teacher of one family and a student of another agree on the response's token ids. Per family
the tokenizer names its tokens as the processor expects (``image_token``, Gemma 3's ``boi_token``, InternVL's
``context_image_token``, ...), sets its bos/eos and whether it adds bos, and the model config's token ids
point at them.

    python -m data_prep.tiny_families --family qwen2_vl --tokenizer runs/demo/world/tokenizer --out /tmp/qwen2_vl
    python -m data_prep.tiny_families --family all --tokenizer runs/demo/world/tokenizer --out /tmp/families

Chat templates (each constant below names its source): PaliGemma's checkpoints have none; the caller writes
PaliGemma's own prompt (``processor(text="<image>caption en", images=..., suffix=...)``; the processor adds bos
and the closing newline).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import (
    AddedToken,
    AutoModelForImageTextToText,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from distill.models.processors import has_torchvision, image_only_processors, processor_class, without_video

log = logging.getLogger(__name__)


class FamilyUnavailable(RuntimeError):
    """The family cannot be built here: the installed transformers lacks a class, or its processor a dependency."""


# ---------------------------------------------------------------------------------------------------------------
# Chat templates, copied from the families' real checkpoints.

# llava-hf/llava-1.5-7b-hf (as in transformers' tests/models/llava/test_processing_llava.py, "must match the Hub").
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json (it has no generation prompt).
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# llava-hf/llava-onevision-qwen2-*-ov-hf (transformers' convert_llava_onevision_weights_to_hf.py).
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen/Qwen2-VL-7B-Instruct and Qwen/Qwen2.5-VL-7B-Instruct chat_template.json (the two are identical).
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen/Qwen3-VL-*-Instruct chat_template.json.
QWEN3_VL_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # noqa: E501 (the template's own long lines)

# OpenGVLab/InternVL3-*-hf (transformers' convert_internvl_weights_to_hf.py).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# HuggingFaceM4/Idefics3-8B-Llama3 (its rendering is pinned by transformers' test_processing_idefics3.py).
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# HuggingFaceTB/SmolVLM-Instruct (as in transformers' tests/models/smolvlm/test_processing_smolvlm.py).
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# google/gemma-3-*-it (transformers' convert_gemma3_weights.py, _CHAT_TEMPLATE).
GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# mistralai/Mistral-Small-3.1-24B-Instruct-2503, transformers format (as in transformers'
# tests/models/mistral3/test_processing_mistral3.py, from hf-internal-testing/Mistral-Small-3.1-...-only-processor).
# Its default system prompt carries today's date (strftime_now), as the real one does.
MISTRAL3_TEMPLATE = r"""{%- set today = strftime_now("%Y-%m-%d") %}
{%- set default_system_message = "You are Mistral Small 3, a Large Language Model (LLM) created by Mistral AI, a French startup headquartered in Paris.\nYour knowledge base was last updated on 2023-10-01. The current date is " + today + ".\n\nWhen you're not sure about some information, you say that you don't have the information and don't make up anything.\nIf the user's question is not clear, ambiguous, or does not provide enough context for you to accurately answer the question, you do not try to answer it right away and you rather ask the user to clarify their request (e.g. \"What are some good restaurants around me?\" => \"Where are you?\" or \"When is the next flight to Tokyo\" => \"Where do you travel from?\")" %}

{{- bos_token }}

{%- if messages[0]['role'] == 'system' %}
    {%- if messages[0] is string %}
        {%- set system_message = messages[0]['content'] %}
        {%- set loop_messages = messages[1:] %}
    {%- else %} 
        {%- set system_message = messages[0]['content'][0]['text'] %}
        {%- set loop_messages = messages[1:] %}
    {%- endif %}
{%- else %}
    {%- set system_message = default_system_message %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}

{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
            {%- if message['content'] is string %}
            {{- '[INST]' + message['content'] + '[/INST]' }}
            {%- else %}
                    {{- '[INST]' }}
                    {%- for block in message['content'] %}
                            {%- if block['type'] == 'text' %}
                                    {{- block['text'] }}
                            {%- elif block['type'] == 'image' or block['type'] == 'image_url' %}
                                    {{- '[IMG]' }}
                                {%- else %}
                                    {{- raise_exception('Only text and image blocks are supported in message content!') }}
                                {%- endif %}
                        {%- endfor %}
                    {{- '[/INST]' }}
                {%- endif %}
    {%- elif message['role'] == 'system' %}
        {{- '[SYSTEM_PROMPT]' + message['content'] + '[/SYSTEM_PROMPT]' }}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is string %}
            {{- message['content'] + eos_token }}
        {%- else %}
            {{- message['content'][0]['text'] + eos_token }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Only user, system and assistant roles are supported!') }}
    {%- endif %}
{%- endfor %}"""  # noqa: E501, W291 (the template's own long lines and trailing space)


# ---------------------------------------------------------------------------------------------------------------
# Family specs.


@dataclass(frozen=True)
class Tok:
    """A token in a config value: replaced by its id in the family's tokenizer."""

    text: str


@dataclass(frozen=True)
class Dim:
    """A size in a config value that follows the text model's size: ``hidden_size`` or ``mrope_section``."""

    name: str


@dataclass(frozen=True)
class TextSize:
    """Shape of the text model (every family's decoder takes these)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def mrope_section(self) -> list[int]:
        """Qwen-VL's rotary split of ``head_dim / 2`` into (time, height, width): 64 -> [16, 24, 24] as in Qwen2-VL."""
        half = self.head_dim // 2
        side = (half - half // 4) // 2
        return [half - 2 * side, side, side]


@dataclass(frozen=True)
class Family:
    """What it takes to write one family's checkpoint. Config values may hold ``Tok`` and ``Dim`` markers."""

    config: str
    """transformers config class of the whole model."""
    text: dict[str, Any]
    """``text_config`` (``model_type`` and family-specific fields; ``TextSize`` and token ids are filled in)."""
    vision: dict[str, Any]
    extra: dict[str, Any]
    """Other top-level config fields (token ids, projector and feature-selection settings)."""
    processor: str
    image_processor: str
    """The torchvision image processor class; ``<name>Pil`` is used where torchvision is absent."""
    image_processor_kwargs: dict[str, Any]
    processor_kwargs: dict[str, Any] = field(default_factory=dict)
    video_processor: str | None = None
    """Built (with ``video_processor_kwargs``) only where torchvision is installed; else the checkpoint has none."""
    video_processor_kwargs: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    """Named tokenizer tokens (``tokenizer.image_token`` etc.), saved as the tokenizer's model-specific specials."""
    special: tuple[str, ...] = ()
    """Further special tokens the processor or the template uses."""
    bos: str | None = None
    eos: str = "<|im_end|>"
    add_bos: bool = False
    """Whether the tokenizer adds ``bos`` itself (Llama and Mistral tokenizers do)."""
    stop: tuple[str, ...] = ()
    """End-of-turn tokens that also end generation (``generation_config.eos_token_id``)."""
    chat_template: str | None = None


QWEN_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
               "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
QWEN_IDS = {"image_token_id": Tok("<|image_pad|>"), "video_token_id": Tok("<|video_pad|>"),
            "vision_start_token_id": Tok("<|vision_start|>"), "vision_end_token_id": Tok("<|vision_end|>")}
QWEN_TEXT = {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": Dim("mrope_section")}}
# Patch 8, merge 2: one image token per 16x16 pixels; between 1 and 16 tokens an image.
QWEN_IMAGES = {"patch_size": 8, "merge_size": 2, "temporal_patch_size": 2,
               "size": {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}}
CLIP_VISION = {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
SIGLIP_VISION = {**CLIP_VISION, "model_type": "siglip_vision_model"}
LLAVA_PROCESSOR = {"patch_size": 8, "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
# Idefics3 / SmolVLM: 32-pixel tiles of 16 patches, pixel-shuffled by 2 to 4 tokens; images up to 64 pixels: 2x2 tiles.
IDEFICS_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                  "image_size": 32, "patch_size": 8}
IDEFICS_IMAGES = {"size": {"longest_edge": 64}, "max_image_size": {"longest_edge": 32}, "do_image_splitting": True}
IDEFICS_SPECIAL = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))

FAMILIES: dict[str, Family] = {
    "llava": Family(
        config="LlavaConfig", text={"model_type": "llama"}, vision=CLIP_VISION,
        extra={"image_token_index": Tok("<image>"), "vision_feature_layer": -2,
               "vision_feature_select_strategy": "default", "image_seq_length": 16},
        processor="LlavaProcessor", image_processor="CLIPImageProcessor",
        image_processor_kwargs={"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},
        processor_kwargs=LLAVA_PROCESSOR,
        tokens={"image_token": "<image>"}, bos="<s>", eos="</s>", add_bos=True, chat_template=LLAVA_TEMPLATE,
    ),
    "llava_next": Family(
        config="LlavaNextConfig", text={"model_type": "mistral"}, vision=CLIP_VISION,
        extra={"image_token_index": Tok("<image>"), "vision_feature_layer": -2,
               "vision_feature_select_strategy": "default",
               "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]},
        processor="LlavaNextProcessor", image_processor="LlavaNextImageProcessor",
        image_processor_kwargs={"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
                                "image_grid_pinpoints": [[32, 64], [64, 32], [64, 64], [96, 32], [32, 96]]},
        processor_kwargs=LLAVA_PROCESSOR,
        tokens={"image_token": "<image>"}, special=("[INST]", "[/INST]"), bos="<s>", eos="</s>", add_bos=True,
        chat_template=LLAVA_NEXT_TEMPLATE,
    ),
    "llava_onevision": Family(
        config="LlavaOnevisionConfig", text={"model_type": "qwen2"}, vision=SIGLIP_VISION,
        extra={"image_token_index": Tok("<image>"), "video_token_index": Tok("<video>"), "vision_feature_layer": -1,
               "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_9",
               "image_grid_pinpoints": [[32 * i, 32 * j] for i in range(1, 7) for j in range(1, 7)]},
        processor="LlavaOnevisionProcessor", image_processor="LlavaOnevisionImageProcessor",
        image_processor_kwargs={"size": {"height": 32, "width": 32},
                                "image_grid_pinpoints": [[32 * i, 32 * j] for i in range(1, 7) for j in range(1, 7)]},
        processor_kwargs={"num_image_tokens": 16, "vision_feature_select_strategy": "full",
                          "vision_aspect_ratio": "anyres_max_9"},
        video_processor="LlavaOnevisionVideoProcessor", video_processor_kwargs={"size": {"height": 32, "width": 32}},
        tokens={"image_token": "<image>", "video_token": "<video>"}, chat_template=LLAVA_ONEVISION_TEMPLATE,
    ),
    "qwen2_vl": Family(
        config="Qwen2VLConfig", text={"model_type": "qwen2_vl_text", **QWEN_TEXT},
        vision={"depth": 2, "embed_dim": 32, "hidden_size": Dim("hidden_size"), "num_heads": 2, "mlp_ratio": 2,
                "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2},
        extra=QWEN_IDS, processor="Qwen2VLProcessor", image_processor="Qwen2VLImageProcessor",
        image_processor_kwargs=QWEN_IMAGES, video_processor="Qwen2VLVideoProcessor",
        video_processor_kwargs=QWEN_IMAGES, tokens=QWEN_TOKENS, chat_template=QWEN2_VL_TEMPLATE,
    ),
    "qwen2_5_vl": Family(
        config="Qwen2_5_VLConfig", text={"model_type": "qwen2_5_vl_text", **QWEN_TEXT},
        vision={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                "out_hidden_size": Dim("hidden_size"), "patch_size": 8, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "window_size": 32, "fullatt_block_indexes": [1]},
        extra=QWEN_IDS, processor="Qwen2_5_VLProcessor", image_processor="Qwen2VLImageProcessor",
        image_processor_kwargs=QWEN_IMAGES, video_processor="Qwen2VLVideoProcessor",
        video_processor_kwargs=QWEN_IMAGES, tokens=QWEN_TOKENS, chat_template=QWEN2_VL_TEMPLATE,
    ),
    "qwen3_vl": Family(
        config="Qwen3VLConfig",
        text={"model_type": "qwen3_vl_text", "head_dim": Dim("head_dim"),
              "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                                  "mrope_section": Dim("mrope_section")}},
        vision={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                "out_hidden_size": Dim("hidden_size"), "patch_size": 8, "spatial_merge_size": 2,
                "temporal_patch_size": 2, "num_position_embeddings": 64, "deepstack_visual_indexes": [0]},
        extra=QWEN_IDS, processor="Qwen3VLProcessor", image_processor="Qwen2VLImageProcessor",
        image_processor_kwargs=QWEN_IMAGES, video_processor="Qwen3VLVideoProcessor",
        video_processor_kwargs=QWEN_IMAGES, tokens=QWEN_TOKENS, chat_template=QWEN3_VL_TEMPLATE,
    ),
    "internvl": Family(
        config="InternVLConfig", text={"model_type": "qwen2"},
        vision={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "image_size": [32, 32], "patch_size": [8, 8], "use_absolute_position_embeddings": True},
        extra={"image_token_id": Tok("<IMG_CONTEXT>"), "image_seq_length": 4, "downsample_ratio": 0.5,
               "vision_feature_layer": -1, "vision_feature_select_strategy": "default"},
        processor="InternVLProcessor", image_processor="GotOcr2ImageProcessor",
        # 32-pixel tiles, up to 4 of them plus a thumbnail; 4 tokens a tile.
        image_processor_kwargs={"size": {"height": 32, "width": 32}, "crop_to_patches": True, "min_patches": 1,
                                "max_patches": 4, "image_mean": [0.485, 0.456, 0.406],
                                "image_std": [0.229, 0.224, 0.225]},
        processor_kwargs={"image_seq_length": 4},
        video_processor="InternVLVideoProcessor", video_processor_kwargs={"size": {"height": 32, "width": 32}},
        tokens={"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"},
        chat_template=INTERNVL_TEMPLATE,
    ),
    "idefics3": Family(
        config="Idefics3Config", text={"model_type": "llama"}, vision=IDEFICS_VISION,
        extra={"image_token_id": Tok("<image>"), "scale_factor": 2},
        processor="Idefics3Processor", image_processor="Idefics3ImageProcessor",
        image_processor_kwargs=IDEFICS_IMAGES, processor_kwargs={"image_seq_len": 4},
        tokens={"image_token": "<image>"}, special=IDEFICS_SPECIAL,
        bos="<|begin_of_text|>", eos="<|end_of_text|>", add_bos=True, stop=("<end_of_utterance>",),
        chat_template=IDEFICS3_TEMPLATE,
    ),
    "smolvlm": Family(
        config="SmolVLMConfig", text={"model_type": "llama"}, vision=IDEFICS_VISION,
        extra={"image_token_id": Tok("<image>"), "scale_factor": 2},
        processor="SmolVLMProcessor", image_processor="SmolVLMImageProcessor",
        image_processor_kwargs=IDEFICS_IMAGES, processor_kwargs={"image_seq_len": 4},
        video_processor="SmolVLMVideoProcessor", video_processor_kwargs=IDEFICS_IMAGES,
        tokens={"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>",
                "video_token": "<video>"},
        special=IDEFICS_SPECIAL, eos="<end_of_utterance>", chat_template=SMOLVLM_TEMPLATE,
    ),
    "gemma3": Family(
        config="Gemma3Config", text={"model_type": "gemma3_text", "head_dim": Dim("head_dim"), "sliding_window": 64},
        vision=SIGLIP_VISION,
        # 16 patches average-pooled to 2x2 image tokens.
        extra={"mm_tokens_per_image": 4, "image_token_index": Tok("<image_soft_token>"),
               "boi_token_index": Tok("<start_of_image>"), "eoi_token_index": Tok("<end_of_image>")},
        processor="Gemma3Processor", image_processor="Gemma3ImageProcessor",
        image_processor_kwargs={"size": {"height": 32, "width": 32}}, processor_kwargs={"image_seq_length": 4},
        tokens={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"},
        special=("<start_of_turn>", "<end_of_turn>"), bos="<bos>", eos="<eos>", add_bos=True,
        stop=("<end_of_turn>",), chat_template=GEMMA3_TEMPLATE,
    ),
    "mistral3": Family(
        config="Mistral3Config", text={"model_type": "mistral"},
        vision={"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                "num_attention_heads": 2, "head_dim": 16, "image_size": 64, "patch_size": 8},
        extra={"image_token_index": Tok("[IMG]"), "spatial_merge_size": 2, "vision_feature_layer": -1},
        processor="PixtralProcessor", image_processor="PixtralImageProcessor",
        image_processor_kwargs={"size": {"longest_edge": 64}, "patch_size": {"height": 8, "width": 8}},
        processor_kwargs={"patch_size": 8, "spatial_merge_size": 2},
        tokens={}, special=("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]", "[SYSTEM_PROMPT]",
                           "[/SYSTEM_PROMPT]"),
        bos="<s>", eos="</s>", add_bos=True, chat_template=MISTRAL3_TEMPLATE,
    ),
    "paligemma": Family(
        config="PaliGemmaConfig", text={"model_type": "gemma", "head_dim": Dim("head_dim")},
        vision={**SIGLIP_VISION, "projection_dim": Dim("hidden_size")},
        extra={"image_token_index": Tok("<image>"), "projection_dim": Dim("hidden_size")},
        processor="PaliGemmaProcessor", image_processor="SiglipImageProcessor",
        image_processor_kwargs={"size": {"height": 32, "width": 32}, "image_seq_length": 16},
        tokens={"image_token": "<image>"}, bos="<bos>", eos="<eos>",
    ),
}


def special_tokens() -> list[str]:
    """Every family's special tokens, in one fixed order: the ids every family's tokenizer gives them."""
    ordered: dict[str, None] = {}
    for spec in FAMILIES.values():
        for token in (*spec.tokens.values(), *spec.special, spec.bos, spec.eos, *spec.stop):
            if token is not None:
                ordered[token] = None
    return list(ordered)


def family_tokenizer(spec: Family, tokenizer_dir: Path) -> PreTrainedTokenizerBase:
    """The shared tokenizer plus every family's special tokens, with this family's names, bos, eos and bos rule."""
    base = AutoTokenizer.from_pretrained(tokenizer_dir)
    base.add_tokens([AddedToken(t, special=True, normalized=False) for t in special_tokens()], special_tokens=True)
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)
        # Reloaded so that the named tokens (which the processors read as tokenizer attributes) are saved with the
        # tokenizer; passing them on the first load would add them to the vocabulary in a family-dependent order.
        kwargs: dict[str, Any] = {"extra_special_tokens": spec.tokens, "eos_token": spec.eos,
                                  "add_bos_token": spec.add_bos}
        if spec.bos is not None:
            kwargs["bos_token"] = spec.bos
        tokenizer = AutoTokenizer.from_pretrained(tmp, **kwargs)
    if tokenizer.pad_token is None:
        raise ValueError(f"{tokenizer_dir}: the tokenizer has no pad token")
    return tokenizer


def _class(name: str) -> type:
    cls = getattr(transformers, name, None)
    if cls is None or getattr(cls, "is_dummy", False):
        raise FamilyUnavailable(f"transformers {transformers.__version__} has no usable {name}")
    return cls


def _resolve(value: Any, tokenizer: PreTrainedTokenizerBase, size: TextSize) -> Any:
    if isinstance(value, Tok):
        token_id = tokenizer.convert_tokens_to_ids(value.text)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"token {value.text!r} is not in the tokenizer")
        return token_id
    if isinstance(value, Dim):
        return size.mrope_section() if value.name == "mrope_section" else getattr(size, value.name)
    if isinstance(value, dict):
        return {k: _resolve(v, tokenizer, size) for k, v in value.items()}
    return value


def build_processor(spec: Family, tokenizer: PreTrainedTokenizerBase) -> ProcessorMixin:
    """The family's processor over ``tokenizer``; without torchvision, PIL image processor and no video processor."""
    torchvision = has_torchvision()
    image_processor = _class(spec.image_processor if torchvision else spec.image_processor + "Pil")(
        **spec.image_processor_kwargs)
    kwargs = {"image_processor": image_processor, "tokenizer": tokenizer, "chat_template": spec.chat_template,
              **spec.processor_kwargs}
    cls = processor_class(spec.processor)
    if spec.video_processor is not None:
        video = _class(spec.video_processor)(**spec.video_processor_kwargs) if torchvision else None
        kwargs["video_processor"] = video
        if video is not None:
            return cls(**kwargs)
    try:
        with image_only_processors():
            return without_video(cls(**kwargs))
    except ImportError as e:  # a processor's own optional dependency (SmolVLM's num2words)
        raise FamilyUnavailable(f"{spec.processor}: {e}") from e


def build_model(spec: Family, tokenizer: PreTrainedTokenizerBase, size: TextSize, seed: int) -> PreTrainedModel:
    """Random weights of the family's model class; the vocabulary covers the tokenizer (rounded up to 64)."""
    token_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                 "pad_token_id": tokenizer.pad_token_id}
    text = {**size.__dict__, "head_dim": size.head_dim, "vocab_size": (len(tokenizer) + 63) // 64 * 64,
            **token_ids, **_resolve(spec.text, tokenizer, size)}
    config = _class(spec.config)(text_config=text, vision_config=_resolve(spec.vision, tokenizer, size),
                                 **_resolve(spec.extra, tokenizer, size))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    stop = [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list(spec.stop))]
    model.generation_config.eos_token_id = stop[0] if len(stop) == 1 else stop
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def build_family(family: str, out: Path, tokenizer_dir: Path, seed: int = 0, **size: int) -> Path:
    """Write a tiny random checkpoint of ``family`` to ``out``; ``size`` overrides ``TextSize`` fields."""
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    out, text_size = Path(out), TextSize(**size)
    tokenizer = family_tokenizer(spec, Path(tokenizer_dir))
    processor = build_processor(spec, tokenizer)  # before the model: PaliGemma's processor adds location tokens
    model = build_model(spec, processor.tokenizer, text_size, seed)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    # A processor built without its video part (no torchvision) saves only under the view it was built in.
    with nullcontext() if has_torchvision() else image_only_processors():
        processor.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("%s: %s + %s, %d parameters, vocab %d -> %s", family, type(model).__name__, type(processor).__name__,
             n_params, model.config.get_text_config().vocab_size, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=[*FAMILIES, "all"])
    parser.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer folder from data_prep.standins")
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint folder (with --family all: its parent)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.family == "all":
        for family in FAMILIES:
            build_family(family, args.out / family, args.tokenizer, args.seed)
    else:
        build_family(args.family, args.out, args.tokenizer, args.seed)


if __name__ == "__main__":
    main()
