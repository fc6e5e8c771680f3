"""`llmctl serve`: an OpenAI-compatible HTTP API over any stage's model.

``GET /health``, ``GET /v1/models``, ``POST /v1/completions`` and ``POST /v1/chat/completions``
(the model's chat template), with ``max_tokens``, ``temperature`` (0 = greedy), ``top_p``,
``stop``, ``n``, ``seed`` and ``stream`` (server-sent events). One worker thread owns the model;
requests that are waiting decode together: an OpenVINO model through openvino-genai's
continuous batching, any other through transformers' ``generate`` on a batch of the requests
that decode alike; a GGUF quantize output runs through llama.cpp, one request at a
time. The server holds a bounded number of requests (decoding or waiting): past
it a new one is 429 with ``Retry-After``; a client that hangs up frees its place at once; the
first SIGTERM drains (new requests 503, held ones finish, then exit 0). Bad requests are 4xx
with OpenAI's JSON error body. Listens on 127.0.0.1 unless told otherwise; with
``LLMCTL_API_KEY`` (or ``LLMCTL_API_KEY_FILE``, a file holding it) every /v1 request needs
``Authorization: Bearer <key>`` (compared in constant time; the key is never logged).
"""

import asyncio
import collections
import concurrent.futures
import functools
import hmac
import itertools
import json
import os
import queue
import random
import socket
import sys
import threading
import time
import types
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field

from llmctl.errors import UserError
from llmctl.schema import GenerateConfig
from llmctl.stages.generate import cut_at_stop, generated_length

API_KEY_ENV = "LLMCTL_API_KEY"
API_KEY_FILE_ENV = "LLMCTL_API_KEY_FILE"
MAX_CHOICES = 16  # completions one request asks for (prompts x n)
MAX_STOP_CHARS = 64  # transformers' stop-string matcher costs time in their length x the vocabulary
MAX_QUEUE = 64  # requests that wait for the model beyond --max-batch decoding ones
MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_SECONDS = 1  # what a refused client is told (busy moments pass in a batch or two)
# After a batch of several requests, how long dynamic batching waits for their clients' next
# requests before it decodes what is waiting (a batch takes seconds; this, milliseconds).
GATHER_SECONDS = 0.02


# -- requests --------------------------------------------------------------------------------


class Sampling(BaseModel):
    """The decoding fields both endpoints share, with OpenAI's defaults and ranges."""

    # Clients send fields llmctl does not use (user, stream_options, ...): ignored, not refused;
    # the ones that would change the answer are refused in `unsupported`.
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=0, lt=1 << 64)  # torch's and openvino's seed range
    stream: bool = False

    def stops(self) -> list[str]:
        found = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(found) > 4 or any(not 0 < len(s) <= MAX_STOP_CHARS for s in found):
            raise BadRequest(f"stop: at most 4 strings of 1 to {MAX_STOP_CHARS} characters",
                             "stop")
        for text in found:
            check_unicode(text, "stop")
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
    """A request the server answers with an error (4xx, or 503 while draining) in OpenAI's
    JSON shape."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error", code: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind
        self.code, self.retry_after = code, retry_after


def check_unicode(text: str, param: str) -> None:
    """JSON can carry half of a surrogate pair (\\ud800), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{param}: not valid Unicode (a lone surrogate)", param) from None


# -- the engines -----------------------------------------------------------------------------


@dataclass
class Job:
    """One prompt of a request and its n choices."""

    input_ids: torch.Tensor  # 1 x prompt length
    max_tokens: int
    sampling: Sampling
    stops: list[str]
    on_text: Optional[Callable[[int, str], None]] = None  # streaming: (choice, new text)
    done: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def prompt_tokens(self) -> int:
        return int(self.input_ids.shape[1])


@dataclass
class Choice:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    tokens: int


