"""`llmctl serve`: an OpenAI-compatible HTTP API over any stage's model.

``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``
(the model's chat template), with ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``,
``stop``, ``n``, ``seed`` and ``stream`` (server-sent events). One worker thread owns the model
and takes requests from an unbounded queue in arrival order: concurrent requests wait, none is
dropped. Bad requests are HTTP 400 with OpenAI's JSON error body. Listens on 127.0.0.1 unless
told otherwise; with ``LLMCTL_API_KEY`` set in the environment every /v1 request needs
``Authorization: Bearer <key>`` (compared in constant time; the key is never logged).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import os
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from llmctl.errors import UserError
from llmctl.schema import GenerateConfig

API_KEY_ENV = "LLMCTL_API_KEY"
MAX_CHOICES = 16


# -- requests --------------------------------------------------------------------------------


class Sampling(BaseModel):
    """The decoding fields both endpoints share, with OpenAI's defaults and ranges."""

    # Clients send fields llmctl does not use (user, stream_options, ...): ignored, not refused;
    # the ones that would change the answer are refused in `unsupported`.
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False

    def stops(self) -> list[str]:
        found = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(found) > 4 or any(not s for s in found):
            raise BadRequest("stop: at most 4 non-empty strings", "stop")
        return found

    def unsupported(self) -> None:
        extra = self.model_extra or {}
        for name, neutral in (("logprobs", None), ("top_logprobs", None), ("echo", False),
                              ("suffix", None), ("best_of", 1), ("logit_bias", None),
                              ("presence_penalty", 0), ("frequency_penalty", 0), ("tools", None),
                              ("response_format", None)):
            if extra.get(name, neutral) not in (neutral, None, {}):
                raise BadRequest(f"{name}: not supported by llmctl serve", name)


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[dict[str, Any]]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:  # the content-parts form: only text parts are meaningful here
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest("messages: only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind


# -- the model worker ------------------------------------------------------------------------


@dataclass
class Job:
    """One prompt of a request: its n choices are decoded one after another."""

    input_ids: torch.Tensor
    max_tokens: int
    sampling: Sampling
    stops: list[str]
    on_text: Optional[Callable[[int, str], None]] = None  # streaming: (choice, new text)
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    tokens: int


class Engine:
    """The model, its tokenizer and the one thread that runs them."""

    def __init__(self, model, tokenizer, name: str):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        from llmctl.models import max_positions

        self.positions = max_positions(model)
        self.jobs: queue.Queue[Job] = queue.Queue()  # unbounded: a busy server queues, never drops
        self.in_flight = 0  # requests being answered (event-loop side)
        threading.Thread(target=self._work, name="llmctl-serve-model", daemon=True).start()

    def encode(self, text: str, chat: bool) -> torch.Tensor:
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's.
        return self.tokenizer(text, add_special_tokens=not chat, return_tensors="pt",
                              return_token_type_ids=False)["input_ids"]

    def budget(self, prompt_tokens: int, asked: int | None, default: int) -> int:
        """New tokens for a prompt: what was asked (or the default), capped by the context."""
        wanted = asked or default
        if self.positions is None:
            return wanted
        room = self.positions - prompt_tokens
        if room < 1:
            raise BadRequest(f"the prompt is {prompt_tokens} tokens; the model has "
                             f"{self.positions} positions", "prompt")
        return min(wanted, room)

    def render_chat(self, messages: list[ChatMessage]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest(f"model {self.name!r} has no chat template: use /v1/completions",
                             "messages")
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.text()} for m in messages], tokenize=False,
            add_generation_prompt=True)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                job.done.cancel()
                continue
            try:
                job.done.set_result([self._choice(job, i) for i in range(job.sampling.n)])
            except Exception as err:  # reported to the request that caused it
                job.done.set_exception(err)

    @torch.inference_mode()
    def _choice(self, job: Job, index: int) -> Choice:
        from transformers import GenerationConfig, StoppingCriteria

        from llmctl.evaluation import model_device
        from llmctl.stages.generate import cut_at_stop, generated_length

        s = job.sampling
        if s.seed is not None:
            torch.manual_seed(s.seed + index)  # one worker thread: the seed alone decides
        sample = s.temperature > 0
        config = GenerationConfig(
            max_new_tokens=job.max_tokens, do_sample=sample,
            temperature=s.temperature if sample else None, top_p=s.top_p if sample else None,
            top_k=0 if sample else None, stop_strings=job.stops or None,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)

        class Cancelled(StoppingCriteria):  # a streaming client that left stops the decode
            def __call__(self, input_ids, scores, **kwargs):
                return torch.full((input_ids.shape[0],), job.cancelled.is_set(), dtype=torch.bool)

        streamer = StopAwareStreamer(self.tokenizer, job.stops,
                                     lambda text: job.on_text(index, text)) if job.on_text else None
        ids = job.input_ids.to(model_device(self.model))
        out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  generation_config=config, tokenizer=self.tokenizer,
                                  streamer=streamer, stopping_criteria=[Cancelled()])
        new = out[0, ids.shape[1]:]
        tokens = generated_length(new, self.tokenizer.eos_token_id)
        full = self.tokenizer.decode(new[:tokens], skip_special_tokens=True)
        text = cut_at_stop(full, job.stops)
        hit_eos = tokens and int(new[tokens - 1]) == self.tokenizer.eos_token_id
        return Choice(text, "stop" if text != full or hit_eos else "length", int(tokens))


