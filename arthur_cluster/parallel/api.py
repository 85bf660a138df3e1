"""Rank 0's HTTP side: OpenAI-compatible routes on FastAPI, served by uvicorn in a thread of rank 0.

It speaks to the ranks only through protocol.Engine: a request is checked here field by field (types, ranges,
prompt and answer within the context), turned into token ids, and submitted; its events come back through a
sink and become the client's text. What is supported, refused and different: docs/openai.md.

Wire facts the project's own client reads (engines/mlx.py): prefill progress as SSE comment lines
`: prefill done/total`, usage.prompt_tokens_details.cached_tokens, and a non-standard "arthur" object (token ids,
per-rank prefill, weight loads, speeds) on the last chunk of a stream and on a whole answer.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request as HttpRequest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from ..errors import ArthurError
from .protocol import (SEED_MAX, TOKEN_MAX, TOP_LOGPROBS_MAX, Done, Engine, EngineBusy, EngineDown, Failed, Prefill,
                       Request, Token)

MAX_MESSAGES = 2048
MAX_STOP, MAX_STOP_CHARS = 4, 256
MAX_N = 4
DEFAULT_MAX_TOKENS = 4096  # when a request names none (and the context has room)
BODY_BYTES_PER_TOKEN = 32  # the body cap: this much per token of context (JSON-escaped text), plus a base
BODY_BASE = 1 << 20
DRAIN_MAX = 32 << 20  # an over-cap body is read and dropped up to here, so the client sees the 413
BODY_WAIT = 30.0  # seconds to receive a whole body
IDLE_WAIT = 15.0  # seconds a connection may sit without a request in progress
MAX_CONNECTIONS = 256  # open connections; more are closed at once
LIMIT_CONCURRENCY = MAX_CONNECTIONS + 16  # uvicorn answers 503 past this many connections or tasks (a backstop)
REQUEST_WAIT = 3600.0  # seconds one answer may take in total
POLL = 0.5  # seconds between checks that a waiting client is still there


class ApiError(ArthurError, ValueError):
    """A request the endpoint answers with an HTTP error (status, message, the parameter at fault)."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


# --- requests -----------------------------------------------------------------------------------------------

_STRICT = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class TextPart(BaseModel):
    model_config = _STRICT
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = _STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None
    name: str | None = Field(default=None, max_length=256)

    @field_validator("content")
    @classmethod
    def _content(cls, v, info):
        if v is None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message may have null content")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TemplateFlags(BaseModel):
    """The only chat template arguments a caller may pass: the model's own template runs, never a caller's."""

    model_config = _STRICT
    enable_thinking: bool | None = None


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool | None = None


