"""The live explorer in a real browser: headless Chromium (Debian's chromium + chromium-driver)
driven by selenium, against a live worker (real catalog + encoder) during a replay.

The test picks a user from the page's list of recently active users, waits for their pulled
recommendations, sends that user new events in another category and waits for the page to
show the push that they caused (server-sent events), with a different list. The screenshot is
saved to the test's tmp dir (and to ``docs/results/explorer.png`` with STREAMREC_UPDATE_DOCS=1).

Only the system chromedriver is used (``/usr/bin/chromedriver``, never selenium-manager
downloads). Skipped, with a message, only when chromium is not installed; CI installs it.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import msgspec
import orjson
import pytest
from support.worker import wait_until

from devstack.produce import EventProducer, dataset_events
from streamrec.datasets import load_dataset
from streamrec.events import make_event

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
REPLAY_RATE = 25.0  # events per second of background traffic


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # never let selenium-manager download anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM or ""
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1440,1100", "--hide-scrollbars", "--lang=en-US"):  # fmt: skip
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


class Replay(threading.Thread):
    """Online Retail test events, re-timed to now, at REPLAY_RATE until stopped."""

    def __init__(self, settings, retail, n: int = 3000) -> None:
        super().__init__(daemon=True)
        self.events = list(dataset_events(retail, "test", settings=settings, limit=n))
        self.producer = EventProducer(settings)
        self.halt = threading.Event()
        self.sent = 0

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.halt.is_set() and self.sent < len(self.events):
            due = min(len(self.events), int((time.monotonic() - t0) * REPLAY_RATE) + 1)
            while self.sent < due:
                ev = self.events[self.sent]
                self.producer.send(msgspec.structs.replace(ev, ts=int(time.time() * 1000)))
                self.sent += 1
            self.producer.poll(0)
            time.sleep(0.05)
        self.producer.flush(10)


def _rows(driver) -> list[str]:
    """The item ids of the recommendations table, read in one go (the page re-renders it live)."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#recs tbody tr')].map((tr) => tr.dataset.itemId)"
    )


def _texts(driver, selector: str) -> list[str]:
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((e) => e.textContent)", selector
    )


def _source(driver) -> str:
    return driver.execute_script("return document.getElementById('recs').dataset.source")


def _click_first_user(driver) -> str:
    """Click the first entry of the (periodically re-rendered) user list; its user id."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    for _ in range(20):
        try:
            li = driver.find_element(By.CSS_SELECTOR, "#users li[data-user]")
            user = li.get_attribute("data-user")
            li.click()
            return user
        except StaleElementReferenceException:
            time.sleep(0.1)
    raise AssertionError("could not click a user in the explorer's list")


@pytest.mark.skipif(CHROMIUM is None or not Path(CHROMEDRIVER).exists(),
                    reason="chromium/chromedriver not installed (apt-get install chromium chromium-driver)")  # fmt: skip
def test_the_explorer_shows_a_users_recommendations_changing_live(
    worker, topics, settings, retail_model_dir, redis_client, data_dir, tmp_path: Path
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    w = worker(
        items="inference.catalog:load_catalog",
        encoder="inference.encoder:load_encoder",
        STREAMREC_MODEL_DIR=str(retail_model_dir),
        STREAMREC_SCORING_COALESCE_MS="400",
        STREAMREC_ENCODER_PROVIDERS='["CPUExecutionProvider"]',
    ).start()
    retail = load_dataset("online-retail", data_dir)
    w.wait_ready(timeout=180)
    replay = Replay(settings, retail)
    replay.start()
    driver = _browser()
    try:
        wait_until(
            lambda: len(orjson.loads(w.get("/explorer/api/users")[1] or b'{"users": []}')["users"]) >= 5,
            90,
            "five replayed users in the explorer",
        )
        driver.get(w.url("/explorer"))
        wait = WebDriverWait(
            driver, 60, poll_frequency=0.2, ignored_exceptions=[StaleElementReferenceException]
        )
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#users li[data-user]"))
        user = _click_first_user(driver)
        wait.until(lambda d: _source(d) and _rows(d))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#events tbody tr[data-event-id]"))
        assert driver.find_element(By.ID, "user-title").text == f"User {user}"
        before = _rows(driver)

        # The user's new events: a search and clicks in a category their list does not show.
        cats = retail.item_category()
        shown = {cats.get(i) for i in before}
        category = next(c for c in ("clock", "lantern", "bunting", "mug", "bag") if c not in shown)
        clicks = retail.items[retail.items["category"] == category]["item_id"].tolist()[:4]
        now = int(time.time() * 1000)
        evs = [make_event("search", user, query=f"{category} gift", ts=now)]
        evs += [make_event("click", user, item_id=i, ts=now + 1 + n) for n, i in enumerate(clicks)]
        producer = EventProducer(settings)
        for ev in evs:
            producer.send(ev)
        producer.flush(30)
        last = evs[-1].event_id

        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#pushes li[data-source-event-id="{last}"]'))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, f'#events tbody tr[data-event-id="{last}"]'))
        after = _rows(driver)
        assert _source(driver) == "push"
        assert after and after != before, (before, after)
        assert int(_texts(driver, "#push-count")[0]) >= 1
        reasons = _texts(driver, "#recs tbody .reason")
        assert all(reasons) and any(r.startswith(("similar_to:", "matches_query")) for r in reasons), reasons
        assert any(f"{category} gift" in t for t in _texts(driver, "#events tbody td"))

        time.sleep(0.5)  # let the events table and the user list settle for the picture
        shot = tmp_path / "explorer.png"
        assert driver.save_screenshot(str(shot))
        if os.environ.get("STREAMREC_UPDATE_DOCS"):  # refresh the picture in docs/results on request
            shutil.copyfile(shot, REPO / "docs" / "results" / "explorer.png")
    finally:
        driver.quit()
        replay.halt.set()
        replay.join(15)
    assert w.stop() == 0, w.tail()
