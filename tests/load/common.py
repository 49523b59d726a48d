"""What the load and soak runs share: a controller process that can be restarted (gracefully or with
SIGKILL), its memory sampled, a census of llama-server processes, and a streaming client that times the
first token. Everything on loopback; every run stops by itself."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from controller.config import validate_config
from tests.support.server import answers, bearer, provision_token, run_sync

STANDIN = "tests.support.standin"
failures: list[str] = []  # targets missed, over all runs


def check(condition: bool, what: str) -> str:
    """Record a missed target; the word to print next to the number."""
    if not condition:
        failures.append(what)
    return "ok" if condition else "MISSED"


def standin_binary(folder: Path, token_interval: float) -> str:
    """A `llama-server` that is the scripted stand-in, pacing its streamed events ``token_interval`` apart."""
    wrapper = folder / "standin-llama-server"
    root = Path(__file__).resolve().parents[2]
    wrapper.write_text(
        f'#!/bin/sh\ncd "{root}"\nSTANDIN_TOKEN_INTERVAL={token_interval} exec "{sys.executable}" -m {STANDIN} "$@"\n'
    )
    wrapper.chmod(0o755)
    return str(wrapper)


@dataclass
class Controller:
    """`llamacontroller serve` for one config, started and stopped as often as a run needs."""

    config: dict[str, Any]
    folder: Path
    token: str = ""
    process: subprocess.Popen[bytes] | None = None
    peak_rss: int = 0  # of the largest of serve's processes
    peak_total_rss: int = 0  # of all of them together
    _sampler: threading.Thread | None = None
    _stop_sampling: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config_path = self.folder / "serve.yaml"
        self.config_path.write_text(yaml.safe_dump(self.config))
        self.token = run_sync(provision_token(validate_config(self.config)))
        self.url = f"http://{self.config['server']['listen']}"
        self.headers = bearer(self.token)

    def start(self) -> None:
        log = (self.folder / "serve.log").open("ab")
        command = [sys.executable, "-m", "llamacontroller", "serve", "--config", str(self.config_path)]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        if not answers(f"{self.url}/readyz", self.process, 60):
            raise RuntimeError(f"serve did not start: see {self.folder / 'serve.log'}")
        self._stop_sampling.clear()
        self._sampler = threading.Thread(target=self._sample, args=(self.process.pid,), daemon=True)
        self._sampler.start()

    def processes(self) -> list[psutil.Process]:
        """`serve` and its controller and gateway processes (not the backends, nor Caddy)."""
        assert self.process is not None
        top = psutil.Process(self.process.pid)
        found = [top]
        for child in top.children(recursive=True):
            try:
                if "llamacontroller" in child.cmdline():
                    found.append(child)
            except psutil.Error:
                continue
        return found

    def cpu_seconds(self) -> float:
        """CPU time `serve`'s own processes have used so far (user + system): the controller and the gateways."""
        total = 0.0
        for process in self.processes():
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
        return total

    def _sample(self, pid: int) -> None:
        """The largest process's peak (the bound is per process: the controller, a gateway) and all of them."""
        while not self._stop_sampling.wait(0.1):
            sizes = []
            for process in self.processes():
                try:
                    sizes.append(process.memory_info().rss)
                except psutil.Error:
                    continue
            if self.process is None or self.process.poll() is not None:
                return  # it ended
            self.peak_rss = max(self.peak_rss, max(sizes, default=0))
            self.peak_total_rss = max(self.peak_total_rss, sum(sizes))

    def stop(self, kill: bool = False) -> None:
        process = self.process
        if process is None:
            return
        self._stop_sampling.set()
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        self.process = None


def backends(model_files: Iterable[str]) -> dict[str, list[int]]:
    """The running backend processes (llama-server or its stand-in) of each model file, by pid."""
    wanted = set(model_files)
    found: dict[str, list[int]] = {path: [] for path in wanted}
    for process in psutil.process_iter(["pid", "cmdline"]):
        command = process.info["cmdline"] or []
        for index, argument in enumerate(command[:-1]):
            if argument in ("-m", "--model") and command[index + 1] in wanted:
                found[command[index + 1]].append(process.info["pid"])
    return found


def stop_backends(model_files: Iterable[str]) -> int:
    """Stop what a failed run left behind (by pid, these models only); the count is reported as orphans."""
    pids = [pid for pids in backends(model_files).values() for pid in pids]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


@dataclass
class StreamResult:
    ok: bool
    status: int
    tokens: int
    first_token: float | None  # seconds from sending to the first content
    seconds: float
    error: str = ""


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any], ollama: bool) -> StreamResult:
    """One streamed chat, OpenAI (SSE) or Ollama (NDJSON); counts content pieces as tokens."""
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                return StreamResult(False, response.status_code, 0, None, time.perf_counter() - started, text[:200])
            async for line in response.aiter_lines():
                payload = line if ollama else line.removeprefix("data: ")
                if not payload.startswith("{"):
                    continue
                event = json.loads(payload)
                if "error" in event:
                    return StreamResult(False, 200, tokens, first, time.perf_counter() - started, str(event["error"]))
                content = event["message"]["content"] if ollama else _delta(event)
                if content:
                    tokens += 1
                    first = first if first is not None else time.perf_counter() - started
        return StreamResult(True, 200, tokens, first, time.perf_counter() - started)
    except httpx.HTTPError as exc:
        return StreamResult(False, 0, tokens, first, time.perf_counter() - started, repr(exc))


def _delta(event: dict[str, Any]) -> str:
    choices = event.get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


async def many(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], ollama: bool, count: int
) -> tuple[list[StreamResult], float]:
    """``count`` streams at once; their results and the wall time of the whole batch."""
    started = time.perf_counter()
    results = await asyncio.gather(*(stream_chat(client, url, body, ollama) for _ in range(count)))
    return list(results), time.perf_counter() - started
