"""Take docs/ui-race.png: `park demo --ui` in headless Chromium, the race's job selected.

    python scripts/ui_screenshot.py [--output docs/ui-race.png]

Runs `park demo --ui --no-browser --plain` from the checkout, opens the URL it
prints in Debian's chromium (through chromium-driver and Selenium, as the tests
do), selects the race as soon as the page lists it, and saves the page as soon as
its plot has a line of two or more reports for two contestants. The demo then runs to
its end; its exit status is this script's.
"""
from __future__ import annotations

import argparse
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[1]
WAIT = 240   # seconds: the demo transfers a file and builds a wheel before the race


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "ui-race.png")
    args = parser.parse_args()
    demo = subprocess.Popen([sys.executable, "-m", "park.cli", "demo", "--ui", "--no-browser", "--plain"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert demo.stdout is not None
        for line in demo.stdout:
            print(line, end="", flush=True)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    url = None
    while url is None:
        match = re.search(r"dashboard is at (\S+)", lines.get(timeout=WAIT))
        url = match[1] if match else None
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=ChromeService(shutil.which("chromedriver") or "chromedriver"), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, WAIT, poll_frequency=0.1)
        race = 'tr[data-key] td:nth-child(4)'
        wait.until(lambda d: d.execute_script(
            f"const c = [...document.querySelectorAll('{race}')].find(c => c.textContent === 'race');"
            "if (c) c.closest('tr').click(); return c"))
        # As soon as two contestants have reported twice: the race is usually still on (it lasts about a second).
        wait.until(lambda d: d.execute_script(   # in the page: the plot is redrawn as reports arrive
            "return [...document.querySelectorAll('#plot path.line')].filter(p => p.getAttribute('d').includes('L'))"
            ".length >= 2"))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.output))
        print(f"ui_screenshot: saved {args.output}", flush=True)
    finally:
        driver.quit()
    return demo.wait(timeout=WAIT)


if __name__ == "__main__":
    sys.exit(main())
