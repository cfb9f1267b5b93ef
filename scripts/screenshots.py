"""Take the README's screenshots (docs/img/dashboard.png, docs/img/report.png) of a study that has run.

    koopman-search launch studies/quickstart.toml
    python scripts/screenshots.py studies/quickstart.toml

Both come from the real commands: ``koopman-search report`` writes the report to a temporary file, and
``koopman-search dashboard`` serves the study on a free loopback port; headless Chromium (Debian's
``chromium`` and ``chromium-driver``, driven by selenium) opens each, waits for the plotly figures and saves
the PNGs. The dashboard writes its notes and figures into the study's storage before serving, as it always does.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from koopman_search.search.studyfile.spec import load_spec
from koopman_search.trainer.errors import ConfigError, KoopmanError

logger = logging.getLogger("screenshots")

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
)
MAX_PNG_BYTES = 300_000  # the README's images stay small in the repository
# optuna-dashboard's ids of the study figures that `koopman-search dashboard` writes (search.review.FIGURE_IDS)
FIGURE_SELECTOR = '[id^="user-defined-plot:koopman-"] .main-svg'
FIGURE_COUNT = 4
WIDTH = 1280  # CSS pixels: two figures side by side on the dashboard, the report's tables unwrapped
MARGIN = 16
SETTLE_S = 1.0  # plotly redraws after a resize or scroll


class ScreenshotError(RuntimeError):
    """Something the screenshots need is missing or did not come up in time."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Take docs/img/dashboard.png and docs/img/report.png of a study that has been run, "
        "with the real `koopman-search report` and `koopman-search dashboard` in headless Chromium.",
        epilog="example:\n  koopman-search launch studies/quickstart.toml\n"
        "  python scripts/screenshots.py studies/quickstart.toml --out-dir docs/img",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "study",
        nargs="?",
        default=str(REPO / "studies" / "quickstart.toml"),
        metavar="STUDY.toml",
        help="the study file; its study must have been run (default: studies/quickstart.toml)",
    )
    parser.add_argument(
        "--out-dir", type=Path, default=REPO / "docs" / "img", help="where the PNGs go (default: docs/img)"
    )
    parser.add_argument(
        "--trial-note",
        action="store_true",
        help="also take dashboard-trial.png: the best trial's page with its note",
    )
    parser.add_argument(
        "--timeout", type=float, default=90.0, metavar="SECONDS", help="longest wait for a page (default: 90)"
    )
    return parser.parse_args(argv)


def _cli(*args: str) -> list[str]:
    """The ``koopman-search`` command line, run by this interpreter (the project's venv)."""
    return [sys.executable, "-m", "koopman_search.search.cli", *args]


def free_port() -> int:
    """A TCP port nobody listens on at 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def write_report(study: str, out: Path) -> None:
    """``koopman-search report STUDY --out OUT``."""
    done = subprocess.run(_cli("report", study, "--out", str(out)), capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ScreenshotError(
            f"koopman-search report must succeed, but got exit={done.returncode}: {done.stderr.strip()}"
        )


@contextmanager
def dashboard(study: str, port: int, log: Path, timeout: float) -> Iterator[str]:
    """``koopman-search dashboard STUDY --port PORT`` in the background; yields its base URL once it answers."""
    base = f"http://127.0.0.1:{port}"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            _cli("dashboard", study, "--port", str(port), "--refresh", "0"), stdout=stderr, stderr=stderr
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise ScreenshotError(
                    f"koopman-search dashboard must keep serving, but got exit={proc.returncode}: "
                    f"{log.read_text().strip()}"
                )
            try:
                get_json(f"{base}/api/meta")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise ScreenshotError(
                        f"the dashboard must answer at {base} within {timeout:g} s, but got no answer"
                    ) from None
                time.sleep(0.5)
        yield base
    finally:
        proc.terminate()  # SIGTERM: the dashboard stops cleanly, as on Ctrl-C
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def chromium(profile: Path, timeout: float) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        raise ScreenshotError(
            f"Chromium and its driver must be installed, but got {', '.join(missing)} missing; "
            "install them with: apt-get install chromium chromium-driver"
        )
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(timeout)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver: webdriver.Chrome, what: str, condition: Callable[[Any], Any], timeout: float) -> Any:
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.25).until(condition)
    except TimeoutException:
        raise ScreenshotError(f"{what} must show within {timeout:g} s, but got nothing in time") from None


def save_png(driver: webdriver.Chrome, path: Path) -> None:
    png = driver.get_screenshot_as_png()
    if len(png) >= MAX_PNG_BYTES:
        raise ScreenshotError(
            f"a README screenshot must be < {MAX_PNG_BYTES // 1000} KB, but got {path.name}={len(png) // 1000} KB"
        )
    path.write_bytes(png)
    logger.info("wrote %s (%d KB)", path, len(png) // 1000)


def set_viewport(driver: webdriver.Chrome, width: int, height: int) -> None:
    """Make the page area (not the window) ``width`` x ``height`` CSS pixels."""
    driver.set_window_size(width, height)
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight]")
    driver.set_window_size(2 * width - int(inner[0]), 2 * height - int(inner[1]))
    time.sleep(SETTLE_S)


def shoot_dashboard(driver: webdriver.Chrome, base: str, study_id: int, out: Path, timeout: float) -> None:
    """The study page, scrolled to the koopman-search figures: trial curves and Pareto front."""
    set_viewport(driver, WIDTH, 1000)
    driver.get(f"{base}/dashboard/studies/{study_id}")
    wait_for(
        driver,
        f"the dashboard's {FIGURE_COUNT} study figures",
        lambda d: len(d.find_elements(By.CSS_SELECTOR, FIGURE_SELECTOR)) >= FIGURE_COUNT,
        timeout,
    )
    # the figures' cards, from the top of the first to the bottom of the last (legends included)
    top, bottom = driver.execute_script(
        "const cards = Array.from(document.querySelectorAll('[id^=\"user-defined-plot:\"]'))"
        "  .map(e => e.closest('.MuiCard-root') || e).map(e => e.getBoundingClientRect());"
        "return [Math.min(...cards.map(r => r.top)) + window.scrollY,"
        "        Math.max(...cards.map(r => r.bottom)) + window.scrollY];"
    )
    bar = driver.execute_script("const b = document.querySelector('header'); return b ? b.offsetHeight : 0")
    set_viewport(driver, WIDTH, int(bottom - top) + int(bar) + MARGIN)
    driver.execute_script(f"window.scrollTo(0, {int(top) - int(bar)})")  # the first cards just under the bar
    time.sleep(SETTLE_S)
    save_png(driver, out)


def shoot_trial_note(
    driver: webdriver.Chrome, base: str, study_id: int, number: int, out: Path, timeout: float
) -> None:
    """The dashboard's page of trial ``number``, down to the end of its note."""
    set_viewport(driver, WIDTH, 1000)
    driver.get(f"{base}/dashboard/studies/{study_id}/trials?numbers={number}")
    heading = f"Trial {number}: "
    wait_for(
        driver, f"the note of trial {number}", lambda d: heading in d.find_element(By.TAG_NAME, "body").text, timeout
    )
    bottom = driver.execute_script(
        "const h = Array.from(document.querySelectorAll('h3')).find(e => e.textContent.startsWith(arguments[0]));"
        "const note = h && (h.closest('.MuiPaper-root') || h.parentElement);"
        "return note ? note.getBoundingClientRect().bottom + window.scrollY : document.body.scrollHeight;",
        heading,
    )
    set_viewport(driver, WIDTH, int(bottom) + MARGIN)
    save_png(driver, out)


