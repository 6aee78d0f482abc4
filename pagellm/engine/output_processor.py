"""Applies a step's sampled tokens to requests: detokenizes, checks stop conditions, builds outputs."""

from __future__ import annotations

import time

from pagellm.engine.detokenizer import IncrementalDetokenizer
from pagellm.engine.request import Request, RequestStatus
from pagellm.engine.stop_strings import find_stop_string
from pagellm.outputs import CompletionOutput, Logprob, RequestOutput


class TokenTextCache:
    """Decoded text of single tokens, for logprob entries."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            if len(self._cache) < 1_000_000:
                self._cache[token_id] = text
        return text


def make_logprob_entry(token: int, logprob: float, rank: int, top: list[tuple[int, float]],
                       decode: TokenTextCache | None) -> dict[int, Logprob]:
    """vLLM's per-position dict: the chosen token plus the top-k, each with rank and text."""
    entry = {t: Logprob(lp, i + 1, decode(t) if decode else None) for i, (t, lp) in enumerate(top)}
    if token not in entry:
        entry[token] = Logprob(logprob, rank, decode(token) if decode else None)
    else:
        entry[token].rank = rank
    return entry


class OutputProcessor:
    def __init__(self, tokenizer, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.token_text = TokenTextCache(tokenizer)

    def _decoder(self, request: Request) -> TokenTextCache | None:
        return self.token_text if request.sampling_params.detokenize and self.tokenizer is not None else None

    def init_request(self, request: Request) -> None:
        p = request.sampling_params
        if p.detokenize and self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                         p.skip_special_tokens, p.spaces_between_special_tokens)
        if p.prompt_logprobs is not None:
            request.prompt_logprobs = [None]

    def append_prompt_logprobs(self, request: Request, items) -> None:
        decode = self._decoder(request)
        for token, lp, rank, top in items:
            request.prompt_logprobs.append(make_logprob_entry(token, lp, rank, top, decode))

    def append_token(self, request: Request, token: int, logprob=None) -> RequestStatus | None:
        """Adds a sampled token; returns the finished status if this token ends the request."""
        now = time.time()
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        request.metrics.last_token_time = now
        request.output_token_ids.append(token)
        if logprob is not None:
            lp, rank, top = logprob
            request.cumulative_logprob += lp
            decode = self._decoder(request)
            request.logprobs.append(make_logprob_entry(token, lp, rank, top, decode))
        new_chars = 0
        if request.detokenizer is not None:
            delta = request.detokenizer.append(token)
            request.output_text += delta
            new_chars = len(delta)
        status = self._check_stop(request, token, new_chars)
        if status is not None and request.detokenizer is not None and not isinstance(request.stop_reason, str):
            # Finished by EOS, a stop token or length: the detokenizer may still hold the
            # start of an unfinished character, which belongs in the final text (as U+FFFD,
            # as tokenizer.decode shows it). A stop string already cut the text before it.
            request.output_text += request.detokenizer.flush()
        return status

    def _check_stop(self, request: Request, token: int, new_chars: int) -> RequestStatus | None:
        p = request.sampling_params
        n_out = len(request.output_token_ids)
        if n_out >= p.min_tokens:
            if not p.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if p.stop_token_ids and token in p.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if p.stop and new_chars:
                hit = find_stop_string(request.output_text, new_chars, p.stop, p.include_stop_str_in_output)
                if hit is not None:
                    request.stop_reason, cut = hit
                    request.output_text = request.output_text[:cut]
                    return RequestStatus.FINISHED_STOPPED
        if n_out >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    @staticmethod
    def completion(request: Request) -> CompletionOutput:
        return CompletionOutput(index=request.index, text=request.output_text,
                                token_ids=list(request.output_token_ids),
                                cumulative_logprob=request.cumulative_logprob if request.logprobs is not None else None,
                                logprobs=request.logprobs, finish_reason=request.finish_reason,
                                stop_reason=request.stop_reason)

    def request_output(self, children: list[Request]) -> RequestOutput:
        first = children[0]
        finished = all(c.is_finished for c in children)
        metrics = first.metrics
        if finished:
            metrics.finished_time = max(c.metrics.finished_time or time.time() for c in children)
        return RequestOutput(request_id=first.parent_id, prompt=first.prompt,
                             prompt_token_ids=first.prompt_token_ids, prompt_logprobs=first.prompt_logprobs,
                             outputs=[self.completion(c) for c in children], finished=finished, metrics=metrics,
                             num_cached_tokens=first.num_cached_tokens)
