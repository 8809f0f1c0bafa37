"""The demo page in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, never a downloaded browser) driven by selenium, against a real
`python -m service` on a free loopback port, behind an API key and a JLAD_ROOT_PATH prefix.

Known answers come from the bundled sample pictures: `astronaut-shifted.png` is
`astronaut.png` moved SHIFT pixels, so a match and a carried mask have a place to land.
A screenshot of every state is written to the module's output folder (JLAD_DEMO_SCREENSHOTS
names another one, e.g. to refresh the README's pictures).
"""

from __future__ import annotations

import asyncio
import fnmatch
import io
import json
import os
import shutil
import time
import tomllib
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from jlad_client.masks import mask_iou
from numpy.typing import NDArray
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from service.app import create_app
from tests.queue_support import ServiceProcess, start_process
from tests.service_support import service_settings

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "service" / "static" / "samples"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
API_KEY = "demo-page-key"
PREFIX = "/jlad"
MAX_UPLOAD = 1_500_000
SHIFT = (16, 8)  # astronaut-shifted.png = astronaut.png moved right and down by these pixels
# A match of the shifted copy may miss the true place by this much (the identity misses it
# by |SHIFT| = 17.9 px).
MATCH_TOLERANCE_PX = 6.0
WAIT_S = 60


Driver = Any  # selenium's Chrome driver


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JLAD_")}
    env.update(
        {
            "JLAD_MODEL_DIR": str(model_dir),
            "JLAD_HOST": "127.0.0.1",
            "JLAD_API_KEYS": API_KEY,
            "JLAD_ROOT_PATH": PREFIX,
            "JLAD_MAX_UPLOAD_BYTES": str(MAX_UPLOAD),
            "JLAD_PROVIDERS": "cpu",
            "JLAD_INTRA_OP_THREADS": "2",
            "JLAD_SHUTDOWN_GRACE_S": "2",
            "JLAD_LOG_LEVEL": "warning",
            "OMP_NUM_THREADS": "2",
        }
    )
    process = start_process("service", "demo", env, tmp_path_factory.mktemp("demo_service"))
    try:
        process.wait_ready(120)
        yield process
    finally:
        process.stop(15)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    named = os.environ.get("JLAD_DEMO_SCREENSHOTS")
    if named:
        Path(named).mkdir(parents=True, exist_ok=True)
        return Path(named)
    return tmp_path_factory.mktemp("demo_page")


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory, downloads: Path) -> Iterator[Driver]:
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip(
            "needs Chromium and its driver (apt-get install chromium chromium-driver; "
            ".ci/run installs them)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium_profile')}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.add_experimental_option(
        "prefs",
        {"download.default_directory": str(downloads), "download.prompt_for_download": False},
    )
    driver = webdriver.Chrome(service=ChromeService(executable_path=CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        yield driver
    finally:
        driver.quit()


# -- helpers ------------------------------------------------------------------------------------


def wait(driver: Driver, condition: Callable[[Driver], Any], what: str) -> Any:
    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.05).until(condition)
    except TimeoutException:
        error = driver.find_element(By.ID, "error").text
        raise AssertionError(f"timed out waiting for {what}; page error: {error!r}") from None


def page_url(service: ServiceProcess) -> str:
    return f"{service.url}{PREFIX}/"


def open_page(driver: Driver, service: ServiceProcess, *, key: str | None = API_KEY) -> None:
    """A fresh page; `key` already remembered for the tab, as after typing it once."""
    driver.get(page_url(service))
    driver.execute_script(
        "const key = arguments[0];"
        "if (key === null) sessionStorage.clear();"
        "else sessionStorage.setItem('jlad-api-key', key);",
        key,
    )
    driver.get(page_url(service))
    driver.get_log("browser")  # from here on, a console error is this page's
    if key is not None:
        wait(driver, lambda d: d.execute_script("return document.body.dataset.ready"), "models")


def choose_sample(driver: Driver, slot: str, file: str) -> None:
    Select(driver.find_element(By.ID, f"{slot}-sample")).select_by_value(file)


def landmarks_shown(driver: Driver, slot: str) -> list[dict[str, float]]:
    items = driver.find_elements(By.CSS_SELECTOR, f"#{slot}-landmarks li")
    return [
        {k: float(item.get_attribute(f"data-{k}") or "nan") for k in ("x", "y", "confidence")}
        for item in items
    ]


def open_pair(driver: Driver, source: str, target: str) -> None:
    choose_sample(driver, "source", source)
    choose_sample(driver, "target", target)
    wait(driver, lambda d: d.execute_script("return document.body.dataset.field"), "the field")


def image_offset(element: WebElement, x: float, y: float, size: tuple[int, int]) -> tuple[int, int]:
    """Offset from the element's centre (selenium's origin) of image pixel (x, y)."""
    rect = element.rect
    return (
        round((x + 0.5) / size[0] * rect["width"] - rect["width"] / 2),
        round((y + 0.5) / size[1] * rect["height"] - rect["height"] / 2),
    )


def readout(driver: Driver) -> dict[str, Any]:
    data: dict[str, Any] = driver.execute_script(
        "return Object.assign({}, document.getElementById('match-readout').dataset)"
    )
    return data


def shot(driver: Driver, out_dir: Path, name: str, selector: str | None = None) -> Path:
    """A screenshot of the window, or of the element `selector` picks."""
    path = out_dir / f"{name}.png"
    if selector:
        element = driver.find_element(By.CSS_SELECTOR, selector)
        driver.execute_script("arguments[0].scrollIntoView({block: 'start'})", element)
        element.screenshot(str(path))
    else:
        driver.save_screenshot(str(path))
    return path


def console_errors(driver: Driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def downloaded(downloads: Path, name: str, since: float) -> bytes:
    path = downloads / name
    until = time.monotonic() + WAIT_S
    while not (path.exists() and path.stat().st_mtime >= since - 1 and path.stat().st_size):
        assert time.monotonic() < until, f"{name} was not downloaded; have {os.listdir(downloads)}"
        time.sleep(0.05)
    time.sleep(0.2)  # Chrome renames the finished file into place; let it settle
    return path.read_bytes()


def png_labels(content: bytes) -> NDArray[np.uint8]:
    with Image.open(io.BytesIO(content)) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def api(service: ServiceProcess) -> httpx.Client:
    return httpx.Client(base_url=service.url + PREFIX, headers={"X-API-Key": API_KEY}, timeout=60)


# -- tests --------------------------------------------------------------------------------------


def test_shifted_sample_is_the_sample_moved() -> None:
    """What the match and mask tests rely on: the bundled pair really is a pure shift."""
    base = np.asarray(Image.open(SAMPLES / "astronaut.png").convert("RGB"))
    moved = np.asarray(Image.open(SAMPLES / "astronaut-shifted.png").convert("RGB"))
    dx, dy = SHIFT
    assert base.shape == moved.shape == (192, 256, 3)
    assert np.array_equal(moved[dy:, dx:], base[:-dy, :-dx])


def test_every_page_file_ships_in_the_package() -> None:
    """Each file under service/static/ is in a listed package and matches its package-data
    globs, so a wheel (the Docker image installs one) carries the whole page."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    static = ROOT / "service" / "static"
    files = [f for f in static.rglob("*") if f.is_file()]
    assert {"index.html", "demo.js", "encode.js", "demo.css"} <= {f.name for f in files}
    for file in files:
        package = ".".join(file.parent.relative_to(ROOT).parts)
        assert package in config["packages"], package
        globs = config["package-data"].get(package, [])
        assert any(fnmatch.fnmatch(file.name, g) for g in globs), (file, globs)


def test_page_is_served_outside_the_api_document(tmp_path: Path) -> None:
    """/ and /demo serve the page with its <base> under JLAD_ROOT_PATH, its files come from
    the package with or without the prefix (a gateway may strip it), and none of it is in
    the OpenAPI document, which describes the API only."""
    app = create_app(service_settings(tmp_path, root_path="/jlad"))

    async def fetch(paths: list[str]) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)  # no lifespan: no models needed
        async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
            return [await client.get(path) for path in paths]

    pages = asyncio.run(fetch(["/", "/demo", "/jlad/"]))
    for page in pages:
        assert page.status_code == 200, page.url
        assert page.headers["content-type"].startswith("text/html")
        assert '<base href="/jlad/">' in page.text
        assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = ["/demo/assets/demo.js", "/jlad/demo/assets/samples/astronaut.png"]
    script, sample = asyncio.run(fetch(assets))
    assert script.status_code == 200
    assert "javascript" in script.headers["content-type"]
    assert sample.content == (SAMPLES / "astronaut.png").read_bytes()
    for missing in asyncio.run(fetch(["/demo/assets/nothing.js", "/demo/assets/%2e%2e/demo.py"])):
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
    (spec,) = asyncio.run(fetch(["/openapi.json"]))
    paths = set(spec.json()["paths"])
    assert paths and not any(p == "/" or p.startswith("/demo") for p in paths), paths


def test_page_loads_and_runs_without_console_errors(
    browser: Driver, service: ServiceProcess, out_dir: Path
) -> None:
    open_page(browser, service)
    models = Select(browser.find_element(By.ID, "model"))
    assert {o.get_attribute("value") for o in models.options} == {"objects", "faces"}
    assert models.first_selected_option.get_attribute("value") == "objects"
    open_pair(browser, "astronaut.png", "chelsea.png")
    wait(browser, lambda d: d.find_element(By.ID, "view-image").is_displayed(), "the flow view")
    shot(browser, out_dir, "01_loaded")
    assert console_errors(browser) == []
    # Every file the page loaded came from the service, under the gateway prefix.
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert loaded and all(url.startswith(page_url(service)) for url in loaded), loaded


def test_landmarks_of_a_sample_are_drawn_with_their_confidence(
    browser: Driver, service: ServiceProcess, out_dir: Path
) -> None:
    open_page(browser, service)
    Select(browser.find_element(By.ID, "model")).select_by_value("faces")
    choose_sample(browser, "source", "face.png")
    wait(browser, lambda d: len(landmarks_shown(d, "source")) > 0, "landmarks")
    shown = landmarks_shown(browser, "source")
    with api(service) as client:
        faces = client.get("/models/faces").json()
        answer = client.post(
            "/landmarks",
            params={"model": "faces"},
            files={"image": ("face.png", (SAMPLES / "face.png").read_bytes())},
        ).json()
    assert len(shown) == faces["num_landmarks"]
    expected = [{k: lm[k] for k in ("x", "y", "confidence")} for lm in answer["landmarks"]]
    for got, want in zip(shown, expected, strict=True):
        assert got == pytest.approx(want, abs=1e-3)
    info = browser.find_element(By.ID, "source-info").text
    assert "192×192" in info and f"{len(shown)} landmarks" in info
    shot(browser, out_dir, "02_landmarks")


def test_a_click_finds_its_match_on_a_shifted_copy(
    browser: Driver, service: ServiceProcess, out_dir: Path
) -> None:
    open_page(browser, service)
    open_pair(browser, "astronaut.png", "astronaut-shifted.png")
    canvas = browser.find_element(By.ID, "source-canvas")
    size = (256, 192)
    point = (120.0, 70.0)  # on the astronaut's face: texture to match
    ActionChains(browser).move_to_element_with_offset(
        canvas, *image_offset(canvas, *point, size)
    ).click().perform()
    wait(browser, lambda d: readout(d).get("kind") == "pinned", "a pinned match")
    ActionChains(browser).move_by_offset(0, -200).perform()  # leave: the pinned one shows
    wait(browser, lambda d: readout(d).get("kind") == "pinned", "the pinned match")
    pinned = readout(browser)
    source = np.array([float(pinned["sourceX"]), float(pinned["sourceY"])])
    target = np.array([float(pinned["targetX"]), float(pinned["targetY"])])
    assert np.abs(source - point).max() <= 1.5  # where the click was
    assert np.linalg.norm(target - (source + SHIFT)) <= MATCH_TOLERANCE_PX, (source, target)
    assert 0.0 <= float(pinned["confidence"]) <= 1.0
    # The page reads the dense field exactly as the service answers query points.
    with api(service) as client:
        files = {
            "source": ("s.png", (SAMPLES / "astronaut.png").read_bytes()),
            "target": ("t.png", (SAMPLES / "astronaut-shifted.png").read_bytes()),
        }
        data = {"points": json.dumps([source.tolist()])}
        answer = client.post("/correspond", files=files, data=data).json()
    (match,) = answer["matches"]
    assert target == pytest.approx(match["target"], abs=0.05)
    assert float(pinned["confidence"]) == pytest.approx(match["confidence"], abs=1e-3)
    shot(browser, out_dir, "03_click_match")

    # Hover shows matches live; the keyboard moves and pins too.
    ActionChains(browser).move_to_element_with_offset(
        canvas, *image_offset(canvas, 180, 120, size)
    ).perform()
    wait(browser, lambda d: readout(d).get("kind") == "hover", "a hover match")
    hovered = readout(browser)
    assert float(hovered["sourceX"]) == pytest.approx(180, abs=1.5)
    assert float(hovered["targetX"]) == pytest.approx(180 + SHIFT[0], abs=MATCH_TOLERANCE_PX)
    canvas.send_keys(Keys.ARROW_RIGHT, Keys.ENTER)
    keyed = readout(browser)
    assert keyed["kind"] == "pinned"
    assert float(keyed["sourceX"]) == pytest.approx(float(hovered["sourceX"]) + 4, abs=1e-6)

    browser.find_element(By.ID, "show-all").click()
    label = browser.find_element(By.ID, "show-all").find_element(By.XPATH, "..")
    wait(browser, lambda d: int(label.get_attribute("data-count") or 0) > 0, "confident matches")
    shot(browser, out_dir, "04_all_matches", ".pictures")

    for view, width in (("confidence", 256), ("warped", 256), ("flow", 256)):
        browser.find_element(By.CSS_SELECTOR, f'input[name="view"][value="{view}"]').click()
        image = browser.find_element(By.ID, "view-image")
        wait(
            browser,
            lambda d, v=view, img=image: (
                img.get_attribute("data-view") == v
                and d.execute_script("return arguments[0].complete", img)
            ),
            f"the {view} view",
        )
        assert browser.execute_script("return arguments[0].naturalWidth", image) == width
        shot(browser, out_dir, f"05_view_{view}", "section.views")
    assert console_errors(browser) == []


def test_a_painted_mask_is_carried_to_a_shifted_copy(
    browser: Driver, service: ServiceProcess, out_dir: Path, downloads: Path
) -> None:
    open_page(browser, service)
    open_pair(browser, "astronaut.png", "astronaut-shifted.png")
    Select(browser.find_element(By.ID, "extra-sample")).select_by_value("chelsea.png")
    wait(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#extra-list li")) == 1, "chip")
    browser.find_element(By.CSS_SELECTOR, 'input[name="mode"][value="paint"]').click()
    browser.find_element(By.ID, "brush-size").send_keys(Keys.END)  # the widest brush
    canvas = browser.find_element(By.ID, "source-canvas")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    size = (256, 192)
    # Strokes across the astronaut's head and shoulders: a filled region about 110 x 80 px.
    for y in range(40, 121, 16):
        ActionChains(browser).move_to_element_with_offset(
            canvas, *image_offset(canvas, 80, y, size)
        ).click_and_hold().move_to_element_with_offset(
            canvas, *image_offset(canvas, 190, y, size)
        ).release().perform()
    link = browser.find_element(By.ID, "download-source-mask")
    wait(browser, lambda d: link.get_attribute("aria-disabled") is None, "the source mask")
    started = time.time()
    link.click()
    painted = png_labels(downloaded(downloads, "source_mask.png", started))
    assert painted.shape == (192, 256)
    assert 0.12 < np.mean(painted == 1) < 0.4, np.mean(painted == 1)  # the strokes, filled

    browser.find_element(By.ID, "propagate").click()
    wait(browser, lambda d: d.execute_script("return document.body.dataset.propagated"), "masks")
    results = browser.find_elements(By.CSS_SELECTOR, "#results li")
    assert len(results) == 2
    fractions = [
        float(r.find_element(By.CLASS_NAME, "reliable").get_attribute("data-reliable") or "nan")
        for r in results
    ]
    assert all(0.0 <= f <= 1.0 for f in fractions), fractions
    assert "Reliable pixels" in results[0].text
    shot(browser, out_dir, "06_mask_carried", "section.mask")
    shot(browser, out_dir, "06_mask_on_the_pictures", ".pictures")

    started = time.time()
    results[0].find_element(By.CLASS_NAME, "download-mask").click()
    carried = png_labels(downloaded(downloads, "mask_astronaut-shifted.png", started))
    dx, dy = SHIFT
    expected = np.zeros_like(painted)
    expected[dy:, dx:] = painted[:-dy, :-dx]
    iou = mask_iou(carried, expected)
    print(f"carried mask IoU {iou:.3f}, left in place {mask_iou(painted, expected):.3f}")
    assert iou >= 0.8, iou
    # Carrying it must beat leaving the mask where it was.
    assert iou > mask_iou(painted, expected)

    started = time.time()
    browser.find_element(By.ID, "download-all").click()
    with zipfile.ZipFile(io.BytesIO(downloaded(downloads, "masks.zip", started))) as archive:
        assert archive.testzip() is None
        assert archive.namelist() == ["mask_astronaut-shifted.png", "mask_chelsea.png"]
        assert np.array_equal(png_labels(archive.read("mask_astronaut-shifted.png")), carried)
        assert png_labels(archive.read("mask_chelsea.png")).shape == (200, 300)

    # The colour option: the service moves edges onto the target's colours (the painted
    # strokes do not follow the astronaut's colours, so some pixels change).
    browser.find_element(By.ID, "refine-colour").click()
    browser.execute_script("delete document.body.dataset.propagated")
    browser.find_element(By.ID, "propagate").click()
    wait(browser, lambda d: d.execute_script("return document.body.dataset.propagated"), "masks")
    (downloads / "mask_astronaut-shifted.png").unlink()  # so the new one keeps its name
    started = time.time()
    first = browser.find_elements(By.CSS_SELECTOR, "#results li")[0]
    first.find_element(By.CLASS_NAME, "download-mask").click()
    snapped = png_labels(downloaded(downloads, "mask_astronaut-shifted.png", started))
    assert set(np.unique(snapped)) <= {0, 1} and not np.array_equal(snapped, carried)
    assert mask_iou(snapped, carried) > 0.5
    assert console_errors(browser) == []


def test_errors_show_the_services_problem_text(
    browser: Driver, service: ServiceProcess, out_dir: Path, tmp_path: Path
) -> None:
    # No key yet: the service's 401 is shown, and typing the key gets the models.
    open_page(browser, service, key=None)
    error = browser.find_element(By.ID, "error")
    wait(browser, lambda d: error.is_displayed(), "the 401 message")
    assert "Missing or invalid API key (401)" in error.text
    key = browser.find_element(By.ID, "api-key")
    key.send_keys(API_KEY, Keys.TAB)
    wait(browser, lambda d: d.execute_script("return document.body.dataset.ready"), "models")
    assert not error.is_displayed()

    big = tmp_path / "big.png"
    noise = np.random.default_rng(0).integers(0, 256, (800, 800, 3), dtype=np.uint8)
    Image.fromarray(noise).save(big)
    assert big.stat().st_size > MAX_UPLOAD
    browser.find_element(By.ID, "source-file").send_keys(str(big))
    wait(browser, lambda d: error.is_displayed(), "the 413 message")
    assert "Request body too large (413)" in error.text
    assert "JLAD_MAX_UPLOAD_BYTES" in error.text
    assert browser.find_element(By.ID, "spinner").is_displayed() is False
    shot(browser, out_dir, "07_error_too_large")

    not_image = tmp_path / "notes.png"
    not_image.write_text("these are not pixels\n" * 20)
    browser.find_element(By.ID, "error-close").click()
    browser.find_element(By.ID, "target-file").send_keys(str(not_image))
    wait(browser, lambda d: error.is_displayed(), "the 415 message")
    assert "(415)" in error.text and "image" in error.text.lower()
    shot(browser, out_dir, "08_error_not_an_image")


def test_phone_sized_viewport_and_labels(
    browser: Driver, service: ServiceProcess, out_dir: Path
) -> None:
    browser.set_window_size(390, 844)
    try:
        open_page(browser, service)
        open_pair(browser, "astronaut.png", "astronaut-shifted.png")
        overflow = browser.execute_script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0, f"the page is {overflow} px wider than a phone screen"
        canvas = browser.find_element(By.ID, "source-canvas")
        assert canvas.rect["width"] <= 390
        wait(browser, lambda d: not d.find_element(By.ID, "spinner").is_displayed(), "answers")
        shot(browser, out_dir, "09_phone")
    finally:
        browser.set_window_size(1280, 1000)
    unlabelled = browser.execute_script(
        """return [...document.querySelectorAll('input, select, button, canvas[tabindex]')]
            .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label')
                         && !(e.tagName === 'BUTTON' && e.textContent.trim()))
            .map(e => e.id || e.outerHTML.slice(0, 80))"""
    )
    assert unlabelled == []
