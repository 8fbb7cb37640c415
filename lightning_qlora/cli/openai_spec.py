"""The OpenAI-compatible HTTP side of ``lightning-qlora serve``: LitServe's ``OpenAISpec`` plus what it lacks.

LitServe's ``OpenAISpec`` brings the request schema, the worker queue and the app. :class:`OpenAIServeSpec` checks and
renders every request in the API server, before it is queued (so bad input is a 400 JSON error, also for a streamed
request, and never reaches the model's worker), and answers ``/v1/chat/completions`` and ``/v1/completions`` itself:
each of ``n`` choices whole also when streamed (LitServe's stream stops at the shortest), its own finish reason
(``length`` when ``max_tokens`` ended it), seed ``seed + i`` for choice ``i``, a prompt's tokens counted once, one id
per response, ``stream_options.include_usage``; ``/v1/models`` lists the one model in memory.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import asdict, replace
from typing import Any

from fastapi import BackgroundTasks, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from litserve.specs.openai import ChatCompletionRequest, OpenAISpec, ResponseFormatText
from litserve.utils import LitAPIStatus, ResponseBufferItem
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightning_qlora.data.inference_prompts import chat_messages, render_prompts
from lightning_qlora.models.generation import GenerationOptions
from lightning_qlora.utils.errors import first_line

MAX_CHOICES = 8
"""Most completions one request may ask for (``n`` times the number of prompts)."""


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    include_usage: bool = False


class ChatRequest(ChatCompletionRequest):
    """LitServe's chat request with the OpenAI fields it lacks (the unsupported ones are read to be refused)."""

    seed: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    stream_options: StreamOptions | None = None


class PreparedChat(ChatRequest):
    """A checked chat request, rendered by the API server (never built from a client's JSON)."""

    prompt_text: str = ""
    options: dict[str, Any] = {}


class CompletionRequest(BaseModel):
    """An OpenAI ``/v1/completions`` request (the fields this server reads; the others are refused if set)."""

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class PreparedCompletion(BaseModel):
    """One queued plain-prompt completion, rendered by the API server."""

    prompt_text: str
    options: dict[str, Any]


class PromptRenderer:
    """What the API server needs to check and render requests: the tokenizer and the training prompt settings.

    Args:
        tokenizer: the model's tokenizer.
        prompt_style: ``chat_template`` or ``alpaca`` (as in training).
        system_prompt: the training system prompt, added to conversations without one.
        context_window: the model's context window in tokens (None: not checked).
        defaults: decoding options for fields a request leaves out (the server's command line).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt_style: str,
        system_prompt: str | None,
        context_window: int | None,
        defaults: GenerationOptions,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_style = prompt_style
        self.system_prompt = system_prompt
        self.context_window = context_window
        self.defaults = defaults

    def chat_prompt(self, messages: Any) -> str:
        """The chat template (or Alpaca) prompt for OpenAI-style messages, checked and fitted to the context."""
        clean = chat_messages(messages, "messages")
        if self.system_prompt is not None and clean[0]["role"] != "system":
            clean = [{"role": "system", "content": self.system_prompt}, *clean]
        text = render_prompts(self.tokenizer, [clean], self.prompt_style, ["messages"])[0]  # type: ignore[arg-type]
        self.check_length(text, self.prompt_style == "alpaca")
        return text

    def check_length(self, text: str, add_special_tokens: bool) -> None:
        """Raise if the prompt leaves no room for an answer in the context window."""
        tokens = len(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        if self.context_window is not None and tokens >= self.context_window:
            raise ValueError(
                f"the prompt is {tokens} tokens but this model's context window is {self.context_window} tokens; "
                "shorten the prompt"
            )

    def options(self, request: BaseModel, max_tokens: int | None) -> GenerationOptions:
        """Decoding options: the request's fields where it sets them, the server's defaults elsewhere.

        Raises:
            ValueError: for an out-of-range value.
        """

        def given(name: str, default: Any) -> Any:
            value = getattr(request, name, None)
            return value if name in request.model_fields_set and value is not None else default

        defaults = self.defaults
        stop = given("stop", defaults.stop)
        return GenerationOptions(
            max_new_tokens=max_tokens if max_tokens is not None else defaults.max_new_tokens,
            temperature=given("temperature", defaults.temperature),
            top_p=given("top_p", defaults.top_p),
            stop=[stop] if isinstance(stop, str) else list(stop),
            seed=given("seed", defaults.seed),
        )


def _text_parts_joined(message: dict[str, Any]) -> dict[str, Any]:
    """A message whose content is a list of text parts (``[{"type": "text", "text": ...}]``) with one string."""
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        message = {**message, "content": "".join(str(p.get("text", "")) for p in content)}
    return message


def refuse_unsupported(request: BaseModel, fields: dict[str, Any]) -> None:
    """Raise for a field set to something this server cannot do (rather than silently ignoring it)."""
    for name, neutral in fields.items():
        value = getattr(request, name, None)
        if value not in neutral:
            raise ValueError(f"'{name}'={value!r} is not supported by this server; leave it out")


def bad_request(err: Exception) -> HTTPException:
    """A 400 with the error's first line."""
    return HTTPException(status_code=400, detail=first_line(err))


