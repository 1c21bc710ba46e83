"""The status page in a real headless browser (Debian's Chromium, driven by
Selenium through chromedriver): it renders after HTTP Basic sign-in, a provider
that keeps failing shows OFFLINE after a reload, a provider's markup-looking
error is shown as text and never runs, and a screenshot of the page is kept
under `tests/artifacts/` (or `$FALLBACK_PROXY_TEST_ARTIFACTS`), its path printed.

A web page of another origin calls the API from the same browser (CORS).

Skipped, saying why, only where Chromium or chromedriver is not installed
(`.ci/run` installs both: `apt-get install -y chromium chromium-driver`)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from proxy.fakes import FakeOpenAI

from .conftest import ServedApp, openai_provider

ADMIN_KEY = "admin-secret"
XSS = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1800",
)
ARTIFACTS = Path(os.environ.get("FALLBACK_PROXY_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")

pytestmark = pytest.mark.slow


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip(
            "Chromium or chromedriver is not installed: the status page's browser test needs both "
            "(Debian: apt-get install -y chromium chromium-driver; .ci/run installs them)"
        )
    return chromium, driver


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    """A headless Chromium with a fresh profile, driven by Selenium."""
    chromium, driver_path = _browser_paths()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    # An explicit chromedriver: Selenium Manager never runs (it would try to download one).
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def markup_upstream(serve_asgi: Callable[..., ServedApp]) -> ServedApp:
    """A provider that fails with a 500 whose text is markup, until told otherwise."""

    async def fail(request: Request) -> Response:
        return PlainTextResponse(XSS, status_code=500)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": []})

    return serve_asgi(
        Starlette(routes=[Route("/v1/chat/completions", fail, methods=["POST"]), Route("/v1/models", models)])
    )


def test_the_status_page_in_chromium(
    browser: Any,
    serve: Callable[..., ServedApp],
    cloud: FakeOpenAI,
    backup: FakeOpenAI,
    markup_upstream: ServedApp,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    proxy = serve(
        {
            "server": {"admin_key": ADMIN_KEY},
            "providers": {
                "cloud": openai_provider(cloud.url, quota={"requests_per_day": 1000}),
                "backup": openai_provider(backup.url),
                "markup": openai_provider(markup_upstream.url),
            },
            "routes": {
                "default": ["cloud", "backup"],
                "coding": {"first": "markup", "on": {"markup": {"server_error": "backup"}}},
            },
            "health": {"failure_threshold": 3},
        }
    )
    page = f"http://ops:{ADMIN_KEY}@127.0.0.1:{proxy.port}/status?refresh=0"

    def state_of(provider: str) -> str:
        return str(browser.find_element(By.CSS_SELECTOR, f'#providers tr[data-provider="{provider}"] .state').text)

    browser.get(page)
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#providers"))
    assert browser.find_element(By.TAG_NAME, "h1").text == "fallback-proxy status"
    assert state_of("cloud") == "HEALTHY" and state_of("backup") == "HEALTHY"
    nodes = browser.find_elements(By.CSS_SELECTOR, '[data-route="default"] tr[data-node]')
    assert [node.get_attribute("data-node") for node in nodes] == ["cloud", "backup"]
    assert "No failovers" in browser.find_element(By.ID, "failovers").text

    cloud.set_fault("status", status=503)
    with openai.OpenAI(base_url=proxy.url + "/v1", api_key="x", max_retries=0) as sdk:
        for route in ("default", "default", "default", "coding"):
            answer = sdk.chat.completions.with_raw_response.create(
                model=route, messages=[{"role": "user", "content": "hi"}]
            )
            assert answer.headers["x-proxy-provider"] == "backup"

    browser.refresh()
    WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, "#failovers tr.failover"))
    assert state_of("cloud") == "OFFLINE"
    assert state_of("backup") == "HEALTHY"
    cloud_row = browser.find_element(By.CSS_SELECTOR, '#providers tr[data-provider="cloud"]').text
    assert "open" in cloud_row and "server_error: 3 consecutive failures" in cloud_row
    assert "requests: 3 used, 997 left of 1,000" in cloud_row
    failovers = browser.find_element(By.ID, "failovers").text
    assert failovers.count("cloud → backup") == 3 and "markup → backup" in failovers

    # The markup in a provider's error is text on the page; it never ran.
    assert browser.title == "fallback-proxy status"
    assert XSS in browser.find_element(By.CSS_SELECTOR, '#providers tr[data-provider="markup"] .last-error').text
    assert browser.find_elements(By.CSS_SELECTOR, "body script, body img") == []

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "status-page.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\n[status page screenshot: {screenshot.resolve()}]")


def test_without_the_right_key_the_browser_shows_nothing_of_the_page(
    browser: Any, serve: Callable[..., ServedApp], cloud: FakeOpenAI
) -> None:
    """A wrong password in the URL: the Basic challenge comes back (Chromium would
    ask for the password; headless, it shows an empty page), never the status."""
    from selenium.webdriver.common.by import By

    proxy = serve(
        {
            "server": {"admin_key": ADMIN_KEY},
            "providers": {"cloud": openai_provider(cloud.url)},
            "routes": {"default": ["cloud"]},
        }
    )
    browser.get(f"http://ops:wrong@127.0.0.1:{proxy.port}/status")
    assert browser.find_elements(By.ID, "providers") == []
    assert "cloud" not in browser.find_element(By.TAG_NAME, "body").text
    assert browser.title != "fallback-proxy status"
    browser.get(f"http://ops:{ADMIN_KEY}@127.0.0.1:{proxy.port}/status")
    assert browser.find_elements(By.ID, "providers") != []  # the same browser, the right key: the page


CALLER_PAGE = """<!doctype html><html><head><title>caller</title></head><body><pre id="out">running</pre>
<script>
const query = new URLSearchParams(location.search);
const proxy = query.get("proxy");
const headers = {"authorization": "Bearer " + query.get("key"), "content-type": "application/json",
                 "x-stainless-lang": "js"};
