"""Load and soak runs, bounded and on loopback: `make load` (all) or
``python -m tests.load.load stream|switch|restart|restart-docker|store [--quick]``. Each prints a table and checks its
targets; the exit status is 1 when one was missed.

- stream: 500 concurrent streams, direct to the backend and through the gateway (OpenAI and Ollama),
  against a paced scripted backend and against the tiny real model; a queue past its depth (503s).
- switch: 4 clients each wanting a different model with max_loaded_models 1, for 2 minutes; then a switch
  while another model serves steady traffic, which must complete within twice (unload + load).
- restart: 20 controller restarts (half SIGKILL) while clients keep sending; restart-docker: the same 20 with the
  docker runtime (needs a Docker Engine; builds the llama-server image if missing).
- store: 1,000 token verifications a second against SQLite and Redis, revocations mixed in.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from common.names import canonical
from controller.runtime.containers import INSTANCE, MANAGED, MODEL
from controller.runtime.process import free_port
from tests.load.common import (
    Controller,
    StreamResult,
    backends,
    check,
    failures,
    many,
    median,
    percentile,
    standin_binary,
    stop_backends,
)
from tests.load.store import store_run
from tests.support.server import backend_headers
from tests.support.tinymodel import write_tiny_model

RSS_LIMIT = 200 * 2**20
SLOWEST = [0.0]  # the longest any one answer took, over a run
ROUNDS = 3


WORKERS: int | str = "auto"  # gateway.workers of every run (--workers)


def base_config(root: Path, models: dict[str, dict[str, Any]], **sections: Any) -> dict[str, Any]:
    return {
        "server": {"data_dir": str(root / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "edge": {"enabled": False},
        "models_dir": str(root / "none"),
        "defaults": {"keep_alive": "30m"},
        "gateway": {"workers": WORKERS},
        "models": models,
        **sections,
    }


async def stream_rows(controller: Controller, model: str, count: int, words: int) -> None:
    backend = httpx.post(f"{controller.url}/control/v1/models/{model}/load", headers=controller.headers, timeout=120)
    direct_url = backend.json()["backend_url"]
    # Straight to the backend with its own key (a real llama-server refuses any other), through the gateway with
    # the client's token.
    direct_headers = backend_headers(controller.config["server"]["data_dir"], canonical(backend.json()["name"]))
    text = " ".join(f"w{i}" for i in range(words))
    openai = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": words, "stream": True}
    ollama = {**openai, "options": {"num_predict": words}}
    # No kept-alive connections in the client: httpcore's pool walks every connection each time a response
    # closes, and with 500 idle kept-alive ones (the gateway keeps connections open; the stand-in closes them)
    # the client itself spent 10 s of CPU per round, and the gateway looked four times slower than it is.
    limits = httpx.Limits(max_connections=count + 50, max_keepalive_connections=0)
    paths = (
        ("direct", f"{direct_url}/v1/chat/completions", openai, False, direct_headers),
        ("gateway /v1 (SSE)", f"{controller.url}/v1/chat/completions", openai, False, controller.headers),
        ("gateway /api/chat (NDJSON)", f"{controller.url}/api/chat", ollama, True, controller.headers),
    )
    rounds: dict[str, list[tuple[list[StreamResult], float]]] = {label: [] for label, *_ in paths}
    cpu: dict[str, list[float]] = {label: [] for label, *_ in paths}  # the controller's CPU seconds per token
    for _ in range(ROUNDS):  # interleaved, the median round counts: one noisy moment does not decide
        for label, url, body, is_ollama, headers in paths:
            # A new client each time, so no round inherits another's connections.
            async with httpx.AsyncClient(limits=limits, timeout=600, headers=headers) as client:
                cpu_before = controller.cpu_seconds()
                results, seconds = await many(client, url, body, is_ollama, count)
                tokens = sum(r.tokens for r in results)
                cpu[label].append((controller.cpu_seconds() - cpu_before) / max(tokens, 1))
                rounds[label].append((results, seconds))
    runs = {label: sorted(results, key=lambda r: r[1])[len(results) // 2] for label, results in rounds.items()}
    direct_rate = sum(r.tokens for r in runs["direct"][0]) / runs["direct"][1]
    direct_first = median([r.first_token for r in runs["direct"][0] if r.first_token is not None])
    print(f"\n{model}: {count} concurrent streams of {words} tokens (median of {ROUNDS} interleaved rounds)")
    heads = ("errors", "tokens/s", "ratio", "first p50", "first p99", "added p50", "CPU/token")
    print(f"{'path':<28}{heads[0]:>7}{heads[1]:>10}{heads[2]:>8}" + "".join(f"{h:>14}" for h in heads[3:]))
    for label, (results, seconds) in runs.items():
        errors = sum(not r.ok for r in results)
        rate = sum(r.tokens for r in results) / seconds
        firsts = [r.first_token for r in results if r.first_token is not None]
        first50, first99 = median(firsts), percentile(firsts, 0.99)
        added = (first50 - direct_first) * 1e3
        per_token = median(cpu[label]) * 1e6
        print(
            f"{label:<28}{errors:>7}{rate:>10.0f}{rate / direct_rate:>8.1%}{first50 * 1e3:>12.1f}ms"
            f"{first99 * 1e3:>12.1f}ms{added:>12.1f}ms{per_token:>12.1f}µs"
        )
        check(errors == 0, f"{model} {label}: {errors} errors")
        if label != "direct":
            check(rate >= 0.98 * direct_rate, f"{model} {label}: {rate / direct_rate:.1%} of direct tokens/s")


async def overflow_row(controller: Controller, model: str, count: int, depth: int, slots: int) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "w " * 20}], "stream": False}
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=count + 10), timeout=120) as client:

        async def one() -> tuple[int, float, Any]:
            started = time.perf_counter()
            answer = await client.post(f"{controller.url}/api/chat", json=body, headers=controller.headers)
            return answer.status_code, time.perf_counter() - started, answer.json()

        results = await asyncio.gather(*(one() for _ in range(count)))
    refused = [r for r in results if r[0] == 503]
    answered = [r for r in results if r[0] == 200]
    shaped = all(isinstance(r[2].get("error"), str) and "queue" in r[2]["error"] for r in refused)
    slowest_refusal = max((r[1] for r in refused), default=0.0)
    print(f"\nqueue overflow: {count} requests at once, {slots} slots + queue depth {depth}")
    other = count - len(answered) - len(refused)
    print(f"  answered {len(answered)}, refused 503 {len(refused)} (Ollama shape: {shaped}), other {other}")
    print(f"  slowest refusal {slowest_refusal * 1e3:.0f} ms")
    check(len(answered) == slots + depth and len(refused) == count - slots - depth, "queue overflow counts")
    check(shaped, "queue overflow: 503 bodies in Ollama's shape")


def stream_run(root: Path, quick: bool) -> None:
    count = 100 if quick else 500
    binary = standin_binary(root, token_interval=0.05)
    tiny = write_tiny_model(root / "tiny.gguf")
    models = {
        "paced": {"path": str(tiny), "max_concurrent": count, "queue_depth": count},
        "small": {"path": str(tiny), "max_concurrent": 2, "queue_depth": 20},
    }
    scripted = Controller(
        base_config(root / "scripted", models, llama_server={"binary": binary}, scheduling={"max_loaded_models": 2}),
        root / "scripted",
    )
    scripted.start()
    try:
        asyncio.run(stream_rows(scripted, "paced", count, words=40))
        asyncio.run(overflow_row(scripted, "small", 100, depth=20, slots=2))
    finally:
        scripted.stop()
    real = Controller(
        base_config(root / "real", {"tiny": {"path": str(tiny), "max_concurrent": 8, "ctx_size": 256}}), root / "real"
    )
    real.start()
    try:
        asyncio.run(stream_rows(real, "tiny", count, words=16))
    finally:
        real.stop()
    peak = max(scripted.peak_rss, real.peak_rss)
    total = max(scripted.peak_total_rss, real.peak_total_rss)
    verdict = check(peak <= RSS_LIMIT, "RSS")
    print(
        f"\npeak RSS of the largest of serve's processes {peak / 2**20:.0f} MB (limit {RSS_LIMIT / 2**20:.0f}): "
        f"{verdict}; all of them together {total / 2**20:.0f} MB"
    )


class Census(threading.Thread):
    """Counts backends per model file every 50 ms: the most at once, per model and in all."""

    def __init__(self, files: list[str]) -> None:
        super().__init__(daemon=True)
        self.files = files
        self.most_per_model = 0
        self.most_in_all = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            counts = [len(pids) for pids in backends(self.files).values()]
            self.most_per_model = max(self.most_per_model, *counts)
            self.most_in_all = max(self.most_in_all, sum(counts))


async def keep_asking(
    url: str, headers: dict[str, str], model: str, going: Callable[[], bool], outcomes: dict[str, int]
) -> None:
    """Send one chat after another until ``going()`` says stop; count how each one ended."""
    chat = [{"role": "user", "content": "hi"}]
    body = {"model": model, "messages": chat, "stream": False, "options": {"num_predict": 2}}
    async with httpx.AsyncClient(timeout=120) as client:
        while going():
            started = time.monotonic()
            try:
                answer = await client.post(f"{url}/api/chat", json=body, headers=headers)
                key = "answered" if answer.status_code == 200 else f"error {answer.status_code}"
                SLOWEST[0] = max(SLOWEST[0], time.monotonic() - started)
            except httpx.TimeoutException:
                key = "hung (no answer in 120 s)"
            except httpx.TransportError:
                key = "connection refused or reset"
                await asyncio.sleep(0.05)
            outcomes[key] = outcomes.get(key, 0) + 1


def models_of(root: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    tiny = write_tiny_model(root / "tiny.gguf")
    models = {}
    for name in names:
        target = root / f"{name}.gguf"
        shutil.copy(tiny, target)
        models[name] = {"path": str(target), "ctx_size": 256}
    return models


def switch_run(root: Path, quick: bool) -> None:
    seconds = 20 if quick else 120
    names = ["m1", "m2", "m3", "m4"]
    models = models_of(root, names)
    files = [m["path"] for m in models.values()]
    SLOWEST[0] = 0.0
    controller = Controller(base_config(root, models, scheduling={"max_loaded_models": 1}), root / "switch")
    controller.start()
    census = Census(files)
    census.start()
    outcomes: dict[str, int] = {}
    until = time.monotonic() + seconds

    def going() -> bool:
        return time.monotonic() < until

    async def clients() -> None:
        await asyncio.gather(*(keep_asking(controller.url, controller.headers, n, going, outcomes) for n in names))

    try:
        asyncio.run(clients())
    finally:
        census.stopped.set()
        controller.stop()
    time.sleep(1)
    left = stop_backends(files)
    print(f"\nswitch storm: 4 clients, 4 models, max_loaded_models 1, {seconds} s")
    print(f"  requests: {outcomes}; the slowest answer took {SLOWEST[0]:.1f} s")
    most = census.most_per_model
    print(f"  most backends of one model at once: {most} ({check(most <= 1, 'switch duplicates')})")
    print(f"  most backends at once: {census.most_in_all}")
    print(f"  backends left after the controller stopped: {left} ({check(left == 0, 'switch leftovers')})")
    check(set(outcomes) <= {"answered", "error 503"}, f"switch: unexpected outcomes {outcomes}")
    traffic_switch_run(root, quick)


def traffic_switch_run(root: Path, quick: bool) -> None:
    """A switch asked for while another model serves steady traffic completes within twice (unload + load): the
    busy model's waiting requests queue behind the switch instead of restarting it into the room made."""
    names = ["busy", "next"]
    models = models_of(root, names)
    files = [m["path"] for m in models.values()]
    controller = Controller(base_config(root, models, scheduling={"max_loaded_models": 1}), root / "traffic-switch")
    controller.start()
    outcomes: dict[str, int] = {}
    try:
        quiet, switches = asyncio.run(_traffic_switches(controller, 2 if quick else 5, outcomes))
    finally:
        controller.stop()
    time.sleep(1)
    left = stop_backends(files)
    baseline, typical = median(quiet), median(switches)
    print("\nswitch under traffic: 3 clients keep one model busy, max_loaded_models 1")
    print(f"  unload + load, nothing running: median {baseline:.2f} s over {len(quiet)}")
    print(f"  switch to the other model meanwhile: {', '.join(f'{s:.2f}' for s in switches)} s")
    verdict = check(typical <= 2 * baseline and max(switches) < float("inf"), "switch under traffic")
    print(f"  median switch {typical:.2f} s, at most twice the quiet unload + load ({verdict})")
    print(f"  requests: {outcomes}; backends left: {left} ({check(left == 0, 'switch under traffic leftovers')})")
    check(set(outcomes) <= {"answered", "error 503"}, f"switch under traffic: unexpected outcomes {outcomes}")


