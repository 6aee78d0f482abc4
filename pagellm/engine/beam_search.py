"""Beam search on top of the engine, scored as transformers' `generate(num_beams=...)` scores it.

Each step turns every live beam into one engine request (its prompt plus the beam's tokens,
max_tokens=1, top-K logprobs), runs them as one batch and keeps the best continuations. The
beams of one prompt share their history, so the prefix cache serves it and each request only
computes the tail that no earlier step has filled a block with. BeamSearchState is the state
machine; `run_beam_search` drives it on an idle LLMEngine (offline), and
engine/async_beam_search.py drives it on the server's shared AsyncLLMEngine.

The rules are transformers' (generation/utils.py, `_beam_search`), so the beams match its:
- K = max(2, 1 + number of EOS ids) * beam_width candidates are kept per step, ranked by
  cumulative logprob; the best beam_width that do not end the sequence stay live.
- A candidate that ends the sequence (an EOS token, or the max_tokens-th token) is a finished
  hypothesis only if it ranks among the first beam_width candidates. Its score is
  cum_logprob / generated_length ** length_penalty, the EOS token counted in the length; the
  best beam_width hypotheses are kept.
- early_stopping: True stops once beam_width hypotheses are finished; False (transformers'
  default) stops once the best live beam, scored at its current length, cannot beat the worst
  kept hypothesis; "never" does the same but, for length_penalty > 0, scores the live beam at
  the longest possible length.
vLLM differs here (it divides by the length including the prompt and has no early stopping).
Beams are chosen on the model's raw logprobs: temperature does not change them, as in vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterable, Literal

from pagellm.outputs import CompletionOutput, Logprob, RequestOutput
from pagellm.sampling_params import BeamSearchParams, SamplingParams

if TYPE_CHECKING:
    from pagellm.engine.engine import LLMEngine

EarlyStopping = bool | Literal["never"]


@dataclass
class BeamSearchSequence:
    """One beam (vLLM's shape). `tokens` holds the prompt and the generated tokens (an ending
    EOS token included, as transformers has it), and `text` decodes them, as vLLM does: an
    ending EOS token only with `include_stop_str_in_output`."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (an EOS token) or "length"
    stop_reason: int | str | None = None
    # transformers' sequence score: cum_logprob / generated_length ** length_penalty.
    score: float = 0.0


@dataclass
class BeamSearchOutput:
    """The best beam_width sequences for one prompt, best first."""

    sequences: list[BeamSearchSequence]


@dataclass
class _Candidate:
    beam: BeamSearchSequence
    token: int
    logprob: float
    cum_logprob: float
    entry: dict[int, Logprob]