class _Common(BaseModel):
    model_config = _STRICT
    model: str | None = Field(default=None, max_length=1024)  # absent: the one model served
    max_tokens: int | None = Field(default=None, ge=1, le=TOKEN_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=1024)
    # accepted only at their no-effect values (checked in _refuse)
    frequency_penalty: float | None = Field(default=None, ge=0.0, le=0.0)
    presence_penalty: float | None = Field(default=None, ge=0.0, le=0.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings")
        if any(not s or len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop string has 1 to {MAX_STOP_CHARS} characters")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=TOKEN_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=TOP_LOGPROBS_MAX)
    chat_template_kwargs: TemplateFlags | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: Literal[False] | None = None  # accepted as false only
    best_of: int | None = Field(default=None, ge=1, le=1)


# OpenAI parameters accepted only at the value that means "nothing asked" (the SDKs and some clients send them)
_NO_EFFECT: dict[str, tuple] = {
    "tools": ([],), "functions": ([],), "logit_bias": ({},), "response_format": ({"type": "text"},),
    "store": (False,), "parallel_tool_calls": (), "tool_choice": ("none",), "modalities": (["text"],),
    "suffix": (), "metadata": (), "service_tier": ("auto", "default"),
}


def _refuse(body: dict, model: type[BaseModel]) -> dict:
    """Unknown or unsupported parameters are named in a 400, never silently ignored."""
    out = {}
    for k, v in body.items():
        if k in model.model_fields:
            out[k] = v
        elif k in _NO_EFFECT and (v is None or v in _NO_EFFECT[k]):
            continue
        else:
            raise ApiError(400, f"parameter '{k}' is not supported by this server (see docs/openai.md)", k,
                           "unsupported_parameter")
    return out


def _type_step(x) -> bool:
    """A step of an error's location that names a type of a union, not a field."""
    return isinstance(x, str) and (x in ("str", "int", "float", "bool", "none") or "[" in x)


def parse(body: Any, model: type[BaseModel]):
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    try:
        return model.model_validate(_refuse(body, model))
    except ValidationError as e:
        err = e.errors(include_input=False, include_url=False)[0]
        loc = ".".join(str(x) for x in err["loc"] if not _type_step(x))
        raise ApiError(400, f"{loc or 'body'}: {err['msg']} ({e.error_count()} problem(s) in all)",
                       loc or None) from None


# --- text: detokenizing, thinking, stop strings --------------------------------------------------------------


class Decoder:
    """One choice's tokens to text: content and reasoning (between the model's thinking markers, as mlx_lm.server
    splits them), cut at the first stop string (which is never sent)."""

    def __init__(self, tokenizer, eos: set[int], stops: list[str], reasoning: bool):
        self.detok = tokenizer.detokenizer  # a fresh copy per caller
        self.eos, self.stops = eos, stops
        self.think = (tokenizer.think_start, tokenizer.think_end) if getattr(tokenizer, "has_thinking", False) \
            else None
        self.state = "reasoning" if reasoning and self.think else "normal"
        self.buf = ""
        self.stopped = False
        self.tokens = 0

    def add(self, tid: int) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        self.tokens += 1
        if tid in self.eos:
            return []  # the end token is counted, not shown
        self.detok.add_token(tid)
        return self._scan(self.detok.last_segment, final=False)

    def finish(self) -> list[tuple[str, str]]:
        if self.stopped:
            return []
        self.detok.finalize()
        return self._scan(self.detok.last_segment, final=True)

    def _patterns(self) -> list[tuple[str, str]]:
        pats = [(s, "stop") for s in self.stops]
        if self.think:
            pats.append((self.think[1], "normal") if self.state == "reasoning" else (self.think[0], "reasoning"))
        return pats

    def _scan(self, text: str, final: bool) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while True:
            pats = self._patterns()
            hits = [(self.buf.find(p), p, what) for p, what in pats if p in self.buf]
            if not hits:
                break
            at, p, what = min(hits, key=lambda h: (h[0], -len(h[1])))
            if at:
                out.append((self.state, self.buf[:at]))
            self.buf = self.buf[at + len(p):]
            if what == "stop":
                self.stopped, self.buf = True, ""
                return out
            self.state = what
        keep = 0 if final else max((k for p, _ in pats for k in range(1, len(p)) if self.buf.endswith(p[:k])),
                                   default=0)
        if len(self.buf) > keep:
            out.append((self.state, self.buf[:len(self.buf) - keep]))
            self.buf = self.buf[len(self.buf) - keep:]
        return [(s, t) for s, t in out if t]


# --- the app ------------------------------------------------------------------------------------------------


@dataclass
class Choice:
    index: int
    handle: Any
    queue: asyncio.Queue
    decoder: Decoder
    logprobs: list[dict]
    finish: str | None = None
    sent: int = 0  # logprob entries already streamed
    info: dict | None = None


class Front:
    """What the routes share: the engine, the model's tokenizer (once loaded) and the context length."""

    def __init__(self, engine: Engine, model_id: str, token: str):
        self.engine, self.model_id, self.token = engine, model_id, token
        self.tokenizer = None
        self.context: int | None = None
        self.eos: set[int] = set()
        self.lock = threading.Lock()  # one tokenizer, many requests
        self.created = int(time.time())
        self.server = None

    def ready(self, tokenizer, context: int | None) -> None:
        self.eos = set(tokenizer.eos_token_ids or [])
        self.context = context
        self.tokenizer = tokenizer

    @property
    def max_body(self) -> int:
        return BODY_BASE + BODY_BYTES_PER_TOKEN * (self.context or 262144)

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True

    # --- prompts

    def _encode_chat(self, req: ChatRequest) -> tuple[list[int], bool]:
        tok = self.tokenizer
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(),
                 **({"name": m.name} if m.name else {})} for m in req.messages]
        flags = req.chat_template_kwargs
        kw = {} if flags is None or flags.enable_thinking is None else {"enable_thinking": flags.enable_thinking}
        with self.lock:
            try:
                ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kw)
            except Exception as e:  # noqa: BLE001 - the model's template refused these messages (it may raise)
                raise ApiError(400, f"messages: the model's chat template refused them ({type(e).__name__}: "
                                    f"{str(e)[:200]})", "messages") from None
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        ids = [int(t) for t in ids]
        thinking = bool(getattr(tok, "has_thinking", False)) and \
            tok.rfind_think_start(ids) > tok.rfind_think_end(ids)
        return ids, thinking

    def _encode_text(self, req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, list) and len(req.prompt) != 1:
            raise ApiError(400, "prompt: one prompt per request (a list of one string at most)", "prompt")
        text = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        with self.lock:
            return [int(t) for t in self.tokenizer.encode(text)]

    def _budget(self, prompt: list[int], asked: int | None, name: str, source: str = "messages") -> int:
        ctx = self.context
        if not prompt:
            raise ApiError(400, "the prompt is empty", source)
        if ctx is None:
            return asked or DEFAULT_MAX_TOKENS
        if len(prompt) >= ctx:
            raise ApiError(400, f"the prompt is {len(prompt)} tokens; the model's context is {ctx} tokens, which "
                                "must also hold at least one answer token", source)
        room = ctx - len(prompt)
        if asked is not None and asked > room:
            raise ApiError(400, f"{name} is {asked} but only {room} tokens are left in the {ctx}-token context "
                                f"after the {len(prompt)}-token prompt", name)
        return asked or min(room, DEFAULT_MAX_TOKENS)

    # --- running

    def _submit(self, prompt: list[int], req, max_tokens: int, reasoning: bool) -> list[Choice]:
        loop = asyncio.get_running_loop()
        n = req.n or 1
        logprobs = bool(getattr(req, "logprobs", None))
        top = getattr(req, "top_logprobs", None) or 0
        if top and not logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs set to true", "top_logprobs")
        flags = getattr(req, "chat_template_kwargs", None)  # in the prefix cache's key, as on every rank
        thinking = flags.enable_thinking if flags is not None else None
        choices: list[Choice] = []
        try:
            for i in range(n):
                seed = (req.seed + i) % (SEED_MAX + 1) if req.seed is not None else secrets.randbelow(SEED_MAX + 1)
                r = Request(prompt=prompt, max_tokens=max_tokens, temperature=float(
                    1.0 if req.temperature is None else req.temperature), top_p=float(
                    1.0 if req.top_p is None else req.top_p), seed=seed, logprobs=logprobs, top_logprobs=top,
                    enable_thinking=thinking)
                q: asyncio.Queue = asyncio.Queue()
                h = self.engine.submit(r, _sink(loop, q))
                choices.append(Choice(i, h, q, Decoder(self.tokenizer, self.eos, req.stops(), reasoning), []))
        except (EngineBusy, EngineDown) as e:
            for c in choices:
                self.engine.cancel(c.handle)
            if isinstance(e, EngineBusy):
                raise ApiError(429, str(e), None, "rate_limit_exceeded") from None
            raise ApiError(503, str(e), None, "unavailable") from None
        return choices

    def cancel(self, choices: list[Choice]) -> None:
        for c in choices:
            if c.finish is None:
                self.engine.cancel(c.handle)

    def _token(self, c: Choice, ev: Token) -> list[tuple[str, str]]:
        if c.decoder.stopped:
            return []  # tokens the ranks made before they saw the stop
        parts = c.decoder.add(ev.id)
        if ev.logprob is not None:
            c.logprobs.append(self._logprob_entry(ev.id, ev.logprob, ev.top))
        if c.decoder.stopped:
            c.finish = "stop"
            self.engine.cancel(c.handle)  # the ranks stop at their next agreed check
        return parts

    def _logprob_entry(self, tid: int, lp: float, top) -> dict:
        def one(i: int, v: float) -> dict:
            s = self.tokenizer.decode([i])
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return {**one(tid, lp), "top_logprobs": [one(i, v) for i, v in top]}

    async def events(self, c: Choice, http: HttpRequest, deadline: float) -> AsyncIterator[Any]:
        """The choice's events until it is done; a client that leaves cancels it (raises ClientLeft)."""
        check = time.monotonic() + POLL
        while True:
            try:
                ev = await asyncio.wait_for(c.queue.get(), POLL)
            except asyncio.TimeoutError:
                ev = None
            now = time.monotonic()
            if now >= check:  # also while tokens flow: a client that left must not wait for the whole answer
                check = now + POLL
                if await http.is_disconnected():
                    raise ClientLeft()
                if now > deadline:
                    raise ApiError(504, f"no complete answer within {REQUEST_WAIT:.0f} s", None, "timeout")
            if ev is None:
                continue
            yield ev
            if isinstance(ev, (Done, Failed)):
                return


