"""The HTTPS edge for real: Caddy 2.11 (supervised by `serve`), real TLS from its local CA, real llama-server.

The real `ollama` and `openai` clients talk to https:// trusting the CA from `llamacontroller edge ca`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from controller.edge.admin import CaddyAdmin
from controller.edge.child import CaddyChild, find_caddy
from controller.edge.render import EdgeSettings
from controller.edge.sync import EdgeSync
from controller.events import EdgeChanged
from controller.runtime.process import free_port
from tests.support.server import TESTER_PASSWORD, ServeProcess, edge_section, serve_subprocess

pytestmark = pytest.mark.gemma
GEMMA = "gemma3:270m"


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_model: Path, long_tiny_model: Path, gemma_model: Path
) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("edge")
    gemma = gemma_model
    config = {
        "server": {"data_dir": str(root / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "models_dir": str(root / "none"),
        "defaults": {"ctx_size": 2048, "max_concurrent": 2, "keep_alive": "10m"},
        "scheduling": {"max_loaded_models": 3},
        "edge": {**edge_section(), "max_body": 1_000_000},
        "models": {
            GEMMA: {"path": str(gemma), "aliases": ["gemma"]},
            "tiny": {"path": str(tiny_model)},
            # generations that run for seconds, and a keep-alive shorter than them
            "long": {"path": str(long_tiny_model), "ctx_size": 32768, "max_concurrent": 1, "keep_alive": "2s"},
        },
    }
    with serve_subprocess(config, root) as served:
        yield served


@pytest.fixture(scope="module")
def ca(served: ServeProcess) -> ssl.SSLContext:
    """Trust in the edge's local CA, as a client gets it: `llamacontroller edge ca --output FILE`."""
    return ssl.create_default_context(cafile=served.ca_file())


@pytest.fixture
def https(served: ServeProcess, ca: ssl.SSLContext) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.https_url, verify=ca, headers=served.headers, timeout=120) as client:
        yield client


def test_edge_serve_prints_the_https_url(served: ServeProcess) -> None:
    assert f"HTTPS (Caddy edge): {served.https_url}" in served.output()


def test_edge_ollama_client_over_https(served: ServeProcess, ca: ssl.SSLContext) -> None:
    with ollama.Client(host=served.https_url, verify=ca, headers=served.headers, timeout=120) as client:
        assert {m.model for m in client.list().models} == {GEMMA, "tiny:latest", "long:latest"}
        reply = client.chat(GEMMA, messages=[{"role": "user", "content": "Say hi."}], options={"num_predict": 8})
        assert reply.done and reply.message.content
        parts = list(client.generate(GEMMA, prompt="The sky is", stream=True, options={"num_predict": 8}))
        assert parts[-1].done and len(parts) > 2
        embedded = client.embed(GEMMA, input=["a", "b"])
        assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) == 640
        assert GEMMA in {m.model for m in client.ps().models}


def test_edge_without_a_token_is_a_clean_401_in_ollamas_shape(served: ServeProcess, ca: ssl.SSLContext) -> None:
    with ollama.Client(host=served.https_url, verify=ca, timeout=30) as client:
        with pytest.raises(ollama.ResponseError) as refused:
            client.list()
    assert refused.value.status_code == 401 and "authentication required" in refused.value.error
    answer = httpx.get(f"{served.https_url}/api/tags", verify=ca)
    assert answer.status_code == 401 and answer.headers["www-authenticate"].startswith("Bearer")
    assert set(answer.json()) == {"error"}


def test_edge_openai_client_over_https(served: ServeProcess, ca: ssl.SSLContext) -> None:
    with httpx.Client(verify=ca) as transport:
        client = openai.OpenAI(base_url=f"{served.https_url}/v1", api_key=served.token, http_client=transport)
        reply = client.chat.completions.create(
            model=GEMMA, messages=[{"role": "user", "content": "Hello"}], max_tokens=8
        )
        assert reply.choices[0].message.content
        anonymous = openai.OpenAI(base_url=f"{served.https_url}/v1", api_key="lc_bad_x", http_client=transport)
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()


def test_edge_streams_are_not_buffered(https: httpx.Client) -> None:
    body = {"model": "long", "prompt": "x", "options": {"num_predict": 3000, "temperature": 0}}
    arrivals = []
    with https.stream("POST", "/api/generate", json=body) as response:
        assert response.status_code == 200
        started = time.monotonic()  # from the headers: a load or a busy machine before them is not buffering
        for line in response.iter_lines():
            if line:
                arrivals.append(time.monotonic() - started)
    assert json.loads(line)["done"] is True
    total = arrivals[-1]
    assert total > 0.5, "the generation must take a while for this to mean anything"
    assert arrivals[0] < total / 4, f"first line after {arrivals[0]:.2f}s of {total:.2f}s: buffered"


