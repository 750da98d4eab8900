"""The HTTP side: OpenAI's /v1/models, /v1/completions and /v1/chat/completions (streamed as server-sent
events or not), /health and /metrics, with OpenAI-style error bodies."""

import asyncio
import json
import secrets
import time
from typing import Any

from fastapi import Depends, FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .metrics import Metrics
from .scheduler import QueueFull, Request, Scheduler


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None):
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error",
                              500: "server_error", 503: "server_error"}.get(status, "invalid_request_error")


def error_body(status: int, message: str, param=None, code=None, type_=None) -> dict:
    e = ApiError(status, message, param, code, type_)
    return {"error": {"message": message, "type": e.type, "param": param, "code": code}}


class _Strict(BaseModel):
    # wrong types are errors (no "5" -> 5); fields we do not use are ignored, as OpenAI-compatible servers do
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    ignore_eos: bool = False   # an extension (vLLM's name): generate max_tokens whatever the model says


class CompletionBody(_Sampling):
    prompt: str | list[str] | list[int]


class Message(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None


class Server:
    """The app around one Scheduler. name: the model id served; api_key: required as a Bearer token on /v1
    when set."""

    def __init__(self, scheduler: Scheduler, tokenizer, name: str, metrics: Metrics, api_key: str | None = None):
        self.scheduler, self.tokenizer, self.name, self.metrics = scheduler, tokenizer, name, metrics
        self.api_key = api_key
        self.created = int(time.time())
        self.app = self._build()

    # ---- request -> Request
    def _check_key(self, http: HttpRequest) -> None:
        if self.api_key is None:
            return
        auth = http.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
        if not secrets.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key (send `Authorization: Bearer KEY`)",
                           code="invalid_api_key")

    def _request(self, body: _Sampling, prompt_ids: list[int], prompt_text: str, max_tokens: int | None,
                 default_max: int | None) -> Request:
        if body.model is not None and body.model != self.name:
            raise ApiError(404, f"The model '{body.model}' does not exist; this server serves '{self.name}'",
                           "model", "model_not_found")
        if body.n not in (None, 1):
            raise ApiError(400, "only n=1 is supported", "n")
        context = self.scheduler.batch.max_context
        n = len(prompt_ids)
        if n == 0:
            raise ApiError(400, "the prompt is empty", "prompt")
        if n > context:
            raise ApiError(400, f"This model's maximum context length is {context} tokens; the prompt has {n}",
                           "prompt" if isinstance(body, CompletionBody) else "messages", "context_length_exceeded")
        if max_tokens is None:
            max_tokens = default_max or context - n + 1
        if max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, not {max_tokens}", "max_tokens")
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        if not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature must be in [0, 2], not {temperature}", "temperature")
        if not 0 < top_p <= 1:
            raise ApiError(400, f"top_p must be in (0, 1], not {top_p}", "top_p")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > 4 or any(not s for s in stop):
            raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
        if not self.scheduler.fits_ever(n, max_tokens):
            raise ApiError(400, f"{n} prompt tokens + max_tokens do not fit the server's KV-cache budget "
                                f"({self.scheduler.batch.budget_tokens} tokens)", "max_tokens")
        return Request(prompt_ids, max_tokens, emit=None, temperature=temperature, top_p=top_p, seed=body.seed,
                       stop=stop, prompt_text=prompt_text, ignore_eos=body.ignore_eos)

    def _completion_prompt(self, body: CompletionBody) -> tuple[list[int], str]:
        p = body.prompt
        if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            if len(p) != 1:
                raise ApiError(400, "one prompt per request (batch the requests instead)", "prompt")
            p = p[0]
        if isinstance(p, str):
            return list(self.tokenizer(p)["input_ids"]), p
        if any(not 0 <= t < len(self.tokenizer) for t in p):
            raise ApiError(400, "a token id of the prompt is outside the vocabulary", "prompt")
        return list(p), ""

    def _chat_prompt(self, body: ChatBody) -> tuple[list[int], str]:
        if not body.messages:
            raise ApiError(400, "messages is empty", "messages")
        msgs = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if part.get("type") == "text")
            msgs.append({"role": m.role, "content": content or ""})
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:
            raise ApiError(400, f"the chat template refused the messages: {e}", "messages") from None
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]), text

    # ---- running one request
    async def _run(self, req: Request, chat: bool, body: _Sampling, endpoint: str):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)
        try:
            self.scheduler.submit(req)
        except QueueFull:
            raise ApiError(429, "the server's queue is full; retry later", code="queue_full") from None
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        rid = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        try:
            first = await events.get()
        except BaseException:
            req.cancel()
            raise
        if first[0] == "error":
            raise ApiError(first[1], first[2])
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(self._sse(req, events, first, rid, created, chat, include_usage, endpoint),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text, ev = [], first
        try:
            while ev[0] == "text":
                text.append(ev[1])
                ev = await events.get()
        except BaseException:
            req.cancel()
            raise
        if ev[0] == "error":
            raise ApiError(ev[1], ev[2])
        _, reason, usage = ev
        out = "".join(text)
        choice = ({"index": 0, "message": {"role": "assistant", "content": out}, "logprobs": None,
                   "finish_reason": reason} if chat else
                  {"index": 0, "text": out, "logprobs": None, "finish_reason": reason})
        self.metrics.requests.labels(endpoint, "200").inc()
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": created, "model": self.name, "choices": [choice], "usage": usage})

    async def _sse(self, req, events, first, rid, created, chat, include_usage, endpoint):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece=None, reason=None, role=False, usage=None, choices=True):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": piece} if piece else {})
                ch = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                ch = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": reason}
            d = {"id": rid, "object": obj, "created": created, "model": self.name, "choices": [ch] if choices else []}
            if usage is not None:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        done = False
        try:
            if chat:
                yield chunk(role=True)
            ev = first
            while True:
                if ev[0] == "text":
                    yield chunk(ev[1])
                elif ev[0] == "done":
                    yield chunk(reason=ev[1])
                    if include_usage:
                        yield chunk(usage=ev[2], choices=False)
                    break
                else:
                    err = error_body(ev[1], ev[2])
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                ev = await events.get()
            yield "data: [DONE]\n\n"
            done = True
            self.metrics.requests.labels(endpoint, "200").inc()
        finally:
            if not done:        # the client went away: free the slot at the next step
                req.cancel()
                self.metrics.requests.labels(endpoint, "disconnected").inc()

    # ---- the app
    def _build(self) -> FastAPI:
        app = FastAPI(title="sparse-export serve", docs_url=None, redoc_url=None, openapi_url=None)

        def fail(endpoint: str, status: int, body: dict) -> JSONResponse:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            return JSONResponse(body, status_code=status)

        @app.exception_handler(ApiError)
        async def _api_error(http: HttpRequest, e: ApiError):
            return fail(http.url.path, e.status, error_body(e.status, e.message, e.param, e.code, e.type))

        @app.exception_handler(RequestValidationError)
        @app.exception_handler(ValidationError)
        async def _invalid(http: HttpRequest, e: RequestValidationError | ValidationError):
            errs = e.errors()
            first = errs[0] if errs else {}
            loc = [str(x) for x in first.get("loc", ()) if x != "body"]
            if first.get("type") == "json_invalid":
                msg, param = "the request body is not valid JSON", None
            else:
                param = loc[0] if loc else None     # (the rest of loc names union members and list indexes)
                msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}"
            return fail(http.url.path, 400, error_body(400, msg, param, "invalid_request"))

        @app.exception_handler(StarletteHTTPException)
        async def _http(http: HttpRequest, e: StarletteHTTPException):
            return fail(http.url.path, e.status_code, error_body(e.status_code, str(e.detail)))

        @app.exception_handler(Exception)
        async def _crash(http: HttpRequest, e: Exception):
            return fail(http.url.path, 500, error_body(500, f"internal error: {type(e).__name__}: {e}"))

        @app.get("/health")
        async def health():
            return {"status": "ok", "model": self.name, **self.scheduler.status()}

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

        auth = [Depends(self._check_key)]   # before the body is read: a bad key is 401 whatever the body

        @app.get("/v1/models", dependencies=auth)
        async def list_models():
            return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                                 "owned_by": "sparse-export",
                                                 "max_model_len": self.scheduler.batch.max_context}]}

        # bodies are parsed here, not by FastAPI, so a JSON body without a JSON content type (curl -d) works

        @app.post("/v1/completions", dependencies=auth)
        async def completions(http: HttpRequest):
            body = CompletionBody.model_validate_json(await http.body())
            ids, text = self._completion_prompt(body)
            req = self._request(body, ids, text, body.max_tokens, 16)
            return await self._run(req, False, body, "/v1/completions")

        @app.post("/v1/chat/completions", dependencies=auth)
        async def chat(http: HttpRequest):
            body = ChatBody.model_validate_json(await http.body())
            ids, text = self._chat_prompt(body)
            req = self._request(body, ids, text, body.max_completion_tokens or body.max_tokens, None)
            return await self._run(req, True, body, "/v1/chat/completions")

        return app