class ClientLeft(ArthurError, ConnectionError):
    """The client closed its connection before its answer was complete."""


def _sink(loop: asyncio.AbstractEventLoop, q: asyncio.Queue):
    """Events from the engine's thread into this request's queue; once the HTTP side is gone they are dropped
    (an error here would reach rank 0's main loop)."""

    def put(ev) -> None:
        try:
            loop.call_soon_threadsafe(q.put_nowait, ev)
        except RuntimeError:
            pass

    return put


def _usage(prompt_tokens: int, choices: list[Choice]) -> dict:
    done = sum(c.decoder.tokens for c in choices)
    cached = max((c.info or {}).get("cached_tokens", 0) for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": done, "total_tokens": prompt_tokens + done,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _finish(c: Choice, ev: Done | Failed) -> None:
    if isinstance(ev, Failed):
        raise ApiError(503, ev.message, None, "unavailable")
    c.info = ev.info
    if c.finish is None:
        c.finish = "length" if ev.finish_reason == "cancelled" else ev.finish_reason


def _arthur(c: Choice) -> dict:
    return {k: v for k, v in (c.info or {}).items() if k != "finish_reason"}


def _error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.kind, "param": e.param, "code": e.status}}


def _error(e: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if e.status in (429, 503) else None
    return JSONResponse(_error_body(e), status_code=e.status, headers=headers)


async def _read_json(http: HttpRequest, cap: int) -> Any:
    declared = http.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or len(declared) > 12):
        raise ApiError(400, "Content-Length is not a number", "Content-Length")
    chunks, size = [], 0
    too_big = declared is not None and int(declared) > cap

    async def read() -> None:
        nonlocal size
        async for chunk in http.stream():
            size += len(chunk)
            if size > DRAIN_MAX:
                break
            if size <= cap and not too_big:
                chunks.append(chunk)

    try:
        await asyncio.wait_for(read(), BODY_WAIT)
    except asyncio.TimeoutError:
        raise ApiError(408, f"the body did not arrive within {BODY_WAIT:.0f} s") from None
    if too_big or size > cap:
        raise ApiError(413, f"the body is {max(size, int(declared or 0))} bytes; this server takes at most {cap} "
                            "bytes (a bound from the model's context)", None, "request_too_large")
    try:
        return json.loads(b"".join(chunks) or b"null")
    except (ValueError, RecursionError) as e:
        raise ApiError(400, f"the body is not valid JSON ({type(e).__name__}: {str(e)[:120]})") from None