def test_edge_client_identity_header_never_passes(served: ServeProcess, ca: ssl.SSLContext) -> None:
    forged = {"X-LlamaController-Identity": "forged.by.client"}
    alone = httpx.get(f"{served.https_url}/api/tags", headers=forged, verify=ca)
    # Deleted at the edge: the app says "authentication required", not "invalid identity header".
    assert alone.status_code == 401 and "authentication required" in alone.json()["error"]
    both = httpx.get(f"{served.https_url}/api/tags", headers={**forged, **served.headers}, verify=ca)
    assert both.status_code == 200 and both.json()["models"]


def test_edge_one_client_cannot_lock_everyone_out_of_an_account(served: ServeProcess, ca: ssl.SSLContext) -> None:
    """Through the edge every connection to the app comes from Caddy: the sign-in throttle keys on the address
    Caddy forwards. Two clients on two loopback addresses; the guesser's own X-Forwarded-For is replaced."""

    def sign_in(source: str, password: str, forwarded: str | None = None) -> int:
        transport = httpx.HTTPTransport(local_address=source, verify=ca)
        headers = {"X-Forwarded-For": forwarded} if forwarded else {}
        with httpx.Client(base_url=served.https_url, transport=transport, headers=headers) as client:
            body = {"username": "tester", "password": password}
            return client.post("/auth/login", json=body).status_code

    for _ in range(5):  # auth.login_max_failures
        assert sign_in("127.0.0.2", "wrong-password") == 401
    assert sign_in("127.0.0.2", TESTER_PASSWORD) == 429
    assert sign_in("127.0.0.2", TESTER_PASSWORD, forwarded="198.51.100.7") == 429, "a forged header is replaced"
    assert sign_in("127.0.0.3", TESTER_PASSWORD) == 200, "another client signs in"


def test_edge_internal_paths_are_not_routed(https: httpx.Client) -> None:
    for path in ("/auth/verify", "/internal/caddy/config"):
        answer = https.get(path)
        assert answer.status_code == 404 and answer.json() == {"error": "not found"}


def test_edge_body_over_the_limit_is_413_in_each_dialect(https: httpx.Client) -> None:
    big = b"{" + b" " * 1_100_000 + b"}"
    ollama_answer = https.post("/api/chat", content=big, headers={"Content-Type": "application/json"})
    assert ollama_answer.status_code == 413 and "larger than the limit" in ollama_answer.json()["error"]
    openai_answer = https.post("/v1/chat/completions", content=big, headers={"Content-Type": "application/json"})
    assert openai_answer.status_code == 413 and openai_answer.json()["error"]["code"] == "payload_too_large"

    def chunks() -> Iterator[bytes]:  # no declared length: the cap applies while reading
        for _ in range(11):
            yield b" " * 100_000

    streamed = https.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "payload_too_large"


def test_edge_a_malformed_body_is_the_clients_400_not_an_unreachable_app(
    served: ServeProcess, ca: ssl.SSLContext
) -> None:
    """Caddy answers 502 both when it cannot connect to the app and when it cannot read the client's chunked
    body: only the first is "not reachable"; the second is a 400 in the dialect of the path."""
    host, _, port = served.config["edge"]["listen"].rpartition(":")

    def send(path: str) -> tuple[int, Any]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {served.token}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=30) as plain:
            with ca.wrap_socket(plain, server_hostname=host) as tls:
                tls.sendall(head.encode() + b"zz\r\n{}\r\n0\r\n\r\n")  # "zz" is no chunk length
                answer = b""
                while chunk := tls.recv(65536):
                    answer += chunk
        status_line, _, body = answer.partition(b"\r\n\r\n")
        return int(status_line.split()[1]), json.loads(body)

    status, ollama_body = send("/api/chat")
    assert status == 400 and "could not be read" in ollama_body["error"], ollama_body
    status, openai_body = send("/v1/chat/completions")
    assert status == 400 and openai_body["error"]["code"] == "bad_request", openai_body


def test_edge_llama_paths_reach_the_model_through_the_gateway(
    served: ServeProcess, https: httpx.Client, ca: ssl.SSLContext
) -> None:
    """llama-server's own API per model over HTTPS: loaded on demand, authorized like every model path."""
    assert https.post("/control/v1/models/tiny/unload").status_code == 200
    props = https.get("/llama/tiny/props")
    assert props.status_code == 200 and "default_generation_settings" in props.json()
    assert "model_path" not in props.json(), "where the model file lies is not the client's business"
    assert https.get("/control/v1/models/tiny").json()["state"] == "ready"
    assert https.get("/llama/tiny/slots").status_code == 200
    unknown = https.get("/llama/nope/props")
    assert unknown.status_code == 404 and unknown.json()["error"]["message"] == "model 'nope' not found"
    assert httpx.get(f"{served.https_url}/llama/tiny/props", verify=ca).status_code == 401