const body = {model: "default", messages: [{role: "user", content: "hi"}]};
(async () => {
  const out = {};
  try {
    const plain = await fetch(proxy + "/v1/chat/completions", {method: "POST", headers, body: JSON.stringify(body)});
    out.plain = (await plain.json()).choices[0].message.content;
    out.provider = plain.headers.get("x-proxy-provider");
    const streamed = await fetch(proxy + "/v1/chat/completions",
                                 {method: "POST", headers, body: JSON.stringify({...body, stream: true})});
    const reader = streamed.body.getReader();
    const decoder = new TextDecoder();
    let text = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) break;
      text += decoder.decode(value, {stream: true});
    }
    out.streamed = text.split("\\n").filter(l => l.startsWith("data: {"))
      .map(l => JSON.parse(l.slice(6))).map(c => (c.choices[0] && c.choices[0].delta.content) || "").join("");
    out.done = text.trimEnd().endsWith("data: [DONE]");
  } catch (error) {
    out.error = String(error);
  }
  document.getElementById("out").textContent = JSON.stringify(out);
})();
</script></body></html>"""


def test_a_page_of_another_origin_calls_the_proxy_from_chromium(
    browser: Any, serve: Callable[..., ServedApp], serve_asgi: Callable[..., ServedApp], cloud: FakeOpenAI
) -> None:
    """A web app on another origin calls the proxy with `fetch` (a key, the
    JSON content type, an SDK header: a preflight), as a browser build of the
    openai SDK would: it reads the answer, the stream and `x-proxy-provider`."""
    import json

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    proxy = serve(
        {
            "auth": {"keys": ["team-key"]},
            "providers": {"cloud": openai_provider(cloud.url)},
            "routes": {"default": ["cloud"]},
        }
    )

    async def page(request: Request) -> Response:
        return Response(CALLER_PAGE, media_type="text/html")

    site = serve_asgi(Starlette(routes=[Route("/", page)]))
    browser.get(f"http://127.0.0.1:{site.port}/?key=team-key&proxy=http://localhost:{proxy.port}")  # another origin
    WebDriverWait(browser, 30).until(lambda b: b.find_element(By.ID, "out").text != "running")
    out = json.loads(browser.find_element(By.ID, "out").text)
    assert out == {"plain": "Hello from cloud.", "provider": "cloud", "streamed": "Hello from cloud.", "done": True}
