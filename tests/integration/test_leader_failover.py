"""Leader election with the real `serve` command, a real redis-server and a real llama-server: a leader whose lease
is taken ends with exit status 3 and leaves its backend running; the standby (the same data dir: instance, keys,
pid files) takes over and adopts that very process. tests/leadership has the election's own tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from controller.leadership.office import EXIT_LEADERSHIP_LOST
from controller.leadership.redis import lock_key
from controller.runtime.process import free_port
from tests.support.redis_server import redis_server
from tests.support.server import answers, backend_processes, bearer, real_config, serve_subprocess

Models = Callable[..., dict[str, dict[str, Any]]]
ELECTION = {"kind": "redis", "lease_duration": "3s", "renew_interval": "1s"}  # short: the test waits for it
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with redis_server(tmp_path / "redis") as url:
        yield url


def controller_config(tmp_path: Path, models: dict[str, dict[str, Any]], redis_url: str) -> dict[str, Any]:
    server = {"listen": f"127.0.0.1:{free_port()}", "leader_election": ELECTION}
    return real_config(tmp_path, models, server=server, store={"kind": "redis", "redis_url": redis_url})


def test_leader_that_loses_its_lease_ends_and_the_standby_adopts_its_backend(
    tmp_path: Path, tiny_models: Models, redis_url: str
) -> None:
    models = tiny_models("a")
    model_file = Path(models["a"]["path"])
    with serve_subprocess(controller_config(tmp_path, models, redis_url), tmp_path, "leader") as leader:
        assert leader.http.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
        pid = int(leader.http.get("/control/v1/models/a").json()["handle"])

        standby_config = controller_config(tmp_path, models, redis_url)
        path = tmp_path / "standby.yaml"
        path.write_text(yaml.safe_dump(standby_config))
        with (tmp_path / "standby.log").open("w") as log:
            standby = subprocess.Popen(
                [sys.executable, "-m", "llamacontroller", "serve", "--config", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://{standby_config['server']['listen']}"
        try:
            assert answers(f"{url}/healthz", standby, 60), (tmp_path / "standby.log").read_text()
            ready = httpx.get(f"{url}/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "standby"

            redis.Redis.from_url(redis_url).set(lock_key("llamacontroller"), "thief", px=3000)
            assert leader.process.wait(60) == EXIT_LEADERSHIP_LOST
            assert "lost the lead: another controller holds the lease" in leader.output()
            assert [p.pid for p in backend_processes(model_file)] == [pid], "the lost leader stopped its backend"

            assert answers(f"{url}/readyz", standby, 60), (tmp_path / "standby.log").read_text()
            headers = bearer(leader.token)
            adopted = httpx.get(f"{url}/control/v1/models/a", headers=headers).json()
            assert adopted["state"] == "ready" and adopted["adopted"] is True and int(adopted["handle"]) == pid
            answer = httpx.post(f"{url}/v1/chat/completions", json={"model": "a", **CHAT}, headers=headers, timeout=60)
            assert answer.status_code == 200
        finally:
            standby.terminate()
            standby.wait(60)
    assert backend_processes(model_file) == [], "the new leader's clean stop stops what it adopted"
