"""/metrics against a real llama-server with Gemma 3 270M: tokens and first-token times from real answers,
every backend's own metrics re-exported with a model label, and every metric the Grafana dashboard uses."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.runtime.process import free_port
from tests.support.server import ServeProcess, serve_subprocess
from tests.unit.test_grafana_dashboard import used_metrics

pytestmark = pytest.mark.gemma
GEMMA = "gemma3:270m"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, gemma_model: Path) -> Iterator[ServeProcess]:
    root = tmp_path_factory.mktemp("metrics")
    config = {
        "server": {"data_dir": str(root / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "edge": {"enabled": False},
        "models_dir": str(root / "none"),
        "defaults": {"ctx_size": 2048, "keep_alive": "10m"},
        "models": {GEMMA: {"path": str(gemma_model)}},
    }
    with serve_subprocess(config, root) as served:
        yield served


def scrape(served: ServeProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = served.http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_real_answers_are_counted_per_model(served: ServeProcess) -> None:
    options = {"num_predict": 16, "temperature": 0}
    with ollama.Client(host=served.url, headers=served.headers, timeout=120) as client:
        answer = client.chat(GEMMA, messages=[{"role": "user", "content": "Count to five."}], options=options)
        pieces = list(client.chat(GEMMA, messages=[{"role": "user", "content": "Hi!"}], options=options, stream=True))
    body = {"model": GEMMA, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "stream": True}
    with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=body, headers=served.headers) as response:
        assert response.status_code == 200 and len(list(response.iter_lines())) > 2

    samples = scrape(served)
    generated = value(samples, "llamacontroller_generated_tokens_total", model=GEMMA)
    expected = (answer.eval_count or 0) + (pieces[-1].eval_count or 0)
    assert generated >= expected > 0, "the Ollama answers' own eval counts, plus the OpenAI stream's"
    assert value(samples, "llamacontroller_prompt_tokens_total", model=GEMMA) > 0
    assert value(samples, "llamacontroller_requests_total", model=GEMMA, endpoint="chat", status="200") == 2
    assert value(samples, "llamacontroller_time_to_first_token_seconds_count", model=GEMMA, endpoint="chat") == 1
    openai_stream = {"model": GEMMA, "endpoint": "v1/chat/completions"}
    assert value(samples, "llamacontroller_time_to_first_token_seconds_count", **openai_stream) == 1
    assert value(samples, "llamacontroller_generation_tokens_per_second_count", model=GEMMA) >= 2
    assert value(samples, "llamacontroller_model_loads_total", model=GEMMA) == 1


def test_metrics_real_backend_metrics_are_re_exported_with_the_model(served: ServeProcess) -> None:
    served.http.post("/api/generate", json={"model": GEMMA, "prompt": "Hi", "options": {"num_predict": 4}})
    samples = scrape(served)
    assert value(samples, "llamacpp:prompt_tokens_total", model=GEMMA) > 0
    assert value(samples, "llamacpp:tokens_predicted_total", model=GEMMA) > 0
    assert not any(name.startswith("llamacpp:") and not dict(labels).get("model") for name, labels in samples)


def test_metrics_real_every_metric_on_the_dashboard_exists(served: ServeProcess) -> None:
    served.http.post("/api/generate", json={"model": GEMMA, "prompt": "Hi", "options": {"num_predict": 4}})
    # The model's expiry starts once the gateway process has reported its request ended (at once, by a report).
    deadline = time.monotonic() + 5
    while (missing := used_metrics() - {name for name, _ in scrape(served)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not missing, f"the Grafana dashboard uses metrics this server does not export: {sorted(missing)}"