def make_app(front: Front) -> FastAPI:
    app = FastAPI(title="arthur-cluster", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["GET", "POST", "OPTIONS"],
                       allow_headers=["*"])

    @app.exception_handler(ApiError)
    async def _api_error(_http, e: ApiError):
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_http, e: StarletteHTTPException):
        return _error(ApiError(e.status_code, str(e.detail), None, "not_found" if e.status_code == 404 else
                               "invalid_request_error"))

    @app.exception_handler(Exception)
    async def _any_error(_http, e: Exception):
        return _error(ApiError(500, f"internal error: {type(e).__name__}", None, "server_error"))

    @app.get("/health")
    async def health():
        st = front.engine.status()
        body = {"status": st.status, "model": front.model_id, **st.info}
        if st.reason:
            body["reason"] = st.reason
        return JSONResponse(body, status_code=200 if st.status in ("ok", "busy") else 503)

    def model_card() -> dict:
        return {"id": front.model_id, "object": "model", "created": front.created, "owned_by": "arthur-cluster"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != front.model_id:
            raise ApiError(404, f"no model {model_id[:200]!r} here; this server runs {front.model_id!r}", "model",
                           "model_not_found")
        return model_card()

    @app.post("/admin/shutdown")
    async def shutdown(http: HttpRequest):
        given = http.headers.get("authorization", "").encode()
        if not front.token or not hmac.compare_digest(given, f"Bearer {front.token}".encode()):
            raise ApiError(403, "wrong or missing token", None, "forbidden")
        front.engine.shutdown()
        return {"status": "stopping"}

    async def prepare(http: HttpRequest, kind: type[BaseModel]):
        body = await _read_json(http, front.max_body)
        if front.tokenizer is None:
            raise ApiError(503, front.engine.status().reason or "the ranks are still loading", None, "unavailable")
        req = parse(body, kind)
        if req.model is not None and req.model != front.model_id:
            raise ApiError(404, f"model {req.model[:200]!r} is not served here; this server runs {front.model_id!r}",
                           "model", "model_not_found")
        return req

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        req: ChatRequest = await prepare(http, ChatRequest)
        prompt, reasoning = await asyncio.to_thread(front._encode_chat, req)
        if req.max_tokens is not None and req.max_completion_tokens is not None:
            raise ApiError(400, "max_tokens and max_completion_tokens: give one", "max_completion_tokens")
        name = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        budget = front._budget(prompt, req.max_completion_tokens or req.max_tokens, name)
        choices = front._submit(prompt, req, budget, reasoning)
        return await _answer(front, http, req, prompt, choices, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        req: CompletionRequest = await prepare(http, CompletionRequest)
        prompt = await asyncio.to_thread(front._encode_text, req)
        budget = front._budget(prompt, req.max_tokens, "max_tokens", "prompt")
        choices = front._submit(prompt, req, budget, False)
        return await _answer(front, http, req, prompt, choices, chat=False)

    async def options():  # a plain OPTIONS (a CORS preflight is answered by the middleware)
        return Response(status_code=204, headers={"Allow": "GET, POST, OPTIONS"})

    for path in ("/health", "/v1/models", "/v1/models/{model_id:path}", "/v1/chat/completions", "/v1/completions"):
        app.add_api_route(path, options, methods=["OPTIONS"])
    return app


# --- answers ------------------------------------------------------------------------------------------------


def _piece(parts: list[tuple[str, str]], chat: bool) -> dict:
    content = "".join(t for s, t in parts if s == "normal")
    reasoning = "".join(t for s, t in parts if s == "reasoning")
    if not chat:
        return {"text": content + reasoning}
    out: dict[str, Any] = {}
    if content:
        out["content"] = content
    if reasoning:
        out["reasoning"] = out["reasoning_content"] = reasoning
    return out


async def _answer(front: Front, http: HttpRequest, req, prompt: list[int], choices: list[Choice], chat: bool):
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    deadline = time.monotonic() + REQUEST_WAIT
    if req.stream:
        return StreamingResponse(_stream(front, http, req, prompt, choices, chat, rid, deadline),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        texts = []
        for c in choices:
            parts: list[tuple[str, str]] = []
            async for ev in front.events(c, http, deadline):
                if isinstance(ev, Token):
                    parts += front._token(c, ev)
                elif isinstance(ev, (Done, Failed)):
                    _finish(c, ev)
                    parts += c.decoder.finish()
            texts.append(_piece(parts, chat))
    except ClientLeft:
        front.cancel(choices)
        return Response(status_code=499)
    except BaseException:
        front.cancel(choices)
        raise
    out = []
    for c, piece in zip(choices, texts):
        lp = {"content": c.logprobs} if c.logprobs else None
        if chat:
            msg = {"role": "assistant", "content": piece.get("content", ""), **{k: v for k, v in piece.items()
                                                                                   if k != "content"}}
            out.append({"index": c.index, "message": msg, "finish_reason": c.finish, "logprobs": lp})
        else:
            out.append({"index": c.index, "text": piece["text"], "finish_reason": c.finish, "logprobs": None})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": front.model_id, "choices": out, "usage": _usage(len(prompt), choices),
            "arthur": _arthur(choices[-1])}


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


async def _stream(front: Front, http: HttpRequest, req, prompt, choices: list[Choice], chat: bool, rid: str,
                  deadline: float):
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"
    usage_chunk = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(c: Choice, delta: dict, finish: str | None = None, logprobs: list | None = None, **extra) -> bytes:
        choice = {"index": c.index, "finish_reason": finish}
        if chat:
            choice.update(delta=delta, logprobs={"content": logprobs} if logprobs else None)
        else:
            choice.update(text=delta.get("text", ""), logprobs=None)
        return _sse({"id": rid, "object": obj, "created": created, "model": front.model_id, "choices": [choice],
                     **extra})

    finished = False
    try:
        for c in choices:
            if chat:
                yield chunk(c, {"role": "assistant", "content": ""})
            async for ev in front.events(c, http, deadline):
                if isinstance(ev, Prefill):
                    yield f": prefill {ev.done}/{ev.total}\n\n".encode()
                    continue
                if isinstance(ev, Token):
                    parts = front._token(c, ev)
                else:
                    _finish(c, ev)
                    parts = c.decoder.finish()
                if parts or len(c.logprobs) > c.sent:
                    yield chunk(c, _piece(parts, chat), logprobs=c.logprobs[c.sent:])
                    c.sent = len(c.logprobs)
            last = c is choices[-1]
            extra = {"arthur": _arthur(c)} if last and not usage_chunk else {}
            yield chunk(c, {}, c.finish, **extra)
        if usage_chunk:
            yield _sse({"id": rid, "object": obj, "created": created, "model": front.model_id, "choices": [],
                        "usage": _usage(len(prompt), choices), "arthur": _arthur(choices[-1])})
        yield b"data: [DONE]\n\n"
        finished = True
    except ApiError as e:
        yield _sse(_error_body(e))
        yield b"data: [DONE]\n\n"
    except ClientLeft:
        pass
    finally:
        if not finished:
            front.cancel(choices)


# --- uvicorn in a thread ------------------------------------------------------------------------------------


class _Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 with two bounds it lacks: a connection that sits without a request in progress for
    IDLE_WAIT seconds (a fresh one, one sending its headers slowly, an idle keep-alive) is closed, and past
    MAX_CONNECTIONS open connections new ones are closed at once."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > MAX_CONNECTIONS:
            idle = next((c for c in self.connections if c is not self and c._is_idle()
                         and not c.transport.is_closing()), None)
            (idle or self).transport.close()  # an idle one makes room; with none idle, the new one goes
        self._arm()

    def _is_idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        self._idle = self.loop.call_later(IDLE_WAIT, self._check, self.cycle)

    def _check(self, seen) -> None:
        if self.transport.is_closing():
            return
        if self.cycle is seen and self._is_idle():
            self.transport.close()
            return
        self._arm()

    def connection_lost(self, exc) -> None:
        idle = getattr(self, "_idle", None)
        if idle is not None:
            idle.cancel()
        super().connection_lost(exc)


def serve_http(front: Front, host: str, port: int, wait: float = 30.0) -> Front:
    """Start the app on (host, port) in a daemon thread; raises ApiError if it does not listen within `wait`."""
    import uvicorn

    config = uvicorn.Config(make_app(front), host=host, port=port, http=_Protocol, lifespan="off",
                            log_level="warning", access_log=False, limit_concurrency=LIMIT_CONCURRENCY,
                            timeout_keep_alive=int(IDLE_WAIT), backlog=MAX_CONNECTIONS)
    server = uvicorn.Server(config)
    front.server = server
    t = threading.Thread(target=server.run, name="http", daemon=True)
    t.start()
    end = time.monotonic() + wait
    while not server.started:
        if not t.is_alive() or time.monotonic() > end:
            raise ApiError(500, f"the HTTP server did not start on {host}:{port}")
        time.sleep(0.05)
    return front


__all__ = ["Front", "make_app", "serve_http", "ChatRequest", "CompletionRequest", "Decoder", "ApiError"]
