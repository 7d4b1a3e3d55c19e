"""The web page end to end in a real headless browser (Debian's chromium driven by Playwright):
upload a small real COCO zip, watch the job finish, browse the model, segment a photo and check
that the overlay shows masks. Screenshots go to $UPLVP_SCREENSHOTS (default: the test's tmp dir);
the README's come from `UPLVP_SCREENSHOTS=docs/screenshots`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from models.cli import main as uplvp

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
QUICKSTART_BUDGET_MIN = "3"  # README, "Quickstart": the time budget it tells a new user to set
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture()
def page(tmp_path: Path) -> Any:
    if CHROMIUM is None:
        pytest.skip("no chromium: `make setup` installs Debian's chromium package (apt); install it to run this test")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield pg
        browser.close()


def wait_for(page: Any, js: str, timeout_ms: int, worker_log: Path) -> None:
    """`page.wait_for_function(js)`, failing with what the page and the worker said when it times out
    (a bare Playwright timeout says neither where the job was nor why)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

    try:
        page.wait_for_function(js, timeout=timeout_ms)
    except PlaywrightTimeoutError:
        seen = {k: page.text_content(f"#{k}") for k in ("job-state", "job-detail", "job-result", "train-error")}
        pytest.fail(f"waited {timeout_ms / 1000:.0f} s for `{js}`; the page shows {seen}; "
                    f"the worker's log ends:\n{worker_log.read_text(errors='replace')[-3000:]}")


def test_train_watch_browse_and_segment_in_the_browser(page: Any, live_api: str, celery_worker: Path,
                                                        voc_dir: Path, tmp_path: Path) -> None:
    shots = Path(os.environ.get("UPLVP_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    demo = tmp_path / "demo.zip"
    assert uplvp(["demo-data", "--out", str(demo)]) == 0
    page.goto(live_api)
    wait_for(page, "document.getElementById('ready').textContent.startsWith('ready')", 30_000, celery_worker)

    page.set_input_files("#dataset", str(demo))
    page.fill("#model-name", "web-demo")
    if "UPLVP_SCREENSHOTS" in os.environ:  # the README's pictures: the quickstart exactly as it reads
        page.fill("input[name=time_budget_min]", QUICKSTART_BUDGET_MIN)
    else:  # the suite: a short fixed schedule at a small size
        page.fill("input[name=time_budget_min]", "")
        page.fill("input[name=epochs]", "40")
        page.fill("input[name=image_size]", "160")
        page.fill("input[name=lr]", "0.0005")
    page.fill("input[name=val_fraction]", "0")
    page.click("#start")
    page.wait_for_selector("#job:not([hidden])")
    # the dataset report of the 202 is on the page before training starts
    page.wait_for_selector("#report-table")
    report = page.text_content("#report-table")
    assert "images" in report and all(c in report for c in ("bottle", "chair", "diningtable", "person")), report
    assert page.text_content("#report-table tr:nth-child(2) td") == "4"  # images of the train split
    wait_for(page, "document.getElementById('job-state').textContent === 'running'", 60_000, celery_worker)
    wait_for(page, "document.getElementById('job-detail').textContent.includes('loss')", 120_000, celery_worker)
    page.screenshot(path=str(shots / "job-running.png"))
    wait_for(page, "['succeeded','failed','cancelled'].includes(document.getElementById('job-state').textContent)",
             600_000, celery_worker)
    assert page.text_content("#job-state") == "succeeded", (page.text_content("#job-result"),
                                                             celery_worker.read_text(errors="replace")[-3000:])
    assert "web-demo v1" in page.text_content("#job-result")

    page.click("#model-list button[data-model=web-demo]")
    page.wait_for_selector("#versions")
    assert "v1" in page.text_content("#versions") and page.query_selector("#per-category") is not None
    page.wait_for_function("[...document.querySelectorAll('img.report')].length === 2 && "
                           "[...document.querySelectorAll('img.report')].every(i => i.complete && i.naturalWidth > 0)",
                           timeout=30_000)  # the learning curve and the evaluation grid, loaded with the key
    page.click("button.promote[data-version='1']")
    page.wait_for_function("document.getElementById('versions').textContent.includes('production')")
    # the version's files, fetched with the key: the checkpoint, and the ONNX export (made on this first download)
    for fmt, magic in (("pt", b"PK"), ("onnx", b"\x08")):  # a torch zip; an ONNX protobuf (field 1, ir_version)
        with page.expect_download(timeout=120_000) as dl:
            page.click(f"button.download[data-version='1'][data-format='{fmt}']")
        assert dl.value.suggested_filename == f"web-demo-v1.{fmt}"
        assert Path(dl.value.path()).read_bytes()[:len(magic)] == magic
        page.wait_for_function(f"document.getElementById('download-status').textContent.startsWith('web-demo-v1.{fmt}')")
    page.screenshot(path=str(shots / "models.png"))

    page.select_option("#seg-model", "web-demo")
    page.fill("#threshold", "0.05")
    page.set_input_files("#photo", str(voc_dir / "images" / "voc_0.jpg"))
    page.click("#run-segment")
    page.wait_for_selector("#instances li", timeout=120_000)
    n = len(page.query_selector_all("#instances li"))
    assert n > 0 and "instance(s) from web-demo v1" in page.text_content("#segment-summary")
    # The overlay differs from the bare photo where masks were drawn.
    painted = page.evaluate("""async () => {
        const c = document.getElementById('overlay');
        const img = new Image(); img.src = URL.createObjectURL(document.getElementById('photo').files[0]);
        await img.decode();
        const raw = document.createElement('canvas'); raw.width = c.width; raw.height = c.height;
        raw.getContext('2d').drawImage(img, 0, 0, c.width, c.height);
        const a = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        const b = raw.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let changed = 0;
        for (let i = 0; i < a.length; i += 4) if (Math.abs(a[i] - b[i]) + Math.abs(a[i+1] - b[i+1]) > 30) changed++;
        return [changed, c.width, c.height];
    }""")
    assert painted[1:] == [500, 375] and painted[0] > 2000, painted
    page.screenshot(path=str(shots / "segment.png"))
    page.uncheck("#instances li:first-child input")  # toggling an instance redraws without it
    assert not page.is_checked("#instances li:first-child input")
    with page.expect_download() as dl:
        page.click("#download-json")
    assert dl.value.suggested_filename == "segmentation.json"
