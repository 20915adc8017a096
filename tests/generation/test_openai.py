"""The OpenAI-compatible HTTP endpoint on Serve's HTTP proxy, called with the official `openai` client: models,
completions, chat completions, streaming (SSE) and errors in OpenAI's shape, for the session app's named models."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import GENERATION_TOKEN

pytestmark = pytest.mark.timeout(600)


def _client(app):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{app.http_port}/v1", api_key=GENERATION_TOKEN, max_retries=0, timeout=120)


async def test_openai_client_against_the_http_endpoint(serve_generation_app):
    import openai

    client = _client(serve_generation_app)

    def calls():
        models = [m.id for m in client.models.list()]
        assert models == ["tiny", "second", "gated"]
        done = client.completions.create(model="tiny", prompt="Paris is", max_tokens=4, temperature=0)
        assert done.object == "text_completion" and done.model == "tiny"
        assert done.choices[0].finish_reason in ("stop", "length") and done.usage.completion_tokens >= 1
        chat = client.chat.completions.create(model="second", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=4, temperature=0)
        assert chat.choices[0].message.role == "assistant" and chat.model == "second"
        greedy = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=5, temperature=0)
        chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=5, temperature=0, stream=True))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy.choices[0].message.content
        two = client.completions.create(model="tiny", prompt=["a", "b"], max_tokens=2, n=2)
        assert len(two.choices) == 4
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
        assert err.value.body["code"] == "model_not_found" and "tiny" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError) as err:
            client.completions.create(model="tiny", prompt="x", max_tokens=1000)
        assert err.value.body["type"] == "invalid_request_error" and "max_tokens" in err.value.body["message"]
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=[])
        assert err.value.body["param"] == "messages"

    await asyncio.to_thread(calls)


HOSTILE = [  # (route, raw body, expected status)
    ("completions", b"not json", 400),
    ("completions", b"[]", 400),
    ("completions", b'{"model": "tiny"}', 400),
    ("completions", b'{"model": "tiny", "prompt": 123}', 400),
    ("completions", b'{"model": "tiny", "prompt": "x", "max_tokens": -5}', 400),
    ("completions", b'{"model": "tiny", "prompt": "x", "temperature": NaN}', 400),
    ("completions", b'{"model": "tiny", "prompt": "x", "temperature": 1e400}', 400),
    ("completions", b'{"model": "tiny", "prompt": "x", "n": 1000000000000}', 400),
    ("completions", b'{"model": "tiny", "prompt": "x", "seed": 100000000000000000000000}', 400),
    ("completions", b'{"model": "tiny", "prompt": "x", "stop": [1, 2]}', 400),
    ("completions", b'{"model": "tiny", "prompt": "x", "stop": ' + str(["s"] * 100).replace("'", '"').encode()
     + b"}", 400),
    ("completions", b'{"model": "tiny", "prompt": ' + str(["p"] * 1000).replace("'", '"').encode() + b"}", 400),
    ("completions", b'{"model": "tiny", "prompt": "x", "logprobs": 3}', 400),
    ("completions", b'{"model": "\\u0000nope", "prompt": "x"}', 404),
    ("chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": [{"type": "text", '
     b'"text": 5}]}]}', 400),
    ("chat/completions", b'{"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}', 400),
    ("chat/completions", b'{"model": "tiny", "messages": [{"content": "x"}]}', 400),
    ("chat/completions", b'{"model": "tiny", "messages": "hello"}', 400),
    ("chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stream": true, '
     b'"n": 2}', 400),
    ("chat/completions", b'{"model": "tiny", "messages": [{"role": "user", "content": "' + b"\xff\xfe" + b'"}]}', 400),
]


async def test_hostile_bodies_get_openai_errors_never_a_500(serve_generation_app):
    import httpx

    base = f"http://127.0.0.1:{serve_generation_app.http_port}/v1/"
    headers = {"authorization": f"Bearer {GENERATION_TOKEN}", "content-type": "application/json"}

    def calls():
        with httpx.Client(timeout=120) as http:
            for route, body, status in HOSTILE:
                r = http.post(base + route, content=body, headers=headers)
                assert r.status_code == status, (body[:120], r.status_code, r.text[:300])
                error = r.json()["error"]  # OpenAI's shape, with the field named where there is one
                assert error["type"] == "invalid_request_error" and error["message"], (body[:120], error)
            # still serving, and a hostile body without the token is refused before it is read
            ok = http.post(base + "completions", headers=headers,
                           content=b'{"model": "tiny", "prompt": "Paris is", "max_tokens": 2}')
            assert ok.status_code == 200 and ok.json()["choices"], ok.text
            anon = http.post(base + "completions", content=b'{"model": "tiny", "prompt": "x"}',
                             headers={"content-type": "application/json"})
            assert anon.status_code == 401 and anon.json()["error"]["type"] == "authentication_error"

    await asyncio.to_thread(calls)
