"""The review as a person sees it: optuna-dashboard and the HTML report in a real headless Chromium.

Needs Debian's ``chromium`` and ``chromium-driver`` (``apt-get install chromium chromium-driver``); without
them these tests FAIL, they do not skip. Screenshots go to ``test-artifacts/`` (git-ignored).
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.artifacts import FileSystemArtifactStore
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from koopman_search.search.review import FIGURE_IDS, SECTION_TITLES, annotate_study, write_report
from koopman_search.search.storage.layout import BASELINE_ROLE_PREFIX, ROLE_ATTR
from tests.search.review.synthetic import STUDY_NAME, dashboard_at, make_review_study

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT_S = 60
WINDOW_WIDTH = 1400
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
)


# For each row of each table on the page: the horizontal gaps (px) between the visible text (no spaces) of
# neighbouring non-empty cells.
NOTE_TABLE_GAPS = """
function inked(cell) {
    var text = cell.textContent, first = text.search(/\\S/);
    if (first < 0) { return null; }
    var last = text.length - 1;
    while (/\\s/.test(text[last])) { last -= 1; }
    var walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT), nodes = [], node;
    while ((node = walker.nextNode())) { nodes.push(node); }
    function at(offset) {
        for (var i = 0; i < nodes.length; i++) {
            if (offset < nodes[i].length) { return [nodes[i], offset]; }
            offset -= nodes[i].length;
        }
        return [nodes[nodes.length - 1], nodes[nodes.length - 1].length];
    }
    var range = document.createRange(), a = at(first), b = at(last);
    range.setStart(a[0], a[1]);
    range.setEnd(b[0], b[1] + 1);
    return range.getBoundingClientRect();
}
var out = [];
document.querySelectorAll("table tr").forEach(function (tr) {
    var boxes = Array.from(tr.children).map(inked).filter(function (r) { return r && r.width > 0; });
    var gaps = [];
    for (var i = 1; i < boxes.length; i++) { gaps.push(boxes[i].left - boxes[i - 1].right); }
    if (gaps.length) { out.push(gaps); }
});
return out;
"""


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"the browser tests need Chromium and its driver, but {', '.join(missing)} is missing; "
            "install them with: apt-get install chromium chromium-driver"
        )
    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in CHROME_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    options.add_argument("--window-size=1280,900")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: webdriver.Chrome, what: str, condition: Any) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(condition)
    except TimeoutException:
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "timeout.png"))
        pytest.fail(f"timed out after {WAIT_S} s waiting for {what}; see test-artifacts/timeout.png")


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def _severe(driver: webdriver.Chrome) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _full_page_screenshot(driver: webdriver.Chrome, path: Path, width: int) -> None:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(width, min(int(height) + 20, 12000))
    driver.save_screenshot(str(path))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, optuna.Study]]:
    """The small finished study, annotated, behind a dashboard on a free loopback port."""
    url = f"sqlite:///{tmp_path / 'review-demo.db'}"
    study = make_review_study(url)
    store = FileSystemArtifactStore(str(tmp_path))
    annotate_study(study, store)  # with the store: each trial note opens with its curves image
    with dashboard_at(url, store) as address:
        yield address, study


def test_dashboard_lists_the_study_and_renders_its_notes_and_figures(
    served: tuple[str, optuna.Study], chrome: webdriver.Chrome
) -> None:
    base, study = served
    # the JSON API the dashboard's pages read
    summaries = _get_json(f"{base}/api/studies")["study_summaries"]
    assert [s["study_name"] for s in summaries] == [STUDY_NAME]
    study_id = summaries[0]["study_id"]
    detail = _get_json(f"{base}/api/studies/{study_id}")
    assert [t["number"] for t in detail["trials"]] == [t.number for t in study.trials]
    assert all(t["note"]["body"].startswith(f"### Trial {t['number']}: ") for t in detail["trials"])
    assert {g["id"] for g in detail["plotly_graph_objects"]} == set(FIGURE_IDS.values())
    assert _get_json(f"{base}/api/meta")["artifact_is_available"] is True

    # the study page: the koopman-search figures among the dashboard's own, drawn by plotly
    chrome.get(f"{base}/dashboard/studies/{study_id}")
    for figure_id in FIGURE_IDS.values():
        _wait(
            chrome,
            f"figure {figure_id}",
            lambda d, i=figure_id: d.find_elements(By.CSS_SELECTOR, f'[id="user-defined-plot:{i}"] .main-svg'),
        )
    body = chrome.find_element(By.TAG_NAME, "body").text
    assert "Val perplexity vs baseline" in body and "Pareto front: lower is better" in body
    assert "total loss limit 7.0 (pruned above)" in body and "limit 1.3 × baseline (pruned above)" in body
    ARTIFACTS.mkdir(exist_ok=True)
    _full_page_screenshot(chrome, ARTIFACTS / "dashboard-full.png", 1280)
    # the four koopman-search figures (optuna-dashboard shows them in two rows of cards)
    chrome.set_window_size(1280, 1110)
    chrome.execute_script(
        "const top = Math.min(...Array.from(document.querySelectorAll('[id^=\"user-defined-plot:\"]'))"
        "  .map(e => e.getBoundingClientRect().top + window.scrollY));"
        "window.scrollTo(0, top - 90);"
    )
    chrome.save_screenshot(str(ARTIFACTS / "dashboard.png"))

    # the study note
    chrome.get(f"{base}/dashboard/studies/{study_id}/note")
    _wait(chrome, "the study note", lambda d: "Pruned when:" in d.find_element(By.TAG_NAME, "body").text)
    assert "6 complete, 2 pruned, 1 failed" in chrome.find_element(By.TAG_NAME, "body").text

    # a pruned trial's page: its note with the prune reason
    pruned = next(t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED)
    chrome.get(f"{base}/dashboard/studies/{study_id}/trials?numbers={pruned.number}")
    reason = pruned.user_attrs["prune_reason"]
    _wait(chrome, "the pruned trial's note", lambda d: reason in d.find_element(By.TAG_NAME, "body").text)
    chrome.save_screenshot(str(ARTIFACTS / "dashboard-trial.png"))
    # the note's tables render as tables whose cells do not run together: between the visible text of two
    # neighbouring cells there is a gap (the dashboard gives the cells no padding of their own)
    gaps = chrome.execute_script(NOTE_TABLE_GAPS)
    assert len(gaps) >= 2 and min(min(row) for row in gaps) >= 8, gaps


def test_a_trials_page_shows_its_curves_first_within_the_first_screen(
    served: tuple[str, optuna.Study], chrome: webdriver.Chrome
) -> None:
    base, study = served
    study_id = _get_json(f"{base}/api/studies")["study_summaries"][0]["study_id"]
    chrome.set_window_size(WINDOW_WIDTH, 1000)
    height = chrome.execute_script("return window.innerHeight")
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.FAIL:
            continue  # no epochs, no curves
        chrome.get(f"{base}/dashboard/studies/{study_id}/trials?numbers={trial.number}")
        alt = f"Trial {trial.number}: val perplexity, losses and linearity per epoch"
        image = _wait(
            chrome,
            f"the curves image of trial {trial.number}",
            lambda d, a=alt: next(
                (i for i in d.find_elements(By.TAG_NAME, "img") if i.get_attribute("alt") == a and
                 d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)),
                None,
            ),
        )  # fmt: skip
        box = chrome.execute_script("var r = arguments[0].getBoundingClientRect(); return [r.top, r.bottom]", image)
        if box[0] >= height:
            ARTIFACTS.mkdir(exist_ok=True)
            chrome.save_screenshot(str(ARTIFACTS / "trial-curves-below.png"))
        assert 0 <= box[0] < height and box[1] - box[0] > 100, (trial.number, box, height)
    ARTIFACTS.mkdir(exist_ok=True)
    chrome.save_screenshot(str(ARTIFACTS / "dashboard-trial-curves.png"))


def test_the_study_list_shows_the_study_first_and_its_baseline_as_such_and_no_importance_under_ten(
    served: tuple[str, optuna.Study], chrome: webdriver.Chrome
) -> None:
    base, study = served
    companion = optuna.create_study(study_name=f"{STUDY_NAME}.baseline-seed0", storage=study._storage)
    companion.set_user_attr(ROLE_ATTR, BASELINE_ROLE_PREFIX + STUDY_NAME)  # created last: the newest study
    chrome.set_window_size(WINDOW_WIDTH, 1000)
    chrome.get(f"{base}/dashboard")
    cards = _wait(chrome, "both studies listed", lambda d: [e.text for e in d.find_elements(By.TAG_NAME, "h5")][:2])
    study_id = study._study_id
    assert cards == [
        f"{study_id}. {STUDY_NAME}",
        f"{companion._study_id}. {STUDY_NAME}.baseline-seed0 (baseline of {STUDY_NAME}, not a search)",
    ], cards
    # the study page: 6 complete trials, so the stock importance plot draws no bar and no error shows
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) < 10
    chrome.get(f"{base}/dashboard/studies/{study_id}")
    _wait(
        chrome,
        "the importance plot",
        lambda d: d.find_elements(By.CSS_SELECTOR, "#graph-hyperparameter-importances .main-svg"),
    )
    assert chrome.find_elements(By.CSS_SELECTOR, "#graph-hyperparameter-importances .bars path") == []
    assert "Failed to load" not in chrome.find_element(By.TAG_NAME, "body").text
    assert _severe(chrome) == []


def test_no_dashboard_page_is_wider_than_a_1400_px_window(
    served: tuple[str, optuna.Study], chrome: webdriver.Chrome
) -> None:
    """Each trial's page (records, checkpoint, rung decisions stored) and the study's pages fit the window."""
    base, study = served
    study_id = _get_json(f"{base}/api/studies")["study_summaries"][0]["study_id"]
    chrome.set_window_size(WINDOW_WIDTH, 1000)
    inner = chrome.execute_script("return window.innerWidth")
    pages = [f"{base}/dashboard/studies/{study_id}", f"{base}/dashboard/studies/{study_id}/note"]
    pages += [f"{base}/dashboard/studies/{study_id}/trials?numbers={t.number}" for t in study.trials]
    for page in pages:
        chrome.get(page)
        _wait(chrome, f"{page} to render", lambda d: "Trial" in d.find_element(By.TAG_NAME, "body").text)
        width = chrome.execute_script("return document.documentElement.scrollWidth")
        if width > inner:
            ARTIFACTS.mkdir(exist_ok=True)
            chrome.save_screenshot(str(ARTIFACTS / "too-wide.png"))
        assert width <= inner, f"{page} is {width} px wide in a {inner} px window"


def test_report_opens_offline_without_errors_and_shows_every_section(tmp_path: Path, chrome: webdriver.Chrome) -> None:
    study = make_review_study(f"sqlite:///{tmp_path / 'review-demo.db'}")
    out = write_report(study, tmp_path / "report.html")
    plots = out.read_text(encoding="utf-8").count('class="plotly-graph-div"')

    chrome.get(out.as_uri())
    _wait(
        chrome,
        f"{plots} plotly figures to render",
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".js-plotly-plot .main-svg")) >= plots,
    )
    headings = [h.text for h in chrome.find_elements(By.TAG_NAME, "h2")]
    expected = ["Pareto front" if key == "best" else title for key, title in SECTION_TITLES.items()]
    assert headings == expected
    assert (
        chrome.find_elements(By.CSS_SELECTOR, "#pruned td")
        and "total_loss" in chrome.find_element(By.ID, "pruned").text
    )
    assert "[koopman]" in chrome.find_element(By.ID, "config").text
    assert _severe(chrome) == []
    chrome.set_window_size(WINDOW_WIDTH, 1000)
    inner = chrome.execute_script("return window.innerWidth")
    width = chrome.execute_script("return document.documentElement.scrollWidth")
    assert width <= inner, f"the report is {width} px wide in a {inner} px window"
    ARTIFACTS.mkdir(exist_ok=True)
    chrome.set_window_size(1280, 1300)  # the first screen: summary and Pareto front
    chrome.save_screenshot(str(ARTIFACTS / "report.png"))
    _full_page_screenshot(chrome, ARTIFACTS / "report-full.png", 1280)


def test_report_trial_menu_switches_all_four_curve_figures_together(tmp_path: Path, chrome: webdriver.Chrome) -> None:
    study = make_review_study(f"sqlite:///{tmp_path / 'review-demo.db'}")
    out = write_report(study, tmp_path / "report.html")
    chrome.get(out.as_uri())
    ids = ["curves-losses", "curves-val_ppl", "curves-linearity", "curves-weight"]
    _wait(
        chrome,
        "the curve figures to render",
        lambda d: all(
            d.execute_script("var g = document.getElementById(arguments[0]); return !!(g && g.data)", i) for i in ids
        ),
    )
    menus = json.loads(chrome.find_element(By.ID, "curves-menus").get_attribute("textContent"))
    shown = """
        var menus = arguments[1], out = {};
        arguments[0].forEach(function (id) {
            var g = document.getElementById(id);
            out[id] = menus[id][0][1].map(function (s) { return Array.from(g.data[s].y || []); });
        });
        return out;
    """
    menu = chrome.find_element(By.ID, "curves-trial")
    options = menu.find_elements(By.TAG_NAME, "option")
    current = int(menu.get_attribute("value"))
    target = next(i for i in range(len(options)) if i != current)
    before = chrome.execute_script(shown, ids, menus)
    for figure_id in ids:  # the selected trial's data is on show at first
        assert before[figure_id] == menus[figure_id][current][0]["y"], figure_id
    options[target].click()
    _wait(chrome, "the figures to switch", lambda d: d.execute_script(shown, ids, menus) != before)
    after = chrome.execute_script(shown, ids, menus)
    for figure_id in ids:  # one choice, all four figures
        assert after[figure_id] == menus[figure_id][target][0]["y"], figure_id
    assert _severe(chrome) == []
