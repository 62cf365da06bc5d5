"""The test page in a real headless browser (Debian's Chromium driven by Selenium, against live uvicorn),
and the annotated PNG answer of ``POST /v1/detect``.

The page loads, a generated frame is uploaded, the boxes it draws are counted in the DOM and compared with
``POST /v1/detect`` on the same frame (count, classes, scores, positions); the jobs tab draws a loss curve that
grows as a running job logs steps. Every request the browser makes goes to the service, and the console stays
free of errors (a Content-Security-Policy violation would show there).

Screenshots go to the test's temp folder. To refresh the ones in the docs::

    GLASSES_VISION_PAGE_SCREENSHOTS=docs/images python -m pytest -q tests/test_service_ui.py

The browser tests need ``apt-get install chromium chromium-driver`` (``.ci/run`` installs them); they are
skipped when those are missing.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from service.core.config import DEFAULT_MODEL_ID
from service.jobs.spec import job_run_dir
from service.main import create_app
from tests.helpers.service import API_KEY, AUTH, make_settings, running_server, wait_for

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SCREENSHOT_DIR_ENV = "GLASSES_VISION_PAGE_SCREENSHOTS"
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,960", "--hide-scrollbars")

needs_chromium = pytest.mark.skipif(
    not (os.path.isfile(CHROMIUM) and os.path.isfile(CHROMEDRIVER)),
    reason=f"the browser test needs Chromium and its driver at {CHROMIUM} and {CHROMEDRIVER}: "
           "apt-get install -y chromium chromium-driver (CI's .ci/run installs them)",
)


@pytest.fixture(scope="module")
def page_server(tmp_path_factory):
    """Live uvicorn on a fresh home: the shipped base model is exported on start, as ``glasses-vision serve`` does."""
    home = tmp_path_factory.mktemp("ui") / "home"
    settings = make_settings(home, job_workers=0)
    app = create_app(settings)
    with running_server(app) as url:
        wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 200, 180, interval=0.3,
                 what="the default model to be exported and loaded")
        yield app, settings, url


@pytest.fixture(scope="module")
def browser(page_server, tmp_path_factory):
    """Headless Chromium; quits before the server stops (no event stream left open)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _save_screenshot(driver, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    assert driver.save_screenshot(str(path)), "the browser did not write a screenshot"
    with Image.open(path) as shot:
        assert shot.format == "PNG" and shot.size[0] >= 800, shot.size
        assert np.asarray(shot.convert("L")).std() > 5, "the screenshot is blank"
    target = os.environ.get(SCREENSHOT_DIR_ENV)
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / name)
    return path


def _requested_urls(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _assert_page_stayed_local(driver, url: str) -> None:
    urls = _requested_urls(driver)
    assert urls, "no requests were logged"
    network = [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:"))]  # not chrome://, data:, blob:
    assert any(u.startswith(f"{url}/v1/") for u in network), network
    foreign = [u for u in network if not u.startswith(url + "/")]
    assert not foreign, f"the page fetched from outside the service: {foreign}"
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _wait_for_boxes(driver, conf: str, timeout: float = 60):
    def done(d):
        overlay = d.find_element(By.ID, "overlay")
        return overlay.get_attribute("data-state") == "done" and overlay.get_attribute("data-conf") == conf
    WebDriverWait(driver, timeout).until(done, message=f"the page never drew the boxes at conf={conf}")
    return driver.find_elements(By.CSS_SELECTOR, "#overlay .box")


def _set_slider(driver, value: str) -> None:
    driver.execute_script(
        "const s = document.getElementById('conf'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input', {bubbles: true}));", value)


@pytest.mark.slow
@needs_chromium
def test_the_page_draws_the_boxes_that_detect_returns(page_server, browser, tmp_path):
    from training.data.synthetic import render_frame

    _, _, url = page_server
    browser.get(f"{url}/")
    assert browser.title.startswith("Glasses Vision")
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "model").get_attribute("value") == DEFAULT_MODEL_ID,
        message="the model list never loaded")

    png = _png(render_frame(640, 480, seed=2, domain="egocentric"))
    frame_path = tmp_path / "frame.png"
    frame_path.write_bytes(png)
    expected = httpx.post(f"{url}/v1/detect?conf=0.25", files={"image": ("frame.png", png, "image/png")},
                          timeout=60).json()
    assert expected["detections"], "the base model should find objects on this generated frame"

    browser.find_element(By.ID, "file").send_keys(str(frame_path))
    boxes = _wait_for_boxes(browser, "0.25")
    overlay = browser.find_element(By.ID, "overlay")
    assert len(boxes) == len(expected["detections"]) == int(overlay.get_attribute("data-count"))

    # each box: the class, the score in its label, and its place on the frame (within 2 CSS pixels)
    canvas = browser.find_element(By.ID, "frame").rect
    scale_x, scale_y = canvas["width"] / expected["image"]["width"], canvas["height"] / expected["image"]["height"]
    for box, want in zip(boxes, expected["detections"]):
        assert box.get_attribute("data-class-name") == want["class_name"]
        assert box.find_element(By.CLASS_NAME, "label").text == f"{want['class_name']} {want['score']:.2f}"
        rect = box.rect
        np.testing.assert_allclose(
            [rect["x"] - canvas["x"], rect["y"] - canvas["y"], rect["width"], rect["height"]],
            [want["x1"] * scale_x, want["y1"] * scale_y, (want["x2"] - want["x1"]) * scale_x,
             (want["y2"] - want["y1"]) * scale_y], atol=2)
    status = browser.find_element(By.ID, "status").text
    assert f"{len(boxes)} box" in status and "inference" in status and " ms" in status, status
    rows = browser.find_elements(By.CSS_SELECTOR, "#detections tbody tr")
    assert len(rows) == len(boxes)
    _save_screenshot(browser, tmp_path, "test-page.png")

    # the confidence slider asks again: the page follows the service at the new threshold
    low = httpx.post(f"{url}/v1/detect?conf=0.05", files={"image": ("frame.png", png, "image/png")},
                     timeout=60).json()
    assert len(low["detections"]) > len(boxes), "a lower threshold should give more boxes on this frame"
    _set_slider(browser, "0.05")
    boxes = _wait_for_boxes(browser, "0.05")
    assert sorted(b.get_attribute("data-class-name") for b in boxes) == \
        sorted(d["class_name"] for d in low["detections"])
    assert browser.find_element(By.ID, "conf-value").text == "0.05"
    _assert_page_stayed_local(browser, url)


