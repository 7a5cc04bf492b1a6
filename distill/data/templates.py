"""Chat templates, chosen by name in the data config (never guessed from a model name).

A template renders a LLaVA-style conversation into text segments, each marked as response or not, so the
collator can train on responses only. ``jinja`` is the same template for ``processor.apply_chat_template``,
written into every artifact so that users of the checkpoint prompt it the way it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass


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


_CHATML_JINJA = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = '' %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set text = text + '<image>\n' %}"
    "{% else %}{% set text = text + part['text'] %}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + text + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

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
    ),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"data.template={name!r}: expected one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]
