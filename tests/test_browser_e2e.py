"""End to end in a real browser: start the app, answer the questionnaire, open an estimate, launch a tiny run
from the Launch page and watch it reach "completed" on the Runs page. Headless Debian Chromium via Playwright.

Prints the speed figures the issue asks for (first page interactive after start, first 70B estimate, cached
re-render after a knob change). Bounds asserted here are generous (CI machines are slow and shared); the printed
figures are the ones to quote. Set FTADVISOR_SAVE_SCREENSHOTS=1 to copy the screenshots to docs/screenshots/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOT_DIR = ROOT / "docs" / "screenshots"
VIEWPORT = {"width": 1440, "height": 1000}
# Generous bounds for a shared 2-core CI box; the targets (3 s, 3 s, 300 ms) are printed, not asserted.
START_BOUND_S = 60
ESTIMATE_BOUND_S = 60
RERENDER_BOUND_S = 10
RUN_BOUND_S = 300

if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed at /usr/bin/chromium (apt-get install chromium; "
                "`make test` does it as root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"streamlit exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError("streamlit did not become healthy")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("screenshots")
    yield folder
    if os.environ.get("FTADVISOR_SAVE_SCREENSHOTS") == "1":
        SCREENSHOT_DIR.mkdir(parents=True, exist_ok=True)
        for png in folder.glob("*.png"):
            shutil.copy(png, SCREENSHOT_DIR / png.name)


def _wait_idle(page, timeout_ms: int = 120_000) -> None:
    """Wait until Streamlit finished the current script run (the app root's script state is no longer running)."""
    page.wait_for_timeout(300)
    page.wait_for_function("() => document.querySelector('[data-testid=stApp]')"
                           "?.getAttribute('data-test-script-state') !== 'running'", timeout=timeout_ms)


def _shot(page, path: Path) -> None:
    """Screenshot of the whole page: Streamlit scrolls inside its main block, so the viewport is made tall."""
    _wait_idle(page)
    height = page.evaluate("document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": VIEWPORT["width"], "height": min(max(height, VIEWPORT["height"]), 6000)})
    page.wait_for_timeout(2500)  # charts and tables re-layout to the new size
    page.screenshot(path=path)
    page.set_viewport_size(VIEWPORT)


def _metric(page, label: str) -> str:
    m = page.locator("[data-testid='stMetric']", has_text=label).first
    return m.locator("[data-testid='stMetricValue']").inner_text()


def _fill(page, label: str, value: str, role: str = "textbox") -> None:
    box = page.get_by_role(role, name=label, exact=True)
    box.fill(value)
    box.press("Enter")
    _wait_idle(page)


def _choose(page, label: str, option: str) -> None:
    """Pick an option of a selectbox by typing it (the list filters as you type) and pressing Enter."""
    box = page.get_by_role("combobox", name=label)
    box.click()
    box.fill(option)
    box.press("Enter")
    _wait_idle(page)


def test_questionnaire_estimate_launch_and_watch(browser, shots, tmp_path, tiny_model_dir):
    figures: dict[str, float] = {}
    rows = [{"prompt": f"What is {a} plus {b}? ", "completion": f"{a + b}"} for a in range(8) for b in range(5)]
    dataset = tmp_path / "sums.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    home = tmp_path / "home"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FTADVISOR_HOME": str(home)}
    page = browser.new_page(viewport=VIEWPORT)
    log = (tmp_path / "streamlit.log").open("wb")  # a file, never a pipe nobody reads

    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
                             "--server.address", "127.0.0.1", "--server.headless", "true",
                             "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
                            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _run_flow(page, url, proc, t0, figures, shots, tiny_model_dir, dataset)
        registry = [json.loads(p.read_text()) for p in (home / "runs").glob("*/result.json")]
        assert [r["status"] for r in registry] == ["completed"]
    finally:
        print("\nbrowser figures (targets: < 3 s, < 3 s, < 300 ms):")
        for name, value in figures.items():
            print(f"  {name}: {value:.2f}")
        page.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    assert figures["first page interactive after start (s)"] < START_BOUND_S
    assert figures["first estimate of a 70B model (s)"] < ESTIMATE_BOUND_S
    assert figures["cached estimate re-render after a knob change (ms)"] < RERENDER_BOUND_S * 1000


