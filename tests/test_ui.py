"""`park ui` in a real headless Chromium, over two real federated brokers.

One `park ui` process (the command as a user runs it, with a client configuration
naming both sites) and one browser serve every test of the module; each test
submits its own jobs and waits on what the page shows with explicit waits.
"""
from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

import park
from harness import Broker, as_user, broker_cli, federate, make_broker, public_key_of
from park.signer import write_private_key

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service as ChromeService  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions as ec  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.timeout(120)
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
WAIT = 30     # seconds any page condition may take


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("ui")
    directory.chmod(0o777)     # the brokers' job accounts write markers here (see conftest.jobs_reach_tmp_path)
    for parent in directory.parents:
        if parent == Path(tempfile.gettempdir()):
            break
        parent.chmod(parent.stat().st_mode | 0o711)
    return directory


@pytest.fixture(scope="module")
def sites(module_dir: Path, user_key: Path) -> Iterator[tuple[Broker, Broker]]:
    sns, cluster = make_broker(module_dir, "sns", workers=4, extra=["--cpus", "4"]), make_broker(module_dir, "cluster", workers=2)
    federate(sns, cluster)
    yield sns, cluster
    for broker in (sns, cluster):
        for service in broker.services:
            service.close()
        broker.stop()


@contextlib.contextmanager
def park_ui(config: Path, **env: str) -> Iterator[str]:
    """A `park ui` process over the services of `config`; its printed URL (with the secret)."""
    proc = subprocess.Popen([sys.executable, "-m", "park.cli", "ui", "--no-browser"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PARK_CONFIG": str(config), **env})
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        first = lines.get(timeout=WAIT)
    except queue.Empty:
        proc.kill()
        raise AssertionError("park ui printed nothing") from None
    match = re.search(r"(http://127\.0\.0\.1:\d+/\?secret=\S+)", first)
    assert match, first
    try:
        yield match[1]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0


@pytest.fixture(scope="module")
def config(sites: tuple[Broker, Broker], module_dir: Path) -> Path:
    path = module_dir / "config.toml"
    path.write_text("".join(f'[services.{b.site}]\naddress = "{b.address}"\ncert = "{b.cert}"\n' for b in sites))
    return path


@pytest.fixture(scope="module")
def ui(config: Path) -> Iterator[str]:
    with park_ui(config) as url:
        yield url


@pytest.fixture(scope="module")
def browser(ui: str, module_dir: Path) -> Iterator[webdriver.Chrome]:
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/run installs them)")
    downloads = module_dir / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=ChromeService(DRIVER), options=options)
    driver.get(ui)
    yield driver
    driver.quit()


def wait(driver: webdriver.Chrome, condition, timeout: float = WAIT):  # type: ignore[no-untyped-def]
    return WebDriverWait(driver, timeout).until(condition)


def row(driver: webdriver.Chrome, site: str, job_id: str):  # type: ignore[no-untyped-def]
    """The job's row, once the page lists it (filtered by its id, so paging never hides it)."""
    box = driver.find_element(By.ID, "text-filter")
    box.clear()
    box.send_keys(job_id)
    return wait(driver, ec.presence_of_element_located((By.CSS_SELECTOR, f'tr[data-key="{site}/{job_id}"]')))


def state_is(site: str, job_id: str, state: str):  # type: ignore[no-untyped-def]
    selector = f'tr[data-key="{site}/{job_id}"][data-state="{state}"]'
    return lambda d: d.find_elements(By.CSS_SELECTOR, selector)


def select(driver: webdriver.Chrome, site: str, job_id: str) -> None:
    row(driver, site, job_id)
    selector = f'tr[data-key="{site}/{job_id}"]'
    # The list is redrawn as events arrive: click the row as it is now, again if it was just replaced.
    wait(driver, lambda d: d.execute_script(f"const r = document.querySelector('{selector}'); r && r.click(); return r"))
    wait(driver, ec.text_to_be_present_in_element((By.ID, "detail-meta"), f"{site}/{job_id}"))


