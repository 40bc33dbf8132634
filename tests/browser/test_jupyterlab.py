"""Notebook 06 in a real browser (`make test-browser`; not part of `make test`: it needs Chromium).

JupyterLab starts on 127.0.0.1 at a free port without a token, serving a copy of notebook 06 (so nothing
in notebooks/ is touched) and a papermill-executed copy. Headless Chromium opens the copy, runs all cells,
checks that the explorer's one output renders as the widget alone (its PNG view is not shown beside it),
moves the first threshold slider with the keyboard and checks that the live line's accuracy and the
histogram image changed. Then it saves, reopens the notebook without a kernel, as a researcher does the next
day, and checks that the explorer shows as it was saved (JupyterLab restores it from the widget state our
settings save). Last it opens the papermill output, which nobody signed and JupyterLab therefore does not
trust, and checks that the explorer's output shows its PNG. Last, notebooks 01, 03 and 06 executed by
papermill are exported to HTML by nbconvert and opened from file:// in Chromium with every host name
unresolvable (offline): 06 must show the explorer's picture, and no page may hold more than one progress
line per bar. Screenshots go to runs/browser/ (ignored by git). JupyterLab is stopped by its pid; its
settings and workspaces live in the test's temporary folder (nothing written to the home folder), with the
news prompt turned off so that it covers no screenshot.

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
EXECUTED = "06_papermill.ipynb"  # notebook 06 as `make run` leaves it: executed by papermill, not signed
SHOTS = ROOT / "runs" / "browser"
EXPORTED = (("01_toy_dense_kd.ipynb", "01_papermill.ipynb", ["-p", "steps", "100"]),
            ("03_cifar100.ipynb", "03_papermill.ipynb", []))  # executed too, for their exported HTML


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
    settings = root / "lab-settings" / "@jupyterlab" / "apputils-extension"  # JupyterLab's user settings, here
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))  # no prompt
    env = {**os.environ, "HDKD_FIGURES": str(root / "figures"), "HDKD_RUNS": str(root / "runs"),
           "JUPYTERLAB_SETTINGS_DIR": str(root / "lab-settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(root / "lab-workspaces")}
    for name, out, params in ((NOTEBOOK, EXECUTED, ["-p", "steps", "200"]), *EXPORTED):
        subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks" / name), str(root / out),
                        "--cwd", str(ROOT / "notebooks"), *params], check=True, capture_output=True, env=env)
    port = _free_port()
    log = open(root / "jupyterlab.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
                               f"--port={port}", "--IdentityProvider.token=", "--ServerApp.password=",
                               f"--ServerApp.root_dir={root}", "--LabApp.news_url=",
                               f"--LabApp.workspaces_dir={root / 'lab-workspaces'}",
                               f"--LabApp.user_settings_dir={root / 'lab-settings'}",
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


def _open(driver, url, name=NOTEBOOK):
    driver.get(f"{url}/lab/tree/{name}")
    WebDriverWait(driver, 120).until(EC.presence_of_element_located((By.CSS_SELECTOR, ".jp-Notebook .jp-Cell")))
    _accept_dialogs(driver)


def _explorer_output(driver):
    """The output area of the cell that displays the explorer (None until the page has it)."""
    for cell in driver.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell"):
        if "threshold_explorer(val_probs" in cell.find_element(By.CSS_SELECTOR, ".jp-InputArea").text:
            return cell.find_element(By.CSS_SELECTOR, ".jp-OutputArea")
    return None


def _live_line(element) -> str:
    lines = [e.text for e in element.find_elements(By.CSS_SELECTOR, ".widget-html") if "accuracy" in e.text]
    return lines[0] if lines else ""


def _accuracy(line: str) -> float:
    return float(re.search(r"accuracy ([0-9.]+)%", line).group(1))


def _idle(driver) -> bool:
    return "Idle" in driver.find_element(By.ID, "jp-main-statusbar").text


def test_explorer_live_then_reopened_as_saved(lab, browser):
    url, root = lab
    wait = WebDriverWait(browser, 240)
    settings = _get(f"{url}/lab/api/settings/@jupyter-widgets/jupyterlab-manager:plugin")
    assert settings["schema"]["properties"]["saveState"]["default"] is True, "run `make lab-settings`"
    _open(browser, url)
    wait.until(_idle)
    _menu(browser, "Run", "Run All Cells")
    wait.until(lambda d: _explorer_output(d) and _live_line(_explorer_output(d))
               and _explorer_output(d).find_elements(By.CSS_SELECTOR, "img.widget-image"))
    wait.until(_idle)
    training = [c for c in browser.find_elements(By.CSS_SELECTOR, ".jp-Notebook .jp-CodeCell")
                if "toy.fit(" in c.find_element(By.CSS_SELECTOR, ".jp-InputArea").text][0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", training)
    browser.save_screenshot(str(SHOTS / "0-training-live.png"))
    # the progress bar: one plain output holding its final line, no stderr box (pink) around it or after it
    assert not training.find_elements(By.CSS_SELECTOR, "[data-mime-type='application/vnd.jupyter.stderr']")
    assert len(re.findall(r"\d+%\|", training.find_element(By.CSS_SELECTOR, ".jp-OutputArea").text)) == 1
    output = _explorer_output(browser)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", output)
    browser.save_screenshot(str(SHOTS / "1-explorer-live.png"))
    # one output, shown as the widget alone: its PNG view is not drawn beside it, and no style rule hides it
    assert len(output.find_elements(By.CSS_SELECTOR, ".jp-OutputArea-child")) == 1
    assert not output.find_elements(By.CSS_SELECTOR, ".jp-RenderedImage") and "<style" not in output.get_attribute("innerHTML")
    before = _live_line(output)
    picture_before = output.find_element(By.CSS_SELECTOR, "img.widget-image").get_attribute("src")

    handle = output.find_elements(By.CSS_SELECTOR, ".noUi-handle")[0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", handle)
    handle.click()
    for _ in range(70):  # exit 1 from 0.80 down to 0.10: far more samples leave there
        handle.send_keys(Keys.ARROW_LEFT)
    WebDriverWait(browser, 60).until(lambda d: _live_line(_explorer_output(d)) != before)
    WebDriverWait(browser, 120).until(_idle)
    after = _live_line(output)
    assert output.find_element(By.CSS_SELECTOR, "img.widget-image").get_attribute("src") != picture_before
    browser.save_screenshot(str(SHOTS / "2-explorer-slider-moved.png"))
    assert _accuracy(after) != _accuracy(before), (before, after)
    assert after.split("leaving per exit: ")[1] != before.split("leaving per exit: ")[1]

    # the next day: the notebook saved with its outputs and widget state, the kernel gone, the page opened again
    browser.find_element(By.CSS_SELECTOR, ".jp-Notebook").click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.CONTROL, "s")

    def saved(_):
        nb = json.loads((root / NOTEBOOK).read_text())
        outputs = [o for c in nb["cells"] if "threshold_explorer(val_probs" in "".join(c["source"])
                   for o in c.get("outputs", [])]
        return "widgets" in nb["metadata"] and outputs and "image/png" in outputs[0].get("data", {})
    WebDriverWait(browser, 60).until(saved)
    for session in _get(f"{url}/api/sessions"):
        urllib.request.urlopen(urllib.request.Request(f"{url}/api/sessions/{session['id']}", method="DELETE"))
    browser.get("about:blank")
    _open(browser, url)
    wait.until(lambda d: _explorer_output(d) and _live_line(_explorer_output(d)))
    output = _explorer_output(browser)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", output)
    time.sleep(1)
    browser.save_screenshot(str(SHOTS / "3-reopened-as-saved.png"))
    assert "Error displaying widget" not in output.text
    assert "run the cell to move them" in output.text  # the saved sliders say that they need the kernel
    assert _live_line(output) == after  # the state the notebook was saved in
    picture = output.find_element(By.CSS_SELECTOR, "img.widget-image")
    assert picture.is_displayed() and picture.size["width"] > 100


def test_untrusted_papermill_output_shows_the_explorer_png(lab, browser):
    url, root = lab
    _open(browser, url, EXECUTED)
    WebDriverWait(browser, 120).until(
        lambda d: _explorer_output(d) and _explorer_output(d).find_elements(By.CSS_SELECTOR, ".jp-RenderedImage img"))
    output = _explorer_output(browser)
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", output)
    time.sleep(1)
    browser.save_screenshot(str(SHOTS / "4-papermill-output-png.png"))
    picture = output.find_element(By.CSS_SELECTOR, ".jp-RenderedImage img")
    assert picture.get_attribute("src").startswith("data:image/png;base64,") and picture.size["width"] > 300
    assert not output.find_elements(By.CSS_SELECTOR, ".widget-slider, .jupyter-widgets")  # the PNG alone


@pytest.fixture
def offline_browser(request):
    """Headless Chromium that resolves no host name: a page that needs the network shows what it has without."""
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2200",
                 "--host-resolver-rules=MAP * ~NOTFOUND"):
        options.add_argument(flag)
    options.binary_location = shutil.which("chromium") or shutil.which("google-chrome") or ""
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(shutil.which("chromedriver")))
    SHOTS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()


def test_exported_html_shows_the_explorer_picture_offline_and_one_line_per_bar(lab, offline_browser):
    url, root = lab
    bars = {EXECUTED: 1, "01_papermill.ipynb": 3, "03_papermill.ipynb": 1}  # fits in 06, methods in 01, epochs
    for name, count in bars.items():
        subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "html", str(root / name)],
                       check=True, capture_output=True)
        page = root / name.replace(".ipynb", ".html")
        offline_browser.get(page.as_uri())
        time.sleep(2)
        text = offline_browser.find_element(By.TAG_NAME, "body").text
        assert len(re.findall(r"\d+%\|", text)) == count, name  # the final line of each bar, nothing else
        stem = name.split("_")[0]
        offline_browser.save_screenshot(str(SHOTS / f"5-exported-{stem}-top.png"))
        cells = offline_browser.find_elements(By.CSS_SELECTOR, ".jp-Cell")
        if name == EXECUTED:
            explorer = [c for c in cells if "threshold_explorer(val_probs" in c.text][0]
            picture = explorer.find_element(By.CSS_SELECTOR, ".jp-OutputArea img")
            offline_browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", picture)
            time.sleep(0.5)
            offline_browser.save_screenshot(str(SHOTS / "5-exported-06-explorer.png"))
            assert picture.is_displayed() and offline_browser.execute_script(
                "return arguments[0].complete && arguments[0].naturalWidth", picture) > 300
        else:  # the tables in percent, further down the page
            tables = [c for c in cells if "(%)" in c.text]
            assert tables, name
            offline_browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", tables[0])
            time.sleep(0.5)
            offline_browser.save_screenshot(str(SHOTS / f"5-exported-{stem}-tables.png"))