class OpenAIServeSpec(OpenAISpec):
    """LitServe's OpenAI spec with checked, server-rendered requests, ``/v1/completions`` and ``/v1/models``.

    Args:
        renderer: checks and renders requests.
        model_name: the id ``/v1/models`` lists and responses carry.
    """

    def __init__(self, renderer: PromptRenderer, model_name: str) -> None:
        super().__init__()
        self.renderer = renderer
        self.model_name = model_name

    def pre_setup(self, lit_api: Any) -> None:
        """Register LitServe's chat endpoint, then ``/v1/completions`` and ``/v1/models``."""
        super().pre_setup(lit_api)
        self.add_endpoint("/v1/completions", self.completion, ["POST"])
        self.add_endpoint("/v1/models", self.models, ["GET"])

    def populate_context(self, context: dict, request: Any) -> None:
        """Nothing: the worker reads the prepared request itself (and completion requests have no messages)."""

    async def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one model served."""
        return {
            "object": "list",
            "data": [{"id": self.model_name, "object": "model", "created": 0, "owned_by": "lightning-qlora"}],
        }

    async def chat_completion(self, request: ChatRequest, background_tasks: BackgroundTasks) -> Any:  # type: ignore[override]
        """``POST /v1/chat/completions``: checked and rendered, ``n`` choices queued for the worker; JSON or SSE."""
        try:
            refuse_unsupported(
                request,
                {"tools": (None, []), "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
                 "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
                 "response_format": (None, ResponseFormatText(type="text"))},
            )  # fmt: skip
            if request.n is None or not 1 <= request.n <= MAX_CHOICES:
                raise ValueError(f"'n'={request.n!r}: ask for 1 to {MAX_CHOICES} choices")
            max_tokens = request.max_completion_tokens
            max_tokens = request.max_tokens if max_tokens is None else max_tokens
            if max_tokens is not None and max_tokens < 1:
                raise ValueError(f"'max_tokens'={max_tokens!r}: ask for at least 1 token")
            options = self.renderer.options(request, max_tokens)
            prompt = self.renderer.chat_prompt([_text_parts_joined(m.model_dump()) for m in request.messages])
        except ValueError as err:
            raise bad_request(err) from None
        data = request.model_dump(exclude_unset=True)
        pipes = [
            self._enqueue(PreparedChat(**data, prompt_text=prompt, options=asdict(choice_options(options, i))))
            for i in range(request.n)
        ]
        head = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": request.model or self.model_name}  # fmt: skip
        if request.stream:
            usage = bool(request.stream_options and request.stream_options.include_usage)
            events = _events(head, pipes, self.response_buffer, request.n, usage, chat=True)
            return StreamingResponse(events, media_type="text/event-stream", background=background_tasks)
        choices, usage_counts = [], _usage()
        for index, (uid, pipe) in enumerate(pipes):
            text, reason = [], "stop"
            async for output in _outputs(pipe, uid, self.response_buffer):
                text.append(output.get("content") or "")
                reason = output.get("finish_reason") or reason
                _count(usage_counts, output, prompt=index == 0)
            message = {"role": "assistant", "content": "".join(text)}
            choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": reason})
        return {**head, "object": "chat.completion", "choices": choices, "usage": usage_counts}

    async def completion(self, request: CompletionRequest, background_tasks: BackgroundTasks) -> Any:
        """``POST /v1/completions``: plain prompts (no chat template), JSON or server-sent events."""
        try:
            refuse_unsupported(
                request,
                {"echo": (False,), "logprobs": (None,), "suffix": (None, ""), "best_of": (None, 1),
                 "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": (None, {})},
            )  # fmt: skip
            prompts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt)
            if not prompts or not all(prompts) or not 1 <= request.n * len(prompts) <= MAX_CHOICES:
                raise ValueError(f"'prompt' and 'n': ask for 1 to {MAX_CHOICES} completions of non-empty prompts")
            if request.max_tokens is not None and request.max_tokens < 1:
                raise ValueError(f"'max_tokens'={request.max_tokens!r}: ask for at least 1 token")
            options = self.renderer.options(request, request.max_tokens)
            for prompt in prompts:
                self.renderer.check_length(prompt, True)
        except ValueError as err:
            raise bad_request(err) from None
        n = request.n
        pipes = [
            self._enqueue(PreparedCompletion(prompt_text=p, options=asdict(choice_options(options, i))))
            for p in prompts
            for i in range(n)
        ]
        model, cid, created = request.model or self.model_name, f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "created": created, "model": model}
        if request.stream:
            usage = bool(request.stream_options and request.stream_options.include_usage)
            return StreamingResponse(
                _events(head, pipes, self.response_buffer, n, usage, chat=False), media_type="text/event-stream"
            )
        choices, usage_counts = [], _usage()
        for index, (uid, pipe) in enumerate(pipes):
            text, reason = [], "stop"
            async for output in _outputs(pipe, uid, self.response_buffer):
                text.append(output.get("text", ""))
                reason = output.get("finish_reason") or reason
                _count(usage_counts, output, prompt=index % n == 0)
            choices.append({"text": "".join(text), "index": index, "logprobs": None, "finish_reason": reason})
        return {**head, "object": "text_completion", "choices": choices, "usage": usage_counts}

    def _enqueue(self, item: PreparedCompletion) -> tuple[uuid.UUID, AsyncIterator]:
        """Queue one completion for the model's worker (as LitServe's chat endpoint does); its output stream."""
        uid, queue, event = uuid.uuid4(), deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(response_queue=queue, event=event)
        self.request_queue.put((self.response_queue_id, uid, time.monotonic(), item))
        return uid, self.data_streamer(queue, event, send_status=True)


async def _outputs(pipe: AsyncIterator, uid: Any, buffer: dict) -> AsyncIterator[dict[str, Any]]:
    """The worker's decoded outputs for one queued item; its error as an ``HTTPException``."""
    try:
        async for response, status in pipe:
            if status == LitAPIStatus.ERROR:
                if isinstance(response, HTTPException):
                    raise response
                raise HTTPException(status_code=500, detail="the model failed on this request; see the server log")
            yield json.loads(response)
    finally:
        buffer.pop(uid, None)


