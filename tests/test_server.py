"""The OpenAI-compatible server end to end: a real `pagellm serve` subprocess on a tiny random
Llama, driven with the official `openai` client (sync and async) and raw httpx."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time

import httpx
import pytest

from server_helpers import client_and_auth_fixtures, metric_samples, running_server

openai = pytest.importorskip("openai")

API_KEY = "sk-pagellm-test"
MODEL = "tiny"
MAX_MODEL_LEN = 256


# ---- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    """`pagellm serve` on the tiny Llama (conftest's), on a free port, with an API key."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    args = ["--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-memory", "64MiB", "--served-model-name", MODEL,
            "--api-key", API_KEY]
    with running_server(tiny_llama_dir, args, log_path) as base:
        yield {"base": base, "log": log_path}


client, auth = client_and_auth_fixtures(API_KEY, timeout=120)


def _tokens(server, auth, **body) -> list[int]:
    response = httpx.post(server["base"] + "/tokenize", json=body, headers=auth, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def _metrics(server) -> dict[str, float]:
    """Prometheus samples as {'name{label="v",...}': value} (no key needed)."""
    return metric_samples(server["base"])


# ---- basics -----------------------------------------------------------------------------------------


def test_open_endpoints_and_models(server, client):
    assert httpx.get(server["base"] + "/health").status_code == 200
    version = httpx.get(server["base"] + "/version").json()
    assert isinstance(version["version"], str) and version["version"]
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"


def test_tokenize_detokenize_round_trip(server, auth):
    ids = _tokens(server, auth, prompt="Hello world, how are you?")
    assert ids and all(isinstance(t, int) for t in ids)
    text = httpx.post(server["base"] + "/detokenize", json={"tokens": ids}, headers=auth).json()["prompt"]
    assert text == "Hello world, how are you?"
    chat_ids = _tokens(server, auth, messages=[{"role": "user", "content": "Hi"}])
    assert len(chat_ids) > len(_tokens(server, auth, prompt="Hi"))  # the template adds its markup


def test_completion_greedy_usage_exact(server, auth, client):
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert out.id.startswith("cmpl-") and out.object == "text_completion" and out.model == MODEL
    assert isinstance(out.created, int)
    assert len(out.choices) == 1 and out.choices[0].index == 0
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == len(_tokens(server, auth, prompt=prompt))
    assert out.usage.completion_tokens == 6
    assert out.usage.total_tokens == out.usage.prompt_tokens + 6
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
    assert again.choices[0].text == out.choices[0].text  # greedy is deterministic


def test_completion_stream_equals_non_stream(client):
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_stream_equals_non_stream(server, auth, client):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Say something."}]}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    plain = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    assert full.usage.prompt_tokens == len(_tokens(server, auth, messages=plain))
    assert full.usage.completion_tokens == len_or_finished(full)
    stream = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=7, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert stream[0].object == "chat.completion.chunk"
    assert stream[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert content == full.choices[0].message.content
    with_choices = [c for c in stream if c.choices]
    assert with_choices[-1].choices[0].finish_reason == full.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert stream[-1].usage.completion_tokens == full.usage.completion_tokens
    assert stream[-1].usage.prompt_tokens == full.usage.prompt_tokens


def len_or_finished(response) -> int:
    """Completion tokens implied by a 7-token cap: 7 unless the model stopped early."""
    return 7 if response.choices[0].finish_reason == "length" else response.usage.completion_tokens


def test_chat_default_max_tokens_is_rest_of_context(server, auth):
    # No max_tokens: the request is accepted and may run to the end of the context. A stop
    # token id that the model produces right away keeps the test short.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "temperature": 0}
    first = httpx.post(server["base"] + "/v1/chat/completions", json={**body, "max_tokens": 1}, headers=auth,
                       timeout=60).json()
    token = _tokens(server, auth, prompt=first["choices"][0]["message"]["content"])
    out = httpx.post(server["base"] + "/v1/chat/completions", json={**body, "stop_token_ids": token[:1]},
                     headers=auth, timeout=60)
    assert out.status_code == 200, out.text
    assert out.json()["choices"][0]["finish_reason"] == "stop"


# ---- sampling features ------------------------------------------------------------------------------


def test_n3_with_seed_gives_three_reproducible_choices(client):
    kwargs = dict(model=MODEL, prompt="Pick a word:", max_tokens=5, temperature=1.0, n=3, seed=1234,
                  extra_body={"ignore_eos": True})
    out = client.completions.create(**kwargs)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert out.usage.completion_tokens == 15
    again = client.completions.create(**kwargs)
    assert [c.text for c in sorted(again.choices, key=lambda c: c.index)] == \
        [c.text for c in sorted(out.choices, key=lambda c: c.index)]
    texts = {c.text for c in out.choices}
    assert len(texts) > 1  # different child seeds give different samples
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], n=3,
                                          seed=5, temperature=1.0, max_tokens=3)
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]


