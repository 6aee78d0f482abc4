"""`pagellm chat` and `pagellm generate`: text streamed to the terminal from an in-process engine.

No server and no asyncio: one request at a time, so the synchronous engine is stepped
directly and each step's new text is printed as it arrives.
"""

from __future__ import annotations

import sys
from typing import Iterator, TextIO

from pagellm.engine.engine import LLMEngine
from pagellm.engine.input_processor import PromptType
from pagellm.entrypoints.openai.text_stream import TextDeltaStream
from pagellm.sampling_params import SamplingParams

EXIT_COMMANDS = ("/exit", "/quit")
CLEAR_COMMAND = "/clear"


def stream_text(engine: LLMEngine, prompt: PromptType, params: SamplingParams) -> Iterator[str]:
    """Generates one completion, yielding new text as it is produced (first choice only).

    Stop strings are never half-shown. Stopping the iteration early (or Ctrl-C) aborts the
    request, so the engine is clean for the next one. Raises ValueError for bad input.
    """
    request_id = engine.new_request_id()
    engine.add_request(request_id, prompt, params)
    text = TextDeltaStream(params)
    finished = False
    try:
        while not finished and engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                first = out.outputs[0]
                finished = out.finished
                piece = text.delta(first.text, first.finish_reason is not None)
                if piece:
                    yield piece
    finally:
        if not finished:
            engine.abort_request(request_id)


def run_chat(engine: LLMEngine, params: SamplingParams, system_prompt: str | None = None,
             chat_template: str | None = None, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """An interactive chat: one user message per input line, the reply streamed back.

    `/exit` (or end of input) ends it; `/clear` forgets the conversation so far. A reply
    that would overflow the context starts a fresh conversation instead of failing.
    """
    interactive = stdin.isatty()
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    history: list[dict[str, str]] = []
    if interactive:
        stdout.write("pagellm chat: type a message; /clear to start over, /exit or Ctrl-D to quit.\n")
    while True:
        if interactive:
            stdout.write(">>> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        message = line.strip()
        if not message:
            continue
        if message in EXIT_COMMANDS:
            break
        if message == CLEAR_COMMAND:
            history.clear()
            continue
        history.append({"role": "user", "content": message})
        try:
            reply = _reply(engine, system + history, params, chat_template, stdout)
        except ValueError as exc:
            stdout.write(f"[error: {exc}; the conversation was cleared]\n")
            stdout.flush()
            history.clear()
            continue
        except KeyboardInterrupt:
            stdout.write("\n")
            history.pop()
            continue
        history.append({"role": "assistant", "content": reply})


def _reply(engine: LLMEngine, messages: list[dict[str, str]], params: SamplingParams, chat_template: str | None,
           stdout: TextIO) -> str:
    text = engine.inputs.render_chat(messages, chat_template, add_generation_prompt=True)
    ids = engine.inputs.encode_chat(text)
    budget = engine.model_config.max_model_len - len(ids)
    if budget < 1:
        raise ValueError(f"the conversation is {len(ids)} tokens, the context is "
                         f"{engine.model_config.max_model_len}")
    turn_params = params.clone()
    turn_params.max_tokens = budget if params.max_tokens is None else min(params.max_tokens, budget)
    pieces = []
    for piece in stream_text(engine, {"prompt": text, "prompt_token_ids": ids}, turn_params):
        pieces.append(piece)
        stdout.write(piece)
        stdout.flush()
    stdout.write("\n")
    stdout.flush()
    return "".join(pieces)