async def _traffic_switches(
    controller: Controller, rounds: int, outcomes: dict[str, int]
) -> tuple[list[float], list[float]]:
    """Seconds for each quiet unload + load, then for each switch while "busy" has traffic (inf: none in 60 s)."""
    control = f"{controller.url}/control/v1/models"
    async with httpx.AsyncClient(timeout=120, headers=controller.headers) as client:

        async def timed(*calls: tuple[str, dict[str, Any]]) -> float:
            started = time.monotonic()
            for path, body in calls:
                (await client.post(f"{control}/{path}", json=body)).raise_for_status()
            return time.monotonic() - started

        quiet = []
        for _ in range(rounds):
            await timed(("busy/load", {}))
            quiet.append(await timed(("busy/unload", {}), ("next/load", {})))
            await timed(("next/unload", {}))
        await timed(("busy/load", {}))
        done = asyncio.Event()
        askers = [
            asyncio.create_task(
                keep_asking(controller.url, controller.headers, "busy", lambda: not done.is_set(), outcomes)
            )
            for _ in range(3)
        ]
        switches = []
        try:
            for _ in range(rounds):
                await asyncio.sleep(1)  # the traffic has "busy" back
                try:
                    switches.append(await asyncio.wait_for(timed(("next/load", {"exclusive": True})), 60))
                except TimeoutError:
                    switches.append(float("inf"))
        finally:
            done.set()
            await asyncio.gather(*askers)
    return quiet, switches


