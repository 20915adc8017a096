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