class Engine:
    """The model's tokenizer, its context, the request queue and the one thread that decodes.
    Jobs wait in ``jobs`` (handed over) and ``waiting`` (the worker's) until they decode; how
    many requests may wait is the HTTP side's business (:class:`Admission`). Subclasses decode
    in ``_work`` and batch whatever is waiting (``batches``, ``largest_batch``: how)."""

    kind = "?"

    def __init__(self, tokenizer, name: str, positions: int | None, max_batch: int):
        self.tokenizer, self.name, self.positions = tokenizer, name, positions
        self.max_batch = max_batch  # sequences decoded together at most
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.waiting: collections.deque[Job] = collections.deque()  # the worker thread's
        self.batches = self.largest_batch = 0
        # No token decodes to more characters than its vocabulary entry has (byte-level BPE,
        # SentencePiece, WordPiece), so a prompt longer than this cannot fit the context: it is
        # refused before the tokenizer spends seconds on a megabyte of text.
        self.max_prompt_chars = None if positions is None else \
            positions * max(map(len, tokenizer.get_vocab()), default=1)
        threading.Thread(target=self._work, name="llmctl-serve-model", daemon=True).start()

    @property
    def queued(self) -> int:
        """Jobs waiting for the model (not yet decoding)."""
        return self.jobs.qsize() + len(self.waiting)

    def encode(self, text: str, chat: bool, param: str) -> torch.Tensor:
        check_unicode(text, param)
        if self.max_prompt_chars is not None and len(text) > self.max_prompt_chars:
            raise BadRequest(f"{param}: {len(text)} characters cannot fit the model's "
                             f"{self.positions} positions", param)
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's.
        return self.tokenizer(text, add_special_tokens=not chat, return_tensors="pt",
                              return_token_type_ids=False)["input_ids"]

    def budget(self, prompt_tokens: int, asked: int | None, default: int, param: str) -> int:
        """New tokens for a prompt: what was asked, which must fit the context after the
        prompt, or the default, capped by the context."""
        if self.positions is None:
            return asked or default
        room = self.positions - prompt_tokens
        if room < 1:
            raise BadRequest(f"{param}: {prompt_tokens} tokens; the model has "
                             f"{self.positions} positions", param)
        if asked is not None and asked > room:
            raise BadRequest(f"max_tokens: {asked} new tokens after a prompt of {prompt_tokens} "
                             f"exceed the model's {self.positions} positions (at most {room})",
                             "max_tokens")
        return min(asked or default, room)

    def render_chat(self, messages: list[ChatMessage]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise BadRequest(f"model {self.name!r} has no chat template: use /v1/completions",
                             "messages")
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.text()} for m in messages], tokenize=False,
            add_generation_prompt=True)

    def choice(self, ids: list[int], stops: list[str], stopped: bool) -> Choice:
        """A finished sequence's choice: new token ids (through eos, if any) to text cut at the
        first stop string. ``stopped``: the decoder ended it early (eos, a stop string)."""
        eos = self.tokenizer.eos_token_id
        full = self.tokenizer.decode(ids, skip_special_tokens=True)
        text = cut_at_stop(full, stops)
        hit_eos = bool(ids) and ids[-1] == eos
        return Choice(text, "stop" if text != full or hit_eos or stopped else "length", len(ids))

    def _drop_cancelled(self) -> None:
        """Forget the waiting jobs whose clients have left."""
        for job in [job for job in self.waiting if job.cancelled.is_set()]:
            self.waiting.remove(job)
            job.done.cancel()

    def _arrivals(self, wait: bool) -> list[Job]:
        """Every job queued now; when ``wait``, at least one (blocking until it comes)."""
        arrived = [self.jobs.get()] if wait else []
        while True:
            try:
                arrived.append(self.jobs.get_nowait())
            except queue.Empty:
                return arrived

    def _counted(self, size: int) -> None:
        self.batches += 1
        self.largest_batch = max(self.largest_batch, size)

    def _work(self) -> None:
        raise NotImplementedError


