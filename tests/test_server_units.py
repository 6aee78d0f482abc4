"""Server building blocks without a model: AsyncLLMEngine over a scripted fake engine, the
stop-string-safe text streamer, and the OpenAI logprob formatters."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from types import SimpleNamespace

import pytest

from pagellm.engine.async_engine import AsyncLLMEngine, EngineStepError
from pagellm.engine.engine import EngineStats
from pagellm.entrypoints.openai.logprobs import CompletionLogprobsBuilder, chat_logprobs
from pagellm.entrypoints.openai.text_stream import TextDeltaStream
from pagellm.outputs import CompletionOutput, Logprob, RequestOutput
from pagellm.sampling_params import SamplingParams


class FakeEngine:
    """Emits one token ("x") per step for every request; a prompt of "boom" makes step raise."""

    def __init__(self) -> None:
        self.groups: dict[str, dict] = {}
        self.scheduler = SimpleNamespace(running=[])
        self.aborted: list[str] = []
        self.threads: set[int] = set()
        self.batch_sizes: list[int] = []

    def _touch(self) -> None:
        self.threads.add(threading.get_ident())

    def add_request(self, request_id, prompt, params, arrival_time=None, validated=None) -> None:
        self._touch()
        if not prompt:
            raise ValueError("prompt must not be empty")
        self.groups[request_id] = {"prompt": prompt, "done": 0, "max": params.max_tokens}

    def abort_request(self, request_ids) -> None:
        self._touch()
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            if self.groups.pop(rid, None) is not None:
                self.aborted.append(rid)

    def step(self) -> list[RequestOutput]:
        self._touch()
        self.scheduler.running = [SimpleNamespace(parent_id=rid) for rid in self.groups]
        self.batch_sizes.append(len(self.groups))
        time.sleep(0.002)  # a step is blocking work
        if any(g["prompt"] == "boom" for g in self.groups.values()):
            raise RuntimeError("kaboom")
        outputs = []
        for rid, g in list(self.groups.items()):
            g["done"] += 1
            finished = g["done"] >= g["max"]
            choice = CompletionOutput(0, "x" * g["done"], [7] * g["done"], None, None,
                                      "length" if finished else None)
            outputs.append(RequestOutput(rid, g["prompt"], [1], None, [choice], finished))
            if finished:
                del self.groups[rid]
        return outputs

    def stats(self) -> EngineStats:
        self._touch()
        return EngineStats(len(self.groups), 0, 0.0, 0, 1, 0, 0, 0)

    def validate(self, prompt, params):
        self._touch()
        return prompt, [1]


def _run(coro):
    return asyncio.run(coro)


async def _collect(engine: AsyncLLMEngine, rid: str, prompt: str, max_tokens: int) -> list[RequestOutput]:
    return [out async for out in engine.generate(rid, prompt, SamplingParams(max_tokens=max_tokens))]


def test_concurrent_requests_batch_on_one_engine_thread():
    fake = FakeEngine()

    async def main():
        engine = AsyncLLMEngine(fake)
        await engine.start()
        results = await asyncio.gather(*(_collect(engine, f"r{i}", "hi", 3 + i % 4) for i in range(16)))
        await engine.shutdown()
        return results

    results = _run(main())
    for i, outs in enumerate(results):
        assert outs[-1].finished and all(not o.finished for o in outs[:-1])
        assert outs[-1].outputs[0].text == "x" * (3 + i % 4)
    assert max(fake.batch_sizes) > 1  # requests from different callers shared steps
    assert len(fake.threads) == 1 and threading.get_ident() not in fake.threads
    assert fake.groups == {} and fake.aborted == []


def test_leaving_early_and_cancelling_abort_the_request():
    fake = FakeEngine()

    async def main():
        engine = AsyncLLMEngine(fake)
        await engine.start()
        stream = engine.generate("early", "hi", SamplingParams(max_tokens=1000))
        async for _ in stream:
            break
        await stream.aclose()

        async def consume():
            async for _ in engine.generate("cancelled", "hi", SamplingParams(max_tokens=1000)):
                pass

        task = asyncio.create_task(consume())
        while "cancelled" not in fake.groups:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await engine.get_stats()  # runs after the queued abort on the engine thread
        in_flight = engine.num_in_flight
        await engine.shutdown()
        return in_flight

    assert _run(main()) == 0
    assert sorted(fake.aborted) == ["cancelled", "early"]
    assert fake.groups == {}


def test_failed_step_fails_its_requests_and_the_loop_keeps_serving():
    fake = FakeEngine()

    async def main():
        engine = AsyncLLMEngine(fake)
        await engine.start()
        with pytest.raises(EngineStepError, match="kaboom"):
            await _collect(engine, "bad", "boom", 5)
        after = await _collect(engine, "good", "fine", 2)
        running = engine.is_running
        await engine.shutdown()
        return after, running

    after, running = _run(main())
    assert running and after[-1].finished and after[-1].outputs[0].text == "xx"
    assert "bad" in fake.aborted


def test_bad_input_raises_and_leaves_nothing_behind():
    fake = FakeEngine()

    async def main():
        engine = AsyncLLMEngine(fake)
        await engine.start()
        with pytest.raises(ValueError, match="empty"):
            await _collect(engine, "r", "", 2)
        ok = await _collect(engine, "r", "again", 1)  # the id is free again
        steps = len(fake.batch_sizes)
        await asyncio.sleep(0.05)
        idle_steps = len(fake.batch_sizes) - steps
        await engine.shutdown()
        return ok, idle_steps

    ok, idle_steps = _run(main())
    assert ok[-1].finished
    assert idle_steps == 0  # the loop sleeps when there is no work


def test_generate_before_start_is_an_error():
    async def main():
        engine = AsyncLLMEngine(FakeEngine())
        with pytest.raises(RuntimeError, match="start"):
            await _collect(engine, "r", "hi", 1)

    _run(main())


# ---- streaming text around stop strings --------------------------------------------------------------


def test_text_stream_holds_back_a_possible_stop_string():
    s = TextDeltaStream(SamplingParams(stop=["Paris."]))
    assert s.delta("The capital is", False) == "The capital is"
    assert s.delta("The capital is Par", False) == " "  # "Par" might start "Paris."
    assert s.delta("The capital is Parma", False) == "Parma"  # it did not
    assert s.delta("The capital is Parma", True) == ""


def test_text_stream_releases_everything_when_finished():
    s = TextDeltaStream(SamplingParams(stop=["END"]))
    assert s.delta("abc E", False) == "abc "
    assert s.delta("abc EN", True) == "EN"  # finished for another reason: show it all
    s = TextDeltaStream(SamplingParams(stop=["END"], include_stop_str_in_output=True))
    assert s.delta("abc EN", False) == "abc EN"


def test_text_stream_final_text_cut_at_the_stop_string():
    s = TextDeltaStream(SamplingParams(stop=["Paris."]))
    shown = s.delta("It is P", False) + s.delta("It is Pari", False)
    shown += s.delta("It is ", True)  # the engine cut the text at the stop string
    assert shown == "It is "


# ---- logprob formats ----------------------------------------------------------------------------------


def _entry(chosen: int, chosen_lp: float, chosen_rank: int, top: list[tuple[int, float, str]]):
    entry = {t: Logprob(lp, i + 1, text) for i, (t, lp, text) in enumerate(top)}
    if chosen not in entry:
        entry[chosen] = Logprob(chosen_lp, chosen_rank, f"<{chosen}>")
    return entry


def test_completion_logprobs_offsets_continue_across_chunks():
    builder = CompletionLogprobsBuilder(num_top=1, initial_offset=0)
    first = builder.build([5], [_entry(5, -0.1, 1, [(5, -0.1, "ab")])])
    second = builder.build([9], [_entry(9, -3.0, 4, [(2, -0.5, "zz")])])
    assert first.tokens == ["ab"] and first.text_offset == [0]
    assert second.tokens == ["<9>"] and second.text_offset == [2]
    assert second.top_logprobs == [{"zz": -0.5, "<9>": -3.0}]  # top-1 plus the chosen token


def test_completion_logprobs_first_prompt_token_is_null():
    builder = CompletionLogprobsBuilder(num_top=0)
    out = builder.build([1, 5], [None, _entry(5, -1.0, 1, [(5, -1.0, "b")])], first_token_text="a")
    assert out.tokens == ["a", "b"] and out.token_logprobs == [None, -1.0] and out.top_logprobs[0] is None
    assert out.text_offset == [0, 1]


def test_chat_logprobs_exact_top_count_and_finite_numbers():
    entry = _entry(3, -math.inf, 9, [(1, -0.1, "é"), (2, -0.2, "b"), (4, -0.3, "c")])
    content = chat_logprobs([3], [entry], num_top=2)
    assert len(content) == 1
    assert [t.token for t in content[0].top_logprobs] == ["é", "b"]
    assert content[0].top_logprobs[0].bytes == list("é".encode("utf-8"))
    assert content[0].logprob == -9999.0  # JSON has no -inf
