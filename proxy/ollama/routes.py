"""The Ollama endpoints, in raw ASGI: read → validate → lease → relay upstream SSE as NDJSON."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from common import notes
from common.asgi import Receive, Scope, Send, header, read_body, run_until_disconnect, send_json
from common.background import Background
from common.directory import Lease, ModelDirectory, ModelInfo
from common.errors import BadRequest, UpstreamError, UpstreamRefused
from common.jsonbody import parse_json_object
from common.upstream import Upstream
from proxy.forward import passed_headers
from proxy.limits import clamp_predict
from proxy.ollama import info as render
from proxy.ollama.convert import chat_body, generate_chat_body, native_body, openai_messages
from proxy.ollama.embeddings import embed, normalise
from proxy.ollama.fit import context_overflow, shorten_history
from proxy.ollama.requests import (
    ChatRequest,
    Common,
    EmbedRequest,
    GenerateRequest,
    parse_chat,
    parse_embed,
    parse_embeddings,
    parse_generate,
    parse_show,
)
from proxy.ollama.stream import Accumulator, SSEParser, load_chunk
from proxy.ollama.wire import encode, json_or_error, upstream_error_message
from proxy.restricted import Restricted

OLLAMA_VERSION = "0.33.0"  # the Ollama API version whose wire format this gateway follows
NDJSON = b"application/x-ndjson"
_UNLOAD_WAIT = 10.0
_RUNNER_STOPPED = (
    "the model's backend stopped unexpectedly (it may have crashed or run out of memory); "
    "see GET /control/v1/models/{name}/logs"
)
MANAGEMENT_REFUSAL = (
    "{path} is not available here: LlamaController serves the GGUF files listed in its config and found in "
    "its models_dir, and never downloads, copies or deletes models through the API. Add a model by putting "
    "its .gguf file in models_dir (see docs/configuration.md)."
)


def _nanoseconds(seconds: float) -> int:
    return max(int(seconds * 1e9), 0)


async def _send_line(send: Send, value: Any) -> None:
    await send({"type": "http.response.body", "body": encode(value) + b"\n", "more_body": True})


def _require(info: ModelInfo, capability: str, message: str) -> None:
    if capability not in info.capabilities:
        raise BadRequest(message)


def _needs_capabilities(request: Common) -> bool:
    """Whether the request uses anything a model may lack (most do not: skip the lookup then)."""
    if request.think not in (None, False):
        return True
    if isinstance(request, ChatRequest):
        return bool(request.tools) or any(message.images for message in request.messages)
    return isinstance(request, GenerateRequest) and bool(request.images or request.suffix)


UnsupportedTools = Literal["ignore", "reject"]
# Said on an answer whose request's tools were dropped (gateway.unsupported_tools: ignore).
TOOLS_IGNORED_HEADER = (b"x-llamacontroller-ignored", b"tools")
_TOOL_KEYS = ("tools", "tool_choice", "parallel_tool_calls")


def _unsupported_tools(request: Common, info: ModelInfo) -> ChatRequest | None:
    """The chat whose tools its model cannot use, if this is one."""
    if isinstance(request, ChatRequest) and request.tools and "tools" not in info.capabilities:
        return request
    return None


def _check_capabilities(request: Common, info: ModelInfo, name: str) -> None:
    if isinstance(request, ChatRequest):
        if request.tools:
            _require(info, "tools", f"{name} does not support tools")
        if any(message.images for message in request.messages):
            _require(info, "vision", f'"{name}" does not support image input')
    if isinstance(request, GenerateRequest):
        if request.images:
            _require(info, "vision", f'"{name}" does not support image input')
        if request.suffix:
            _require(info, "insert", f'"{name}" does not support insert')
        if request.raw and request.images:
            raise BadRequest("raw mode does not support images")
    if request.think is not None and request.think is not False:
        _require(info, "thinking", f'"{name}" does not support thinking')


def _check_shift(request: Common, info: ModelInfo) -> None:
    """``shift`` is a load-time flag of llama-server (--context-shift): a request can only ask for what runs."""
    if request.shift is None or request.shift == info.context_shift:
        return
    if request.shift:
        raise BadRequest(
            f"shift: true is not available for {request.model}: its backend stops at the context length "
            '(done_reason "length"); raise options.num_ctx, or add --context-shift to the model\'s args in the config'
        )
    raise BadRequest(f"shift: false is not available for {request.model}: its backend runs with --context-shift")


class OllamaRoutes:
    def __init__(
        self,
        directory: ModelDirectory,
        upstream: Upstream,
        max_body: int,
        unsupported_tools: UnsupportedTools = "ignore",
    ) -> None:
        """``unsupported_tools``: ``ignore`` drops the tools of a chat whose model has no tool support (chat front
        ends such as Open WebUI send theirs with every request) and says so in a header; ``reject`` answers
        Ollama's 400."""
        self._directory = directory
        self._upstream = upstream
        self._max_body = max_body
        self._ignore_tools = unsupported_tools == "ignore"
        self._background = Background()

    async def close(self) -> None:
        self._background.cancel()
        await self._background.drain()

    async def _json(self, scope: Scope, receive: Receive) -> dict[str, Any]:
        body = parse_json_object(await read_body(scope, receive, self._max_body))
        notes.note_asked(body.get("model") or body.get("name"))  # named in the log line even if it fails
        return body

    # ------------------------------------------------------------------ simple endpoints

    async def root(self, scope: Scope, receive: Receive, send: Send) -> None:
        accept = (header(scope, b"accept") or b"").decode("latin-1")
        if "text/html" in accept and scope["method"] == "GET":
            await send(
                {
                    "type": "http.response.start",
                    "status": 302,
                    "headers": [(b"location", b"/ui/"), (b"content-length", b"0")],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        body = b"Ollama is running"
        headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def version(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, {"version": OLLAMA_VERSION})

    async def tags(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, render.tags(await self._for(scope).models()))

    async def ps(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_json(send, 200, render.ps(await self._for(scope).models()))

    async def show(self, scope: Scope, receive: Receive, send: Send) -> str:
        request = parse_show(await self._json(scope, receive))
        await send_json(send, 200, render.show(await self._for(scope).model(request.model)))
        return request.model

    async def management(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        shown = "/api/blobs" if path.startswith("/api/blobs") else path
        await send_json(send, 403, {"error": MANAGEMENT_REFUSAL.format(path=shown)})

    # ------------------------------------------------------------------ load / unload

    def _for(self, scope: Scope) -> Restricted:
        """The directory limited to the models this caller's credentials allow."""
        return Restricted.for_scope(self._directory, scope)

    async def _unload(self, directory: Restricted, name: str) -> None:
        """keep_alive 0 with nothing to do: unload, waiting a little for in-flight requests to finish.

        The unload is an intent that outlives this request (a long stream may still be draining), so it
        runs as tracked background work; the answer says "unload" once the wait is over."""
        await directory.model(name)  # unknown or forbidden names fail here, in the client's dialect
        done = asyncio.Event()

        async def unload() -> None:
            try:
                await directory.unload(name)
            finally:
                done.set()

        self._background.spawn(unload(), f"unload:{name}")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_UNLOAD_WAIT):
                await done.wait()

    async def _load_only(
        self, directory: Restricted, send: Send, request: Common, kind: Literal["chat", "generate"]
    ) -> None:
        """An empty prompt or message list: load (or with keep_alive 0, unload) and say so."""
        if request.keep_alive == 0:
            await self._unload(directory, request.model)
            reply = load_chunk(request.model, kind, "unload")
        else:
            async with directory.lease(request.model, keep_alive=request.keep_alive, ctx_size=request.options.num_ctx):
                reply = load_chunk(request.model, kind, "load")
        await self._reply(send, request.stream, reply)

    @staticmethod
    async def _reply(send: Send, stream: bool, value: dict[str, Any]) -> None:
        if stream:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", NDJSON)]})
            await send({"type": "http.response.body", "body": encode(value) + b"\n"})
        else:
            await send_json(send, 200, value)

    # ------------------------------------------------------------------ generation

    async def chat(self, scope: Scope, receive: Receive, send: Send) -> str:
        started = time.perf_counter()
        request = parse_chat(await self._json(scope, receive))
        await self._generate(scope, receive, send, request, "chat", "/v1/chat/completions", chat_body(request), started)
        return request.model

    async def generate(self, scope: Scope, receive: Receive, send: Send) -> str:
        started = time.perf_counter()
        request = parse_generate(await self._json(scope, receive))
        if request.raw or request.suffix:
            path, body = native_body(request)
        else:
            path, body = "/v1/chat/completions", generate_chat_body(request)
        await self._generate(scope, receive, send, request, "generate", path, body, started)
        return request.model

    async def _generate(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: Common,
        kind: Literal["chat", "generate"],
        path: str,
        body: dict[str, Any],
        started: float,
    ) -> None:
        if isinstance(request, ChatRequest):
            empty = not request.messages
        else:
            empty = isinstance(request, GenerateRequest) and not (request.prompt or request.suffix)
        directory = self._for(scope)
        if empty:
            await run_until_disconnect(receive, self._load_only(directory, send, request, kind))
            return
        reply_headers: tuple[tuple[bytes, bytes], ...] = ()
        if _needs_capabilities(request) or request.shift is not None:
            info = await directory.model(request.model)
            if self._ignore_tools and (chat := _unsupported_tools(request, info)) is not None:
                request = replace(chat, tools=())
                body = {key: value for key, value in body.items() if key not in _TOOL_KEYS}
                reply_headers = (TOOLS_IGNORED_HEADER,)
            _check_capabilities(request, info, request.model)
            _check_shift(request, info)
        accumulator = Accumulator(model=request.model, kind=kind, streaming=request.stream)
        call = _Call(path, body, passed_headers(scope), _shrinker(request), reply_headers)

        async def work() -> None:
            options = request.options
            async with directory.lease(
                request.model, keep_alive=request.keep_alive, ctx_size=options.num_ctx, num_predict=options.num_predict
            ) as lease:
                await self._relay(send, lease, call, accumulator, started)

        await run_until_disconnect(receive, work())

    @staticmethod
    def _shorter(call: _Call, body: dict[str, Any], status: int, error: bytes) -> dict[str, Any]:
        """The body again, shorter, after llama-server refused it as longer than the context (Ollama's
        truncate); any other refusal, or one that cannot be shortened, is raised in the client's words."""
        overflow = context_overflow(status, error)
        if overflow is None:
            raise UpstreamRefused(status, upstream_error_message(error))
        shorter = call.shrink(body, *overflow) if call.shrink is not None else None
        if shorter is None:
            prompt, context = overflow
            raise BadRequest(
                f"the prompt ({prompt} tokens) is longer than the context length ({context} tokens): "
                "raise options.num_ctx"
            )
        return shorter

    async def _relay(self, send: Send, lease: Lease, call: _Call, accumulator: Accumulator, started: float) -> None:
        """Relay the backend's answer through the accumulator; errors after the first byte become a last line.

        A ``stream: false`` request asks the backend for one JSON answer, not SSE: llama-server closes the
        connection after every stream, while a plain answer keeps it alive for the next request.
        """
        streaming = accumulator.streaming
        began = False
        parser = SSEParser()
        body = clamp_predict(call.body, lease.max_predict) or call.body
        try:
            while True:
                payload = encode({**body, "stream": streaming})
                notes.note_backend_contact()
                headers = {**call.headers, **lease.credentials}
                async with self._upstream.request("POST", lease.url + call.path, payload, headers) as response:
                    if response.status >= 400:
                        body = self._shorter(call, body, response.status, await response.read())
                        continue  # sent again, shorter
                    if not streaming:
                        accumulator.feed(json_or_error(await response.read()))
                        break
                    start = [(b"content-type", NDJSON), *call.reply_headers]
                    await send({"type": "http.response.start", "status": 200, "headers": start})
                    began = True
                    async for chunk in response.iter_chunks():
                        for event in parser.feed(chunk):
                            for out in accumulator.feed(event):
                                await _send_line(send, out)
                    for event in parser.close():
                        for out in accumulator.feed(event):
                            await _send_line(send, out)
                break
        except UpstreamError as exc:
            if not began:
                raise
            accumulator.error = exc.message
        if accumulator.error is None and not accumulator.finished:
            accumulator.error = _RUNNER_STOPPED.format(name=lease.model)
        if accumulator.error is not None:
            if not began:
                raise UpstreamRefused(500, accumulator.error)
            await send({"type": "http.response.body", "body": encode({"error": accumulator.error}) + b"\n"})
            return
        final = accumulator.final(_nanoseconds(lease.load_duration), _nanoseconds(time.perf_counter() - started))
        if streaming:
            await send({"type": "http.response.body", "body": encode(final) + b"\n"})
        else:
            await send_json(send, 200, final, call.reply_headers)

    # ------------------------------------------------------------------ embeddings

    async def embed(self, scope: Scope, receive: Receive, send: Send) -> str:
        started = time.perf_counter()
        request = parse_embed(await self._json(scope, receive))
        result = await self._embeddings(scope, request, started)
        vectors = [normalise(v, request.dimensions) for v in result["vectors"]]
        reply: dict[str, Any] = {"model": request.model, "embeddings": vectors}
        if vectors:
            reply.update({key: result[key] for key in ("total_duration", "load_duration", "prompt_eval_count")})
        await send_json(send, 200, reply)
        return request.model

    async def embeddings(self, scope: Scope, receive: Receive, send: Send) -> str:
        """Legacy shape ``{"embedding": [...]}``, not re-normalised (llama-server's own L2 output)."""
        request = parse_embeddings(await self._json(scope, receive))
        result = await self._embeddings(scope, request, time.perf_counter())
        await send_json(send, 200, {"embedding": result["vectors"][0] if result["vectors"] else []})
        return request.model

    async def _embeddings(self, scope: Scope, request: EmbedRequest, started: float) -> dict[str, Any]:
        directory = self._for(scope)
        if not request.inputs and request.keep_alive == 0:
            await self._unload(directory, request.model)
            return {"vectors": []}
        async with directory.lease(request.model, keep_alive=request.keep_alive, embeddings=True) as lease:
            if not request.inputs:
                return {"vectors": []}
            headers = {**passed_headers(scope), **lease.credentials}
            result = await embed(self._upstream, lease.url, request.inputs, request.truncate, headers)
        return {
            "vectors": result.vectors,
            "total_duration": _nanoseconds(time.perf_counter() - started),
            "load_duration": _nanoseconds(lease.load_duration),
            "prompt_eval_count": result.prompt_tokens,
        }


@dataclass(frozen=True)
class _Call:
    """One generation request to a backend: where, what, with which headers, and how to shorten it."""

    path: str
    body: dict[str, Any]
    extra: dict[str, str]
    shrink: Shrink | None
    reply_headers: tuple[tuple[bytes, bytes], ...] = ()  # added to the client's answer

    @property
    def headers(self) -> dict[str, str]:
        return {"Content-Type": "application/json", **self.extra}


Shrink = Callable[[dict[str, Any], int, int], "dict[str, Any] | None"]


def _shrinker(request: Common) -> Shrink | None:
    """Ollama's truncate (on unless false) for chat: drop old turns until the prompt fits."""
    if not isinstance(request, ChatRequest) or request.truncate is False:
        return None
    messages = request.messages

    def shrink(body: dict[str, Any], prompt_tokens: int, context: int) -> dict[str, Any] | None:
        nonlocal messages
        shorter = shorten_history(messages, prompt_tokens, context)
        if shorter is None:
            return None
        messages = shorter
        return {**body, "messages": openai_messages(shorter)}

    return shrink
