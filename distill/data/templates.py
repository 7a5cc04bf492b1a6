"""Chat templates for models that come without one, chosen by name in the data config (never guessed from a model
name).

A model whose processor has a chat template (every real VLM checkpoint, every artifact we write) is always
prompted with its own; ``data.template`` names the template an assembled student starts with, written into its
artifacts so that users of the checkpoint prompt it the way it was trained. ``jinja`` is that template for
``processor.apply_chat_template``; ``segments`` renders the same text piecewise (the stand-in LLMs' corpus).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    user: str
    """Format of a user turn, with ``{content}``."""
    assistant_prefix: str
    """Text before an assistant reply (not trained on)."""
    assistant_suffix: str
    """End-of-turn marker after a reply: trained on, so the model learns to stop."""
    separator: str
    """Text after the end-of-turn marker (not trained on)."""
    system: str = ""
    """Rendered system block, if any; empty means none."""
    jinja: str = ""

    def segments(self, conversation: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """``[(text, is_response), ...]`` for a full conversation of alternating human / gpt turns."""
        out: list[tuple[str, bool]] = [(self.system, False)] if self.system else []
        for turn in conversation:
            if turn["from"] == "human":
                out.append((self.user.format(content=turn["value"]), False))
            else:
                out.append((self.assistant_prefix, False))
                out.append((turn["value"] + self.assistant_suffix, True))
                if self.separator:
                    out.append((self.separator, False))
        return out

    def prompt(self, conversation: list[dict[str, str]]) -> str:
        """Text that asks for the next assistant reply (the conversation ends with a human turn)."""
        return "".join(text for text, _ in self.segments(conversation)) + self.assistant_prefix


def _jinja(turn_start: str, turn_end: str, generation_prompt: str) -> str:
    """A chat template for ``apply_chat_template``: string or list-of-parts content (the standard transformers
    message form), each image part rendered as ``<image>`` and a newline where it stands, as LLaVA data has it.
    The text is collected in a ``namespace``: a variable set inside a Jinja loop does not outlive the loop."""
    return (
        "{% for message in messages %}"
        "{% set ns = namespace(text='') %}"
        "{% if message['content'] is string %}{% set ns.text = message['content'] %}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}{% set ns.text = ns.text + '<image>\n' %}"
        "{% elif part['type'] == 'text' %}{% set ns.text = ns.text + part['text'] %}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ " + turn_start + " + ns.text + " + turn_end + " }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + generation_prompt + " }}{% endif %}"
    )


_CHATML_JINJA = _jinja("'<|im_start|>' + message['role'] + '\n'", "'<|im_end|>\n'", "'<|im_start|>assistant\n'")
_LLAMA3_JINJA = _jinja("'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'", "'<|eot_id|>'",
                       "'<|start_header_id|>assistant<|end_header_id|>\n\n'")

TEMPLATES: dict[str, ChatTemplate] = {
    # Qwen2 / Qwen3 family (ChatML).
    "chatml": ChatTemplate(
        name="chatml",
        user="<|im_start|>user\n{content}<|im_end|>\n",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>",
        separator="\n",
        jinja=_CHATML_JINJA,
    ),
    # Llama 3 family.
    "llama3": ChatTemplate(
        name="llama3",
        user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
        assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n",
        assistant_suffix="<|eot_id|>",
        separator="",
        jinja=_LLAMA3_JINJA,
    ),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"data.template={name!r}: expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def default_chat_template(processor: Any, name: str) -> None:
    """Give ``processor`` the named template when it has none of its own (its own is how the model was trained)."""
    if not getattr(processor, "chat_template", None):
        processor.chat_template = get_template(name).jinja
