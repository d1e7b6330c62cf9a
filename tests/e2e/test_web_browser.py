"""The web page in a real browser: Debian's chromium driven by Selenium through Debian's
chromedriver (one source package, so they always match; nothing is downloaded).

One flow, as the admin at 3 a.m. uses it, against a real ``hermes-py serve`` whose
``web`` child serves the page: log in, see the destination's card, hold it and see
``hermes-py status`` say HELD, release it, and watch an instance that ``hermes-py send``
drops in appear in the live feed (serve's ring file -> the web child -> SSE -> the
page's EventSource). Skipped where chromium is missing, except in CI (CI=true), where a
missing browser fails the run.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import config
from tests.support.config import dest, toml_table
from tests.support.dicomgen import make_instance, save
from tests.support.peers import ToolMissing, free_port, in_ci, wait_for
from tests.support.serve import Hermes, port_open

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000")
PASSWORD = "night shift 0300"
WAIT = 30.0


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        raise ToolMissing(f"{', '.join(missing)} not installed "
                          "(apt-get install chromium chromium-driver)")
    if in_ci():
        import selenium  # noqa: F401  (in CI a missing test extra is a failure, not a skip)
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch a driver
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def _state(driver: Any, name: str) -> str:
    from selenium.webdriver.common.by import By
    return str(driver.find_element(By.CSS_SELECTOR, f"#dest-{name} .state").text)


def _pacs_line(h: Hermes) -> str:
    out = h.cli("status").stdout
    return next(line for line in out.splitlines() if line.startswith("pacs "))


def test_log_in_hold_release_and_watch_the_feed(serve: Callable[..., Hermes], tmp_path: Path,
                                                browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    web_port = free_port()
    cfg = config([dest("pacs", free_port(), "PACS")])  # nothing listens there: it queues
    h = serve(cfg)
    h.write_config(cfg.render() + "\n" + toml_table("web", {"port": web_port}))
    h.start()
    wait_for(lambda: port_open(web_port), WAIT, 0.2, "the web child to listen")
    added = _add_user(h)
    assert added.returncode == 0, added.stderr
    base = f"http://127.0.0.1:{web_port}"
    wait = WebDriverWait(browser, WAIT)

    browser.get(base + "/")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "username").send_keys("ada")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login").click()
    card = wait.until(lambda d: d.find_elements(By.ID, "dest-pacs"))[0]
    assert "queued" in card.text and browser.find_element(By.ID, "who").text.startswith("ada")

    card.find_element(By.CSS_SELECTOR, 'button[data-verb="hold"]').click()
    wait.until(lambda d: _state(d, "pacs") == "HELD")
    assert "HELD" in _pacs_line(h)
    browser.find_element(By.CSS_SELECTOR, '#dest-pacs button[data-verb="release"]').click()
    wait.until(lambda d: _state(d, "pacs") != "HELD")
    assert "HELD" not in _pacs_line(h)

    browser.get(base + "/events")
    wait.until(lambda d: d.find_element(By.ID, "feed-state").text == "live")
    ds = make_instance(8, 8)
    sop = str(ds.SOPInstanceUID)
    sent = h.cli("send", str(save(ds, tmp_path / "one.dcm")), "--no-progress")
    assert sent.returncode == 0, sent.stderr
    wait.until(lambda d: any(sop in li.text for li in d.find_elements(By.CSS_SELECTOR,
                                                                      "#feed li")))
    events = {li.get_attribute("data-event") for li in
              browser.find_elements(By.CSS_SELECTOR, "#feed li") if sop in li.text}
    assert "received" in events


def _add_user(h: Hermes) -> Any:
    import subprocess

    from tests.support.cli import hermes_cmd
    return subprocess.run([*hermes_cmd(), "user", "add", "ada", "--role", "admin", "-c",
                           str(h.path)], input=PASSWORD + "\n", capture_output=True,
                          text=True, timeout=60)
