"""Metrics without a server: what a request's timing records, llama-server's timings found in passed-through
answers (whole, streamed, split across reads), lifecycle counters from events, backend metrics relabelled."""

from __future__ import annotations

import json

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from common import notes
from controller.events import ModelStateChanged, ModelStopFailed
from controller.metrics import BackendFamilies, ControllerMetrics, relabel
from proxy import measure

TIMINGS = {"prompt_n": 12, "predicted_n": 30, "predicted_per_second": 75.5, "prompt_ms": 20.0}


def sse(event: dict[str, object]) -> bytes:
    return f"data: {json.dumps(event)}\n\n".encode()


def timed() -> notes.RequestTiming:
    timing = notes.RequestTiming(started=100.0)
    notes.current.set(timing)
    return timing


def test_metrics_timings_are_found_in_a_whole_answer() -> None:
    timing = timed()
    notes.sniff_timings(json.dumps({"choices": [], "timings": TIMINGS}).encode())
    assert timing.timings == TIMINGS


def test_metrics_timings_are_found_in_the_last_event_of_a_stream() -> None:
    timing = timed()
    notes.sniff_timings(sse({"choices": [{"delta": {"content": "hi"}}]}))
    assert timing.timings is None
    notes.sniff_timings(sse({"choices": [], "timings": TIMINGS}) + b"data: [DONE]\n\n")
    assert timing.timings == TIMINGS


def test_metrics_timings_split_across_two_reads_are_joined() -> None:
    timing = timed()
    event = sse({"choices": [{"delta": {}, "finish_reason": "stop"}], "timings": TIMINGS})
    cut = event.index(b'"predicted_n"')
    notes.sniff_timings(b"data: [x]\n\n" + event[:cut])
    assert timing.timings is None
    notes.sniff_timings(event[cut:])
    assert timing.timings == TIMINGS


def test_metrics_unreadable_answers_record_nothing() -> None:
    timing = timed()
    notes.sniff_timings(b'{"timings": ')  # a JSON answer cut short
    notes.sniff_timings(b'data: {"timings": {broken}\n\n')
    assert timing.timings is None


def test_metrics_gateway_time_excludes_the_wait_for_the_model() -> None:
    timing = notes.RequestTiming(started=10.0, waited=2.0, backend_at=12.0005)
    assert abs(timing.added(ended=15.0) - 0.0005) < 1e-9
    no_backend = notes.RequestTiming(started=10.0)
    assert abs(no_backend.added(ended=10.001) - 0.001) < 1e-9


def test_metrics_one_request_becomes_samples_per_model() -> None:
    registry = CollectorRegistry()
    metrics = measure.GatewayMetrics(registry)
    timing = notes.RequestTiming(started=1.0, backend_at=1.001, first_body_at=1.2, bodies=5, timings=TIMINGS)
    metrics.observe("chat", "gemma3:270m", 200, timing, ended=2.0)
    text = generate_latest(registry).decode()
    assert 'llamacontroller_requests_total{endpoint="chat",model="gemma3:270m",status="200"} 1.0' in text
    assert 'llamacontroller_prompt_tokens_total{model="gemma3:270m"} 12.0' in text
    assert 'llamacontroller_generated_tokens_total{model="gemma3:270m"} 30.0' in text
    assert 'llamacontroller_time_to_first_token_seconds_count{endpoint="chat",model="gemma3:270m"} 1.0' in text
    assert 'llamacontroller_generation_tokens_per_second_bucket{le="100.0",model="gemma3:270m"} 1.0' in text


def test_metrics_a_single_piece_answer_has_no_first_token_time() -> None:
    registry = CollectorRegistry()
    metrics = measure.GatewayMetrics(registry)
    metrics.observe("tags", None, 200, notes.RequestTiming(started=1.0, first_body_at=1.1, bodies=1), ended=1.1)
    count = registry.get_sample_value(
        "llamacontroller_time_to_first_token_seconds_count", {"endpoint": "tags", "model": ""}
    )
    assert count in (None, 0.0)


class NoModels:
    """A supervisor with an empty catalog, enough for the live gauges."""

    class catalog:  # noqa: N801 - stands in for the attribute
        @staticmethod
        def entries() -> list[object]:
            return []

        @staticmethod
        def get(key: str) -> None:
            return None


def test_metrics_lifecycle_is_counted_from_state_events() -> None:
    registry = CollectorRegistry()
    counted = ControllerMetrics(registry, NoModels())  # type: ignore[arg-type]
    steps = [("stopped", "starting"), ("starting", "ready"), ("ready", "stopping"), ("stopping", "failed")]
    steps += [("failed", "starting")]
    steps += [("starting", "failed"), ("failed", "starting"), ("starting", "ready"), ("ready", "stopping")]
    steps += [("stopping", "stopped")]
    for old, new in steps:
        load_seconds = 1.5 if new == "ready" else None
        counted.on_event(ModelStateChanged("m", old, new, None, 0.0, load_seconds))
    value = registry.get_sample_value
    assert value("llamacontroller_model_loads_total", {"model": "m"}) == 2
    assert value("llamacontroller_model_unloads_total", {"model": "m"}) == 1
    assert value("llamacontroller_model_failures_total", {"model": "m", "phase": "run"}) == 1
    assert value("llamacontroller_model_failures_total", {"model": "m", "phase": "load"}) == 1
    assert value("llamacontroller_model_restarts_total", {"model": "m"}) == 2
    assert value("llamacontroller_model_load_duration_seconds_count", {"model": "m"}) == 2


LLAMA_METRICS = """# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed.
# TYPE llamacpp:prompt_tokens_total counter
llamacpp:prompt_tokens_total 42
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 1
"""


def test_metrics_backends_are_relabelled_into_one_exposition() -> None:
    text = relabel([BackendFamilies("a:latest", LLAMA_METRICS), BackendFamilies('b"x', LLAMA_METRICS)])
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert set(families) == {"llamacpp:prompt_tokens", "llamacpp:requests_processing"}
    samples = families["llamacpp:prompt_tokens"].samples
    assert [(s.name, s.labels, s.value) for s in samples] == [
        ("llamacpp:prompt_tokens_total", {"model": "a:latest"}, 42.0),
        ("llamacpp:prompt_tokens_total", {"model": 'b"x'}, 42.0),
    ]
    assert families["llamacpp:requests_processing"].type == "gauge"


def test_metrics_an_unreadable_backend_is_left_out() -> None:
    assert relabel([BackendFamilies("a", "this is { not metrics")]) == ""


def test_metrics_count_each_failed_stop() -> None:
    registry = CollectorRegistry()
    counted = ControllerMetrics(registry, NoModels())  # type: ignore[arg-type]
    for _ in range(2):
        counted.on_event(ModelStopFailed("m", "stopping", "h", "engine timeout", 1, 0.5, 0.0))
    assert registry.get_sample_value("llamacontroller_backend_stop_failures_total", {"model": "m"}) == 2
