"""Turns user prompts (text, token ids, chat messages) into validated token lists."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any, Mapping

PromptType = str | list[int] | Mapping[str, Any]


def check_token_ids(ids, vocab_size: int) -> list[int]:
    """A prompt's token ids as a list of ints; ValueError unless it is a non-empty list of integers
    in [0, vocab_size)."""
    if not isinstance(ids, Iterable):
        raise ValueError(f"prompt_token_ids must be a list of token ids; got {type(ids).__name__}")
    ids = list(ids)
    if not ids:
        raise ValueError("prompt must not be empty (prompt_token_ids has no tokens)")
    # The common case at C speed (a 1,000-token prompt in ~20 us): plain ints, all in range.
    if set(map(type, ids)) == {int} and 0 <= min(ids) and max(ids) < vocab_size:
        return ids
    for t in ids:  # integers of other types (numpy's) are taken as ints
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size:
            raise ValueError(f"prompt_token_ids must be ints in [0, {vocab_size}); got {t!r}")
    return [int(t) for t in ids]


class InputProcessor:
    def __init__(self, tokenizer, max_model_len: int, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

    def process(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """(prompt text or None, prompt token ids). Raises ValueError for empty, too long or bad ids."""
        text: str | None = None
        if isinstance(prompt, str):
            text = prompt
            if not text:
                raise ValueError("prompt must not be empty")
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer (skip_tokenizer_init=True): pass prompt_token_ids")
            ids = self.tokenizer.encode(text)
        elif isinstance(prompt, Mapping):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                text = prompt.get("prompt")
            elif "prompt" in prompt:
                return self.process(prompt["prompt"])
            else:
                raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        elif isinstance(prompt, (list, tuple)):
            ids = prompt
        else:
            raise ValueError(f"prompt must be a string, a list of token ids or a dict; got {type(prompt).__name__}")
        ids = check_token_ids(ids, self.vocab_size)
        if len(ids) > self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens long, longer than max_model_len ({self.max_model_len})")
        return text, ids

    def render_chat(self, messages: list[Mapping[str, Any]], chat_template: str | None = None,
                    add_generation_prompt: bool = True, continue_final_message: bool = False,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
        """The conversation as text through the model's (or the given) chat template."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        for m in messages:
            if not isinstance(m, Mapping) or "role" not in m:
                raise ValueError("each message must be a dict with 'role' and 'content'")
        if not (chat_template or getattr(self.tokenizer, "chat_template", None)):
            raise ValueError("the model has no chat template; pass chat_template=")
        normalised = [dict(m, content=_content_text(m.get("content"))) for m in messages]
        # None leaves the model's template to transformers, which also picks among named ones
        # (tokenizer_config.json's list of {"name", "template"}: "default", or "tool_use" with tools).
        return self.tokenizer.apply_chat_template(
            normalised, chat_template=chat_template or None, add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, tokenize=False, **(chat_template_kwargs or {}))

    def encode_chat(self, text: str) -> list[int]:
        # The template already holds the special tokens it wants.
        return self.tokenizer.encode(text, add_special_tokens=False)


def _content_text(content: Any) -> str:
    """Message content as a string: a string, or a list of OpenAI text parts joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
            else:
                raise ValueError("message content parts must be of type 'text'")
        return "\n".join(parts)
    raise ValueError(f"message content must be a string or a list of text parts; got {type(content).__name__}")
