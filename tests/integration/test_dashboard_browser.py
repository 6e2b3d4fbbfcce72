"""The dashboard in a real browser: headless Chromium (Debian's package) driven by Selenium
through chromedriver, against Django's live server on the test database."""

from __future__ import annotations

import os
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
import requests
from django.contrib.auth.models import User
from django.utils import timezone

from reconciliation.anomalies import DetectorSettings, floor_time
from reconciliation.buckets import buckets_refresh
from reconciliation.queues import queue_depth_sample

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
OUTPUT_DIR = Path(os.environ.get("CONDUCTOR_TEST_OUTPUT", Path(__file__).resolve().parents[2] / "var" / "test-output"))
PASSWORD = "pw-for-browser-tests"


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        raise RuntimeError(
            "the browser test needs Debian's chromium and chromium-driver: run `bash .ci/ensure-browser` "
            "(make test does) or apt-get install chromium chromium-driver"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1800",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()  # stops chromedriver and Chromium, by their pids, even when the test failed


def seed(make_message, park):
    """A few minutes of traffic, errors and dead letters, bucketed as beat would have."""
    from messaging.models import DispatchAttempt

    now = timezone.now()
    for minutes_ago, delivered in ((4, 9), (3, 7)):
        at = floor_time(now - timedelta(minutes=minutes_ago), 60) + timedelta(seconds=5)
        for n in range(10):
            received = n < delivered
            message = make_message(
                state="delivered" if received else "dispatched",
                provider="twilio",
                provider_message_id="SM",
                created_at=at,
                accepted_at=at,
                dispatched_at=at + timedelta(seconds=0.2 + n / 10),
                delivered_at=at + timedelta(seconds=3 + n) if received else None,
            )
            if n == 0:
                DispatchAttempt.objects.create(
                    message=message, number=1, provider="twilio", channel="sms", started_at=at, ended_at=at,
                    outcome="transient_error", error_type="provider_5xx", latency_ms=120,
                )  # fmt: skip
    for _ in range(3):
        park(parked_at=now - timedelta(minutes=2))
    buckets_refresh(now=now, settings=DetectorSettings())
    queue_depth_sample(now=now, depths={"sms.bulk": 120, "sms.critical": 1})


def log_in(browser, live_server, username):
    from selenium.webdriver.common.by import By

    browser.get(f"{live_server.url}/admin/login/?next=/dashboard/")
    browser.find_element(By.NAME, "username").send_keys(username)
    browser.find_element(By.NAME, "password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()


def test_staff_see_the_charts_drawn_from_the_data_endpoint(browser, live_server, make_message, park):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    seed(make_message, park)
    User.objects.create_user("ops", password=PASSWORD, is_staff=True)
    log_in(browser, live_server, "ops")
    wait = WebDriverWait(browser, 30)
    wait.until(lambda b: b.current_url.endswith("/dashboard/"))
    wait.until(lambda b: b.find_element(By.ID, "dashboard").get_attribute("data-rendered"))
    # Every chart is drawn: uPlot made a canvas for each of the five.
    canvases = browser.find_elements(By.CSS_SELECTOR, "#dashboard .chart canvas")
    assert len(canvases) == 5, browser.page_source[:2000]

    # What the charts hold equals what the endpoint answers to the same session.
    session = requests.Session()
    for cookie in browser.get_cookies():
        session.cookies.set(cookie["name"], cookie["value"])
    for _ in range(2):  # a minute may turn between the page's request and ours
        drawn = browser.execute_script(
            "const d = window.conductorDashboard;"
            "return {window: d.data.window, delivery: d.charts.delivery_rate.data,"
            " dead: d.charts.dead_letters.data, labels: d.charts.delivery_rate.series.map(s => s.label)};"
        )
        api = session.get(f"{live_server.url}/dashboard/data/", params={"window": "1h"}, timeout=10).json()
        if drawn["delivery"][0] == api["times"]:
            break
        browser.refresh()
        wait.until(lambda b: b.find_element(By.ID, "dashboard").get_attribute("data-rendered"))
    assert drawn["window"] == "1h"
    assert drawn["delivery"][0] == api["times"]
    assert drawn["labels"][1:] == list(api["delivery_rate"])
    assert drawn["delivery"][1:] == list(api["delivery_rate"].values())
    assert drawn["dead"][1:] == list(api["dead_letters"].values())
    # And the endpoint holds the seeded figures: 9 of 10, then 7 of 10 delivered; 3 dead letters.
    rates = [r for r in api["delivery_rate"]["sms"] if r is not None]
    assert rates == [0.9, 0.7]
    assert sum(api["dead_letters"]["sms"]) == 3

    # Another window redraws from the endpoint.
    browser.find_element(By.CSS_SELECTOR, "#window option[value='24h']").click()
    wait.until(lambda b: (b.find_element(By.ID, "dashboard").get_attribute("data-rendered") or "").startswith("24h"))
    assert len(browser.execute_script("return window.conductorDashboard.charts.delivery_rate.data[0]")) == 24
    browser.find_element(By.CSS_SELECTOR, "#window option[value='1h']").click()
    wait.until(lambda b: (b.find_element(By.ID, "dashboard").get_attribute("data-rendered") or "").startswith("1h"))
    circuits = browser.find_element(By.ID, "circuits").text
    assert "twilio" in circuits and "closed" in circuits

    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    screenshot = OUTPUT_DIR / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    assert screenshot.stat().st_size > 10_000
    print(f"dashboard screenshot: {screenshot}")


def test_the_dashboard_and_admin_refuse_anonymous_and_non_staff_users(browser, live_server):
    from selenium.webdriver.common.by import By

    for path in ("/dashboard/", "/dashboard/data/", "/admin/"):
        browser.get(f"{live_server.url}{path}")
        assert "/admin/login/" in browser.current_url, path
        assert browser.find_elements(By.NAME, "password")
    User.objects.create_user("outsider", password=PASSWORD, is_staff=False)
    log_in(browser, live_server, "outsider")
    assert "/admin/login/" in browser.current_url
    browser.get(f"{live_server.url}/dashboard/")
    assert "/admin/login/" in browser.current_url and not browser.find_elements(By.ID, "dashboard")
