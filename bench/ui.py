"""`park ui` with 10,000 jobs (issue 16): how long the page takes to list them, filter them and follow a cascade.

    python bench/ui.py [--jobs 10000]

Starts one real broker (tests/harness.py: `park-broker serve` on a loopback port,
the caller's key in a key file), submits a gate (`sleep 900`) and `--jobs` jobs
waiting on it, then runs `park ui --no-browser` over it and opens its URL in
Debian's headless chromium (chromium-driver, Selenium), and measures:

- load: from `driver.get(url)` until the page says it lists every job (the
  snapshot pushed over server-sent events, parsed and the first page drawn);
  the peer: `park jobs --json` listing the same jobs, in the same run;
- filter: typing a label into the text filter until the page is redrawn (in the
  page: performance.now() around the input event and the next animation frame);
- cascade: cancelling the gate cancels every waiting job; from the cancel until
  the page's state filter counts them all cancelled, against the broker's own
  time for the last cancellation (its `finished_at`) and `park jobs --json` run
  once after the cascade settled;
- memo hits: `--jobs` more jobs run to completion, then are submitted again, so
  that each is a memo hit (a `reused` event, listed by the page under its own
  id); from the rerun until the page counts them all, against the time the
  client took to have every submission acknowledged.

Every process started is stopped by its own handle at the end.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def _timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="park-bench-ui-"))
    tmp.chmod(0o711)
    from park.signer import write_private_key
    write_private_key(tmp / "user.key", Ed25519PrivateKey.generate(), None)
    os.environ["PARK_KEY_FILE"] = str(tmp / "user.key")
    for name in ("PARK_AUTH_SOCK", "PARK_KEY_PASSPHRASE"):
        os.environ.pop(name, None)

    import park
    from harness import make_broker
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    broker = make_broker(tmp, "bench", workers=2).start()
    config = tmp / "config.toml"
    config.write_text(f'[services.bench]\naddress = "{broker.address}"\ncert = "{broker.cert}"\n')
    env = {**os.environ, "PARK_CONFIG": str(config)}
    ui = driver = None
    try:
        service = broker.service()
        started = time.perf_counter()
        with service:
            gate = park.run(["sleep", "900"], label="gate")
            for i in range(args.jobs):
                park.submit("park_test_tasks:noop", when=gate.iscompleted, label=f"job {i}", memo=False)
            service.flush()
        print(f"submitted {args.jobs + 1} jobs in {time.perf_counter() - started:.1f} s", flush=True)
        peer_list = _timed([sys.executable, "-m", "park.cli", "jobs", "--json"], env)

        ui = subprocess.Popen([sys.executable, "-m", "park.cli", "ui", "--no-browser"], env=env,
                              stdout=subprocess.PIPE, text=True)
        assert ui.stdout is not None
        url = re.search(r"(http://\S+)", ui.stdout.readline())[1]  # type: ignore[index]
        threading.Thread(target=ui.stdout.read, daemon=True).start()
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "chromium"
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
            options.add_argument(argument)
        driver = webdriver.Chrome(service=ChromeService(shutil.which("chromedriver") or "chromedriver"),
                                  options=options)
        total = args.jobs + 1
        wait = WebDriverWait(driver, 600, poll_frequency=0.02)
        started = time.perf_counter()
        driver.get(url)
        wait.until(lambda d: d.find_element(By.ID, "count").text == f"{total} of {total} jobs")
        load = time.perf_counter() - started
        filters = []
        for label in ("job 4242", "job 9", "gate"):
            filters.append(driver.execute_async_script("""
                const done = arguments[1], box = document.getElementById("text-filter"), t0 = performance.now();
                box.value = arguments[0];
                box.dispatchEvent(new Event("input"));
                requestAnimationFrame(() => requestAnimationFrame(() => done(performance.now() - t0)));""", label))
        driver.execute_script("""const box = document.getElementById("text-filter"); box.value = "";
            const state = document.getElementById("state-filter"); state.value = "cancelled";
            state.dispatchEvent(new Event("input"));""")
        started, cancelled_at = time.perf_counter(), time.time()
        gate.cancel("bench")
        wait.until(lambda d: d.find_element(By.ID, "count").text == f"{total} of {total} jobs")
        cascade = time.perf_counter() - started
        peer_after = _timed([sys.executable, "-m", "park.cli", "jobs", "--json"], env)
        at_broker = max(job.finished_at for job in service.list_jobs()) - cancelled_at

        driver.execute_script("""const state = document.getElementById("state-filter"); state.value = "completed";
            state.dispatchEvent(new Event("input"));""")
        with service:
            for i in range(args.jobs):
                park.submit("park_test_tasks:add", i, 0, label=f"memo {i}")
        wait.until(lambda d: d.find_element(By.ID, "count").text == f"{args.jobs} of {total + args.jobs} jobs")
        started = time.perf_counter()
        with service:
            again = [park.submit("park_test_tasks:add", i, 0, label=f"memo {i}") for i in range(args.jobs)]
            service.flush()
        acknowledged = time.perf_counter() - started
        wait.until(lambda d: d.find_element(By.ID, "count").text ==
                   f"{2 * args.jobs} of {total + 2 * args.jobs} jobs")
        memo_shown = time.perf_counter() - started
        assert all(job.memo_hit for job in again)
        print(f"date {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; load: {os.getloadavg()}")
        print(f"page lists all {total} jobs in {load:.2f} s; `park jobs --json` lists them in {peer_list:.2f} s "
              f"(ratio {load / peer_list:.2f})")
        print("filter redraw (ms): " + ", ".join(f"{t:.1f}" for t in filters))
        print(f"cascade of {total} cancellations: the broker's last at {at_broker:.2f} s, the page showed all "
              f"at {cascade:.2f} s; `park jobs --json` afterwards took {peer_after:.2f} s")
        print(f"rerun of {args.jobs} finished jobs: every submission acknowledged (a memo hit) at "
              f"{acknowledged:.2f} s, the page listed them all at {memo_shown:.2f} s")
    finally:
        if driver is not None:
            driver.quit()
        if ui is not None:
            ui.terminate()
            ui.wait(30)
        for service in broker.services:
            service.close()
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
