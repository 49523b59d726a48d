"""House rules that are easy to break by accident: documented routes, the proxy boundary, no shells."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from controller.config import validate_config
from proxy.openai import PASSTHROUGH_PATHS

ROOT = Path(__file__).resolve().parents[2]


def documented_paths() -> set[str]:
    text = (ROOT / "docs" / "api.md").read_text()
    return set(re.findall(r"`(/[^`\s]*)`", text))


def test_rules_every_control_route_is_documented(tmp_path: Path) -> None:
    from controller.runtime.fake import FakeRuntime
    from llamacontroller.app import create_app

    runtime = FakeRuntime()
    config = validate_config(
        {"server": {"data_dir": str(tmp_path)}, "models_dir": str(tmp_path), "edge": {"enabled": False}}
    )
    app = create_app(config, runtime=runtime, probe=runtime.probe, binary=lambda: "llama-server")
    routes = {rule.rule for rule in app.url_map.iter_rules() if rule.endpoint != "static"}
    missing = {route for route in routes if route not in documented_paths()}
    assert not missing, f"routes missing from docs/api.md: {sorted(missing)}"


def test_rules_every_gateway_route_is_documented() -> None:
    from proxy.app import Gateway

    async def nothing(scope: object, receive: object, send: object) -> None:
        return None

    routes = set(Gateway(None, nothing, 1).routes)  # type: ignore[arg-type]  # only the route table is read
    assert set(PASSTHROUGH_PATHS) <= routes
    prefixed = {"/v1/models/<name>", "/llama/<name>/<path>", "/api/blobs/<digest>"}
    missing = (routes | prefixed) - documented_paths()
    assert not missing, f"gateway routes missing from docs/api.md: {sorted(missing)}"


def test_rules_no_shell_strings_in_product_code() -> None:
    for package in ("common", "controller", "llamacontroller", "proxy"):
        for path in (ROOT / package).rglob("*.py"):
            text = path.read_text()
            assert "shell=True" not in text and "os.system(" not in text and "os.popen(" not in text, path


def test_rules_no_asyncio_wait_for() -> None:
    """Python 3.11's asyncio.wait_for swallows a cancellation that arrives as what it awaits completes (a
    cancelled liveness probe went on probing, and the stop waiting for it hung). asyncio.timeout does not."""
    for folder in ("common", "controller", "llamacontroller", "proxy"):
        for path in (ROOT / folder).rglob("*.py"):
            calls = [
                node.lineno
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.Attribute) and node.attr == "wait_for"
                and isinstance(node.value, ast.Name) and node.value.id == "asyncio"
            ]  # fmt: skip
            assert not calls, f"{path.relative_to(ROOT)}:{calls}: use `async with asyncio.timeout(...)`"
