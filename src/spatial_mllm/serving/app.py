"""The FastAPI app: OpenAI `/v1/chat/completions` (JSON or server-sent events), `/v1/models`, `/health`, and the
web page at `/`. One process: the app validates and prepares requests, the engine thread generates."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from . import sse
from .engine import Delta, Engine, Failed, Finished, GenerationRequest, QueueFull
from .errors import APIError, envelope, install_error_handlers
from .gate import RequestGate
from .prompts import prepare_prompt
from .protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
    unsupported_fields,
)
from .sampling import SamplingParams
from .settings import ServerSettings

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 503)}


def context_length(model, settings: ServerSettings) -> int:
    own = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 2048
    return min(own, settings.max_model_len) if settings.max_model_len else own


def create_app(model, processor, settings: ServerSettings | None = None) -> FastAPI:
    """The app serving `model` (eval mode, on its device) with `processor` (which must have a chat template)."""
    settings = settings or ServerSettings()
    if processor.chat_template is None:
        raise ValueError("the processor has no chat template; give one (serve --chat-template FILE)")
    max_model_len = context_length(model, settings)
    # One encode before two threads share the fast tokenizer: it settles the backend's padding/truncation state
    # (a saved tokenizer.json may carry some), after which encoding and decoding only read it.
    processor(text=["warm-up"], padding=False)
    engine = Engine(model, processor, settings.max_batch_size, settings.max_queue, max_model_len)
    created = int(time.time())
    preparing = 0  # requests being prepared count against the queue too, so a burst is refused before decoding

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="spatial-mllm", summary="OpenAI-compatible chat completions for a spatial-mllm model",
                  lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(RequestGate, api_key=settings.api_key, max_request_bytes=settings.max_request_bytes)

    def card() -> ModelCard:
        return ModelCard(id=settings.served_model_name, created=created, root=settings.served_model_name,
                         max_model_len=max_model_len)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8"))

    @app.get("/health", response_model=Health)
    async def health() -> Health:
        return Health(status="ok", running=engine.running, waiting=engine.waiting)

    @app.get("/v1/models", response_model=ModelList, responses=ERRORS)
    async def models() -> ModelList:
        return ModelList(data=[card()])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS)
    async def model_card(model_id: str) -> ModelCard:
        if model_id != settings.served_model_name:
            raise APIError(404, f"The model `{model_id}` does not exist.", "model")
        return card()

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={**ERRORS, 200: {"content": {sse.MEDIA_TYPE: {"schema": {"type": "string"}}},
                                   "description": "JSON, or server-sent events when stream is true"}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        nonlocal preparing
        stop = check_request(body, settings)
        if engine.waiting + preparing >= settings.max_queue:
            raise queue_full(settings)
        preparing += 1
        try:
            prompt = await run_in_threadpool(prepare_prompt, processor, body.messages, settings, max_model_len)
        finally:
            preparing -= 1
        room = max_model_len - len(prompt.input_ids)
        requested = body.max_completion_tokens or body.max_tokens
        if requested is not None and requested > room:
            raise APIError(
                400, f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{len(prompt.input_ids) + requested} tokens ({len(prompt.input_ids)} in the messages, images "
                f"included, {requested} in the completion).",
                "max_completion_tokens" if body.max_completion_tokens else "max_tokens",
            )
        params = SamplingParams(
            max_new_tokens=requested or room,
            temperature=body.temperature or 0.0,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stop=stop,
            ignore_eos=body.ignore_eos,
        )
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = GenerationRequest(prompt, params, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), n=body.n)
        try:
            engine.submit(job)
        except QueueFull:
            raise queue_full(settings) from None
        answer_id = f"chatcmpl-{uuid.uuid4().hex}"
        usage_base = len(prompt.input_ids)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = stream_events(job, events, request, answer_id, settings.served_model_name, usage_base,
                                   include_usage)
            return StreamingResponse(stream, media_type=sse.MEDIA_TYPE, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(job, events, request, answer_id, settings.served_model_name, usage_base)

    return app


def queue_full(settings: ServerSettings) -> APIError:
    return APIError(503, f"the server is busy: {settings.max_queue} requests are already waiting; retry shortly",
                    headers={"Retry-After": str(settings.retry_after_s)})


def check_request(body: ChatCompletionRequest, settings: ServerSettings) -> tuple[str, ...]:
    """Refuses what can be refused without reading a message (model name, unsupported features, n, stream
    options); returns the stop strings."""
    if body.model is not None and body.model != settings.served_model_name:
        raise APIError(404, f"The model `{body.model}` does not exist.", "model")
    unsupported = unsupported_fields(body)
    if unsupported:
        raise APIError(400, f"`{unsupported[0]}` is not supported by this server", unsupported[0])
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "Stream options can only be defined when `stream=True`.", "stream_options")
    limit = min(settings.max_n, settings.max_batch_size)
    if body.n > limit:
        raise APIError(400, f"n={body.n} is over this server's limit of {limit} choices per request", "n")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if "" in stop:
        raise APIError(400, "stop strings must not be empty", "stop")
    return stop


def chunk(answer_id: str, model_name: str, choices: list, created: int, usage: dict | None = None,
          include_usage: bool = False) -> bytes:
    payload = {"id": answer_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
               "choices": choices}
    if include_usage:
        payload["usage"] = usage
    return sse.event(payload)


def watch_for_disconnect(request: Request, job: GenerationRequest, events: asyncio.Queue) -> asyncio.Task:
    """A task that cancels `job` and wakes its reader (with None) when the client goes away. The body has been read,
    so the next ASGI message is the disconnect, whenever it comes."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()
        events.put_nowait(None)

    return asyncio.create_task(watch())