class BeamSearchState:
    """One prompt's search: its live beams, its finished hypotheses and the stopping rules.

    `step()` takes each live beam's top-K next tokens and advances the search by one token;
    `done` turns True when transformers would stop.
    """

    def __init__(self, prompt_token_ids: list[int], beam_width: int, max_new_tokens: int, eos_token_ids: set[int],
                 ignore_eos: bool = False, length_penalty: float = 1.0, early_stopping: EarlyStopping = False) -> None:
        if early_stopping not in (True, False, "never"):
            raise ValueError(f"early_stopping must be True, False or 'never'; got {early_stopping!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        self.prompt_len = len(prompt_token_ids)
        self.beam_width = beam_width
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = set() if ignore_eos else set(eos_token_ids)
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        # transformers keeps K candidates so that beam_width survive even if the top ones all end.
        self.num_candidates = max(2, 1 + len(eos_token_ids)) * beam_width
        self.running = [BeamSearchSequence(tokens=list(prompt_token_ids))]
        self.finished: list[BeamSearchSequence] = []  # best first, at most beam_width
        self.num_generated = 0
        self.done = False
        self._improvable = True

    def step(self, expansions: list[dict[int, Logprob]]) -> None:
        """Advances by one token. `expansions[i]` maps live beam i's next-token candidates (at
        least its top K) to their logprobs."""
        if self.done:
            raise RuntimeError("the search has finished")
        if len(expansions) != len(self.running):
            raise ValueError(f"expected {len(self.running)} expansions; got {len(expansions)}")
        candidates = []
        for beam, entry in zip(self.running, expansions):
            best = sorted(entry.items(), key=lambda item: -item[1].logprob)[:self.num_candidates]
            for token, lp in best:
                candidates.append(_Candidate(beam, token, lp.logprob, beam.cum_logprob + lp.logprob, entry))
        # A stable sort: ties keep beam order, then rank within the beam.
        candidates.sort(key=lambda c: -c.cum_logprob)
        candidates = candidates[:self.num_candidates]
        length = self.num_generated + 1
        at_limit = length >= self.max_new_tokens
        ends = [at_limit or c.token in self.eos_token_ids for c in candidates]

        # Only candidates among the first beam_width can become hypotheses.
        if self._improvable and not (self.early_stopping is True and len(self.finished) == self.beam_width):
            scale = length ** self.length_penalty
            new = [self._extend(c, "length" if at_limit and c.token not in self.eos_token_ids else "stop",
                                c.cum_logprob / scale)
                   for c, end in zip(candidates[:self.beam_width], ends) if end]
            if new:
                merged = sorted(self.finished + new, key=lambda s: -s.score)
                self.finished = merged[:self.beam_width]
        self.running = [self._extend(c, None, 0.0) for c, end in zip(candidates, ends) if not end][:self.beam_width]
        self.num_generated = length

        if self.running and len(self.finished) == self.beam_width:
            if self.early_stopping == "never" and self.length_penalty > 0.0:
                best_length = self.max_new_tokens
            else:
                best_length = self.num_generated
            best_possible = self.running[0].cum_logprob / best_length ** self.length_penalty
            self._improvable = best_possible > self.finished[-1].score
        self.done = (not self._improvable or all(ends) or not self.running
                     or (self.early_stopping is True and len(self.finished) == self.beam_width))

    def _extend(self, c: _Candidate, finish_reason: str | None, score: float) -> BeamSearchSequence:
        return BeamSearchSequence(tokens=c.beam.tokens + [c.token], logprobs=c.beam.logprobs + [c.entry],
                                  cum_logprob=c.cum_logprob, finish_reason=finish_reason, score=score)

    def result(self) -> BeamSearchOutput:
        return BeamSearchOutput(sequences=list(self.finished))


def new_search_state(prompt_token_ids: list[int], params: BeamSearchParams, max_model_len: int,
                     eos_token_ids: set[int], vocab_size: int,
                     early_stopping: EarlyStopping | None = None) -> BeamSearchState:
    """The search for one tokenized prompt, its length capped by the context.

    `early_stopping` overrides `params.early_stopping` when given. Raises ValueError when the
    prompt leaves no room in the context for one generated token, or when `params.beam_width`
    exceeds `vocab_size`.
    """
    if params.beam_width > vocab_size:
        raise ValueError(f"beam_width must be <= the vocabulary size ({vocab_size}), got {params.beam_width}")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; max_model_len is {max_model_len}, which "
                         "leaves no room to generate")
    stopping = params.early_stopping if early_stopping is None else early_stopping
    return BeamSearchState(prompt_token_ids, params.beam_width,
                           min(params.max_tokens, max_model_len - len(prompt_token_ids)), eos_token_ids,
                           params.ignore_eos, params.length_penalty, stopping)  # type: ignore[arg-type]


