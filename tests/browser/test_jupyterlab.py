"""Notebook 06 in a real browser (`make test-browser`; not part of `make test`: it needs Chromium).

JupyterLab starts on 127.0.0.1 at a free port without a token, serving a copy of notebook 06 (so nothing
in notebooks/ is touched). Headless Chromium opens it, runs all cells, moves the first threshold slider with
the keyboard and checks that the live line's accuracy and the histogram image changed, and that the static
copy is hidden while the live widget renders. Then it reopens the saved notebook without a kernel, as a
researcher does the next day, and checks that the static copy shows the histogram image, the numbers and
the line saying to run the cells. Screenshots go to runs/browser/ (ignored by git). JupyterLab is stopped
by its pid.

Install Chromium and its driver first (Debian/Ubuntu): apt-get install chromium chromium-driver
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "06_exit_thresholds.ipynb"
SHOTS = ROOT / "runs" / "browser"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read() or b"null")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    root = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    port = _free_port()
    env = {**os.environ, "HDKD_FIGURES": str(root / "figures"), "HDKD_RUNS": str(root / "runs")}
    log = open(root / "jupyterlab.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
                               f"--port={port}", "--IdentityProvider.token=", "--ServerApp.password=",
                               f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
                               "--ServerApp.disable_check_xsrf=True",  # the test deletes the kernel session over REST
                               *(["--allow-root"] if os.geteuid() == 0 else [])],
                              stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            _get(f"{url}/api/status")
            break
        except OSError:
            assert server.poll() is None, (root / "jupyterlab.log").read_text()[-2000:]
            time.sleep(0.5)
    else:
        raise TimeoutError("JupyterLab did not answer within 120 s")
    yield url, root
    os.killpg(server.pid, signal.SIGTERM)  # JupyterLab and the kernels it started
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    log.close()


@pytest.fixture
def browser(request):
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("google-chrome") or ""
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    if getattr(request.node, "report_call", None) is not None and request.node.report_call.failed:
        driver.save_screenshot(str(SHOTS / "failed.png"))  # what the page showed when the test failed
        (SHOTS / "failed.html").write_text(driver.page_source)
    driver.quit()


def _menu(driver, top: str, item: str):
    wait = WebDriverWait(driver, 30)
    for kind, label in (("lm-MenuBar-item", top), ("lm-Menu-item", item)):
        wait.until(EC.element_to_be_clickable((By.XPATH, f"//li[contains(@class,'{kind}')][.//div[text()='{label}']]"))).click()


def _accept_dialogs(driver, seconds: float = 5.0):
    """Accept what JupyterLab asks on opening (the kernel to start), if it asks."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        buttons = driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog .jp-mod-accept")
        if buttons:
            buttons[0].click()
            return
        time.sleep(0.25)


def _open(driver, url):
    driver.get(f"{url}/lab/tree/{NOTEBOOK}")
    WebDriverWait(driver, 120).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
    _accept_dialogs(driver)


def _live_line(driver) -> str:
    lines = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".widget-html") if "accuracy" in e.text]
    return lines[0] if lines else ""


def _accuracy(line: str) -> float:
    return float(re.search(r"accuracy ([0-9.]+)%", line).group(1))


def test_explorer_live_in_jupyterlab_and_static_after_reopening(lab, browser):
    url, root = lab
    wait = WebDriverWait(browser, 240)
    _open(browser, url)
    wait.until(lambda d: "Idle" in d.find_element(By.ID, "jp-main-statusbar").text)
    _menu(browser, "Run", "Run All Cells")
    wait.until(lambda d: _live_line(d) and d.find_elements(By.CSS_SELECTOR, "img.widget-image"))
    wait.until(lambda d: "Idle" in d.find_element(By.ID, "jp-main-statusbar").text)
    browser.save_screenshot(str(SHOTS / "1-explorer-live.png"))
    before = _live_line(browser)
    image = browser.find_elements(By.CSS_SELECTOR, "img.widget-image")[0]
    picture_before = image.get_attribute("src")
    static = browser.find_elements(By.CSS_SELECTOR, ".hdkd-static-copy")
    assert static and all(not s.is_displayed() for s in static), "the static copy shows beside the live widget"

    handle = browser.find_elements(By.CSS_SELECTOR, ".noUi-handle")[0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", handle)
    handle.click()
    for _ in range(70):  # exit 1 from 0.80 down to 0.10: far more samples leave there
        handle.send_keys(Keys.ARROW_LEFT)
    WebDriverWait(browser, 60).until(lambda d: _live_line(d) != before)
    WebDriverWait(browser, 120).until(lambda d: "Idle" in d.find_element(By.ID, "jp-main-statusbar").text)
    after = _live_line(browser)
    assert browser.find_elements(By.CSS_SELECTOR, "img.widget-image")[0].get_attribute("src") != picture_before
    browser.save_screenshot(str(SHOTS / "2-explorer-slider-moved.png"))
    assert _accuracy(after) != _accuracy(before), (before, after)
    assert after.split("leaving per exit: ")[1] != before.split("leaving per exit: ")[1]

    # the next day: the notebook saved with its outputs, the kernel gone, the page opened again
    browser.find_element(By.CSS_SELECTOR, ".jp-Notebook").click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, "s")
    WebDriverWait(browser, 60).until(
        lambda d: "hdkd-static-copy" in (root / NOTEBOOK).read_text() and '"outputs": []' not in
        json.dumps(json.loads((root / NOTEBOOK).read_text())["cells"][5]))
    for session in _get(f"{url}/api/sessions"):
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/sessions/{session['id']}", method="DELETE"))
    browser.get("about:blank")
    _open(browser, url)
    wait.until(lambda d: any(s.is_displayed() for s in d.find_elements(By.CSS_SELECTOR, ".hdkd-static-copy")))
    copy = [s for s in browser.find_elements(By.CSS_SELECTOR, ".hdkd-static-copy") if s.is_displayed()][0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", copy)
    time.sleep(1)
    browser.save_screenshot(str(SHOTS / "3-reopened-static-copy.png"))
    assert "run the notebook's cells to use the sliders" in copy.text
    assert _accuracy(copy.text) == _accuracy(before)  # the state the cell left: the initial thresholds
    picture = copy.find_element(By.TAG_NAME, "img")
    assert picture.get_attribute("src").startswith("data:image/png;base64,") and picture.size["width"] > 100