def _train_line(step: int, loss: float) -> str:
    return json.dumps({"kind": "train", "step": step, "epoch": 1, "loss": loss, "lr": 0.003 * (1 - step / 20),
                       "time_s": 5.0 + 0.5 * step}) + "\n"


@pytest.mark.slow
@needs_chromium
def test_the_jobs_tab_draws_a_live_loss_curve(page_server, browser, tmp_path):
    app, settings, url = page_server
    store = app.state.store
    store.create({"request": {"name": "kitchen-lora"}}, job_id="job-ui")
    store.claim_next(worker_pid=os.getpid())  # running, with no worker: the test plays the recipe
    store.update_progress("job-ui", step=3, total_steps=20)
    run = job_run_dir(settings, "job-ui")
    run.mkdir(parents=True, exist_ok=True)
    metrics = run / "metrics.jsonl"
    losses = [4.1, 3.6, 3.3, 3.0, 2.9, 2.6, 2.5, 2.45, 2.3, 2.28, 2.2, 2.15]
    metrics.write_text("".join(_train_line(i + 1, loss) for i, loss in enumerate(losses[:3])))

    browser.get(f"{url}/")
    browser.execute_script(
        "const k = document.getElementById('api-key'); k.value = arguments[0];"
        "k.dispatchEvent(new Event('change'));", API_KEY)
    browser.find_element(By.ID, "tab-jobs").click()
    row = WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#jobs-table tr[data-job-id='job-ui']"),
        message="the job never appeared in the jobs tab")[0]
    assert "running" in row.text and "kitchen-lora" in row.text
    row.click()
    chart = browser.find_element(By.ID, "loss-chart")
    WebDriverWait(browser, 30).until(lambda d: chart.get_attribute("data-points") == "3",
                                     message="the loss curve never showed the first steps")

    with open(metrics, "a") as fh:  # the job goes on: the curve follows without a reload
        fh.write("".join(_train_line(i + 1, loss) for i, loss in enumerate(losses) if i >= 3))
    store.update_progress("job-ui", step=len(losses))
    WebDriverWait(browser, 30).until(lambda d: chart.get_attribute("data-points") == str(len(losses)),
                                     message="the loss curve did not grow with the job")
    assert browser.find_element(By.ID, "stat-step").text == "12 / 20"
    assert "12 / 20" in browser.find_element(By.CSS_SELECTOR, "#jobs-table tr[data-job-id='job-ui']").text
    assert browser.find_element(By.ID, "stat-loss").text == "2.1500"
    assert browser.find_element(By.ID, "stat-state").text == "running"
    assert browser.find_element(By.ID, "stat-eta").text == "4 s"  # 0.5 s a step, 8 steps left
    _save_screenshot(browser, tmp_path, "test-page-jobs.png")
    store.finish("job-ui", "succeeded", model_id="kitchen-lora")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "stat-state").text == "succeeded",
                                     message="the end of the job never reached the page")
    _assert_page_stayed_local(browser, url)
    assert httpx.get(f"{url}/v1/jobs/job-ui", headers=AUTH).json()["state"] == "succeeded"