def _run_flow(page, url, proc, t0, figures, shots, tiny_model_dir, dataset) -> None:
    """The user's path through the app; fills ``figures`` (speed) and saves screenshots in ``shots``."""
    _wait_healthy(url, proc, START_BOUND_S)
    figures["server answering after start (s)"] = time.monotonic() - t0
    page.goto(url + "/")
    page.get_by_role("button", name=re.compile("Next")).wait_for(timeout=START_BOUND_S * 1000)
    figures["first page interactive after start (s)"] = time.monotonic() - t0

    # ---- an estimate of a 70B model, shared by link
    t1 = time.monotonic()
    page.goto(url + "/estimate?model=llama-3.1-70b&method=qlora&gpu=a100-80gb&gc=true")
    page.locator("[data-testid='stMetric']", has_text="Peak per GPU").wait_for(timeout=ESTIMATE_BOUND_S * 1000)
    figures["first estimate of a 70B model (s)"] = time.monotonic() - t1
    _wait_idle(page)
    peak = _metric(page, "Peak per GPU")
    _shot(page, shots / "estimate.png")

    # knob change to a new value (computed), then back (cached): time until the figure is back on screen
    page.get_by_text("Gradient checkpointing", exact=True).click()
    page.wait_for_function("v => ![...document.querySelectorAll('[data-testid=stMetricValue]')]"
                           ".some(e => e.innerText === v)", arg=peak, timeout=ESTIMATE_BOUND_S * 1000)
    _wait_idle(page)
    t2 = time.monotonic()
    page.get_by_text("Gradient checkpointing", exact=True).click()
    page.wait_for_function("v => [...document.querySelectorAll('[data-testid=stMetricValue]')]"
                           ".some(e => e.innerText === v)", arg=peak, timeout=RERENDER_BOUND_S * 1000)
    figures["cached estimate re-render after a knob change (ms)"] = (time.monotonic() - t2) * 1000

    page.goto(url + "/")  # a new session, as a user opening the app
    page.get_by_role("button", name=re.compile("Next")).wait_for()

    # ---- the questionnaire, one group at a time
    _fill(page, "Training examples per task", "2000", role="spinbutton")
    page.get_by_role("button", name=re.compile("Next")).click()
    page.get_by_text("Step 2 of 4").wait_for()
    page.get_by_role("radio", name="reasoning", exact=True).click()
    _wait_idle(page)
    page.get_by_role("button", name=re.compile("Next")).click()
    page.get_by_text("Step 3 of 4").wait_for()
    page.get_by_role("button", name=re.compile("Next")).click()
    page.get_by_text("Step 4 of 4").wait_for()
    _shot(page, shots / "advisor-questions.png")
    page.get_by_role("button", name=re.compile("See the recommendation")).click()
    page.locator(".st-key-adv_launch button").wait_for(timeout=ESTIMATE_BOUND_S * 1000)
    _wait_idle(page)
    assert page.get_by_text("Why: the decision path").is_visible()
    _shot(page, shots / "advisor-recommendation.png")

    # ---- from the recommendation to a tiny real run
    page.locator(".st-key-adv_launch button").click()
    page.get_by_role("heading", name="Launch", level=1).wait_for()
    _wait_idle(page)
    _fill(page, "Model: catalog id (e.g. smollm2-135m), hub id or a local model folder", str(tiny_model_dir))
    page.get_by_role("radio", name="LoRA", exact=True).click()
    _wait_idle(page)
    _fill(page, "Max steps (0 = by epochs)", "3", role="spinbutton")
    _fill(page, "Sequence length", "64", role="spinbutton")
    _fill(page, "Micro-batch", "2", role="spinbutton")
    _fill(page, "Grad. accumulation", "1", role="spinbutton")
    _choose(page, "Precision", "fp32")
    _choose(page, "Device", "cpu")
    page.get_by_role("radio", name="Local path", exact=True).click()
    _wait_idle(page)
    _fill(page, "Path to a JSONL, CSV or Parquet file", str(dataset))
    page.locator("[data-testid='stMetric']", has_text="Rows").wait_for(timeout=60_000)
    assert _metric(page, "Rows") == "40"
    _shot(page, shots / "launch.png")
    page.locator(".st-key-ln_launch button").click()
    page.locator(".st-key-ln_goto_runs button").wait_for(timeout=60_000)
    page.locator(".st-key-ln_goto_runs button").click()
    page.get_by_role("heading", name="Runs", level=1).wait_for()
    page.get_by_text(re.compile(r"^completed: \d+ steps")).wait_for(timeout=RUN_BOUND_S * 1000)
    _wait_idle(page)
    _shot(page, shots / "runs.png")

    # ---- the trained adapter answers next to its base model
    page.get_by_role("link", name="Adapters").click()
    page.get_by_role("heading", name="Adapters", level=1).wait_for()
    _wait_idle(page)
    page.locator(".st-key-ad_generate button").click()
    page.get_by_text("base model", exact=True).wait_for(timeout=120_000)
    _shot(page, shots / "adapters.png")
