"""A scripted llama-server stand-in for the HTTP test tier (like llama-swap's simple-responder).

It speaks the parts of llama-server's HTTP API the gateway relays or translates — health, chat (SSE and
plain), raw completion, embeddings, tokenize, responses, messages, rerank — with deterministic answers,
and records every request (target, headers, JSON body), so the relaying and the Ollama translation are
tested in seconds without the llama-server build. Behaviour that needs a real model (text quality,
templates, real limits) is proven against the real llama-server in tests/integration.

Scripted limits mimic llama-server's refusals: a chat prompt longer than ``context_chars`` characters is a
400 ``exceed_context_size_error`` (one "token" per character), and an embedding input longer than
``batch_tokens`` is llama-server's "too large to process" 500.

In process: ``async with StandIn() as standin: ... standin.url``. As a process (for the process runtime):
``python -m tests.support.standin --host H --port P``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

# Seconds between streamed events; a load test paces its stand-ins like a model generating tokens.
TOKEN_INTERVAL = float(os.environ.get("STANDIN_TOKEN_INTERVAL", "0.001"))


@dataclass
class Recorded:
    method: str
    target: str
    headers: dict[str, str]
    body: Any


@dataclass
class StandIn:
    context_chars: int = 4096
    batch_tokens: int = 64
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Recorded] = field(default_factory=list)
    model_path: str = "/srv/private/models/tiny.gguf"
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def last(self, target_prefix: str) -> Recorded:
        return next(r for r in reversed(self.requests) if r.target.startswith(target_prefix))

    async def __aenter__(self) -> StandIn:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 2)

    # ------------------------------------------------------------------ HTTP

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                raw = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw.decode("latin-1")
                self.requests.append(Recorded(method, target, headers, body))
                if not await self._answer(writer, method, target, body):
                    return  # streamed: llama-server closes the connection after a stream
        finally:
            writer.close()

    @staticmethod
    async def _json(writer: asyncio.StreamWriter, status: int, value: Any) -> bool:
        data = json.dumps(value).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            f"Keep-Alive: timeout=5, max=100\r\n\r\n".encode()
            + data
        )
        await writer.drain()
        return True

    @staticmethod
    async def _sse(writer: asyncio.StreamWriter, events: list[Any]) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for event in [*(json.dumps(e) for e in events), "[DONE]"]:
            data = f"data: {event}\n\n".encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            await writer.drain()
            await asyncio.sleep(TOKEN_INTERVAL)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        return False

    async def _answer(self, writer: asyncio.StreamWriter, method: str, target: str, body: Any) -> bool:
        path = target.split("?", 1)[0]
        if path == "/health":
            return await self._json(writer, 200, {"status": "ok"})
        if path == "/v1/chat/completions" and isinstance(body, dict):
            return await self._chat(writer, body)
        if path == "/v1/embeddings" and isinstance(body, dict):
            return await self._embeddings(writer, body)
        if path == "/tokenize" and isinstance(body, dict):
            return await self._json(writer, 200, {"tokens": [ord(c) for c in str(body.get("content", ""))]})
        if path == "/completion" and isinstance(body, dict):
            text = f"raw:{body.get('prompt', '')}"
            final = {"content": text, "stop": True, "stop_type": "eos", "tokens_predicted": 1, "timings": {}}
            if body.get("stream"):
                return await self._sse(writer, [{"content": text, "stop": False}, {**final, "content": ""}])
            return await self._json(writer, 200, final)
        if path in ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/v1/rerank", "/v1/reranking"):
            return await self._json(writer, 200, {"served_by": "standin", "path": path, "model": body.get("model")})
        if path == "/props":  # llama-server says where its model file lies
            props = {"model_path": self.model_path, "total_slots": 1, "default_generation_settings": {"n_ctx": 64}}
            return await self._json(writer, 200, props)
        if path == "/metrics":
            text = b"# TYPE llamacpp:requests_processing gauge\nllamacpp:requests_processing 0\n"
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n" % len(text) + text
            )
            await writer.drain()
            return True
        if path.startswith("/echo"):
            return await self._json(writer, 200, {"method": method, "target": target, "body": body})
        return await self._json(
            writer, 404, {"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}
        )

    async def _chat(self, writer: asyncio.StreamWriter, body: dict[str, Any]) -> bool:
        messages = body.get("messages") or []
        prompt = sum(len(str(m.get("content", ""))) for m in messages)
        if prompt > self.context_chars:
            message = (
                f"request ({prompt} tokens) exceeds the available context size ({self.context_chars} tokens), "
                "try increasing it"
            )
            error = {"code": 400, "message": message, "type": "exceed_context_size_error",
                     "n_prompt_tokens": prompt, "n_ctx": self.context_chars}  # fmt: skip
            return await self._json(writer, 400, {"error": error})
        last = str(messages[-1].get("content", "")) if messages else ""
        words = ["echo:", *last.split()][: int(body.get("max_tokens") or 64)]
        usage = {"prompt_tokens": prompt, "completion_tokens": len(words), "total_tokens": prompt + len(words)}
        timings = {"prompt_n": prompt, "prompt_ms": 1.0, "predicted_n": len(words), "predicted_ms": 2.0}
        created = int(time.time())
        if not body.get("stream"):
            message = {"role": "assistant", "content": " ".join(words)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return await self._json(
                writer,
                200,
                {
                    "object": "chat.completion",
                    "created": created,
                    "choices": [choice],
                    "usage": usage,
                    "timings": timings,
                },
            )
        events: list[Any] = []
        for index, word in enumerate(words):
            delta = {"content": (" " if index else "") + word}
            events.append(
                {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            )
        finish = {"index": 0, "delta": {}, "finish_reason": "stop"}
        events.append({"object": "chat.completion.chunk", "choices": [finish], "usage": usage, "timings": timings})
        return await self._sse(writer, events)

    async def _embeddings(self, writer: asyncio.StreamWriter, body: dict[str, Any]) -> bool:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        lengths = [len(item) for item in items]  # characters of a string, or ids of a token list
        longest = max(lengths, default=0)
        if longest > self.batch_tokens:
            message = (
                f"input ({longest} tokens) is too large to process. increase the physical batch size "
                f"(current batch size: {self.batch_tokens})"
            )
            return await self._json(writer, 500, {"error": {"code": 500, "message": message, "type": "server_error"}})
        data = [{"index": i, "embedding": [float(n), 1.0, 2.0], "object": "embedding"} for i, n in enumerate(lengths)]
        usage = {"prompt_tokens": sum(lengths), "total_tokens": sum(lengths)}
        return await self._json(writer, 200, {"object": "list", "data": data, "usage": usage})


async def _serve(host: str, port: int) -> None:
    async with StandIn(host=host, port=port):
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="a scripted llama-server stand-in")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args, _ = parser.parse_known_args()
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