async def stream_events(job, events, request, answer_id, model_name, prompt_tokens, include_usage) -> AsyncIterator[bytes]:
    created = int(time.time())
    completion_tokens, open_choices = 0, set(range(job.n))
    watcher = watch_for_disconnect(request, job, events)
    try:
        for index in range(job.n):
            yield chunk(answer_id, model_name, [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}], created, None,
                        include_usage)
        while open_choices:
            found = await events.get()
            if found is None:  # the client went away
                return
            if isinstance(found, Failed):
                yield sse.event(envelope(500, found.message))
                yield sse.DONE
                return
            if isinstance(found, Delta):
                choice = {"index": found.index, "delta": {"content": found.text}, "logprobs": None,
                          "finish_reason": None}
            else:
                open_choices.discard(found.index)
                completion_tokens += found.completion_tokens
                choice = {"index": found.index, "delta": {}, "logprobs": None, "finish_reason": found.reason}
            yield chunk(answer_id, model_name, [choice], created, None, include_usage)
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}
            yield chunk(answer_id, model_name, [], created, usage, True)
        yield sse.DONE
    finally:
        watcher.cancel()
        job.cancel()  # a client that went away mid-stream stops its generation; a no-op once it has finished


async def complete(job, events, request, answer_id, model_name, prompt_tokens) -> JSONResponse:
    texts = [[] for _ in range(job.n)]
    reasons: dict[int, str] = {}
    completion_tokens = 0
    watcher = watch_for_disconnect(request, job, events)
    try:
        while len(reasons) < job.n:
            found = await events.get()
            if found is None:  # nobody is left to read an answer
                return JSONResponse(envelope(400, "client disconnected"), status_code=400)
            if isinstance(found, Failed):
                raise APIError(500, found.message)
            if isinstance(found, Delta):
                texts[found.index].append(found.text)
            elif isinstance(found, Finished):
                reasons[found.index] = found.reason
                completion_tokens += found.completion_tokens
    finally:
        watcher.cancel()
        job.cancel()
    return JSONResponse({
        "id": answer_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": "".join(texts[i])}, "logprobs": None,
             "finish_reason": reasons[i]}
            for i in range(job.n)
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    })


__all__ = ["context_length", "create_app"]