class StopAwareStreamer:
    """transformers' streamer protocol (put/end): passes on decoded text as it grows, holding
    back a tail that could be the start of a stop string and nothing after a stop string, so
    the streamed pieces add up to the non-streamed answer."""

    def __init__(self, tokenizer, stops: list[str], emit: Callable[[str], None]):
        self.tokenizer, self.stops, self.emit = tokenizer, stops, emit
        self.ids: list[int] = []
        self.sent = 0
        self.prompt_seen = False
        self.stopped = False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.flatten())
        self._flush(final=False)

    def end(self) -> None:
        self._flush(final=True)

    def _flush(self, final: bool) -> None:
        if self.stopped:
            return
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cut = min((text.index(s) for s in self.stops if s in text), default=None)
        if cut is not None:
            ready, self.stopped = text[:cut], True
        elif final:
            ready = text
        else:
            ready = text[:max(len(text) - self.hold, 0)]
            if ready.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
                ready = ready[:-1]
        if len(ready) > self.sent:
            self.emit(ready[self.sent:])
            self.sent = len(ready)


# -- the HTTP app ----------------------------------------------------------------------------


def create_app(engine: Engine, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llmctl serve", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str, kind: str = "invalid_request_error",
              param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                       "code": None}}, status_code=status)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, err: BadRequest):
        return error(err.status, err.message, err.kind, err.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        # Malformed JSON and wrong fields alike: 400 naming the field, as OpenAI answers.
        first = err.errors()[0]
        if first["type"] == "json_invalid":
            return error(400, f"the body is not valid JSON ({first['ctx'].get('error', '')})")
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return error(400, f"{where}: {first['msg']}", param=where)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, err: HTTPException):
        return error(err.status_code, str(err.detail), "not_found_error"
                     if err.status_code == 404 else "invalid_request_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            expected = f"Bearer {api_key}"
            if not hmac.compare_digest(given.encode(), expected.encode()):
                return error(401, "missing or wrong API key (Authorization: Bearer ...)",
                             "authentication_error")
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.name, "in_flight": engine.in_flight}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model",
                                            "created": 0, "owned_by": "llmctl"}]}

    @app.middleware("http")
    async def _count(request: Request, call_next):
        if not request.url.path.startswith("/v1/") or request.method != "POST":
            return await call_next(request)
        engine.in_flight += 1
        try:
            return await call_next(request)
        finally:  # (a streamed answer is counted until its headers are out: enough for health)
            engine.in_flight -= 1

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise BadRequest("prompt: empty list", "prompt")
        return await answer(body, [engine.encode(p, chat=False) for p in prompts], chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest):
        return await answer(body, [engine.encode(engine.render_chat(body.messages), chat=True)],
                            chat=True)

    async def answer(body: Sampling, prompts: list[torch.Tensor], chat: bool):
        body.unsupported()
        if body.model not in (None, engine.name):
            raise BadRequest(f"model {body.model!r} is not served here (this server: "
                             f"{engine.name!r})", "model", 404, "not_found_error")
        stops = body.stops()
        default = 16 if not chat else (engine.positions or 4096)  # OpenAI's defaults
        budgets = [engine.budget(ids.shape[1], body.max_tokens, default) for ids in prompts]
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        jobs = []
        for p, (ids, budget) in enumerate(zip(prompts, budgets)):
            on_text = None
            if body.stream:
                def on_text(choice: int, text: str, p: int = p) -> None:
                    loop.call_soon_threadsafe(pieces.put_nowait, (p * body.n + choice, text))
            jobs.append(Job(ids, budget, body, stops, on_text))
        for job in jobs:
            engine.jobs.put(job)

        if not body.stream:
            results = [await asyncio.wrap_future(job.done) for job in jobs]
            choices = [c for result in results for c in result]
            usage = usage_of(prompts, choices)
            if chat:
                return {"id": rid, "object": "chat.completion", "created": created,
                        "model": engine.name, "usage": usage, "choices": [
                            {"index": i, "message": {"role": "assistant", "content": c.text},
                             "finish_reason": c.finish_reason, "logprobs": None}
                            for i, c in enumerate(choices)]}
            return {"id": rid, "object": "text_completion", "created": created,
                    "model": engine.name, "usage": usage, "choices": [
                        {"index": i, "text": c.text, "finish_reason": c.finish_reason,
                         "logprobs": None} for i, c in enumerate(choices)]}

        def chunk(index: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else \
                    ({"content": text} if text is not None else {})
                choice = {"index": index, "delta": delta, "finish_reason": finish}
                kind = "chat.completion.chunk"
            else:
                choice = {"index": index, "text": text or "", "finish_reason": finish,
                          "logprobs": None}
                kind = "text_completion"
            data = {"id": rid, "object": kind, "created": created, "model": engine.name,
                    "choices": [choice]}
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            try:
                if chat:
                    for i in range(len(prompts) * body.n):
                        yield chunk(i, None, None, first=True)
                for p, job in enumerate(jobs):
                    done = asyncio.wrap_future(job.done)
                    while not done.done() or not pieces.empty():
                        getter = asyncio.ensure_future(pieces.get())
                        await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
                        if getter.done():
                            index, text = getter.result()
                            yield chunk(index, text, None)
                        else:
                            getter.cancel()
                    try:
                        result = done.result()
                    except Exception as err:  # the model failed mid-stream: say so in-band
                        yield f"data: {json.dumps({'error': {'message': str(err)}})}\n\n"
                        return
                    for c, choice in enumerate(result):
                        yield chunk(p * body.n + c, None, choice.finish_reason)
                yield "data: [DONE]\n\n"
            finally:  # the client left (or the stream ended): drop what is still queued
                for job in jobs:
                    job.cancelled.set()

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def usage_of(prompts: list[torch.Tensor], choices: list[Choice]) -> dict[str, int]:
    prompt_tokens = sum(int(ids.shape[1]) for ids in prompts)
    completion_tokens = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# -- the command -----------------------------------------------------------------------------


def resolve_model(recipe, model: str | None) -> tuple[str, str]:
    """(path, served name) for ``--model``: a stage name of the run, a path or hub id, or by
    default what `llmctl generate` would use."""
    from pathlib import Path

    from llmctl.stages import STAGES

    if model:
        return recipe.named_model(model), model if model in STAGES else Path(model).name or model
    path = STAGES["generate"].inputs(recipe, recipe.generate or GenerateConfig())["model"]
    parts = Path(path).parts
    return path, parts[-2] if len(parts) > 1 and parts[-1] in ("model", "adapter") else parts[-1]


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, opened before the model loads so a taken port is a quick exit 2."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen ({err.strerror})") from None
    sock.listen(128)
    return sock


def serve(recipe, model: str | None, host: str, port: int) -> None:
    import uvicorn

    from llmctl.models import check_loadable, device, load_causal_lm, load_tokenizer

    path, name = resolve_model(recipe, model)
    check_loadable(path, recipe.model, "--model")
    sock = bind(host, port)
    api_key = os.environ.get(API_KEY_ENV) or None
    tokenizer = load_tokenizer(path, recipe.model, padding_side="left")
    engine = Engine(load_causal_lm(path, recipe.model).to(device()).eval(), tokenizer, name)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"serving {name} ({path}) at http://{shown}:{bound_port}/v1"
          f"{'' if api_key else ' (no API key: set ' + API_KEY_ENV + ' to require one)'}",
          flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {host} without {API_KEY_ENV}: anyone who can reach this "
              f"port can use the model", flush=True)
    # uvicorn handles SIGINT/SIGTERM: it stops accepting, lets in-flight requests finish, exits.
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key), log_level="info",
                                           access_log=True))
    server.run(sockets=[sock])