class TransformersEngine(Engine):
    """A transformers (or optimum-intel, or peft) model. Dynamic batching: requests that arrive
    while a batch decodes wait, then those that decode alike (the same sampling settings and
    stop strings, no seed) go together as one left-padded ``generate``, each row stopping at
    its own length. A request with a seed decodes alone, so its seed alone decides its draw."""

    kind = "transformers, dynamic batching"

    def __init__(self, model, tokenizer, name: str, max_batch: int):
        from llmctl.models import max_positions

        self.model = model
        super().__init__(tokenizer, name, max_positions(model), max_batch)

    def _work(self) -> None:
        answered = 0  # jobs the last batch answered
        while True:
            if not self.waiting:
                self.waiting.append(self.jobs.get())
            if answered > 1:  # under load: the clients just answered are about to ask again
                time.sleep(GATHER_SECONDS)
            self.waiting.extend(self._arrivals(wait=False))  # all may join the next batch
            self._drop_cancelled()
            batch = self._take_batch()
            if not batch:  # every waiting request was cancelled (its client left)
                continue
            try:
                results = self._decode(batch)
            except Exception as err:  # reported to the requests that were in the batch
                for job in batch:
                    job.done.set_exception(err)
            else:
                answered = len(batch)
                for job, result in zip(batch, results):
                    if job.cancelled.is_set():
                        job.done.cancel()
                    else:
                        job.done.set_result(result)

    def _take_batch(self) -> list[Job]:
        """The oldest waiting job and the later ones that can decode with it, in order."""
        if not self.waiting:
            return []
        first = self.waiting.popleft()
        batch, rows = [first], first.sampling.n
        if first.sampling.seed is not None:
            return batch

        def alike(job: Job) -> bool:
            a, b = first.sampling, job.sampling
            return (job.sampling.seed is None and job.stops == first.stops and
                    (a.temperature == b.temperature == 0 or
                     (a.temperature, a.top_p) == (b.temperature, b.top_p)))

        for job in list(self.waiting):
            if rows + job.sampling.n > self.max_batch:
                break
            grown = [*batch, job]  # left padding: every row runs to the longest prompt + budget
            fits = self.positions is None or (max(j.prompt_tokens for j in grown) +
                                              max(j.max_tokens for j in grown) <= self.positions)
            if alike(job) and fits:
                self.waiting.remove(job)
                batch.append(job)
                rows += job.sampling.n
        return batch

    @torch.inference_mode()
    def _decode(self, batch: list[Job]) -> list[list[Choice]]:
        from transformers import GenerationConfig, StoppingCriteria

        from llmctl.evaluation import model_device

        rows = [(job, c) for job in batch for c in range(job.sampling.n)]
        self._counted(len(rows))
        s = batch[0].sampling
        if s.seed is not None:
            torch.manual_seed(s.seed)  # one worker thread, a batch of its own: the seed decides
        padded = self.tokenizer.pad({"input_ids": [job.input_ids[0].tolist() for job, _ in rows]},
                                    return_tensors="pt")  # left: the tokenizer's padding side
        device = model_device(self.model)
        ids, mask = padded["input_ids"].to(device), padded["attention_mask"].to(device)
        width = ids.shape[1]
        budgets = torch.tensor([job.max_tokens for job, _ in rows], device=device)
        sample = s.temperature > 0
        config = GenerationConfig(
            max_new_tokens=int(budgets.max()), do_sample=sample,
            temperature=s.temperature if sample else None, top_p=s.top_p if sample else None,
            top_k=0 if sample else None, stop_strings=batch[0].stops or None,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id)

        class RowDone(StoppingCriteria):  # each row's own budget; a client that left
            def __call__(self, input_ids, scores, **kwargs):
                gone = torch.tensor([job.cancelled.is_set() for job, _ in rows], device=device)
                return (input_ids.shape[1] - width >= budgets) | gone

        streamers = [StopAwareStreamer(self.tokenizer, job.stops,
                                       functools.partial(job.on_text, c)) if job.on_text else None
                     for job, c in rows]
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config,
            tokenizer=self.tokenizer, stopping_criteria=[RowDone()],
            streamer=RowStreamer(streamers, budgets.tolist(), self.tokenizer.eos_token_id)
            if any(streamers) else None)
        choices: dict[int, list[Choice]] = collections.defaultdict(list)
        for r, (job, _) in enumerate(rows):
            new = out[r, width:width + job.max_tokens].tolist()
            tokens = generated_length(new, self.tokenizer.eos_token_id)
            choices[id(job)].append(self.choice(new[:tokens], job.stops, stopped=False))
        return [choices[id(job)] for job in batch]


