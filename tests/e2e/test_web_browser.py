"""The web page in a real browser: Debian's chromium driven by Selenium through Debian's
chromedriver (one source package, so they always match; nothing is downloaded).

One flow, as the admin at 3 a.m. uses it, against a real ``hermes-py serve`` whose
``web`` child serves the page: log in, see the destination's card, hold it and see
``hermes-py status`` say HELD, release it, and watch an instance that ``hermes-py send``
drops in appear in the live feed (serve's ring file -> the web child -> SSE -> the
page's EventSource). Skipped where chromium is missing, except in CI (CI=true), where a
missing browser fails the run. The browser gets a new empty profile (``--user-data-dir``)
per test, so nothing a previous run left (cookies, cache) decides anything.

Beside it, ``hermes-py web`` alone as a real listener: TLS from rules.toml, the Host
check on the wire, niced below the receiver, and a clean stop on SIGTERM.
"""

from __future__ import annotations

import json
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

pytestmark = [pytest.mark.e2e]

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,1000")
PASSWORD = "night shift 0300"
WAIT = 30.0


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
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
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def _state(driver: Any, name: str) -> str:
    from selenium.webdriver.common.by import By
    return str(driver.find_element(By.CSS_SELECTOR, f"#dest-{name} .state").text)


def _click(driver: Any, css: str) -> bool:
    """Click what ``css`` names now (a card re-rendered since it was found is stale)."""
    from selenium.webdriver.common.by import By
    driver.find_element(By.CSS_SELECTOR, css).click()
    return True


def _pacs_line(h: Hermes) -> str:
    out = h.cli("status").stdout
    return next(line for line in out.splitlines() if line.startswith("pacs "))


@pytest.mark.browser
def test_log_in_hold_release_and_watch_the_feed(serve: Callable[..., Hermes], tmp_path: Path,
                                                browser: Any) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    web_port = free_port()
    cfg = config([dest("pacs", free_port(), "PACS")])  # nothing listens there: it queues
    h = serve(cfg)
    h.write_config(cfg.render() + "\n" + toml_table("web", {"port": web_port}))
    h.start()
    wait_for(lambda: port_open(web_port), WAIT, 0.2, "the web child to listen")
    web_pid, receive_pid = h.pid("web"), h.pid("receive")
    assert web_pid and receive_pid and web_pid != receive_pid  # its own child of serve ...
    assert nice_of(web_pid) == min(19, nice_of(receive_pid) + 10)  # ... below the receiver
    added = _add_user(h)
    assert added.returncode == 0, added.stderr
    base = f"http://127.0.0.1:{web_port}"
    # the page re-renders a card on every refresh: an element read just then is stale
    wait = WebDriverWait(browser, WAIT, ignored_exceptions=(StaleElementReferenceException,))

    browser.get(base + "/")
    assert "/login" in browser.current_url
    browser.find_element(By.ID, "username").send_keys("ada")
    browser.find_element(By.ID, "password").send_keys(PASSWORD)
    browser.find_element(By.ID, "login").click()
    card = wait.until(lambda d: d.find_elements(By.ID, "dest-pacs"))[0]
    assert "queued" in card.text and browser.find_element(By.ID, "who").text.startswith("ada")

    wait.until(lambda d: _click(d, '#dest-pacs button[data-verb="hold"]'))
    wait.until(lambda d: _state(d, "pacs") == "HELD")
    assert "HELD" in _pacs_line(h)
    wait.until(lambda d: _click(d, '#dest-pacs button[data-verb="release"]'))
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


def nice_of(pid: int) -> int:
    """The nice value of a process (field 19 of /proc/PID/stat)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_web_alone_over_tls_niced_host_checked(tmp_path: Path) -> None:
    """``hermes-py web`` by itself (no serve): HTTPS from [web] tls_cert_file/tls_key_file,
    HSTS, a rebinding Host refused on the wire, nice +10, exit 0 on SIGTERM."""
    import http.client
    import signal
    import ssl
    import subprocess

    trustme = pytest.importorskip("trustme")
    from tests.support.cli import hermes_cmd

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "web.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "web.key"))
    port = free_port()
    rules = config([dest("pacs", free_port(), "PACS")]).render() + "\n" + toml_table(
        "web", {"port": port, "tls_cert_file": "web.pem", "tls_key_file": "web.key"})
    (tmp_path / "rules.toml").write_text(rules)
    (tmp_path / "spool").mkdir(exist_ok=True)
    proc = subprocess.Popen([*hermes_cmd(), "web", "-c", str(tmp_path / "rules.toml")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: port_open(port) or proc.poll() is not None, WAIT, 0.1,
                 "hermes-py web to listen")
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        assert nice_of(proc.pid) == min(19, nice_of(os.getpid()) + 10)
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)

        def get(path: str, host: str) -> http.client.HTTPResponse:
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=10)
            conn.request("GET", path, headers={"Host": host})
            return conn.getresponse()
        r = get("/login", f"127.0.0.1:{port}")
        body = r.read().decode()
        assert r.status == 200 and "hermes-py user add NAME --role admin" in body
        assert r.getheader("strict-transport-security", "").startswith("max-age=")
        assert get("/login", "localhost").status == 200
        assert get("/login", f"rebind.attacker:{port}").status == 400
        r = get("/api/v1/status", "localhost")
        assert r.status == 401 and set(json.loads(r.read())) == {"error", "detail"}
        plain = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            plain.request("GET", "/login")
            answered: int | None = plain.getresponse().status
        except (http.client.HTTPException, OSError):
            answered = None  # the TLS handshake failed: no page in clear
        assert answered != 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
    assert code == 0