def shoot_report(driver: webdriver.Chrome, report: Path, out: Path, timeout: float) -> None:
    """The report's first screen: the summary and the Pareto front, down to the end of its section."""
    plots = report.read_text(encoding="utf-8").count('class="plotly-graph-div"')
    set_viewport(driver, WIDTH, 1000)
    driver.get(report.as_uri())
    wait_for(
        driver,
        f"the report's {plots} plotly figures",
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg")) >= plots,
        timeout,
    )
    bottom = driver.execute_script("return document.getElementById('best').getBoundingClientRect().bottom")
    set_viewport(driver, WIDTH, int(bottom) + MARGIN)
    save_png(driver, out)


def find_study(base: str, name: str) -> dict[str, Any]:
    """The dashboard's view of study ``name``: its ``study_id`` added to ``/api/studies/<id>``."""
    for summary in get_json(f"{base}/api/studies")["study_summaries"]:
        if summary["study_name"] == name:
            detail: dict[str, Any] = get_json(f"{base}/api/studies/{summary['study_id']}")
            return {"study_id": int(summary["study_id"]), **detail}
    raise ScreenshotError(f"the storage must hold study {name!r}, but got no such study; run it first")


def best_trial_number(detail: dict[str, Any]) -> int:
    """The best trial on the first objective (the one the dashboard's figures select first)."""
    best = detail["best_trials"]
    if not best:
        raise ScreenshotError("a trial note needs a complete trial, but got best_trials=[]; run the study first")
    sign = -1.0 if detail["directions"][0] == "maximize" else 1.0
    return int(min(best, key=lambda t: sign * float(t["values"][0]))["number"])


def take(study: str, out_dir: Path, timeout: float, trial_note: bool) -> None:
    name = load_spec(study).name
    with tempfile.TemporaryDirectory(prefix="koopman-screenshots-") as tmp:
        scratch = Path(tmp)
        report = scratch / "report.html"
        write_report(study, report)
        with dashboard(study, free_port(), scratch / "dashboard.log", timeout) as base:
            detail = find_study(base, name)
            states = Counter(t["state"] for t in detail["trials"])
            logger.info(
                "study %s: %d trials (%s), dashboard at %s",
                name,
                len(detail["trials"]),
                ", ".join(f"{n} {state.lower()}" for state, n in states.items()),
                base,
            )
            out_dir.mkdir(parents=True, exist_ok=True)
            with chromium(scratch / "profile", timeout) as driver:
                shoot_dashboard(driver, base, detail["study_id"], out_dir / "dashboard.png", timeout)
                if trial_note:
                    number = best_trial_number(detail)
                    shoot_trial_note(driver, base, detail["study_id"], number, out_dir / "dashboard-trial.png", timeout)
                shoot_report(driver, report, out_dir / "report.png", timeout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.timeout <= 0:
        logger.error("--timeout must be > 0 seconds, but got timeout=%g", args.timeout)
        return 2
    try:
        take(args.study, args.out_dir, args.timeout, args.trial_note)
    except ConfigError as exc:  # the study file
        logger.error("%s", exc)
        return 2
    except (ScreenshotError, KoopmanError) as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