class RowStreamer:
    """transformers' streamer protocol for a batch: each step's tokens go to their row's
    :class:`StopAwareStreamer`, up to the row's budget and eos (after that a row is padding)."""

    def __init__(self, rows: list[Optional["StopAwareStreamer"]], budgets: list[int],
                 eos: int | None):
        self.rows, self.left, self.eos = rows, list(budgets), eos
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompts first
            self.prompt_seen = True
            return
        for r, token in enumerate(value.flatten().tolist()):
            if self.left[r] > 0:
                self.left[r] = 0 if token == self.eos else self.left[r] - 1
                if self.rows[r] is not None:
                    self.rows[r].feed([token])

    def end(self) -> None:
        for row in self.rows:
            if row is not None:
                row.end()


class GenaiEngine(Engine):
    """An OpenVINO model directory with its tokenizer as OpenVINO IR: openvino-genai's
    ``ContinuousBatchingPipeline`` decodes every running request together, one token each per
    step, and a request that arrives joins at the next step (paged KV cache, C++ loop)."""

    kind = "openvino-genai, continuous batching"

    def __init__(self, directory: str, tokenizer, name: str, max_batch: int):
        import openvino_genai
        from transformers import AutoConfig

        from llmctl.models import max_positions

        scheduler = openvino_genai.SchedulerConfig()
        scheduler.max_num_seqs = max_batch
        self.pipeline = openvino_genai.ContinuousBatchingPipeline(directory, scheduler, "CPU")
        positions = max_positions(types.SimpleNamespace(config=AutoConfig.from_pretrained(
            directory)))
        super().__init__(tokenizer, name, positions, max_batch)

    def _config(self, job: Job):
        s = job.sampling
        config = self.pipeline.get_config()
        config.max_new_tokens = job.max_tokens
        if self.tokenizer.eos_token_id is not None:
            config.set_eos_token_id(self.tokenizer.eos_token_id)
        config.do_sample = s.temperature > 0
        if config.do_sample:
            config.temperature, config.top_p, config.top_k = s.temperature, s.top_p, 0
            config.num_return_sequences = s.n  # greedy choices are all alike: decoded once
            # Without a seed each request draws anew (openvino-genai's default seed is fixed).
            config.rng_seed = s.seed if s.seed is not None else random.getrandbits(32)
        if job.stops:  # kept in the output and cut here, as for transformers (mid-token stops)
            config.stop_strings = set(job.stops)
            config.include_stop_str_in_output = True
        return config

    def _work(self) -> None:
        import openvino
        import openvino_genai

        running: dict[int, GenaiDecode] = {}
        ids = itertools.count()
        while True:
            self.waiting.extend(self._arrivals(wait=not running and not self.waiting))
            self._drop_cancelled()
            # Up to --max-batch sequences run in the pipeline; the rest wait here, where a
            # client that leaves costs nothing and /health can count them.
            busy = sum(d.sequences for d in running.values())
            while self.waiting and (not running or busy + GenaiDecode.count(
                    self.waiting[0]) <= self.max_batch):
                job = self.waiting.popleft()
                busy += GenaiDecode.count(job)
                try:
                    handle = self.pipeline.add_request(
                        next(ids), openvino.Tensor(job.input_ids.numpy()), self._config(job))
                except Exception as err:  # noqa: BLE001 - reported to that request
                    job.done.set_exception(err)
                    continue
                running[id(job)] = GenaiDecode(job, handle, self.tokenizer)
            if not running:
                continue
            self._counted(sum(d.sequences for d in running.values()))
            try:
                self.pipeline.step()
            except Exception as err:  # noqa: BLE001 - reported to the requests it ran
                for decode in running.values():
                    decode.job.done.set_exception(err)
                running.clear()
                continue
            for key, decode in list(running.items()):
                try:
                    decode.read()
                    going = decode.handle.get_status() == openvino_genai.GenerationStatus.RUNNING
                    if going and decode.job.cancelled.is_set():  # its streaming client left
                        decode.handle.cancel()
                    elif not going:
                        del running[key]
                        decode.finish(self)
                except Exception as err:  # noqa: BLE001 - that request fails, the others go on
                    running.pop(key, None)
                    decode.handle.cancel()
                    decode.job.done.set_exception(err)


