"""The browser tier: Debian's Chromium driven by Playwright (never `playwright install`), against `serve` with its
HTTPS edge. Each flow saves a screenshot under test-artifacts/screenshots/."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from controller.auth.admin import Administration
from controller.config import validate_config
from controller.runtime.process import free_port
from controller.store import make_store
from controller.web.base import vendor_scripts
from tests.support.server import TESTER_PASSWORD, ServeProcess, edge_section, require, run_sync, serve_subprocess

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
CHROMIUM_ARGS += ["--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
USER_PASSWORD = "bob-password-1"


@dataclass
class Site:
    served: ServeProcess
    admin_password: str

    @property
    def url(self) -> str:
        return self.served.https_url


@pytest.fixture(scope="package")  # not longer: Playwright's sync API keeps an event loop running meanwhile
def browser() -> Iterator[Browser]:
    require(Path(CHROMIUM).exists(), "chromium is not installed (apt-get install chromium)")
    require(bool(vendor_scripts()), "htmx is not installed: scripts/bootstrap.sh installs it with npm")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("web")
    for name in ("a", "b"):
        shutil.copy(tiny_model, root / f"{name}.gguf")
    config = {
        "server": {"data_dir": str(root / "data"), "listen": f"127.0.0.1:{free_port()}"},
        "models_dir": str(root / "none"),
        "defaults": {"ctx_size": 1024, "max_concurrent": 1},
        "scheduling": {"max_loaded_models": 2},
        "auth": {"token_cache_ttl": 0.5},
        "edge": edge_section(),
        "models": {name: {"path": str(root / f"{name}.gguf")} for name in ("a", "b")},
    }
    run_sync(add_user(config, "bob", USER_PASSWORD, ("a",)))
    with serve_subprocess(config, root) as served:
        yield Site(served, TESTER_PASSWORD)  # the admin serve_subprocess provisions


async def add_user(config: dict[str, object], name: str, password: str, models: tuple[str, ...]) -> None:
    """A user of the role `user` limited to `models` (made before the server starts, like the CLI would)."""
    validated = validate_config(config)
    store, _ = make_store(validated)
    await store.open()
    try:
        await Administration(store).add_user(name, password, "user", "tests", models)
    finally:
        await store.close()


@dataclass
class Visit:
    """A browser context (its own cookies) with every console message and CSP violation recorded."""

    context: BrowserContext
    page: Page
    console: list[str]

    def errors(self) -> list[str]:
        return [m for m in self.console if m.startswith(("error", "csp"))]

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def open_visit(browser: Browser, site: Site) -> Visit:
    context = browser.new_context(ignore_https_errors=True, base_url=site.url, viewport={"width": 1200, "height": 800})
    page = context.new_page()
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"error: {error}"))
    context.on("weberror", lambda error: console.append(f"error: {error.error}"))
    return Visit(context, page, console)


def sign_in(visit: Visit, user: str, password: str) -> None:
    visit.page.goto("/ui/")
    visit.page.fill("#username", user)
    visit.page.fill("#password", password)
    visit.page.click("form button[type=submit]")
    visit.page.wait_for_url("**/ui/")


@pytest.fixture
def admin(browser: Browser, site: Site) -> Iterator[Visit]:
    visit = open_visit(browser, site)
    sign_in(visit, "tester", site.admin_password)
    yield visit
    assert visit.errors() == [], "the browser console shows errors or CSP violations"
    visit.context.close()


@pytest.fixture(autouse=True)
def _marked(request: pytest.FixtureRequest) -> None:
    request.node.add_marker(pytest.mark.browser)
