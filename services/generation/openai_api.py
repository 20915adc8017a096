"""OpenAI-compatible HTTP for the served models, on Serve's HTTP proxy (``KNOWSERVE_GENERATION_HTTP_PORT``):
``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` sends server-sent
events ending in ``data: [DONE]``). ``model`` is a served model's name (``knowserve models``). Errors come in
OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``, with its HTTP statuses.

The routes are methods of the generation ingress (mounted with ``serve.ingress``), so they reach the same model
deployments, the same validation and the same limits as the gRPC API::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8054/v1", api_key="unused")
    client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}])
"""

# no `from __future__ import annotations`: FastAPI reads these routes' annotations as real classes

import json
import time
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from services.common import auth
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.status import status_of, unwrap
from services.generation.core import TOOL_TURNS
from services.generation.engine import LENGTH, STOP

_HTTP = {"INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "NOT_FOUND": 404, "FAILED_PRECONDITION": 400,
         "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
          429: "rate_limit_error", 503: "server_error", 504: "server_error", 500: "server_error"}
_FINISH = {STOP: "stop", LENGTH: "length", TOOL_TURNS: "length"}  # OpenAI has no finish reason for a turn limit


class _Request(BaseModel):
    """Fields shared by both endpoints (OpenAI's names); unknown fields are ignored, as OpenAI servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    logprobs: Any = None


class CompletionRequest(_Request):
    prompt: str | list[str]


class ContentPart(BaseModel):
    """One part of a message's content in OpenAI's list form; only text parts carry text here."""

    model_config = ConfigDict(extra="ignore")

    type: str
    text: str = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[ContentPart] = ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = None


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape.

    >>> error_body("model 'x' is not served", 404, "model", "model_not_found")["error"]["type"]
    'invalid_request_error'
    """
    kind = _TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(exc: BaseException):
    from fastapi.responses import JSONResponse

    code, message = status_of(exc)
    status = _HTTP.get(code.name, 500)
    param = getattr(unwrap(exc), "field", None)
    name = "model_not_found" if code.name == "NOT_FOUND" else code.name.lower()
    return JSONResponse(error_body(message, status, param, name), status_code=status)


def _content(content: str | list[ContentPart]) -> str:
    """A message's text (OpenAI's content parts: the text ones, joined).

    >>> _content([ContentPart(type="text", text="Hi "), ContentPart(type="image_url"),
    ...           ContentPart(type="text", text="x")])
    'Hi x'
    """
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if part.type == "text")


def _params(r: _Request, max_tokens: int | None):
    from services.generation.core import GenerateParams

    if r.logprobs:
        raise InvalidArgument("logprobs", "not supported on the OpenAI endpoint; use the gRPC Generate with "
                              "return_logprobs")
    stop = (r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ())
    return GenerateParams(temperature=r.temperature, top_p=r.top_p or 1.0, max_tokens=max_tokens or 0, n=r.n or 1,
                          stop=stop, seed=r.seed)


def _usage(completions) -> dict:
    prompt = sum(len(c.prompt_token_ids) for c in completions if c.sample_index == 0)
    completion = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def with_openai_routes(ingress_cls):
    """``ingress_cls`` with the OpenAI routes, as a ``serve.ingress`` FastAPI deployment class."""
    from fastapi import FastAPI, Header, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray import serve
    from starlette.exceptions import HTTPException

    app = FastAPI(title="knowserve generation (OpenAI-compatible)", docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return JSONResponse(error_body(f"{param}: {first.get('msg', 'invalid request')}", 400, param,
                                       "invalid_request"), status_code=400)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        # FastAPI's own refusals (a body that is not UTF-8, an unknown route, a wrong method) in OpenAI's shape
        return JSONResponse(error_body(str(exc.detail), exc.status_code, None, "invalid_request"),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    class OpenAIIngress(ingress_cls):
        def _refused(self, authorization: str | None):
            """OpenAI's 401 error body when the bearer token (the client's api_key) is missing or wrong."""
            if auth.authorized(authorization, self.token):
                return None
            return _error_response(Unauthenticated(auth.BEARER_HINT))

        @app.get("/v1/models")
        async def openai_models(self, authorization: str | None = Header(default=None)):
            if (refused := self._refused(authorization)) is not None:
                return refused
            return {"object": "list", "data": [{"id": name, "object": "model", "created": 0,
                                                "owned_by": "knowserve"} for name in self.models]}

        @app.post("/v1/completions")
        async def openai_completions(self, body: CompletionRequest, authorization: str | None = Header(default=None)):
            from services.generation.core import Prompt

            if (refused := self._refused(authorization)) is not None:
                return refused
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            return await self._openai(body, [Prompt(text=p) for p in prompts], body.max_tokens, chat=False)

        @app.post("/v1/chat/completions")
        async def openai_chat(self, body: ChatRequest, authorization: str | None = Header(default=None)):
            from services.generation.core import Prompt

            if (refused := self._refused(authorization)) is not None:
                return refused
            messages = [{"role": m.role, "content": _content(m.content)} for m in body.messages]
            return await self._openai(body, [Prompt(messages=messages)], body.max_completion_tokens or body.max_tokens,
                                      chat=True)

        async def _openai(self, body: _Request, prompts: list, max_tokens: int | None, chat: bool):
            method = "openai_chat" if chat else "openai_completions"
            record = self._record(method, body.model)
            try:
                name, handle = self.resolve(body.model)
                params = _params(body, max_tokens)
                if body.stream:
                    if len(prompts) != 1 or params.n != 1:
                        raise InvalidArgument("stream", "streaming takes one prompt and n=1")
                    stream = self._stream(handle, name, prompts[0], params, chat, record)
                    return StreamingResponse(stream, media_type="text/event-stream")
                completions = await handle.generate.remote(prompts, params)
                self.live.sample(name, prompts, completions)
            except Exception as e:  # noqa: BLE001 - OpenAI's error shape
                record.code, _ = status_of(e)
                record.finish()
                return _error_response(e)
            record.finish()
            rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
            choices = []
            for i, c in enumerate(completions):
                finish = _FINISH.get(c.finish_reason, "stop")
                if chat:
                    choices.append({"index": i, "message": {"role": "assistant", "content": c.text},
                                    "finish_reason": finish, "logprobs": None})
                else:
                    choices.append({"index": i, "text": c.text, "finish_reason": finish, "logprobs": None})
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": name, "choices": choices, "usage": _usage(completions),
                    "system_fingerprint": f"v{completions[0].weight_version}"}

        async def _stream(self, handle, name: str, prompt, params, chat: bool, record):
            rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time())
            kind = "chat.completion.chunk" if chat else "text_completion"

            def chunk(text: str, finish: str | None, first: bool = False) -> dict:
                if chat:
                    delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
                    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                else:
                    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
                return {"id": rid, "object": kind, "created": created, "model": name, "choices": [choice]}

            try:
                first, parts, version = True, [], 0
                async for d in handle.options(stream=True).stream.remote(prompt, params):
                    parts.append(d.text)
                    version = d.weight_version or version
                    finish = _FINISH.get(d.finish_reason) if d.finish_reason else None
                    if d.text or finish or first:
                        yield _sse(chunk(d.text, finish, first))
                        first = False
                self.live.sample_one(name, version, prompt, "".join(parts))
            except Exception as e:  # noqa: BLE001 - after the first byte the status is sent: an error event
                record.code, message = status_of(e)
                yield _sse(error_body(message, _HTTP.get(record.code.name, 500)))
            finally:
                record.finish()
            yield _sse("[DONE]")

    return serve.ingress(app)(OpenAIIngress)