def expansion_params(num_logprobs: int, vocab_size: int) -> SamplingParams:
    """The engine request for one beam's next token: one greedy token (never ended by EOS, so
    the search decides) with its top `num_logprobs` alternatives, at most `vocab_size`. Shared by the requests of a step (the engine does not mutate it)."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    # Set after validation: the OpenAI cap on logprobs (20) is for users; the sampler takes any k
    # up to the vocabulary (wide beams ask for more candidates than there are tokens).
    params.logprobs = min(num_logprobs, vocab_size)
    return params


def run_beam_search(engine: LLMEngine, prompts: list[list[int]], params: BeamSearchParams,
                    early_stopping: EarlyStopping | None = None, use_tqdm: bool = False) -> list[BeamSearchOutput]:
    """Beam search for each tokenized prompt, all prompts batched together at every step.

    `early_stopping` overrides `params.early_stopping` when given. Drives `engine` itself, so
    the engine must have no other work (RuntimeError otherwise); the server's driver, which
    shares the engine, is engine/async_beam_search.py. Raises ValueError, before any step, when
    a prompt leaves no room in the context for one generated token or the beam width exceeds
    the vocabulary. Each sequence's text decodes its tokens, less an ending EOS token unless
    `params.include_stop_str_in_output` (vLLM's text).
    """
    if engine.has_unfinished_requests():
        raise RuntimeError("beam search drives the engine itself; it must have no other requests")
    max_len = engine.model_config.max_model_len
    vocab = engine.model_config.vocab_size
    states = [new_search_state(ids, params, max_len, engine.eos_token_ids, vocab, early_stopping) for ids in prompts]
    step_params = expansion_params(states[0].num_candidates, vocab) if states else None
    bar = _progress_bar(params.max_tokens) if use_tqdm else None
    try:
        while True:
            live = [s for s in states if not s.done]
            if not live:
                break
            outputs = _expand(engine, [beam.tokens for s in live for beam in s.running], step_params)
            offset = 0
            for state in live:
                count = len(state.running)
                state.step(outputs[offset:offset + count])
                offset += count
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    results = [s.result() for s in states]
    if engine.tokenizer is not None:
        for result in results:
            for seq in result.sequences:
                ends_on_eos = seq.finish_reason == "stop" and not params.include_stop_str_in_output
                seq.text = engine.tokenizer.decode(seq.tokens[:-1] if ends_on_eos else seq.tokens)
    return results


def beam_request_output(request_id: str, prompt: str | None, prompt_token_ids: list[int], output: BeamSearchOutput,
                        tokenizer, skip_special_tokens: bool = True,
                        with_token_text: bool = False) -> RequestOutput:
    """One prompt's beams as a finished RequestOutput, as vLLM's server returns them: one
    CompletionOutput per beam, best first, holding only the generated tokens; the text leaves
    out a final EOS token. `with_token_text` fills the logprob entries' decoded_token (the
    search runs without detokenizing)."""
    prompt_len = len(prompt_token_ids)
    completions = []
    for index, seq in enumerate(output.sequences):
        generated = seq.tokens[prompt_len:]
        shown = generated[:-1] if seq.finish_reason == "stop" else generated
        text = tokenizer.decode(shown, skip_special_tokens=skip_special_tokens) if tokenizer is not None else ""
        if with_token_text and tokenizer is not None:
            for entry in seq.logprobs:
                for token, lp in entry.items():
                    if lp.decoded_token is None:
                        lp.decoded_token = tokenizer.decode([token])
        completions.append(CompletionOutput(index=index, text=text, token_ids=generated,
                                            cumulative_logprob=seq.cum_logprob, logprobs=seq.logprobs,
                                            finish_reason=seq.finish_reason or "length",
                                            stop_reason=seq.stop_reason))
    return RequestOutput(request_id=request_id, prompt=prompt, prompt_token_ids=list(prompt_token_ids),
                         prompt_logprobs=None, outputs=completions, finished=True)


def _expand(engine: LLMEngine, sequences: Iterable[list[int]], params: SamplingParams) -> list[dict[int, Logprob]]:
    """One step: each sequence's next-token logprobs (its top `params.logprobs`)."""
    ids = []
    for tokens in sequences:
        rid = f"beam-{engine.new_request_id()}"
        engine.add_request(rid, {"prompt_token_ids": tokens}, params, stream=False)
        ids.append(rid)
    finished: dict[str, dict[int, Logprob]] = {}
    try:
        while len(finished) < len(ids):
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out.outputs[0].logprobs[0]
    except BaseException:
        engine.abort_request([rid for rid in ids if rid not in finished])
        raise
    return [finished[rid] for rid in ids]


def _progress_bar(total: int):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="Beam search steps", dynamic_ncols=True)