def test_logit_bias_and_vllm_extras(server, auth, client):
    forced = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, temperature=0,
                                       logit_bias={"1000": 100})
    text = httpx.post(server["base"] + "/detokenize", json={"tokens": [1000] * 3}, headers=auth).json()["prompt"]
    assert forced.choices[0].text == text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                          max_completion_tokens=2, temperature=0,
                                          extra_body={"ignore_eos": True, "min_tokens": 2, "top_k": 5})
    assert chat.usage.completion_tokens == 2 and chat.choices[0].finish_reason == "length"


def test_completion_logprobs_shapes(client):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0
        assert 3 <= len(top) <= 4 and token in top
        assert max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the likeliest


def test_chat_logprobs_shapes(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_echo_with_logprobs(server, auth, client):
    prompt = "Echo this back"
    num_prompt = len(_tokens(server, auth, prompt=prompt))
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=1)
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0)
    assert out.choices[0].text == prompt + plain.choices[0].text
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == num_prompt + 3
    assert lp.token_logprobs[0] is None and all(x is not None for x in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == out.choices[0].text
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == out.choices[0].text


def test_token_id_and_batched_prompts(client):
    out = client.completions.create(model=MODEL, prompt=[[10, 20, 30], [40, 50]], max_tokens=2, temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1]
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == 4
    single = client.completions.create(model=MODEL, prompt=[40, 50], max_tokens=2, temperature=0)
    by_index = {c.index: c.text for c in out.choices}
    assert by_index[1] == single.choices[0].text
    texts = client.completions.create(model=MODEL, prompt=["a b c", "d e"], max_tokens=2, temperature=0, n=1)
    assert sorted(c.index for c in texts.choices) == [0, 1]


def test_stop_strings_cut_streamed_and_not(client):
    # A seeded sample gives varied text. The stop string straddles two tokens, so its first
    # character arrives one step before the rest: a streamer must hold that character back.
    kwargs = dict(model=MODEL, prompt="Tell me a story", max_tokens=24, temperature=1.0, seed=99)
    free = client.completions.create(**kwargs, logprobs=0).choices[0]
    tokens, text = free.logprobs.tokens, free.text
    stop = next(a[-1] + b[:2] for a, b in zip(tokens[len(tokens) // 3:], tokens[len(tokens) // 3 + 1:])
                if a and len(b) >= 2 and (a[-1] + b[:2]) in text)
    expected = text[: text.index(stop)]
    out = client.completions.create(**kwargs, stop=[stop])
    assert out.choices[0].text == expected
    assert out.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(**kwargs, stop=[stop], stream=True))
    pieces = [c.choices[0].text for c in chunks]
    assert "".join(pieces) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Go"}], max_tokens=24, temperature=1.0, seed=3)
    free_chat = client.chat.completions.create(**chat).choices[0].message.content
    stop = free_chat[len(free_chat) // 2: len(free_chat) // 2 + 2]
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(**chat, stop=stop, stream=True) if c.choices)
    assert streamed == free_chat[: free_chat.index(stop)]


# ---- concurrency and disconnects --------------------------------------------------------------------


def test_64_concurrent_streams_all_correct(server, client):
    prompts = ["alpha beta", "gamma delta epsilon", "one two three four", "x"]
    reference = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
                 for p in prompts}

    async def run_all() -> list[tuple[str, str, str | None, int]]:
        aclient = openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0, timeout=300)

        async def one(i: int) -> tuple[str, str, str | None, int]:
            prompt = prompts[i % len(prompts)]
            stream = await aclient.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                                      stream=True, stream_options={"include_usage": True})
            text, finish, used = "", None, -1
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    used = chunk.usage.completion_tokens
            return prompt, text, finish, used

        try:
            return await asyncio.gather(*(one(i) for i in range(64)))
        finally:
            await aclient.close()

    results = asyncio.run(run_all())
    assert len(results) == 64
    for prompt, text, finish, used in results:
        assert text == reference[prompt]
        assert finish == "length" and used == 6


