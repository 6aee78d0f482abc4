"""Engine logprobs -> OpenAI's two logprob formats (legacy completions and chat).

The engine gives, per position, a dict token_id -> Logprob(logprob, rank, decoded_token)
holding the top-k tokens plus the chosen one; prompt logprobs start with None for the first
prompt token, which has no logprob.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from pagellm.entrypoints.openai.protocol import ChatTokenLogprob, ChatTopLogprob, CompletionLogProbs
from pagellm.outputs import Logprob

# JSON has no -inf; OpenAI clients expect a number. vLLM uses the same floor.
_LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return _LOGPROB_FLOOR if math.isnan(logprob) or logprob < _LOGPROB_FLOOR else float(logprob)


def _top_by_rank(entry: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The entry's top-k tokens in rank order (the chosen token is in the entry even when its
    rank is worse than k; it is left out here unless it is in the top k)."""
    ranked = [(t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= k]
    ranked.sort(key=lambda item: item[1].rank)
    return ranked


def _token_text(entry: dict[int, Logprob], token_id: int, fallback: str) -> str:
    lp = entry.get(token_id)
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else fallback


class CompletionLogprobsBuilder:
    """Builds /v1/completions `logprobs` (tokens, token_logprobs, top_logprobs, text_offset),
    keeping text_offset running across the chunks of a stream."""

    def __init__(self, num_top: int, initial_offset: int = 0) -> None:
        self.num_top = num_top
        self.offset = initial_offset

    def build(self, token_ids: Sequence[int], entries: Sequence[dict[int, Logprob] | None],
              first_token_text: str = "") -> CompletionLogProbs:
        """`entries[i]` belongs to `token_ids[i]`; a None entry (the first prompt token) gets
        a null logprob and `first_token_text` as its text."""
        out = CompletionLogProbs()
        for token_id, entry in zip(token_ids, entries):
            if entry is None:
                text = first_token_text
                out.token_logprobs.append(None)
                out.top_logprobs.append(None)
            else:
                text = _token_text(entry, token_id, "")
                chosen = entry.get(token_id)
                out.token_logprobs.append(_finite(chosen.logprob) if chosen is not None else None)
                # OpenAI's legacy format shows the top-k plus the chosen token, keyed by text.
                top: dict[str, float] = {}
                for t, lp in _top_by_rank(entry, self.num_top):
                    top.setdefault(lp.decoded_token or "", _finite(lp.logprob))
                if chosen is not None:
                    top.setdefault(text, _finite(chosen.logprob))
                out.top_logprobs.append(top)
            out.tokens.append(text)
            out.text_offset.append(self.offset)
            self.offset += len(text)
        return out


def chat_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Logprob]],
                  num_top: int) -> list[ChatTokenLogprob]:
    """Chat `logprobs.content`: per token its text, logprob, UTF-8 bytes and exactly the
    top `num_top` alternatives."""
    content = []
    for token_id, entry in zip(token_ids, entries):
        text = _token_text(entry, token_id, "")
        chosen = entry.get(token_id)
        top = [ChatTopLogprob(token=lp.decoded_token or "", logprob=_finite(lp.logprob),
                              bytes=list((lp.decoded_token or "").encode("utf-8")))
               for _, lp in _top_by_rank(entry, num_top)]
        content.append(ChatTokenLogprob(token=text, logprob=_finite(chosen.logprob) if chosen else _LOGPROB_FLOOR,
                                        bytes=list(text.encode("utf-8")), top_logprobs=top))
    return content


def prompt_logprobs_json(entries: Sequence[dict[int, Logprob] | None] | None) -> list[dict[int, dict[str, Any]] | None] | None:
    """vLLM's `prompt_logprobs` extra: per prompt position {token_id: {logprob, rank, decoded_token}}."""
    if entries is None:
        return None
    return [None if entry is None else
            {t: {"logprob": _finite(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for t, lp in entry.items()}
            for entry in entries]