def process_census(files: list[str]) -> Callable[[], dict[str, int]]:
    """Backends per model, counted as llama-server processes (the process runtime)."""
    return lambda: {path: len(pids) for path, pids in backends(files).items()}


def container_census(engine: Any, instance: Callable[[], str]) -> Callable[[], dict[str, int]]:
    """Backends per model, counted as running containers of this controller's instance (the docker runtime)."""

    def count() -> dict[str, int]:
        labels = [f"{MANAGED}=true", f"{INSTANCE}={instance()}"]
        found: dict[str, int] = {}
        for container in engine.containers.list(filters={"label": labels}):
            model = container.labels.get(MODEL, "")
            found[model] = found.get(model, 0) + 1
        return found

    return count


def restart_run(root: Path, quick: bool) -> None:
    models = models_of(root, ["r1", "r2"])
    files = [m["path"] for m in models.values()]
    config = base_config(root, models, scheduling={"max_loaded_models": 2})
    storm(Controller(config, root / "restart"), process_census(files), 6 if quick else 20, "process runtime")
    orphans = stop_backends(files)
    print(f"  backends left after the last stop: {orphans} ({check(orphans == 0, 'restart orphans')})")


def restart_docker_run(root: Path, quick: bool) -> None:
    """The same storm with the docker runtime: llama-server containers of the local image, the tiny model."""
    import docker

    from llamacontroller import images

    engine = docker.from_env(version="auto")
    images.build(["llama-server"], Path(__file__).resolve().parents[2])
    models = models_of(root, ["r1", "r2"])
    runtime = {"kind": "docker", "stop_timeout": 5, "docker": {"image": images.LLAMA_SERVER_IMAGE}}
    config = base_config(root, models, scheduling={"max_loaded_models": 2}, runtime=runtime)
    census = container_census(engine, lambda: census_id(root))
    try:
        storm(Controller(config, root / "restart-docker"), census, 6 if quick else 20, "docker runtime")
    finally:
        left = engine.containers.list(all=True, filters={"label": [f"{MANAGED}=true", f"{INSTANCE}={census_id(root)}"]})
        for container in left:
            container.remove(force=True)
    print(f"  containers left after the last stop: {len(left)} ({check(not left, 'docker restart orphans')})")


