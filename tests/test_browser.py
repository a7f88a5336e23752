"""The HTML report and the rating page in a real browser: Debian's chromium driven by Playwright (headless).

The report is opened from file:// with every other request blocked (it must work offline): its charts render,
the drill-down shows a run's examples and filters them, a row opens its prompt, and the disagreement view lists
two runs side by side. The rating page is served by `labscale rate` itself (a subprocess on a free port): items
are rated by click and by keyboard, the page is reloaded mid-way and resumes, and the stored ratings equal what
was clicked. Screenshots go to the test's folder, and to $LABSCALE_SCREENSHOTS when set (docs/img/ holds copies).

Skipped, with the reason, when chromium or playwright is missing (scripts/setup.sh --dev installs both).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rate_helpers import MODELS, rating_db
from synthetic import make_db, run_spec

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.subprocess,  # a headless chromium
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="chromium is not installed (scripts/setup.sh --dev installs it with apt-get)"),
    pytest.mark.timeout(300),
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e .[dev])")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _shot(page, folder: Path, name: str, **kw) -> Path:
    path = folder / name
    page.screenshot(path=str(path), **kw)
    extra = os.environ.get("LABSCALE_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(extra) / name)
    return path


def test_html_report_offline_charts_and_drill_down(browser, tmp_path, capsys, monkeypatch):
    from helpers import cli

    runs = [run_spec("fact-check", "gpt-4o-mini", "zero-shot", [1, 1, 0, 1, 1, 1, 0, 1, 1, 1] * 3, remote=True,
                     cost_usd=0.04, groups=["a", "b", "c"] * 10),
            run_spec("fact-check", "smollm2-135m", "zero-shot", [1, 0, 0, 1, 0, 1, 0, 1, 0, 1] * 3,
                     groups=["a", "b", "c"] * 10, compute_s=30.0),
            run_spec("fact-check", "smollm2-135m", "few-shot:2", [1, 1, 0, 1, 0, 1, 0, 1, 1, 1] * 3,
                     groups=["a", "b", "c"] * 10, compute_s=60.0),
            run_spec("summary", "gpt-4o-mini", "zero-shot", [0.42, 0.51, 0.38, 0.47, 0.55] * 6, metric="rougeL",
                     remote=True, cost_usd=0.09),
            run_spec("summary", "smollm2-135m", "zero-shot", [0.31, 0.44, 0.29, 0.4, 0.35] * 6, metric="rougeL",
                     compute_s=90.0)]
    db = make_db(tmp_path / "report.db", runs, {"reference": "gpt-4o-mini", "margin": {"default": 0.05}})
    code, _, err = cli(capsys, monkeypatch, "report", "--db", db, "--html")
    assert code == 0, err
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requested, errors = [], []

    def block(route):
        requested.append(route.request.url)
        return route.continue_() if route.request.url.startswith("file://") else route.abort()

    page.route("**/*", block)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(db.with_suffix(".html").as_uri())
    assert errors == [] and all(u.startswith("file://") for u in requested), requested
    assert page.locator("#verdicts tbody tr").count() == 5
    charts = page.locator("figure.chart svg")
    assert charts.count() >= 6
    for i in range(charts.count()):
        box = charts.nth(i).bounding_box()
        assert box and box["width"] > 200 and box["height"] > 100
    assert page.locator("figure[data-kind=cost] text", has_text="Pareto frontier").count() >= 1
    assert page.locator("figure[data-kind=fairness] text", has_text="worst").count() >= 1
    _shot(page, tmp_path, "report-verdicts.png")
    page.locator("figure[data-kind=cost]").first.scroll_into_view_if_needed()
    _shot(page, tmp_path, "report-charts.png")

    # drill-down from the verdict table to one run's examples
    page.locator('#verdicts tr:has-text("few-shot:2") [data-drill]').click()
    assert page.locator("#f-setting").input_value() == "few-shot:2"
    assert page.locator("#examples tbody tr.ex").count() == 30
    assert "few-shot:2" in page.locator("#run-info").inner_text()
    page.locator("#f-text").fill("out-smollm2-135m-few-shot:2-1")  # -1, -10 … -19
    assert page.locator("#examples tbody tr.ex").count() == 11
    page.locator("#examples tbody tr.ex").first.click()
    assert "prompt:" in page.locator("#examples tr.prompt").inner_text()
    page.locator("#f-text").fill("")
    page.locator("#f-wrong").check()
    assert page.locator("#examples tbody tr.ex").count() == 9  # the zeros of [1,1,0,1,0,1,0,1,1,1] × 3
    page.locator("#f-wrong").uncheck()
    page.locator("#f-task").select_option("summary")
    # the model is kept where the new task has it; the setting falls back to one it was run in
    assert page.locator("#f-model").input_value() == "smollm2-135m"
    assert page.locator("#f-setting").input_value() == "zero-shot"
    assert page.locator("#examples tbody tr.ex").count() == 30
    page.locator("#s-drill").scroll_into_view_if_needed()
    _shot(page, tmp_path, "report-examples.png")

    # side by side: where the small model and the reference disagree
    page.locator("#verdicts [data-compare=run01]").click()  # smollm2-135m · zero-shot on fact-check
    rows = page.locator("#compare tbody tr.diff")
    assert rows.count() == 30  # the synthetic outputs always differ
    assert "A: smollm2-135m · zero-shot" in page.locator("#c-ha").inner_text()
    assert "B: gpt-4o-mini · zero-shot" in page.locator("#c-hb").inner_text()
    page.locator("#c-b").select_option(index=0)  # a run of the same task as A
    _shot(page, tmp_path, "report-disagreements.png")
    page.close()


def _start_rate(db: Path, *args: str):
    proc = subprocess.Popen([sys.executable, "-m", "labscale", "rate", "--db", str(db), "--port", "0", *args],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+/)", line)
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"labscale rate did not start: {line}")


def _stop(proc) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(30)


def _changed(page, code: str) -> None:
    """Wait until the page shows another item (Playwright's expect: no eval, which the page's CSP forbids)."""
    from playwright.sync_api import expect

    expect(page.locator("body")).not_to_have_attribute("data-code", code)


def _state(page) -> tuple[str, str]:
    return page.locator("body").get_attribute("data-code"), page.locator("#progress").inner_text()


def test_rating_page_click_keyboard_reload_resume(browser, tmp_path):
    db = rating_db(tmp_path / "rate.db", n=6)
    proc, url = _start_rate(db, "--task", "summ")
    try:
        ctx = browser.new_context(viewport={"width": 1200, "height": 860})
        page = ctx.new_page()
        page.goto(url)
        page.fill("#rater", "alice")
        page.click("#startform button")
        page.wait_for_selector("#rate:not([hidden])")
        html = page.content()
        for secret in (*MODELS, "zero-shot", "run0"):
            assert secret not in html
        assert "The response is valid and satisfying." in page.inner_text("#buttons")
        _shot(page, tmp_path, "rate-absolute.png")
        done = []
        code, progress = _state(page)
        assert progress == "0 of 13 rated"  # 12 items + 1 repeat
        for grade in ("A", "C"):  # by click
            page.click(f"#choice-{grade}")
            _changed(page, code)
            done.append((code, grade))
            code, _ = _state(page)
        for key, grade in (("b", "B"), ("4", "D"), ("d", "D")):  # by keyboard
            page.keyboard.press(key)
            _changed(page, code)
            done.append((code, grade))
            code, _ = _state(page)
        page.reload()  # mid-way: resumes where the rater was
        page.wait_for_selector("#rate:not([hidden])")
        assert _state(page) == (code, "5 of 13 rated")
        page.close()
        page = ctx.new_page()  # the tab closed and opened again
        page.goto(url)
        page.wait_for_selector("#rate:not([hidden])")
        assert _state(page) == (code, "5 of 13 rated")
        while True:
            page.keyboard.press("a")
            done.append((code, "A"))
            _changed(page, code)
            code, progress = _state(page)
            if code == "done":
                break
        assert page.locator("#progress").inner_text() == "13 of 13 rated"
        _shot(page, tmp_path, "rate-done.png")
        ctx.close()
    finally:
        _stop(proc)
    conn = sqlite3.connect(db)
    stored = conn.execute("SELECT item, rating FROM ratings r JOIN rating_sessions s ON s.id = r.session_id "
                          "WHERE s.rater='alice' ORDER BY r.created_at").fetchall()
    conn.close()
    assert stored == done


def test_pairwise_page(browser, tmp_path):
    db = rating_db(tmp_path / "pair.db", n=4)
    proc, url = _start_rate(db, "--task", "summ", "--mode", "pairwise")
    try:
        page = browser.new_page(viewport={"width": 1200, "height": 760})
        page.goto(url)
        page.fill("#rater", "bob")
        page.keyboard.press("Enter")
        page.wait_for_selector("#output-a")
        texts = {page.inner_text("#output-a pre"), page.inner_text("#output-b pre")}
        assert {t.split()[0] for t in texts} == {"closed", "small"}
        _shot(page, tmp_path, "rate-pairwise.png")
        code, _ = _state(page)
        left = page.inner_text("#output-a pre")
        page.click("#choice-left")
        _changed(page, code)
        code2, _ = _state(page)
        page.keyboard.press("t")
        _changed(page, code2)
    finally:
        _stop(proc)
    conn = sqlite3.connect(db)
    rows = conn.execute("SELECT item, rating, run_id, other_run_id FROM ratings ORDER BY created_at").fetchall()
    conn.close()
    assert [(r[0], r[1]) for r in rows] == [(code, "left"), (code2, "tie")]
    # the left run stored is the one whose output was shown on the left
    assert (rows[0][2] == "run00") == left.startswith("closed")
