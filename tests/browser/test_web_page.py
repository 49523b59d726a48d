"""The web page in a real browser: sign-in, live model states, logs, tokens, users, CSRF, CSP."""

from __future__ import annotations

import ssl
import time

import httpx
import ollama
import pytest
from playwright.sync_api import Browser, expect

from tests.browser.conftest import USER_PASSWORD, Site, Visit, open_visit, sign_in

PAGES = ["/ui/", "/ui/tokens", "/ui/users", "/ui/system", "/ui/models/a/logs"]


def test_web_sign_in_says_what_went_wrong(browser: Browser, site: Site) -> None:
    visit = open_visit(browser, site)
    visit.page.goto("/ui/")
    expect(visit.page).to_have_url(f"{site.url}/ui/login?next=/ui/")
    visit.page.fill("#username", "tester")
    visit.page.fill("#password", "not the password")
    visit.page.click("form button[type=submit]")
    expect(visit.page.locator(".alert")).to_have_text("Wrong user name or password.")
    visit.shot("sign-in")
    visit.page.fill("#username", "tester")
    visit.page.fill("#password", site.admin_password)
    visit.page.click("form button[type=submit]")
    expect(visit.page).to_have_url(f"{site.url}/ui/")
    assert visit.errors() == []  # the wrong password's page is a page, not an error (it once answered 401)
    visit.context.close()


def test_web_next_goes_only_to_local_paths(browser: Browser, site: Site) -> None:
    visit = open_visit(browser, site)
    visit.page.goto("/ui/login?next=//evil.example/steal")
    visit.page.fill("#username", "tester")
    visit.page.fill("#password", site.admin_password)
    visit.page.click("form button[type=submit]")
    expect(visit.page).to_have_url(f"{site.url}/ui/")
    visit.context.close()


def test_web_load_and_unload_change_the_state_without_a_reload(admin: Visit, site: Site) -> None:
    page = admin.page
    page.evaluate("window.stillTheSamePage = true")
    row = page.locator("#model-a-latest")
    expect(row).to_have_attribute("data-state", "stopped")
    row.get_by_role("button", name="Load a", exact=True).click()
    expect(page.locator("#model-a-latest")).to_have_attribute("data-state", "ready")
    loaded = page.locator("#model-a-latest")
    expect(loaded.get_by_role("button", name="Unload a", exact=True)).to_be_visible()
    expect(loaded.get_by_role("button", name="Load a", exact=True)).to_have_count(0)  # only what makes sense now
    admin.shot("dashboard")
    # A change made elsewhere (the API) arrives through the events stream.
    site.served.http.post("/control/v1/models/a/unload")
    expect(page.locator("#model-a-latest")).to_have_attribute("data-state", "stopped")
    site.served.http.post("/control/v1/models/b/load")
    expect(page.locator("#model-b-latest")).to_have_attribute("data-state", "ready")
    assert page.evaluate("window.stillTheSamePage") is True
    site.served.http.post("/control/v1/models/b/unload")