def census_id(root: Path) -> str:
    return (root / "data" / "instance-id").read_text().strip()


def storm(controller: Controller, census: Callable[[], dict[str, int]], restarts: int, runtime: str) -> None:
    """Restart ``controller`` ``restarts`` times (every other one SIGKILL) while two clients keep sending."""
    controller.start()
    outcomes: dict[str, int] = {}
    duplicates = 0
    done = threading.Event()
    models = list(controller.config["models"])

    def clients() -> None:
        async def both() -> None:
            going = lambda: not done.is_set()  # noqa: E731
            await asyncio.gather(*(keep_asking(controller.url, controller.headers, n, going, outcomes) for n in models))

        asyncio.run(both())

    asking = threading.Thread(target=clients, daemon=True)
    asking.start()
    try:
        for index in range(restarts):
            time.sleep(1.5)
            controller.stop(kill=index % 2 == 0)
            controller.start()
            time.sleep(0.5)
            duplicates += sum(max(0, count - 1) for count in census().values())
    finally:
        done.set()
        controller.stop()
    asking.join(timeout=150)
    time.sleep(1)
    print(f"\nrestart storm, {runtime}: {restarts} restarts (every other one SIGKILL), 2 clients sending throughout")
    print(f"  requests: {outcomes}")
    print(f"  duplicate backends seen after restarts: {duplicates} ({check(duplicates == 0, 'restart duplicates')})")
    check(not asking.is_alive() and "hung (no answer in 120 s)" not in outcomes, "restart: every request ended")