def cells(driver: webdriver.Chrome, selector: str, pattern: str) -> str:
    """The text of the table row `selector`, cells tab-separated, once it matches `pattern` (read in one
    script: tables are redrawn as news arrives, so an element found may be gone a moment later)."""
    script = "const r = document.querySelector(arguments[0]); " \
             "return r ? [...r.cells].map((c) => c.textContent).join('\\t') : ''"
    return wait(driver, lambda d: (text := d.execute_script(script, selector)) and re.search(pattern, text) and text)


def test_jobs_of_both_sites_are_listed_and_change_state_live(browser: webdriver.Chrome, sites, module_dir: Path) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = sites
    assert not browser.get_log("browser"), "the page logged errors"
    gate = module_dir / "gate"
    with sns.service():
        waiting = park.submit("park_test_tasks:settle_when", str(gate), True, 0.5, label="gated")
    with cluster.service():
        quick = park.submit("park_test_tasks:add", 2, 3, label="quick add")
    assert quick.wait(timeout=60) == "completed"
    wait(browser, state_is("cluster", quick.id, "completed"))
    row(browser, "sns", waiting.id)
    wait(browser, state_is("sns", waiting.id, "running"))
    select(browser, "sns", waiting.id)
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#graph g.node[data-state="running"]'))
    browser.execute_script("window.parkUiMarker = 'no reload'")
    gate.write_text("go")
    wait(browser, state_is("sns", waiting.id, "completed"))
    wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, '#graph g.node[data-state="completed"]'))
    wait(browser, ec.text_to_be_present_in_element((By.ID, "detail-state"), "completed"))
    assert browser.execute_script("return window.parkUiMarker") == "no reload", "the page was reloaded"
    sites_shown = browser.find_element(By.ID, "sites").text
    assert "sns: live" in sites_shown and "cluster: live" in sites_shown


def test_a_race_is_plotted_one_line_per_contestant_with_its_threshold(browser: webdriver.Chrome, sites) -> None:  # type: ignore[no-untyped-def]
    sns, _ = sites
    slow = [5.0, 4.5, 4.0, 3.8, 3.6, 3.5, 3.4, 3.3, 3.2, 3.1]
    with sns.service():
        fits = [park.submit("park_test_tasks:fit", slow, 0.2, memo=False, label="fit a"),
                park.submit("park_test_tasks:fit", [4.0, 3.0, 2.0, 1.5, 1.1, 1.0], 0.2, memo=False, label="fit b"),
                park.submit("park_test_tasks:fit", slow, 0.2, memo=False, label="fit c")]
        race = park.race(fits, until="chisq < 1.2", label="the race")
    assert race.result(timeout=60) == {"chisq": 1.1, "step": 4.0}
    select(browser, "sns", race.id)
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#plot path.line")) == 3)
    drawn = {p.get_attribute("data-id") for p in browser.find_elements(By.CSS_SELECTOR, "#plot path.line")}
    assert drawn == {f.id for f in fits}
    assert "until chisq < 1.2" in browser.find_element(By.ID, "plot").text
    assert browser.find_elements(By.CSS_SELECTOR, "#plot line.threshold")
    assert "won by fit b" in row(browser, "sns", race.id).text


def test_a_cancelled_job_names_the_root_failure_across_sites(browser: webdriver.Chrome, sites) -> None:  # type: ignore[no-untyped-def]
    sns, cluster = sites
    with sns.service():
        reduction = park.submit("park_test_tasks:fail", "bad calibration", label="reduction")
    with cluster.service():
        fit = park.submit("park_test_tasks:add", 1, 1, when=reduction.iscompleted, label="fit")
        plot = park.submit("park_test_tasks:add", 2, 2, when=fit.iscompleted, label="plot")
    assert plot.wait(timeout=60) == "cancelled"
    select(browser, "cluster", plot.id)
    cause = wait(browser, ec.visibility_of_element_located((By.ID, "root-cause")))
    assert "sns/reduction failed" in cause.text and "bad calibration" in cause.text
    graph = browser.find_element(By.ID, "graph")
    assert {g.get_attribute("data-state") for g in graph.find_elements(By.CSS_SELECTOR, "g.node")} == \
        {"failed", "cancelled"}
    assert len(graph.find_elements(By.CSS_SELECTOR, "g.node")) == 3