class GenaiDecode:
    """One request in the continuous-batching pipeline: its sequences' tokens as they come."""

    def __init__(self, job: Job, handle, tokenizer):
        self.job, self.handle = job, handle
        self.sequences = self.count(job)
        self.ids: dict[int, list[int]] = collections.defaultdict(list)
        self.stopped: dict[int, bool] = {}
        self.streamers = {}
        if job.on_text:
            # greedy n > 1 is decoded once: its one sequence streams to every choice
            choices = [[seq] for seq in range(self.sequences)] if self.sequences > 1 else \
                [list(range(job.sampling.n))]
            self.streamers = {seq: StopAwareStreamer(tokenizer, job.stops,
                                                     functools.partial(self._emit, to))
                              for seq, to in enumerate(choices)}

    @staticmethod
    def count(job: Job) -> int:
        """Sequences the pipeline decodes for a job (greedy choices are all alike: one)."""
        return job.sampling.n if job.sampling.temperature > 0 else 1

    def _emit(self, choices: list[int], text: str) -> None:
        for choice in choices:
            self.job.on_text(choice, text)

    def read(self) -> None:
        import openvino_genai

        while self.handle.can_read():
            for seq, output in self.handle.read().items():
                self.ids[seq].extend(output.generated_ids)
                if output.finish_reason != openvino_genai.GenerationFinishReason.NONE:
                    self.stopped[seq] = (output.finish_reason ==
                                         openvino_genai.GenerationFinishReason.STOP)
                if seq in self.streamers:
                    self.streamers[seq].feed(list(output.generated_ids))

    def finish(self, engine: Engine) -> None:
        self.read()
        if self.job.cancelled.is_set():
            self.job.done.cancel()
            return
        for streamer in self.streamers.values():
            streamer.end()
        choices = [engine.choice(self.ids[seq], self.job.stops, self.stopped.get(seq, False))
                   for seq in sorted(self.ids)] or [engine.choice([], self.job.stops, False)]
        if len(choices) < self.job.sampling.n:  # greedy: the one sequence is every choice
            choices = choices[:1] * self.job.sampling.n
        self.job.done.set_result(choices)


class LlamaCppEngine(Engine):
    """A GGUF quantize output under llama.cpp (:mod:`llmctl.quantization.llamacpp`).
    llama-cpp-python's ``Llama`` decodes one sequence at a time, so requests are answered in
    the order they came, each streamed token by token as it is decoded (its own server holds
    a lock around the model the same way)."""

    kind = "llama.cpp, one sequence at a time"

    def __init__(self, model, tokenizer, name: str, max_batch: int):
        from llmctl.models import max_positions

        self.model = model
        super().__init__(tokenizer, name, max_positions(model), 1)

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            if job.cancelled.is_set():
                job.done.cancel()
                continue
            try:
                s = job.sampling
                decoded = [self._decode(job, c) for c in range(s.n if s.temperature > 0 else 1)]
            except Exception as err:  # noqa: BLE001 - reported to that request
                job.done.set_exception(err)
                continue
            if job.cancelled.is_set():
                job.done.cancel()
            else:  # greedy: the one sequence is every choice (and streamed to every one)
                job.done.set_result(decoded if len(decoded) == job.sampling.n
                                    else decoded * job.sampling.n)

    def _decode(self, job: Job, choice: int) -> Choice:
        self._counted(1)
        s = job.sampling
        to = [choice] if s.temperature > 0 else list(range(s.n))
        streamer = StopAwareStreamer(self.tokenizer, job.stops, lambda text: [
            job.on_text(c, text) for c in to]) if job.on_text else None
        sample = {}
        if s.temperature > 0:  # without a seed each request draws anew
            sample = dict(temperature=s.temperature, top_p=s.top_p, seed=s.seed + choice
                          if s.seed is not None else random.getrandbits(31))
        ids, stopped = [], False
        for token in self.model.stream(job.input_ids[0].tolist(), job.max_tokens,
                                       eos_token_id=self.tokenizer.eos_token_id, **sample):
            ids.append(token)
            if streamer is not None:
                streamer.feed([token])
            if job.cancelled.is_set():
                break
            if job.stops and (streamer.stopped if streamer is not None else any(
                    stop in self.tokenizer.decode(ids, skip_special_tokens=True)
                    for stop in job.stops)):
                stopped = True
                break
        if streamer is not None:
            streamer.end()
        return self.choice(ids, job.stops, stopped)


