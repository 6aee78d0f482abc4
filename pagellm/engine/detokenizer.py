"""Incremental detokenization: output token ids -> text, one token at a time.

Decoding each new token on its own is wrong for most tokenizers: a character can span
several tokens (byte-level BPE, byte fallback), and SentencePiece-style decoders strip the
leading space of whichever token comes first in a decode call. Decoding the whole output
every step is right but costs O(length) per token. So we decode a short sliding window:
a few already-emitted tokens of context followed by the new ones, and emit only the
characters past the context's text. The window is re-anchored every few tokens, which
keeps the cost per token constant.

A window whose text ends in U+FFFD may be in the middle of a multi-byte character, so
that text is held back until a later token completes it (or `flush` is called).
"""

from __future__ import annotations

from typing import Any, Callable

import tokenizers

_REPLACEMENT_CHAR = "\ufffd"

# Emitted tokens kept in front of new ones. At least one of them must survive
# skip_special_tokens so that a SentencePiece decoder never sees a new token first;
# the known decoders need no more than that, the rest is margin.
_CONTEXT_TOKENS = 3
# Prompt tokens looked at when seeding the context from the prompt.
_PROMPT_LOOKBACK = 32
# Re-anchor the window once it holds this many tokens (and nothing is held back).
_MAX_WINDOW_TOKENS = 16
# A character is at most 4 bytes, so text that still ends in U+FFFD after this many
# tokens is invalid UTF-8 rather than unfinished; emit it, except a tail of
# _MAX_PENDING_CHARS that one more byte could still change.
_MAX_HELD_TOKENS = 8
_MAX_PENDING_CHARS = 3
# Drop consumed ids from the front of the list once this many have piled up.
_TRIM_IDS_AT = 256


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, one token at a time.

    The concatenation of everything `append` returns, followed by `flush()`, equals
    decoding the output ids in the context of the prompt: for byte-level BPE tokenizers
    that is exactly `tokenizer.decode(output_ids, skip_special_tokens=...)`; for
    SentencePiece-style ones the first output token keeps the leading space it has after
    the prompt (as `decode(prompt + output)` shows it), where a lone `decode(output_ids)`
    would strip it. Text is decoded without `clean_up_tokenization_spaces`.

    Cost per token is O(1) amortised: one decode of a window of at most ~20 tokens.
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: list[int],
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
    ) -> None:
        """Args:
        tokenizer: a transformers tokenizer. A fast one (with `backend_tokenizer`) is
            decoded through the Rust backend directly; any other object with
            `decode(ids, skip_special_tokens=...)` and `all_special_ids` works too.
        prompt_token_ids: the prompt; its last tokens are the context of the first output.
        skip_special_tokens: drop special tokens from the text, as `decode` does.
        spaces_between_special_tokens: passed to a slow tokenizer's `decode`; fast
            tokenizers have no such option and ignore it.
        """
        self._decode_ids, skipped_ids = _make_decode_fn(
            tokenizer, skip_special_tokens, spaces_between_special_tokens
        )
        self._skipped_ids: frozenset[int] = skipped_ids
        self._output_text = ""

        # ids[window_start:] is what gets decoded; the first window_emitted characters of
        # its text are context or already emitted.
        self._ids: list[int] = self._prompt_context(list(prompt_token_ids[-_PROMPT_LOOKBACK:]))
        self._window_start = 0
        self._window_emitted = 0
        self._reanchor()
        # Tokens appended since the window text last ended on a finished character.
        self._num_held_tokens = 0

    @property
    def output_text(self) -> str:
        """All text emitted so far (held-back partial characters excluded)."""
        return self._output_text

    def append(self, token_id: int) -> str:
        """Adds one output token; returns the text that became final with it.

        Returns '' when the token ends in the middle of a multi-byte UTF-8 character (or
        decodes to nothing, like a skipped special token); a U+FFFD that a later token
        could still turn into a real character is never emitted.
        """
        self._ids.append(token_id)
        text = self._decode_ids(self._ids[self._window_start :])

        end = len(text)
        if text.endswith(_REPLACEMENT_CHAR) and end > self._window_emitted:
            self._num_held_tokens += 1
            if self._num_held_tokens < _MAX_HELD_TOKENS:
                return ""
            # Too long to be one unfinished character: the bytes are invalid. Only the
            # last few U+FFFD can still change, so keep those back.
            end = max(self._window_emitted, end - _MAX_PENDING_CHARS)
        else:
            self._num_held_tokens = 0

        # max(): a byte-fallback group that turned invalid can shrink the text below what
        # was emitted; nothing emitted can be taken back.
        new_text = text[self._window_emitted : end]
        self._window_emitted = max(self._window_emitted, end)
        self._output_text += new_text

        if self._num_held_tokens == 0 and len(self._ids) - self._window_start > _MAX_WINDOW_TOKENS:
            self._reanchor()
        return new_text

    def flush(self) -> str:
        """Emits any held-back text (call once when the request finishes).

        Non-empty only when the output ended in the middle of a character; the text then
        holds U+FFFD exactly where `tokenizer.decode` would put it.
        """
        text = self._decode_ids(self._ids[self._window_start :])
        new_text = text[self._window_emitted :]
        self._window_emitted = max(self._window_emitted, len(text))
        self._num_held_tokens = 0
        self._output_text += new_text
        return new_text

    def _prompt_context(self, prompt_tail: list[int]) -> list[int]:
        """Drops prompt tokens that end in an unfinished character.

        A prompt cut mid-character would otherwise glue its stray bytes to the first
        output token, and the output text would no longer be its own decode.
        """
        while prompt_tail and self._decode_ids(prompt_tail).endswith(_REPLACEMENT_CHAR):
            prompt_tail.pop()
        return prompt_tail

    def _reanchor(self) -> None:
        """Moves the window to the last few tokens, all of them emitted already.

        The context is _CONTEXT_TOKENS tokens or more, at least one of them not skipped
        (the token a SentencePiece decoder may strip instead of a new one), and it starts
        on a character boundary: a byte-fallback decoder turns a whole run of byte tokens
        into U+FFFD when the run starts mid-character, and new bytes would join that run.
        """
        end = len(self._ids)
        new_start = end
        has_visible = False
        while new_start > 0 and (end - new_start < _CONTEXT_TOKENS or not has_visible):
            new_start -= 1
            has_visible = has_visible or self._ids[new_start] not in self._skipped_ids
        context_text = self._decode_ids(self._ids[new_start:])
        # A character has at most 4 bytes, so at most 3 steps back reach its first byte.
        for _ in range(3):
            if new_start == 0 or not context_text.startswith(_REPLACEMENT_CHAR):
                break
            new_start -= 1
            context_text = self._decode_ids(self._ids[new_start:])
        self._window_emitted = len(context_text)
        self._window_start = new_start
        if new_start >= _TRIM_IDS_AT:
            del self._ids[:new_start]
            self._window_start = 0


def _make_decode_fn(
    tokenizer: Any, skip_special_tokens: bool, spaces_between_special_tokens: bool
) -> tuple[Callable[[list[int]], str], frozenset[int]]:
    """Returns (ids -> text, the ids that decoding drops)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        # Straight to Rust: transformers' own decode adds Python overhead and nothing
        # else (its only extra, clean_up_tokenization_spaces, is deliberately off).
        skipped = frozenset(
            token_id
            for token_id, added in backend.get_added_tokens_decoder().items()
            if added.special
        )

        def decode_fast(ids: list[int]) -> str:
            return backend.decode(ids, skip_special_tokens=skip_special_tokens)

        return decode_fast, skipped if skip_special_tokens else frozenset()

    def decode_slow(ids: list[int]) -> str:
        return tokenizer.decode(
            ids,
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
            spaces_between_special_tokens=spaces_between_special_tokens,
        )

    skipped = frozenset(getattr(tokenizer, "all_special_ids", ()))
    return decode_slow, skipped if skip_special_tokens else frozenset()