def test_client_disconnect_frees_kv_blocks(server, auth):
    before = _metrics(server)
    aborted_before = before['pagellm:request_success_total{finished_reason="abort"}']
    body = {"model": MODEL, "prompt": [11, 12, 13], "max_tokens": MAX_MODEL_LEN - 3, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server["base"] + "/v1/completions", json=body, headers=auth) as response:
            assert response.status_code == 200
            lines = 0
            for line in response.iter_lines():
                if line.startswith("data:"):
                    lines += 1
                if lines >= 3:
                    break
        # Leaving the block closes the connection mid-stream.
    assert _metrics(server)['pagellm:num_requests_running{}'] <= 1
    deadline = time.time() + 15
    while True:
        m = _metrics(server)
        if m["pagellm:num_used_blocks{}"] == 0 and m["pagellm:num_requests_running{}"] == 0:
            break
        assert time.time() < deadline, f"KV blocks still in use after the disconnect: {m['pagellm:num_used_blocks{}']}"
        time.sleep(0.2)
    assert m['pagellm:request_success_total{finished_reason="abort"}'] == aborted_before + 1
    # It stopped early: it did not run to its max_tokens.
    assert m["pagellm:generation_tokens_total{}"] - before["pagellm:generation_tokens_total{}"] < MAX_MODEL_LEN - 3

    # A non-streamed request whose client gives up is aborted too.
    try:
        done = httpx.post(server["base"] + "/v1/completions", json={**body, "stream": False}, headers=auth,
                          timeout=0.2)
    except httpx.TimeoutException:
        done = None
    if done is not None:  # a machine fast enough to finish 253 tokens in 0.2 s
        assert done.json()["choices"][0]["finish_reason"] == "length"
        return
    deadline = time.time() + 15
    while (m := _metrics(server))["pagellm:num_used_blocks{}"] != 0:
        assert time.time() < deadline, "KV blocks still in use after the non-streamed client left"
        time.sleep(0.2)
    assert m['pagellm:request_success_total{finished_reason="abort"}'] == aborted_before + 2


# ---- auth and errors --------------------------------------------------------------------------------


def test_api_key_missing_wrong_and_right(server):
    for key in (None, "sk-wrong"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, "prompt": "hi"}, headers=headers)
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    wrong = openai.OpenAI(base_url=server["base"] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert httpx.get(server["base"] + "/metrics").status_code == 200  # open without a key
    right = openai.OpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0)
    assert right.models.list().data[0].id == MODEL


_ERROR_CASES = [
    # (endpoint, body or raw bytes, status, param, words in the message)
    ("/v1/completions", b'{"model": "tiny", "prompt": "hi",', 400, None, "JSON"),
    ("/v1/completions", {"model": "tiny"}, 400, "prompt", "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "hi"}, 404, "model", "nope"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": -1}, 400, "temperature", "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "top_p": 0}, 400, "top_p", "top_p"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "n": 0}, 400, "n", "n must"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 21}, 400, "logprobs", "logprobs"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "temperature": "hot"}, 400, "temperature", "temperature"),
    ("/v1/completions", {"model": "tiny", "prompt": ""}, 400, "prompt", "empty"),
    ("/v1/completions", {"model": "tiny", "prompt": [1, 2, 10**9]}, 400, None, "prompt_token_ids"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 10**6}, 400, "max_tokens",
     f"maximum context length is {MAX_MODEL_LEN} tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": [5] * 300, "max_tokens": 2}, 400, None,
     f"maximum context length is {MAX_MODEL_LEN} tokens"),
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options", "stream"),
    ("/v1/chat/completions", {"model": "tiny", "messages": "hello"}, 400, "messages", "messages"),
    ("/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages", "empty"),
    ("/v1/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "nope"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
     400, "top_logprobs", "logprobs"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi " * 300}]}, 400, None,
     f"maximum context length is {MAX_MODEL_LEN} tokens"),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, "messages", "text"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens", "tokens"),
    ("/v1/nothing-here", {}, 404, None, "Not Found"),
]


@pytest.mark.parametrize("endpoint,body,status,param,words", _ERROR_CASES,
                         ids=[f"{i}-{c[0].rsplit('/', 1)[-1]}-{c[2]}" for i, c in enumerate(_ERROR_CASES)])
def test_error_cases_return_openai_json_and_server_keeps_serving(server, auth, endpoint, body, status, param, words):
    url = server["base"] + endpoint
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={**auth, "Content-Type": "application/json"})
    else:
        r = httpx.post(url, json=body, headers=auth)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words.lower() in error["message"].lower(), error
    if param is not None:
        assert error["param"] == param, error
    ok = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 1},
                    headers=auth, timeout=60)
    assert ok.status_code == 200