def test_edge_loads_and_unloads_never_drop_a_clients_connection(served: ServeProcess, ca: ssl.SSLContext) -> None:
    """Caddy's config does not follow the models: a reload would close every client's idle keep-alive
    connection, and a request sent on one at that moment fails ("server disconnected")."""
    stop = threading.Event()
    failures: list[str] = []
    sent = 0

    def keep_asking() -> None:
        nonlocal sent
        with httpx.Client(base_url=served.https_url, verify=ca, headers=served.headers) as client:
            while not stop.is_set():
                sent += 1
                try:
                    client.get("/api/tags").raise_for_status()
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        for _ in range(12):
            assert served.http.post("/control/v1/models/tiny/load").status_code == 200
            assert served.http.post("/control/v1/models/tiny/unload").status_code == 200
    finally:
        stop.set()
        asker.join()
    assert sent > 100, "the client kept asking while models loaded and unloaded"
    assert failures == []


def test_edge_llama_stream_keeps_its_model_loaded_past_keep_alive(served: ServeProcess, https: httpx.Client) -> None:
    """A long /llama stream holds the model's lease: it is not expired under it."""
    body = {"prompt": "x", "n_predict": 4000, "stream": True}
    started = time.monotonic()
    with https.stream("POST", "/llama/long/completion", json=body) as response:
        assert response.status_code == 200
        for _ in response.iter_lines():
            if time.monotonic() - started > 3.5:  # well past the 2 s keep-alive
                state = https.get("/control/v1/models/long").json()["state"]
                assert state == "ready", "a model serving a direct stream must not expire"
                break
    deadline = time.monotonic() + 10
    while https.get("/control/v1/models/long").json()["state"] != "stopped":  # then it expires as usual
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_edge_caddy_killed_comes_back_with_its_routes(served: ServeProcess, https: httpx.Client) -> None:
    system = served.http.get("/control/v1/system").json()["edge"]
    assert system["state"] == "ok" and system["supervised"] is True
    assert https.post("/control/v1/models/tiny/load").status_code == 200
    os.kill(system["pid"], signal.SIGKILL)
    reasons = []
    deadline = time.monotonic() + 15
    while True:
        ready = served.http.get("/readyz")
        assert ready.status_code == 200, "the controller stays ready (in its Service) while its edge is down"
        edge = ready.json()["edge"]
        if edge["state"] != "ok":
            reasons.append(edge["error"])
        try:
            if edge["state"] == "ok" and https.get("/llama/tiny/health").status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the edge did not come back"
        time.sleep(0.05)
    restarted = served.http.get("/control/v1/system").json()["edge"]
    assert restarted["restarts"] >= 1 and restarted["pid"] != system["pid"]
    assert reasons and "caddy exited" in reasons[0], "/readyz says why the edge is down"


async def test_edge_a_refused_config_is_reported_and_retried(tmp_path: Path) -> None:
    """A real Caddy that rejects the document (certificate files missing): the status says why, the push is
    retried, and once the files exist the edge comes up on its own."""
    admin = f"127.0.0.1:{free_port()}"
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    settings = EdgeSettings(
        listen=f"127.0.0.1:{free_port()}",
        admin_listen=admin,
        app="127.0.0.1:1",
        tls_mode="files",
        hostname="llm.example.com",
        cert_file=str(cert),
        key_file=str(key),
        storage=str(tmp_path / "data"),
    )
    events: list[EdgeChanged] = []
    sync = EdgeSync(settings, CaddyAdmin(admin), events.append, interval=0.5)
    child = CaddyChild(find_caddy(None), tmp_path / "caddy", admin, sync.changed, sync.down)
    await child.start()
    sync.start()
    try:
        deadline = time.monotonic() + 15
        while sync.status.state != "rejected":
            assert time.monotonic() < deadline, sync.status
            await asyncio.sleep(0.05)
        assert "Caddy rejected the configuration" in (sync.status.error or "")
        assert events[-1].type == "edge" and events[-1].state == "rejected"
        request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=llm.example.com"]
        subprocess.run(["openssl", *request, "-keyout", key, "-out", cert], check=True, capture_output=True)
        while sync.status.state != "ok":
            assert time.monotonic() < deadline + 15, sync.status
            await asyncio.sleep(0.05)
    finally:
        await sync.close()
        await child.stop()


def test_edge_caddy_metrics_are_a_second_scrape_target(served: ServeProcess) -> None:
    """Caddy's own metrics (config reloads, its process) on edge.admin, a loopback listener that serves nothing
    else: the admin API itself is a unix socket."""
    metrics = f"http://{served.config['edge']['admin']}"
    assert "caddy_config_last_reload_successful 1" in httpx.get(f"{metrics}/metrics", timeout=10).text
    assert httpx.get(f"{metrics}/config/", timeout=10).status_code == 404