class StopAwareStreamer:
    """Streamed text for one sequence, as tokens come (``feed``; or transformers' streamer
    protocol, ``put``/``end``): passes on decoded text as it grows, holding back a tail that
    could be the start of a stop string and nothing after a stop string, so the streamed
    pieces add up to the non-streamed answer."""

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
        self.feed(int(t) for t in value.flatten())

    def feed(self, ids) -> None:
        self.ids.extend(ids)
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


# -- admission and shutdown ------------------------------------------------------------------


class Admission:
    """The requests the server holds (decoding or waiting for the model), at most ``limit``:
    past it a new one is refused with 429, and while the server drains (after SIGTERM) with
    503, both with Retry-After, so a busy server's memory stays bounded and its clients know
    to come back. Touched on the event loop's thread only (and ``draining`` by its signal
    handler)."""

    def __init__(self, limit: int):
        self.limit, self.held, self.draining = limit, 0, False

    def enter(self) -> None:
        if self.draining:
            raise BadRequest("the server is shutting down: it answers the requests it holds "
                             "and takes no new ones", status=503, kind="server_error",
                             code="shutting_down", retry_after=RETRY_AFTER_SECONDS)
        if self.held >= self.limit:
            raise BadRequest(f"the server is busy: it holds {self.held} requests, its limit "
                             f"(--max-batch + --max-queue); retry after {RETRY_AFTER_SECONDS} s",
                             status=429, kind="rate_limit_error", code="queue_full",
                             retry_after=RETRY_AFTER_SECONDS)
        self.held += 1

    def leave(self) -> None:
        self.held -= 1


