"""The browser page at `/`, driven in a real headless Chromium through Selenium.

The page is served by its own Serve app (the tiny model on CPU, no auth) on a port of
its own; it calls the same images API a client would. Needs Debian's chromium and
chromium-driver (.ci/run installs them); skipped when they are missing.
"""

from __future__ import annotations

import io
import os
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip(
        "the browser test needs /usr/bin/chromium and /usr/bin/chromedriver "
        "(apt-get install chromium chromium-driver)",
        allow_module_level=True,
    )

pytest.importorskip("selenium", reason="selenium is in the dev extra")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from daguerre.cluster.serve import start
    from daguerre.pipeline.config import EngineConfig, ModelDeploymentConfig, ServeConfig
    from ray import serve

    root = tmp_path_factory.mktemp("page")
    engine = EngineConfig(model="tiny", device="cpu", torch_threads=1)
    config = ServeConfig(
        port=free_port(),
        models=[ModelDeploymentConfig(engine=engine, num_cpus=0.5)],
        output=str(root / "out"),
    )
    url = start(config)
    yield url
    serve.shutdown()  # test modules share the session's Ray


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download anything
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--window-size=1000,1000", "--force-device-scale-factor=1",
        f"--user-data-dir={tmp_path_factory.mktemp('chrome-profile')}",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def open_page(driver, url: str) -> None:
    driver.get(url + "/")
    assert driver.title == "daguerre"
    WebDriverWait(driver, 60).until(model_options)  # filled from GET /v1/models


def model_options(driver) -> list[str]:
    return [o.get_attribute("value") for o in Select(driver.find_element(By.ID, "model")).options]


def fill(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def test_page_generates_an_image(server, browser, tmp_path):
    from PIL import Image

    open_page(browser, server)
    assert model_options(browser) == ["tiny"]
    assert browser.find_element(By.ID, "size").get_attribute("value") == "64x64"
    assert browser.find_element(By.ID, "steps").get_attribute("value") == "20"
    assert browser.find_element(By.ID, "error").text == ""

    fill(browser, "prompt", "a lighthouse at dusk")
    fill(browser, "steps", "4")
    fill(browser, "seed", "7")
    browser.find_element(By.ID, "generate").click()

    image = browser.find_element(By.ID, "result-image")
    WebDriverWait(browser, 120).until(
        lambda d: (
            d.execute_script("return arguments[0].naturalWidth > 0", image)
            or d.find_element(By.ID, "error").text
        )
    )
    assert browser.find_element(By.ID, "error").text == ""
    size = browser.execute_script(
        "return [arguments[0].naturalWidth, arguments[0].naturalHeight]", image
    )
    assert size == [64, 64]
    src = image.get_attribute("src")
    assert src.startswith("data:image/png;base64,")
    info = browser.find_element(By.ID, "result-info").text
    assert "seed:  7" in info and "online/" in info

    # the image is really drawn: its region of a screenshot has many colours
    rect = browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center'});"
        "const r = arguments[0].getBoundingClientRect();"
        "return [r.left, r.top, r.right, r.bottom, window.devicePixelRatio];",
        image,
    )
    png = browser.get_screenshot_as_png()
    (tmp_path / "page.png").write_bytes(png)
    if os.environ.get("DAGUERRE_PAGE_SCREENSHOT"):  # to look at it: a path to write it to
        Path(os.environ["DAGUERRE_PAGE_SCREENSHOT"]).write_bytes(png)
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    left, top, right, bottom, scale = rect
    box = tuple(round(v * scale) for v in (left + 2, top + 2, right - 2, bottom - 2))
    assert box[2] - box[0] >= 60 and box[3] - box[1] >= 60, (rect, shot.size)
    colours = shot.crop(box).getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 16, f"a blank image region: {colours}"


def test_page_shows_the_servers_error(server, browser):
    open_page(browser, server)
    fill(browser, "prompt", "too many steps")
    fill(browser, "steps", "999")
    browser.find_element(By.ID, "generate").click()
    error = WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "error").text)
    assert "steps" in error and "999" in error and "150" in error, error
    assert browser.find_element(By.ID, "error").is_displayed()
    assert browser.find_element(By.ID, "generate").is_enabled()
