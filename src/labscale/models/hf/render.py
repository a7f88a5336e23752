"""Rendering: the exact text a local model sees for a prompt.

A chat prompt (list of messages) goes through the tokenizer's chat template with the generation prompt. A model
without a chat template gets this plain format, one block per message, blank-line separated, ending with the
assistant cue (no trailing space)::

    System: <content>

    User: <content>

    Assistant: <content>

    User: <content>

    Assistant:

A str prompt is used as-is.
"""

from __future__ import annotations

from labscale.models.base import Prompt

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_plain(messages: list[dict]) -> str:
    """The documented fallback chat format for models without a chat template."""
    blocks = [f"{PLAIN_ROLES.get(m['role'], str(m['role']).capitalize())}: {m['content']}" for m in messages]
    blocks.append("Assistant:")
    return "\n\n".join(blocks)


def render(tokenizer, prompt: Prompt) -> str:
    """The chat template (with the generation prompt) for messages, else the plain format; a str as-is."""
    if isinstance(prompt, str):
        return prompt
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return render_plain(messages)