def draining_server(app, admission: Admission):
    """uvicorn's server, stopped by a drain: the first SIGTERM or Ctrl-C refuses new requests
    (503) while the held ones are answered, then the server exits; a second stops it at once."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:  # uvicorn's handler of SIGINT and SIGTERM
            if admission.draining:
                super().handle_exit(sig, frame)
                self.force_exit = True
            admission.draining = True

        announced = False

        async def on_tick(self, counter: int) -> bool:  # uvicorn's main loop, every 0.1 s
            if admission.draining and not self.should_exit:
                if not admission.held:
                    self.should_exit = True
                elif not self.announced:
                    self.announced = True
                    print(f"serve: draining: answering the {admission.held} request(s) held, "
                          f"new ones get 503 (a second Ctrl-C or SIGTERM stops at once)",
                          file=sys.stderr, flush=True)
            return await super().on_tick(counter)

    return DrainingServer(uvicorn.Config(app, log_level="info", access_log=True))


class BodyLimit:
    """ASGI middleware: reading a request body of more than ``limit`` bytes raises HTTP 413
    (the app answers it in OpenAI's shape), at once by its Content-Length or as soon as a
    chunked body grows past it, so no request costs more memory than that."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.exceptions import HTTPException

        declared = dict(scope["headers"]).get(b"content-length", b"")
        read = 0

        async def limited():
            nonlocal read
            if declared.isdigit() and int(declared) > self.limit:
                raise HTTPException(413)
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.limit:
                raise HTTPException(413)
            return message

        await self.app(scope, limited, send)


async def until_disconnect(receive) -> None:
    """Returns when the client has hung up (a request's body is read by then, so the next
    ASGI message is the disconnect)."""
    while (await receive())["type"] != "http.disconnect":
        pass


# -- the HTTP app ----------------------------------------------------------------------------


def create_app(engine: Engine, admission: Admission, api_key: str | None = None,
               max_body: int = MAX_BODY_BYTES):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="llmctl serve", docs_url=None, redoc_url=None, openapi_url=None)
    # (not FastAPI's own max_body_size: its 413 is plain text, not OpenAI's JSON error)
    app.add_middleware(BodyLimit, limit=max_body)

    def error(status: int, message: str, kind: str = "invalid_request_error",
              param: str | None = None, code: str | None = None,
              retry_after: int | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param,
                                       "code": code}}, status_code=status,
                            headers={"Retry-After": str(retry_after)} if retry_after else None)

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, err: BadRequest):
        return error(err.status, err.message, err.kind, err.param, err.code, err.retry_after)

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
        # 400 here: a body that is not UTF-8 or nests too deep to parse; 413: one too large.
        message = (f"the body is over {max_body} bytes" if err.status_code == 413 else
                   "the body is not JSON in UTF-8 (or nests too deep)"
                   if err.status_code == 400 else str(err.detail))
        return error(err.status_code, message, "not_found_error"
                     if err.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _failed(request: Request, err: Exception):  # logged with its traceback by uvicorn
        return error(500, f"llmctl serve failed: {type(err).__name__}", "server_error")

    class RequireKey:
        """Every /v1 request bears the key (pure ASGI: FastAPI's ``@app.middleware`` would hide
        a client's hang-up from the endpoints behind it)."""

        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http" and scope["path"].startswith("/v1"):
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
                    refused = error(401, "missing or wrong API key (Authorization: Bearer ...)",
                                    "authentication_error")
                    return await refused(scope, receive, send)
            await self.app(scope, receive, send)

    if api_key:
        app.add_middleware(RequireKey)

    @app.get("/health")
    async def health():
        # 503 while draining, so that a load balancer stops sending requests here.
        return JSONResponse({
            "status": "draining" if admission.draining else "ok", "model": engine.name,
            "engine": engine.kind, "in_flight": admission.held, "queued": engine.queued,
            "max_in_flight": admission.limit, "batches": engine.batches,
            "largest_batch": engine.largest_batch}, status_code=503 if admission.draining else 200)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.name, "object": "model",
                                            "created": 0, "owned_by": "llmctl"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts or len(prompts) * body.n > MAX_CHOICES:
            raise BadRequest(f"prompt: 1 to {MAX_CHOICES} completions per request "
                             f"(prompts x n)", "prompt")
        return await answer(request, body, lambda: [engine.encode(p, False, "prompt")
                                                    for p in prompts], chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await answer(request, body, lambda: [engine.encode(
            engine.render_chat(body.messages), True, "messages")], chat=True)

    class HeldStream(StreamingResponse):
        """A streamed answer that frees its request's place however it ends: done, failed, or
        its client gone before or during the stream."""

        def __init__(self, content, on_close: Callable[[], None], **kwargs):
            super().__init__(content, **kwargs)
            self.on_close = on_close

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.on_close()

    async def answer(request: Request, body: Sampling,
                     encode: Callable[[], list[torch.Tensor]], chat: bool):
        body.unsupported()
        if body.model not in (None, engine.name):
            raise BadRequest(f"model {body.model!r} is not served here (this server: "
                             f"{engine.name!r})", "model", 404, "not_found_error")
        stops = body.stops()
        admission.enter()
        jobs: list[Job] = []
        gone: asyncio.Future | None = None  # done when the client hangs up
        streaming = False

        def finish() -> None:  # however the request ends: drop what still decodes, free its place
            for job in jobs:
                job.cancelled.set()
            if gone is not None:
                gone.cancel()
            admission.leave()

        try:
            prompts = encode()
            default = 16 if not chat else (engine.positions or 4096)  # OpenAI's defaults
            budgets = [engine.budget(ids.shape[1], body.max_tokens, default,
                                     "messages" if chat else "prompt") for ids in prompts]
            loop = asyncio.get_running_loop()
            pieces: asyncio.Queue = asyncio.Queue()
            for p, (ids, budget) in enumerate(zip(prompts, budgets)):
                on_text = None
                if body.stream:
                    def on_text(choice: int, text: str, p: int = p) -> None:
                        loop.call_soon_threadsafe(pieces.put_nowait, (p * body.n + choice, text))
                jobs.append(Job(ids, budget, body, stops, on_text))
            for job in jobs:
                engine.jobs.put(job)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
            gone = asyncio.ensure_future(until_disconnect(request.receive))
            if body.stream:
                streaming = True
                return HeldStream(stream(rid, chat, body, jobs, pieces, gone), finish,
                                  media_type="text/event-stream")
            results = asyncio.ensure_future(results_of(jobs))
            await asyncio.wait({results, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not results.done():  # the client hung up: nobody to answer
                results.cancel()
                return Response(status_code=499)  # nginx's "client closed request"
            return completion(rid, chat, prompts, results.result())
        finally:
            if not streaming:
                finish()

    async def results_of(jobs: list[Job]) -> list[list[Choice]]:
        return [await asyncio.wrap_future(job.done) for job in jobs]

    def completion(rid: str, chat: bool, prompts: list[torch.Tensor],
                   results: list[list[Choice]]) -> dict:
        choices = [c for result in results for c in result]
        head = {"id": rid, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": engine.name,
                "usage": usage_of(prompts, choices)}
        if chat:
            return {**head, "choices": [
                {"index": i, "message": {"role": "assistant", "content": c.text},
                 "finish_reason": c.finish_reason, "logprobs": None}
                for i, c in enumerate(choices)]}
        return {**head, "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                                     "logprobs": None} for i, c in enumerate(choices)]}

    async def stream(rid: str, chat: bool, body: Sampling, jobs: list[Job],
                     pieces: asyncio.Queue, gone: asyncio.Future):
        created = int(time.time())

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

        if chat:
            for i in range(len(jobs) * body.n):
                yield chunk(i, None, None, first=True)
        for p, job in enumerate(jobs):
            done = asyncio.wrap_future(job.done)
            while not done.done() or not pieces.empty():
                getter = asyncio.ensure_future(pieces.get())
                await asyncio.wait({getter, done, gone}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    index, text = getter.result()
                    yield chunk(index, text, None)
                else:
                    getter.cancel()
                    if gone.done():  # the client hung up (HeldStream frees its place)
                        return
            try:
                result = done.result()
            except Exception as err:  # the model failed mid-stream: say so in-band
                yield f"data: {json.dumps({'error': {'message': str(err)}})}\n\n"
                return
            for c, choice in enumerate(result):
                yield chunk(p * body.n + c, None, choice.finish_reason)
        yield "data: [DONE]\n\n"

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


def read_api_key() -> str | None:
    """The key every /v1 request must bear: ``LLMCTL_API_KEY``, or the first line of the file
    ``LLMCTL_API_KEY_FILE`` names (a mounted secret); None without either."""
    from pathlib import Path

    key, path = os.environ.get(API_KEY_ENV), os.environ.get(API_KEY_FILE_ENV)
    if key and path:
        raise UserError(f"{API_KEY_ENV} and {API_KEY_FILE_ENV} are both set: set one")
    if path:
        try:
            key = Path(path).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or "not UTF-8 text"
            raise UserError(f"{API_KEY_FILE_ENV}={path}: cannot read the API key ({reason})"
                            ) from None
        if not key:
            raise UserError(f"{API_KEY_FILE_ENV}={path}: the file is empty")
    return key or None


def serve(recipe, model: str | None, host: str, port: int, max_batch: int = 16,
          max_queue: int = MAX_QUEUE, max_body: int = MAX_BODY_BYTES) -> None:
    from llmctl.models import check_loadable, device, load_tokenizer, model_dir
    from llmctl.quantization import check_runtime, load_model, runtime

    path, name = resolve_model(recipe, model)
    check_loadable(path, recipe.model, "--model")
    check_runtime(path, "--model")
    api_key = read_api_key()
    sock = bind(host, port)
    tokenizer = load_tokenizer(path, recipe.model, padding_side="left")
    directory = model_dir(path)  # a .gguf file's converted directory
    if runtime(directory) == "openvino-genai":
        engine: Engine = GenaiEngine(directory, tokenizer, name, max_batch)
    else:
        loaded = load_model(path, recipe.model).to(device()).eval()
        engine = (LlamaCppEngine if runtime(directory) == "llama.cpp" else TransformersEngine)(
            loaded, tokenizer, name, max_batch)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    print(f"serving {name} ({path}) at http://{shown}:{bound_port}/v1 ({engine.kind}, up to "
          f"{max_batch} sequences at once, {max_queue} more requests waiting, bodies up to "
          f"{max_body} bytes)"
          f"{'' if api_key else ' (no API key: set ' + API_KEY_ENV + ' to require one)'}",
          flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"warning: listening on {host} without {API_KEY_ENV}: anyone who can reach this "
              f"port can use the model", flush=True)
    admission = Admission(max_batch + max_queue)
    draining_server(create_app(engine, admission, api_key, max_body), admission).run(
        sockets=[sock])
    print("serve: stopped (every request it held was answered)", file=sys.stderr, flush=True)