RUNS: dict[str, Callable[[Path, bool], None]] = {
    "stream": stream_run,
    "switch": switch_run,
    "restart": restart_run,
    "restart-docker": restart_docker_run,
    "store": store_run,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", metavar="run", help=f"any of {', '.join(RUNS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smaller and shorter (a smoke test of the runs)")
    parser.add_argument("--workers", default="auto", help="gateway.workers: auto, or 0 (one process) to 64")
    args = parser.parse_args()
    global WORKERS
    WORKERS = int(args.workers) if args.workers.isdigit() else args.workers
    unknown = [run for run in args.runs if run not in RUNS]
    if unknown:
        parser.error(f"unknown run(s): {', '.join(unknown)}; choose from {', '.join(RUNS)}")
    args.runs = args.runs or list(RUNS)
    cpu = platform.processor() or platform.machine()
    memory = psutil.virtual_memory().total / 2**30
    print(f"machine: {psutil.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB, Python {platform.python_version()}")
    print(f"gateway.workers: {WORKERS}")
    random.seed(1)
    for name in args.runs:
        with tempfile.TemporaryDirectory(prefix=f"load-{name}-") as folder:
            RUNS[name](Path(folder), args.quick)
    print("\nall targets met" if not failures else f"\nMISSED: {failures}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