def test_context_error_names_both_lengths(server, auth):
    r = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, "prompt": [7] * 10, "max_tokens": 250},
                   headers=auth)
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "260 tokens (10 in the messages, 250 in the completion)" in message


def test_openai_client_raises_bad_request(client):
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="hi", temperature=-3)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "hi"}])


# ---- metrics and the load generator ------------------------------------------------------------------


def test_metrics_after_traffic(server, client):
    client.completions.create(model=MODEL, prompt="metrics please", max_tokens=3, temperature=0)
    m = _metrics(server)
    assert m['pagellm:request_success_total{finished_reason="length"}'] >= 1
    assert m["pagellm:prompt_tokens_total{}"] > 0 and m["pagellm:generation_tokens_total{}"] >= 3
    assert m["pagellm:time_to_first_token_seconds_count{}"] >= 1
    assert m["pagellm:e2e_request_latency_seconds_count{}"] >= 1
    assert m["pagellm:inter_token_latency_seconds_count{}"] >= 2
    assert m["pagellm:num_requests_waiting{}"] == 0
    assert 0.0 <= m["pagellm:kv_cache_usage_perc{}"] <= 1.0


@pytest.mark.parametrize("endpoint,rate,concurrency", [("/v1/completions", math.inf, None),
                                                       ("/v1/chat/completions", 50.0, 2)])
def test_bench_serve_against_server(server, tmp_path, endpoint, rate, concurrency):
    from pagellm.benchmarks import serve as bench

    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    out = tmp_path / "bench.json"
    argv = ["--base-url", server["base"], "--endpoint", endpoint, "--num-prompts", "4", "--random-input-len", "8",
            "--random-output-len", "4", "--request-rate", str(rate), "--api-key", API_KEY, "--output-json",
            str(out), "--quiet"]
    if concurrency:
        argv += ["--max-concurrency", str(concurrency)]
    bench.main(parser.parse_args(argv))
    result = json.loads(out.read_text())
    assert result["completed"] == 4 and result["failed"] == 0, result.get("first_error")
    assert result["total_output_tokens"] == 16
    if endpoint == "/v1/completions":
        assert result["total_input_tokens"] == 32
    for name in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p99"):
            assert result[f"{stat}_{name}_ms"] >= 0.0
    assert result["mean_e2el_ms"] >= result["mean_ttft_ms"] > 0
    assert result["output_throughput"] > 0 and result["request_throughput"] > 0


def test_prefix_cache_metrics_and_reset(server, auth, client):
    """A repeated long prompt hits the prefix cache (counted in /metrics); the reset endpoint works."""
    prompt = list(range(100, 180))  # 80 tokens = 5 full blocks
    before = _metrics(server)
    for _ in range(3):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    after = _metrics(server)
    queries = after["pagellm:prefix_cache_queries_total{}"] - before["pagellm:prefix_cache_queries_total{}"]
    hits = after["pagellm:prefix_cache_hits_total{}"] - before["pagellm:prefix_cache_hits_total{}"]
    assert queries >= 3 * 79 and hits >= 2 * 64
    assert httpx.post(server["base"] + "/reset_prefix_cache", headers=auth).status_code == 200
    client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    final = _metrics(server)
    assert final["pagellm:prefix_cache_hits_total{}"] == after["pagellm:prefix_cache_hits_total{}"]


# ---- wire-format details that clients written for OpenAI and vLLM rely on ---------------------------


def _sse_events(server, auth, endpoint: str, body: dict) -> list[dict]:
    """The JSON payloads of a streamed answer, checking that it ends with `data: [DONE]`."""
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", server["base"] + endpoint, json=body, headers=auth) as response:
            assert response.status_code == 200, response.read()
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


# ---- echo with max_tokens 0: scoring a prompt (lm-evaluation-harness's loglikelihood) ----------------