def choice_options(options: GenerationOptions, index: int) -> GenerationOptions:
    """Choice ``index``'s decoding options: with a seed, ``seed + index`` (n seeded choices differ, yet repeat)."""
    return options if options.seed is None else replace(options, seed=options.seed + index)


def _usage() -> dict[str, int]:
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _count(usage: dict[str, int], output: dict[str, Any], prompt: bool) -> None:
    """Add one worker output's token counts; a prompt answered ``n`` times counts once (``prompt`` on the first)."""
    if prompt:
        usage["prompt_tokens"] += int(output.get("prompt_tokens", 0))
    usage["completion_tokens"] += int(output.get("completion_tokens", 0))
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]


async def _events(
    head: dict[str, Any], pipes: list, buffer: dict, n: int, include_usage: bool, chat: bool
) -> AsyncIterator[str]:
    """Server-sent events, one choice per chunk, choices in order (each one whole, however long the others are).

    A chat choice opens with its role, then content pieces; a completion choice sends text pieces; each ends with a
    chunk carrying its finish reason. With ``include_usage`` every chunk has ``usage: null`` and a last chunk with
    no choices has the request's usage (OpenAI's ``stream_options``). Then ``[DONE]``; an error is one error event.
    ``n`` is the number of choices per prompt: each prompt's tokens count once in the usage.
    """
    kind = "chat.completion.chunk" if chat else "text_completion"
    usage = _usage()

    def event(choices: list[dict[str, Any]], usage_value: dict[str, int] | None = None) -> str:
        body = {**head, "object": kind, "choices": choices}
        if include_usage:
            body["usage"] = usage_value
        return f"data: {json.dumps(body)}\n\n"

    def choice(index: int, piece: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        body = {"index": index, "delta": piece} if chat else {"index": index, "text": piece.get("content", "")}
        return {**body, "logprobs": None, "finish_reason": reason}

    try:
        for index, (uid, pipe) in enumerate(pipes):
            if chat:
                yield event([choice(index, {"role": "assistant", "content": ""})])
            reason = "stop"
            async for output in _outputs(pipe, uid, buffer):
                reason = output.get("finish_reason") or reason
                _count(usage, output, prompt=index % n == 0)
                piece = output.get("content") if chat else output.get("text")
                if piece:
                    yield event([choice(index, {"content": piece})])
            yield event([choice(index, {}, reason)])
        if include_usage:
            yield event([], usage)
        yield "data: [DONE]\n\n"
    except HTTPException as err:
        yield f"data: {json.dumps(error_body(err.status_code, str(err.detail)))}\n\n"


def error_body(status: int, message: str) -> dict[str, Any]:
    """OpenAI's error JSON."""
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def add_error_handlers(app: FastAPI) -> None:
    """Answer bad requests as OpenAI does: 400 for a body that is not valid JSON or does not fit the schema."""

    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        where = ".".join(str(p) for p in errors[0].get("loc", ())[1:]) if errors else ""
        message = f"{where}: {errors[0].get('msg')}" if errors else "invalid request"
        return JSONResponse(status_code=400, content=error_body(400, message.strip(": ")))

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(status_code=exc.status_code, content=error_body(exc.status_code, str(exc.detail)))

    app.add_exception_handler(RequestValidationError, invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, http_error)  # type: ignore[arg-type]  # 404, 405 too


__all__ = ["CompletionRequest", "OpenAIServeSpec", "PromptRenderer", "add_error_handlers", "choice_options"]