def test_a_memo_hit_is_listed_under_its_own_id_naming_the_job_it_reused(browser: webdriver.Chrome, sites) -> None:  # type: ignore[no-untyped-def]
    _, cluster = sites
    with cluster.service():
        first = park.submit("park_test_tasks:add", 40, 2, label="memoized sum")
    assert first.result(timeout=60) == 42
    row(browser, "cluster", first.id)
    # site, id, owner, label, state, attempt, memo, progress, detail
    cells(browser, f'tr[data-key="cluster/{first.id}"]', r"^cluster\t\w+\t\w*\tmemoized sum\tcompleted\t1\t\t")
    memo_column = browser.find_element(By.CSS_SELECTOR, "#jobs th.memo")
    assert not memo_column.is_displayed(), "no job listed was a memo hit, yet the memo column takes room"
    with cluster.service():
        again = park.submit("park_test_tasks:add", 40, 2, label="memoized sum")
    assert again.memo_hit
    row(browser, "cluster", again.id)      # its own row, under the id submitted, following the job it names
    cells(browser, f'tr[data-key="cluster/{again.id}"]',
          rf"\tmemoized sum\tcompleted\t1\thit: {first.id[:10]}\t.*result 42")
    row(browser, "cluster", first.id)
    cells(browser, f'tr[data-key="cluster/{first.id}"]', r"\tcompleted\t1\treused ×1\t")
    assert memo_column.is_displayed()
    select(browser, "cluster", again.id)
    assert f"a memo hit of {first.id}" in browser.find_element(By.ID, "detail-meta").text
    wait(browser, ec.text_to_be_present_in_element((By.ID, "memo"), f"a memo hit: reused {first.id}"))


def test_an_output_downloads_with_its_bytes(browser: webdriver.Chrome, sites, module_dir: Path) -> None:  # type: ignore[no-untyped-def]
    sns, _ = sites
    text = "reduced at sns: 0123456789 " * 40
    with sns.service():
        writer = park.submit("park_test_tasks:write_output", text, label="writer")
    assert writer.wait(timeout=60) == "completed"
    select(browser, "sns", writer.id)
    wait(browser, ec.element_to_be_clickable((By.CSS_SELECTOR, "a.output"))).click()
    target = module_dir / "downloads" / "output"
    wait(browser, lambda d: target.exists() and target.read_text() == text)


def test_the_cancel_button_cancels_after_confirmation(browser: webdriver.Chrome, sites) -> None:  # type: ignore[no-untyped-def]
    _, cluster = sites
    with cluster.service():
        sleeper = park.submit("park_test_tasks:sleep", 60, label="sleeper")
    select(browser, "cluster", sleeper.id)
    browser.find_element(By.ID, "cancel").click()
    alert = wait(browser, ec.alert_is_present())
    assert "sleeper" in alert.text
    alert.dismiss()                       # no: nothing happens
    assert sleeper.state in ("queued", "running")
    browser.find_element(By.ID, "cancel").click()
    wait(browser, ec.alert_is_present()).accept()
    wait(browser, state_is("cluster", sleeper.id, "cancelled"))
    assert sleeper.record().cause.message.endswith(": cancelled from park ui")


