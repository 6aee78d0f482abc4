"""`use_beam_search` in the OpenAI server: a real `pagellm serve` subprocess on the tiny random
Llama gives the same beams as the offline `LLM.beam_search`, shares the engine with other
requests while it searches, rejects what it cannot do with a 400 naming the field, and
leaves no KV block behind (also when the client goes away mid-search). The async driver
is also checked in-process against the offline driver, and for cancellation."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from pagellm import BeamSearchParams, SamplingParams
from pagellm.engine.async_engine import AsyncLLMEngine
from pagellm.engine.beam_search import run_beam_search
from server_helpers import metric_samples, running_server

MODEL = "tiny"
MAX_MODEL_LEN = 256
PROMPTS = [[1, 504, 3575, 282, 4649, 314], [300 + i for i in range(21)]]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    """`pagellm serve` on the tiny Llama (the one `tiny_llm` loads), on a free port."""
    log_path = tmp_path_factory.mktemp("beam_server") / "server.log"
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "64MiB", "--served-model-name", MODEL]
    with running_server(tiny_llama_dir, args, log_path) as base:
        yield base


def _wait_idle(base: str, timeout: float = 20.0) -> dict[str, float]:
    """Metrics once no request runs and no KV block is used (fails after `timeout`)."""
    deadline = time.time() + timeout
    while True:
        m = metric_samples(base)
        if m["pagellm:num_used_blocks{}"] == 0 and m["pagellm:num_requests_running{}"] == 0:
            return m
        assert time.time() < deadline, f"KV blocks still in use: {m['pagellm:num_used_blocks{}']}"
        time.sleep(0.1)


def _expected_choices(llm, prompt_ids: list[int], params: BeamSearchParams) -> list[tuple[str, str, float]]:
    """(text, finish_reason, cumulative logprob) of each offline beam, best first, as the server
    shows it: the generated part only, without a final EOS token."""
    tokenizer = llm.get_tokenizer()
    out = llm.beam_search([{"prompt_token_ids": prompt_ids}], params)[0]
    expected = []
    for seq in out.sequences:
        generated = seq.tokens[len(prompt_ids):]
        shown = generated[:-1] if seq.finish_reason == "stop" else generated
        expected.append((tokenizer.decode(shown, skip_special_tokens=True), seq.finish_reason, seq.cum_logprob))
    return expected


# ---- the server ----------------------------------------------------------------------------------


def test_completion_beams_equal_offline_while_other_requests_run(server, tiny_llm):
    params = BeamSearchParams(beam_width=3, max_tokens=40, ignore_eos=True)
    expected = [_expected_choices(tiny_llm, ids, params) for ids in PROMPTS]
    sample_prompt = [11, 12, 13, 14]
    greedy = tiny_llm.generate({"prompt_token_ids": sample_prompt},
                               SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].text
    before = metric_samples(server)

    async def scenario():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            beam = asyncio.create_task(http.post("/v1/completions", json={
                "model": MODEL, "prompt": PROMPTS, "use_beam_search": True, "n": 3, "temperature": 0,
                "max_tokens": 40, "ignore_eos": True, "logprobs": 2}))
            # Wait until the search is under way, then send an ordinary request alongside it.
            generated = "pagellm:generation_tokens_total{}"
            while metric_samples(server)[generated] == before[generated]:
                await asyncio.sleep(0.02)
            sampled = await http.post("/v1/completions", json={
                "model": MODEL, "prompt": sample_prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
            beam_done_first = beam.done()
            return await beam, sampled, beam_done_first

    beam, sampled, beam_done_first = asyncio.run(scenario())
    assert sampled.status_code == 200, sampled.text
    assert sampled.json()["choices"][0]["text"] == greedy
    assert not beam_done_first, "the ordinary request waited for the whole beam search"
    assert beam.status_code == 200, beam.text
    body = beam.json()
    choices = sorted(body["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == list(range(6))
    for i, want in enumerate(expected):
        got = choices[3 * i:3 * i + 3]
        assert [(c["text"], c["finish_reason"]) for c in got] == [(text, reason) for text, reason, _ in want]
        for c, (_, _, cum_logprob) in zip(got, want):
            lp = c["logprobs"]
            assert len(lp["tokens"]) == 40 and "".join(lp["tokens"]) == c["text"]
            assert sum(lp["token_logprobs"]) == pytest.approx(cum_logprob, abs=1e-3)
            assert all(2 <= len(top) <= 3 for top in lp["top_logprobs"])
    assert body["usage"]["completion_tokens"] == 6 * 40
    assert body["usage"]["prompt_tokens"] == sum(len(p) for p in PROMPTS)
    _wait_idle(server)


def test_beam_stream_sends_the_final_beams(server, tiny_llm):
    params = BeamSearchParams(beam_width=2, max_tokens=6, length_penalty=0.5)
    body = {"model": MODEL, "prompt": "Once upon a time", "use_beam_search": True, "n": 2, "max_tokens": 6,
            "length_penalty": 0.5}
    full = httpx.post(server + "/v1/completions", json=body, timeout=120).json()
    ids = httpx.post(server + "/tokenize", json={"prompt": "Once upon a time"}, timeout=30).json()["tokens"]
    assert [c["text"] for c in full["choices"]] == [t for t, _, _ in _expected_choices(tiny_llm, ids, params)]
    with httpx.stream("POST", server + "/v1/completions", json={**body, "stream": True,
                                                                 "stream_options": {"include_usage": True}},
                      timeout=120) as response:
        assert response.status_code == 200
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    streamed = {c["choices"][0]["index"]: c["choices"][0] for c in chunks if c["choices"]}
    assert [streamed[i]["text"] for i in range(2)] == [c["text"] for c in full["choices"]]
    assert all(streamed[i]["finish_reason"] == full["choices"][i]["finish_reason"] for i in range(2))
    assert chunks[-1]["usage"]["completion_tokens"] == full["usage"]["completion_tokens"]
    _wait_idle(server)


def test_chat_beams_equal_offline(server, tiny_llm):
    messages = [{"role": "user", "content": "Name a colour."}]
    ids = httpx.post(server + "/tokenize", json={"messages": messages}, timeout=30).json()["tokens"]
    params = BeamSearchParams(beam_width=3, max_tokens=5)
    expected = _expected_choices(tiny_llm, ids, params)
    body = {"model": MODEL, "messages": messages, "use_beam_search": True, "n": 3, "max_tokens": 5,
            "logprobs": True, "top_logprobs": 1}
    r = httpx.post(server + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [(c["message"]["content"], c["finish_reason"]) for c in choices] == [(t, f) for t, f, _ in expected]
    for c, (_, _, cum_logprob) in zip(choices, expected):
        content = c["logprobs"]["content"]
        assert sum(t["logprob"] for t in content) == pytest.approx(cum_logprob, abs=1e-3)
        assert all(len(t["top_logprobs"]) == 1 for t in content)
    # Streamed: the role first, then each beam's whole text once the search is done.
    with httpx.stream("POST", server + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as response:
        events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    texts = ["", "", ""]
    for event in events[:-1]:
        for c in json.loads(event)["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    assert texts == [t for t, _, _ in expected]
    _wait_idle(server)


_BAD = [
    ("/v1/completions", {"n": 0}, "n"),
    ("/v1/completions", {"n": 129}, "n"),
    ("/v1/completions", {"stop": ["."]}, "stop"),
    ("/v1/completions", {"presence_penalty": 0.5}, "presence_penalty"),
    ("/v1/completions", {"prompt_logprobs": 1}, "prompt_logprobs"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"logprobs": 1, "echo": True}, "logprobs"),
    ("/v1/completions", {"max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"temperature": -1}, "temperature"),
    ("/v1/completions", {"early_stopping": "sometimes"}, "early_stopping"),
    ("/v1/completions", {"length_penalty": "long"}, "length_penalty"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"stop_token_ids": [5]}, "stop_token_ids"),
]


@pytest.mark.parametrize("endpoint,extra,param", _BAD, ids=[f"{e.rsplit('/', 1)[-1]}-{p}" for e, _, p in _BAD])
def test_bad_beam_fields_give_400_naming_the_field(server, endpoint, extra, param):
    body = {"model": MODEL, "use_beam_search": True, "n": 2, "max_tokens": 3}
    if endpoint == "/v1/completions":
        body["prompt"] = "hi"
    else:
        body["messages"] = [{"role": "user", "content": "hi"}]
    body.update(extra)
    r = httpx.post(server + endpoint, json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_disconnect_mid_search_frees_kv_blocks(server):
    before = _wait_idle(server)
    steps = MAX_MODEL_LEN - 3
    body = {"model": MODEL, "prompt": [5, 6, 7], "use_beam_search": True, "n": 8, "max_tokens": steps,
            "ignore_eos": True}
    try:
        # About 5 s on 2 shared CPU cores; the client gives up long before.
        done = httpx.post(server + "/v1/completions", json=body, timeout=0.5)
    except httpx.TimeoutException:
        done = None
    after = _wait_idle(server)
    if done is not None:  # a machine fast enough to finish the search in 0.5 s
        assert done.status_code == 200 and len(done.json()["choices"]) == 8
        return
    # It stopped early (the whole search generates one token per beam and step), and for good:
    # between two steps the engine is idle too, so check that no step follows.
    generated = after["pagellm:generation_tokens_total{}"]
    assert generated - before["pagellm:generation_tokens_total{}"] < 8 * steps
    time.sleep(0.5)
    assert _wait_idle(server)["pagellm:generation_tokens_total{}"] == generated
    ok = httpx.post(server + "/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 1}, timeout=60)
    assert ok.status_code == 200


# ---- the async driver in-process ---------------------------------------------------------------------


def test_async_driver_equals_offline_and_cancels_cleanly(tiny_llm):
    engine = tiny_llm.llm_engine
    params = BeamSearchParams(beam_width=3, max_tokens=6, length_penalty=2.0, early_stopping="never")
    offline = run_beam_search(engine, PROMPTS, params)

    async def scenario():
        async_engine = AsyncLLMEngine(engine)
        await async_engine.start()
        try:
            outs = []
            for i, ids in enumerate(PROMPTS):
                async for out in async_engine.beam_search(f"b{i}", None, ids, params):
                    outs.append(out)
            # Cancelled mid-search: its step requests are aborted.
            long = BeamSearchParams(beam_width=3, max_tokens=100, ignore_eos=True)
            task = asyncio.create_task(_drain(async_engine.beam_search("c", None, PROMPTS[0], long)))
            while not engine.has_unfinished_requests():
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await async_engine.run(lambda: None)  # the queued aborts have run
            return outs
        finally:
            await async_engine.shutdown()

    outs = asyncio.run(scenario())
    for ids, mine, ref in zip(PROMPTS, outs, offline):
        assert [c.token_ids for c in mine.outputs] == [s.tokens[len(ids):] for s in ref.sequences]
        # Batched differently (offline runs both prompts in one batch): equal up to float rounding.
        assert [c.cumulative_logprob for c in mine.outputs] == pytest.approx([s.cum_logprob for s in ref.sequences],
                                                                             abs=1e-4)
        assert mine.finished and mine.prompt_token_ids == ids
    assert not engine.has_unfinished_requests()
    assert engine.kv_cache.num_used_blocks == 0


async def _drain(stream) -> None:
    async for _ in stream:
        pass