# ---------------------------------------------------------------- annotated answers of POST /v1/detect
def _detections_for_drawing(body: dict) -> list[dict]:
    return [{"box": (d["x1"], d["y1"], d["x2"], d["y2"]), "score": d["score"], "class_id": d["class_id"],
             "class_name": d["class_name"]} for d in body["detections"]]


def test_detect_answers_with_the_frame_and_its_boxes_drawn(page_server):
    from export.draw import draw_detections
    from training.data.synthetic import render_frame

    _, _, url = page_server
    frame = render_frame(640, 480, seed=2, domain="egocentric")
    files = {"image": ("frame.png", _png(frame), "image/png")}
    body = httpx.post(f"{url}/v1/detect?conf=0.25", files=files, timeout=60).json()
    assert body["detections"]
    by_accept = httpx.post(f"{url}/v1/detect?conf=0.25", files=files, headers={"Accept": "image/png"}, timeout=60)
    by_query = httpx.post(f"{url}/v1/detect?conf=0.25&render=true", files=files, timeout=60)
    for resp in (by_accept, by_query):
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/png"
        assert resp.headers["x-detections"] == str(len(body["detections"]))
        assert resp.headers["x-image-size"] == "640x480" and float(resp.headers["x-inference-ms"]) > 0
    assert by_accept.content == by_query.content
    with Image.open(io.BytesIO(by_accept.content)) as drawn:
        assert drawn.format == "PNG" and drawn.size == (640, 480)
        drawn_pixels = np.asarray(drawn.convert("RGB"))
    # exactly what the one drawing function makes of the JSON boxes, and not the bare frame
    expected = np.asarray(draw_detections(frame, _detections_for_drawing(body)))
    np.testing.assert_array_equal(drawn_pixels, expected)
    assert (drawn_pixels != frame).any(axis=2).mean() > 0.005

    # JSON stays the answer for */* and when JSON ranks at least as high as PNG
    for accept in ("*/*", "application/json", "image/png;q=0.5, application/json", "application/json, image/png"):
        resp = httpx.post(f"{url}/v1/detect?conf=0.25", files=files, headers={"Accept": accept}, timeout=60)
        assert resp.headers["content-type"] == "application/json", accept
    assert httpx.post(f"{url}/v1/detect?render=maybe", files=files, timeout=60).status_code == 422


def test_a_large_frame_is_drawn_reduced_with_its_boxes_in_place(page_server):
    from export.draw import class_color
    from training.data.synthetic import render_frame

    _, _, url = page_server
    big = np.asarray(Image.fromarray(render_frame(640, 480, seed=2, domain="egocentric")).resize((2240, 1680)))
    files = {"image": ("big.png", _png(big), "image/png")}
    body = httpx.post(f"{url}/v1/detect?conf=0.25", files=files, timeout=60).json()
    resp = httpx.post(f"{url}/v1/detect?conf=0.25&render=1", files=files, timeout=60)
    assert resp.status_code == 200 and resp.headers["x-image-size"] == "2240x1680"
    with Image.open(io.BytesIO(resp.content)) as drawn:
        assert drawn.size == (1120, 840)  # reduced by 2: the longer side below 2 * 1024
        pixels = np.asarray(drawn.convert("RGB"))
    for d in body["detections"]:  # each box's colour on its left edge, halfway down, at half the file's scale
        x, y = int(round(d["x1"] / 2)), int(round((d["y1"] + d["y2"]) / 4))
        window = pixels[max(0, y - 1): y + 2, max(0, x - 2): x + 3].reshape(-1, 3)
        assert (np.abs(window.astype(int) - class_color(d["class_id"])).sum(axis=1) < 3).any(), d


@pytest.mark.parametrize("accept, png", [
    ("image/png", True), ("image/*", True), ("image/png, application/json;q=0.9", True),
    ("", False), ("*/*", False), ("application/json", False), ("image/png;q=0", False),
    ("image/png;q=0.5, */*", False), ("image/webp", False), ("image/png;q=bad", False),
])
def test_accept_negotiation(accept, png):
    from service.api.routes.detect import wants_png

    assert wants_png(accept) is png
