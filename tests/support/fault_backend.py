"""A scripted stand-in for llama-server, for fault injection only: it dies in the middle of a stream.

Started by the real process runtime in place of llama-server (``llama_server.binary`` points at a wrapper),
so everything around it is real: lifecycle, crash detection, gateway, streaming. It answers ``/health``
and streams a few chat chunks, then exits abruptly, as a backend killed by the OOM killer would.
With ``FAULT_BACKEND_SIGNAL=ILL`` (or another signal name) it kills itself with that signal while
"loading", as a llama-server built for CPU features the machine lacks does.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys


def chunk(content: str) -> bytes:
    event = {
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
        "object": "chat.completion.chunk",
    }
    data = f"data: {json.dumps(event)}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line = head.split(b"\r\n", 1)[0].decode()
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if length:
            await reader.readexactly(length)
        if " /health " in request_line:
            body = b'{"status":"ok"}'
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
            continue
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for word in ("one", " two", " three"):
            writer.write(chunk(word))
            await writer.drain()
            await asyncio.sleep(0.05)
        os._exit(137)  # dies mid-stream, without closing anything properly


async def main() -> None:
    args = sys.argv[1:]
    if "--help" in args or "--version" in args:
        print("fault backend: --host HOST --port PORT")
        return
    die_with = os.environ.get("FAULT_BACKEND_SIGNAL")
    if die_with:
        print("load_tensors: loading model tensors", flush=True)
        signal.signal(getattr(signal, f"SIG{die_with}"), signal.SIG_DFL)
        os.kill(os.getpid(), getattr(signal, f"SIG{die_with}"))
    host = args[args.index("--host") + 1]
    port = int(args[args.index("--port") + 1])
    server = await asyncio.start_server(handle, host, port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