def test_an_admin_sees_every_users_jobs_and_never_their_tokens(browser: webdriver.Chrome, sites, config: Path,  # type: ignore[no-untyped-def]
                                                               module_dir: Path) -> None:
    sns, cluster = sites
    keys = module_dir / "keys"
    keys.mkdir()
    with as_user(sns, "alice", keys):
        with park.Service(sns.address, sns.cert):
            alices = park.submit("park_test_tasks:sleep", 30, label="alice's sleep")
        alices.acknowledged()
    with sns.service():
        upstream = park.submit("park_test_tasks:sleep", 30, label="upstream")
    with cluster.service():
        granted = park.submit("park_test_tasks:noop", when=upstream.iscompleted, label="holds a grant")
    # The user's own dashboard lists their jobs, not alice's (upstream came after hers: she would be shown by now).
    row(browser, "sns", upstream.id)
    row(browser, "cluster", granted.id)
    browser.find_element(By.ID, "text-filter").clear()
    browser.find_element(By.ID, "text-filter").send_keys(alices.id)
    wait(browser, ec.text_to_be_present_in_element((By.ID, "count"), "0 of "))
    assert not browser.find_element(By.ID, "peers").is_displayed(), "a user who is no operator was shown peers"

    operator = keys / "operator.key"
    write_private_key(operator, Ed25519PrivateKey.generate(), None)
    for broker in sites:
        done = broker_cli("users", "add", str(broker.directory), "operator", "--key", public_key_of(operator),
                          "--allow", "admin")
        assert done.returncode == 0, done.stderr
    time.sleep(1.1)   # a running broker re-reads users.toml at most once a second
    mine = browser.current_window_handle
    with park_ui(config, PARK_KEY_FILE=str(operator), PARK_USER="operator") as url:
        browser.switch_to.new_window("tab")
        try:
            browser.get(url)
            theirs = row(browser, "sns", alices.id)
            assert "alice" in theirs.text
            wait(browser, lambda d: "sns · alice: 0 queued, 1 running" in d.find_element(By.ID, "queues").text)
            row(browser, "cluster", granted.id)
            # granted waits on upstream: cluster's stream to sns is open, and sns serves cluster's.
            ours = cells(browser, 'tr[data-peer="cluster/sns"]', r"\tconnected\t.*\t[1-9]\d* / \d+\t")
            assert sns.peer_address in ours, ours
            cells(browser, 'tr[data-peer="sns/cluster"]', r"subscribed since .*, watching [1-9]\d* atoms")
            assert "BEGIN" not in browser.find_element(By.ID, "peers").get_attribute("textContent")
            spec = browser.execute_async_script(
                "const done = arguments[1]; fetch(arguments[0]).then(r => r.json()).then(d => done(d.spec), e => done({e: String(e)}))",
                f"/api/jobs/cluster/{granted.id}")
            assert set(spec["grants"]) == {"sns"} and spec["grants"]["sns"] == "", "a token reached the page"
        finally:
            browser.close()
            browser.switch_to.window(mine)
    alices.cancel()
    upstream.cancel()
    select(browser, "cluster", granted.id)    # the user's dashboard still answers: the cookies did not collide
    wait(browser, ec.text_to_be_present_in_element((By.ID, "detail-state"), "cancelled"))


def _get(url: str, **headers: str) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers, method=headers.pop("method", "GET"))
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.read(200).decode(errors="replace"), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def test_requests_without_the_secret_or_from_another_origin_are_refused(ui: str, sites) -> None:  # type: ignore[no-untyped-def]
    base = ui.split("/?")[0]
    status, body, headers = _get(ui)
    assert status == 200 and "HttpOnly" in headers["set-cookie"] and "SameSite=Strict" in headers["set-cookie"]
    cookie = headers["set-cookie"].split(";")[0]
    assert _get(f"{base}/api/stream", Cookie=cookie, Origin="http://evil.example")[0] == 403
    status, body, _ = _get(f"{base}/api/stream")
    assert status == 403 and "needs the secret" in body
    assert _get(f"{base}/?secret=wrong")[0] == 403
    status, body, _ = _get(f"{base}/api/stream", Cookie=cookie, Host="evil.example")
    assert status == 403 and "Host" in body
    status, body, _ = _get(f"{base}/api/jobs/sns/{'a' * 26}/cancel", Cookie=cookie, method="POST")
    assert status == 403 and "Origin" in body
    status, body, _ = _get(f"{base}/api/jobs/nowhere/{'a' * 26}", Cookie=cookie)
    assert status == 404 and "no configured service is site 'nowhere'" in body
    status, body, _ = _get(f"{base}/api/jobs/sns/..%2Fetc", Cookie=cookie)
    assert status in (400, 404)


def test_park_ui_listens_on_loopback_only() -> None:
    done = subprocess.run([sys.executable, "-m", "park.cli", "ui", "--no-browser", "--listen", "0.0.0.0:0"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "loopback only" in done.stderr