def test_echo_with_zero_max_tokens_returns_the_prompt_and_its_logprobs(server, auth, client):
    prompt = "Score this sentence"
    num_prompt = len(_tokens(server, auth, prompt=prompt))
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = out.choices[0]
    assert choice.text == prompt  # the prompt and nothing generated
    assert choice.finish_reason == "length"
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == num_prompt
    assert "".join(lp.tokens) == prompt
    assert lp.token_logprobs[0] is None and all(x is not None and x <= 0.0 for x in lp.token_logprobs[1:])
    assert out.usage.prompt_tokens == num_prompt and out.usage.completion_tokens == 0
    # The same logprobs as the prompt part of an echo that does generate.
    longer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, echo=True, logprobs=1,
                                       temperature=0)
    assert longer.choices[0].logprobs.token_logprobs[:num_prompt] == pytest.approx(lp.token_logprobs)

    # Batched token-id prompts, as evaluation harnesses send them; and streamed.
    ids = [[10, 20, 30], [40, 50]]
    batch = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert sorted(len(c.logprobs.tokens) for c in batch.choices) == [2, 3]
    assert batch.usage.completion_tokens == 0
    events = _sse_events(server, auth, "/v1/completions",
                         {"model": MODEL, "prompt": prompt, "max_tokens": 0, "echo": True, "stream": True,
                          "stream_options": {"include_usage": True}})
    pieces = [e["choices"][0] for e in events if e["choices"]]
    assert "".join(p["text"] for p in pieces) == prompt
    assert pieces[-1]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 0


def test_zero_max_tokens_without_echo_is_still_a_bad_request(server, auth):
    r = httpx.post(server["base"] + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 0},
                   headers=auth, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "max_tokens"


# ---- stream_options.continuous_usage_stats (vLLM): usage on every chunk -------------------------------


@pytest.mark.parametrize("endpoint,prompt", [("/v1/completions", {"prompt": "Count with me"}),
                                             ("/v1/chat/completions",
                                              {"messages": [{"role": "user", "content": "Count with me"}]})])
def test_continuous_usage_stats_puts_usage_on_every_chunk(server, auth, endpoint, prompt):
    body = {"model": MODEL, **prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = _sse_events(server, auth, endpoint, body)
    final = events[-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 4
    with_choices = events[:-1]
    assert with_choices and all(e["choices"] and e["usage"] is not None for e in with_choices)
    counts = [e["usage"]["completion_tokens"] for e in with_choices]
    assert counts == sorted(counts) and counts[-1] == 4
    for e in with_choices:
        usage = e["usage"]
        assert usage["prompt_tokens"] == final["usage"]["prompt_tokens"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # Without the flag only the last chunk carries usage.
    plain = _sse_events(server, auth, endpoint, {**body, "stream_options": {"include_usage": True}})
    assert all(e["usage"] is None for e in plain[:-1]) and plain[-1]["usage"]["completion_tokens"] == 4


# ---- errors name the field the client sent ---------------------------------------------------------

_HI = [{"role": "user", "content": "hi"}]
_FIELD_ERRORS = [
    # (endpoint, body, param, code)
    ("/v1/completions", {"prompt": [5] * 300, "max_tokens": 2}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi " * 300}]}, "messages",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": _HI, "max_tokens": 10**6}, "max_tokens", "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": _HI, "max_completion_tokens": 10**6}, "max_completion_tokens",
     "context_length_exceeded"),
    ("/v1/chat/completions", {"messages": _HI, "max_completion_tokens": 0}, "max_completion_tokens", None),
]


@pytest.mark.parametrize("endpoint,body,param,code", _FIELD_ERRORS,
                         ids=[f"{i}-{c[0].split('/')[2]}-{c[2]}" for i, c in enumerate(_FIELD_ERRORS)])
def test_error_param_and_code_name_what_the_client_sent(server, auth, endpoint, body, param, code):
    r = httpx.post(server["base"] + endpoint, json={"model": MODEL, **body}, headers=auth, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code), error


def test_chat_stream_deltas_carry_only_their_keys(server, auth):
    # OpenAI (and vLLM) send the role once, then content-only deltas, and `{}` with the finish
    # reason: never `"role": null` / `"content": null`, which strict clients reject.
    events = _sse_events(server, auth, "/v1/chat/completions",
                         {"model": MODEL, "messages": [{"role": "user", "content": "Count with me"}],
                          "max_tokens": 4, "temperature": 0, "ignore_eos": True, "stream": True})
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all(set(d) <= {"content"} and d.get("content") is not None for d in deltas[1:-1])
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert all(value is not None for value in deltas[-1].values())


def test_cors_lets_browsers_call_the_api(server, auth):
    # vLLM's defaults: any origin. A preflight is answered before the key check, and a 401 carries
    # the CORS headers so a browser page can read it.
    origin = {"Origin": "http://ui.example"}
    preflight = httpx.options(server["base"] + "/v1/chat/completions", timeout=30,
                              headers={**origin, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    models = httpx.get(server["base"] + "/v1/models", headers={**origin, **auth}, timeout=30)
    assert models.status_code == 200 and models.headers["access-control-allow-origin"] == "*"
    denied = httpx.get(server["base"] + "/v1/models", headers=origin, timeout=30)
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == "*"
