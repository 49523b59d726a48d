"""The web page's numbers, in a real Chromium through the HTTPS edge: dashboard first paint, the delay from a
model's state change (the server's event time) to its appearance in the page, and the dashboard's weight.

    python -m tests.bench.bench_web [--rounds 10]      (make bench-web)
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

from controller.runtime.process import free_port
from tests.browser.conftest import CHROMIUM, CHROMIUM_ARGS
from tests.support.server import TESTER_PASSWORD, edge_section, serve_subprocess
from tests.support.tinymodel import write_tiny_model

# Bytes the dashboard costs: the document plus everything it loaded, decoded and on the wire.
PAGE_WEIGHT = """() => performance.getEntriesByType("navigation")
    .concat(performance.getEntriesByType("resource"))
    .reduce((sum, e) => [sum[0] + e.decodedBodySize, sum[1] + e.encodedBodySize], [0, 0])"""

WATCH_ROW = """() => {
  window.seen = [];
  const box = document.querySelector("#model-m-latest").parentElement;
  new MutationObserver(() => {
    const row = box.querySelector("tr");
    if (row) window.seen.push([Date.now(), row.dataset.state]);
  }).observe(box, {childList: true, subtree: true});
}"""


def server_events(url: str, headers: dict[str, str], into: list[tuple[float, str]], stop: threading.Event) -> None:
    try:
        with httpx.stream("GET", f"{url}/control/v1/events", headers=headers, timeout=None) as response:
            for line in response.iter_lines():
                if stop.is_set():
                    return
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    into.append((event["time"] * 1000, event["state"]))
    except httpx.RemoteProtocolError:
        if not stop.is_set():  # the server closing the stream at shutdown is expected; anything earlier is not
            raise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        config = {
            "server": {"data_dir": str(root / "data"), "listen": f"127.0.0.1:{free_port()}"},
            "models_dir": str(root / "none"),
            "edge": edge_section(),
            "models": {"m": {"path": str(write_tiny_model(root / "m.gguf"))}},
        }
        with serve_subprocess(config, root) as served, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            context = browser.new_context(ignore_https_errors=True, base_url=served.https_url)
            page = context.new_page()
            page.goto("/ui/login")
            page.fill("#username", "tester")
            page.fill("#password", TESTER_PASSWORD)
            page.click("form button[type=submit]")
            page.wait_for_url("**/ui/")
            paints, weights = [], []
            for _ in range(args.rounds):
                page.goto("/ui/")
                page.wait_for_load_state("networkidle")
                paints.append(page.evaluate("performance.getEntriesByName('first-contentful-paint')[0].startTime"))
                weights.append(page.evaluate(PAGE_WEIGHT))
            events: list[tuple[float, str]] = []
            stop = threading.Event()
            listener = threading.Thread(
                target=server_events, args=(served.url, served.headers, events, stop), daemon=True
            )
            listener.start()
            time.sleep(0.3)
            page.evaluate(WATCH_ROW)
            for _ in range(args.rounds):
                served.http.post("/control/v1/models/m/load")
                served.http.post("/control/v1/models/m/unload")
            time.sleep(0.5)
            stop.set()
            shown = page.evaluate("window.seen")
            browser.close()
    delays = []
    for state in ("ready", "stopped"):
        server = [t for t, s in events if s == state]
        browser_times = [t for t, s in shown if s == state]
        browser_times = sorted(dict.fromkeys(browser_times))
        for moment in server:
            later = [b for b in browser_times if b >= moment - 5]
            if later:
                delays.append(later[0] - moment)
    print(f"\nweb page, {args.rounds} rounds, Chromium through the HTTPS edge")
    print(f"dashboard first contentful paint: median {statistics.median(paints):.0f} ms, max {max(paints):.0f} ms")
    if delays:
        delays.sort()
        p95 = delays[min(len(delays) - 1, int(0.95 * len(delays)))]
        print(f"state change → shown in the page: median {statistics.median(delays):.0f} ms, p95 {p95:.0f} ms")
    decoded, encoded = weights[-1]
    print(f"dashboard weight: {decoded / 1000:.1f} KB ({encoded / 1000:.1f} KB over the wire), htmx included")


if __name__ == "__main__":
    main()
