"""Per-model metrics are labelled with the catalog's name of the model, never with a client's spelling of it:
each spelling would be a new series (2,000 case variants of one alias grew /metrics from 56 KB to 6.6 MB)."""

from __future__ import annotations

import itertools
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from controller.runtime.fake import FakeRuntime
from tests.support.harness import fake_app, fake_config


def spellings(name: str, count: int) -> list[str]:
    """``count`` different case variants of ``name``."""
    variants = dict.fromkeys("".join(chars) for chars in itertools.product(*({c.lower(), c.upper()} for c in name)))
    return list(itertools.islice(variants, count))


async def test_metric_labels_are_catalog_names_whatever_the_spelling(tmp_path: Path, tiny_model: Path) -> None:
    config = fake_config(tmp_path, tiny_model, {"gemma3:270m": {"aliases": ["gemma"]}})
    app = fake_app(config, FakeRuntime())
    async with app.test_app():
        client = app.test_client()
        names = [*spellings("gemma3:270m", 30), *spellings("gemma", 20), "GEMMA:latest"]
        assert len(set(names)) == 51
        for name in names:
            assert (await client.post("/api/show", json={"model": name})).status_code == 200
            assert (await client.get(f"/v1/models/{name}")).status_code == 200
        for unknown in spellings("nothing", 30):  # unknown names share one label, the empty one
            assert (await client.post("/api/show", json={"model": unknown})).status_code == 404
        text = await (await client.get("/metrics")).get_data(as_text=True)
    requests = next(f for f in text_string_to_metric_families(text) if f.name == "llamacontroller_requests")
    counts = {
        (s.labels["endpoint"], s.labels["model"], s.labels["status"]): s.value
        for s in requests.samples
        if s.name.endswith("_total")
    }
    assert counts == {
        ("show", "gemma3:270m", "200"): len(names),
        ("v1/models", "gemma3:270m", "200"): len(names),
        ("show", "", "404"): 30,
    }
