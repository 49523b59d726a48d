"""Gateway CPU per streamed chunk: the controller process's CPU time (user + system, from the kernel) while it
relays streams from a stand-in backend that sends events as fast as it can, divided by the events relayed.

The standing target is 15 µs per chunk. The stand-in (tests/support/standin.py) is used because the number is
the gateway's own cost, not the model's: a real llama-server would only spread the same chunks over more time.
Interleaved rounds, OpenAI passthrough (SSE relayed) and Ollama translation (SSE → NDJSON), the median printed;
once with events sent as fast as possible and once paced 2 ms apart.
``make bench`` runs it; ``python -m tests.bench.bench_chunk_cpu [--streams 4] [--chunks 2000] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from controller.runtime.process import free_port
from tests.load.common import Controller, standin_binary
from tests.support.tinymodel import write_tiny_model

TARGET_US = 15.0


async def relay(url: str, headers: dict[str, str], body: dict[str, Any], streams: int) -> float:
    """``streams`` concurrent streams read to the end (bytes discarded); the wall time."""

    async def one(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", url, json=body) as response:
            response.raise_for_status()
            async for _ in response.aiter_raw():
                pass

    started = time.perf_counter()
    async with httpx.AsyncClient(headers=headers, timeout=120) as client:
        await asyncio.gather(*(one(client) for _ in range(streams)))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=2000, help="events per stream (at most 2048)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    # As fast as the stand-in can: several events arrive per read and go out per write. Paced (2 ms apart, like
    # a model generating): one event per read and per write, the costlier case per chunk.
    for interval in (0.0, 0.002):
        with tempfile.TemporaryDirectory(prefix="bench-chunk-") as folder:
            root = Path(folder)
            tiny = write_tiny_model(root / "tiny.gguf")
            config = {
                "server": {"data_dir": str(root / "data"), "listen": f"127.0.0.1:{free_port()}"},
                "edge": {"enabled": False},
                "models_dir": str(root / "none"),
                "llama_server": {"binary": standin_binary(root, token_interval=interval)},
                "models": {"fast": {"path": str(tiny), "max_concurrent": args.streams}},
            }
            controller = Controller(config, root / "serve")
            controller.start()
            try:
                pace = "as fast as possible" if not interval else f"events {interval * 1e3:.0f} ms apart"
                print(f"\n{pace}: {args.streams} streams x {args.chunks} chunks, median of {args.rounds} rounds")
                measure(controller, args.streams, args.chunks, args.rounds)
            finally:
                controller.stop()


def measure(controller: Controller, streams: int, chunks: int, rounds: int) -> None:
    # The stand-in answers "echo:" and then each word; it refuses prompts over 4096 characters like a small context.
    text = " ".join(["w"] * (chunks - 1))
    chat = [{"role": "user", "content": text}]
    paths = {
        "OpenAI /v1/chat/completions (relayed)": (
            "/v1/chat/completions",
            {"model": "fast", "messages": chat, "max_tokens": chunks, "stream": True},
        ),
        "Ollama /api/chat (translated)": (
            "/api/chat",
            {"model": "fast", "messages": chat, "stream": True, "options": {"num_predict": chunks}},
        ),
    }
    relay_once = lambda path, body: asyncio.run(  # noqa: E731
        relay(controller.url + path, controller.headers, body, streams)
    )
    for path, body in paths.values():  # warm-up: the load, the pools, the caches
        relay_once(path, body)
    results: dict[str, list[tuple[float, float]]] = {label: [] for label in paths}
    for _ in range(rounds):
        for label, (path, body) in paths.items():
            before = controller.cpu_seconds()
            seconds = relay_once(path, body)
            used = controller.cpu_seconds() - before
            results[label].append((used / (streams * chunks) * 1e6, streams * chunks / seconds))
    print(f"{'path':<40}{'µs/chunk':>10}{'range':>16}{'chunks/s':>10}  target {TARGET_US:.0f} µs")
    for label, values in results.items():
        per_chunk = [v[0] for v in values]
        rate = statistics.median(v[1] for v in values)
        spread = f"{min(per_chunk):.1f}-{max(per_chunk):.1f}"
        verdict = "ok" if statistics.median(per_chunk) <= TARGET_US else "over"
        print(f"{label:<40}{statistics.median(per_chunk):>10.1f}{spread:>16}{rate:>10.0f}  {verdict}")


if __name__ == "__main__":
    main()