def test_web_a_failed_load_shows_its_error(admin: Visit, site: Site) -> None:
    page = admin.page
    model = site.served.config["models"]["a"]["path"]
    with open(model, "rb") as handle:
        original = handle.read()
    try:
        with open(model, "wb") as handle:  # its header promises more tensor data than is there: refused
            handle.write(original[: len(original) // 2])
        page.locator("#model-a-latest").get_by_role("button", name="Load a", exact=True).click()
        expect(page.locator("#model-a-latest")).to_have_attribute("data-state", "failed")
        expect(page.locator("#model-a-latest .alert")).to_contain_text("failed to load")
        admin.shot("failed-load")
    finally:
        with open(model, "wb") as handle:
            handle.write(original)
        site.served.http.post("/control/v1/models/a/unload")


def test_web_logs_follow_filter_and_pause(admin: Visit, site: Site) -> None:
    site.served.http.post("/control/v1/models/a/load")
    page = admin.page
    page.goto("/ui/models/a/logs")
    lines = page.locator("#log .line")
    before = lines.count()
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    site.served.http.post("/api/chat", json={**chat, "options": {"num_predict": 2}})
    expect(lines.nth(before)).to_be_attached()  # new lines arrived while the page stayed
    page.fill("#log-filter", "print_timing")
    visible = page.locator("#log .line:not(.hidden)")
    expect(visible.first).to_contain_text("print_timing")
    assert all("print_timing" in text for text in visible.all_inner_texts())
    page.click("#log-pause")
    expect(page.locator("#log-pause")).to_have_attribute("aria-pressed", "true")
    count = lines.count()
    site.served.http.post("/api/chat", json={**chat, "options": {"num_predict": 2}})
    time.sleep(0.5)
    assert lines.count() == count, "paused: no new lines"
    page.click("#log-pause")
    expect(lines.nth(count)).to_be_attached()
    admin.shot("logs")
    download = page.request.get("/ui/models/a/logs/download")
    assert download.ok and "llama_server" in download.text()
    site.served.http.post("/control/v1/models/a/unload")


def test_web_token_made_used_and_revoked(admin: Visit, site: Site) -> None:
    page = admin.page
    page.goto("/ui/tokens")
    page.fill("#token-name", "from-the-browser")
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("#new-token").input_value()
    assert secret.startswith("lc_")
    expect(page.get_by_role("button", name="Copy")).to_be_visible()
    admin.shot("token-created")
    trust = ssl.create_default_context(cafile=site.served.ca_file())
    headers = {"Authorization": f"Bearer {secret}"}
    with ollama.Client(host=site.url, verify=trust, headers=headers, timeout=60) as client:
        assert {m.model for m in client.list().models} == {"a:latest", "b:latest"}
        page.goto("/ui/tokens")
        assert secret not in page.content(), "the secret is shown once only"
        page.get_by_role("button", name="Revoke from-the-browser").click()
        deadline = time.monotonic() + 5
        while True:
            try:
                client.list()
            except ollama.ResponseError as refused:
                assert refused.status_code == 401 and "revoked" in refused.error
                break
            assert time.monotonic() < deadline, "the revoked token still works"
            time.sleep(0.1)


def test_web_sign_out_ends_the_session(browser: Browser, site: Site) -> None:
    visit = open_visit(browser, site)
    sign_in(visit, "tester", site.admin_password)
    visit.page.get_by_role("button", name="Sign out").click()
    expect(visit.page).to_have_url(f"{site.url}/ui/login")
    visit.page.goto("/ui/")
    expect(visit.page).to_have_url(f"{site.url}/ui/login?next=/ui/")
    visit.context.close()


def test_web_a_user_sees_only_their_models_and_no_admin_pages(browser: Browser, site: Site) -> None:
    visit = open_visit(browser, site)
    sign_in(visit, "bob", USER_PASSWORD)
    page = visit.page
    expect(page.locator("#model-a-latest")).to_be_visible()
    expect(page.locator("#model-b-latest")).to_have_count(0)
    expect(page.get_by_role("button", name="Load a", exact=True)).to_have_count(0)  # no models:manage
    expect(page.get_by_role("link", name="Users")).to_have_count(0)
    visit.shot("user-dashboard")
    answer = page.goto("/ui/users")
    assert answer is not None and answer.status == 403
    expect(page.locator("h1")).to_have_text("Not allowed")
    visit.context.close()


def test_web_a_form_without_its_csrf_token_is_refused(admin: Visit) -> None:
    refused = admin.page.request.post("/ui/tokens", form={"name": "sneaky"})
    assert refused.status == 403 and "CSRF" in refused.text()
    forged = admin.page.request.post("/ui/models/a/load", form={"csrf_token": "0" * 64})
    assert forged.status == 403


@pytest.mark.parametrize("path", PAGES)
def test_web_every_page_has_the_csp_and_a_clean_console(admin: Visit, path: str) -> None:
    answer = admin.page.goto(path)
    assert answer is not None and answer.ok
    policy = answer.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    admin.page.wait_for_load_state("networkidle")
    admin.shot(path.strip("/").replace("/", "-") or "ui")


def test_web_dashboard_weighs_under_100_kb(admin: Visit) -> None:
    admin.page.goto("/ui/")
    admin.page.wait_for_load_state("networkidle")
    weight = admin.page.evaluate(
        """() => performance.getEntriesByType("navigation").concat(performance.getEntriesByType("resource"))
                 .reduce((sum, entry) => sum + entry.decodedBodySize, 0)"""
    )
    assert 0 < weight < 100_000, f"the dashboard and everything it loads is {weight} bytes"


def test_web_browser_gets_redirected_from_the_root(site: Site) -> None:
    answer = httpx.get(f"{site.served.url}/", headers={"Accept": "text/html"})
    assert answer.status_code == 302 and answer.headers["location"] == "/ui/"
