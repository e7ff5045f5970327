"""Remake docs/report-top.png and docs/report-truth.png, the README's screenshots of
`astronn-dist report`.

A synthetic survey of 300 stars (seed 1) goes through the bundled model at 20 MC passes; its
report, with the survey's catalog (truth, snr, teff, logg), is opened in headless Chromium
(Selenium), and the window (1280 x 1400) is captured at the top of the page and at the
comparison with the true fakemag. Needs .venv with the test extra and Chromium
(scripts/system-packages.sh):

    .venv/bin/python scripts/report_screenshot.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         "--hide-scrollbars", "--window-size=1280,1400")


def main() -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    cli = [sys.executable, "-m", "astronn_dist.producer.cli"]
    with tempfile.TemporaryDirectory() as work:
        survey, db, page = Path(work) / "survey", f"sqlite:///{work}/results.sqlite", Path(work) / "report.html"
        subprocess.run([*cli, "synth", str(survey), "--n", "300", "--seed", "1"], check=True)
        subprocess.run([*cli, "run", "--catalog", str(survey / "catalog.csv"), "--db", db, "--mc-passes", "20"],
                       check=True, stdout=subprocess.DEVNULL)
        subprocess.run([*cli, "report", str(page), "--catalog", str(survey / "catalog.csv"), "--db", db], check=True)
        os.environ["SE_OFFLINE"] = "true"
        options = webdriver.ChromeOptions()
        options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
        for flag in (*FLAGS, f"--user-data-dir={work}/profile"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver") or "/usr/bin/chromedriver"))
        try:
            driver.get(page.as_uri())
            driver.save_screenshot(str(REPO / "docs" / "report-top.png"))
            driver.execute_script("document.getElementById('truth-fakemag').scrollIntoView()")
            driver.save_screenshot(str(REPO / "docs" / "report-truth.png"))
        finally:
            driver.quit()
    print("wrote docs/report-top.png and docs/report-truth.png")


if __name__ == "__main__":
    main()
