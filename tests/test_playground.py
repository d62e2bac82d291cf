"""The playground in a real browser: headless Chromium loads `/` from `python -m service` and draws real images.

The server serves a temporary repository: the shipped model with an encoder beside it (the shipped encoder.onnx,
or one trained for the test in about 10 s), so that the inversion panel shows, and a copy without one, for which it
does not.

Debian's `chromium` and `chromium-driver` drive it, by explicit path, so Selenium never downloads a browser; CI
installs them (.ci/run). `python -m tests.test_playground --screenshot docs/playground.png` redraws the README's
screenshot.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.select import Select

from testkit.process import ROOT, shipped_version, start_server

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"
SKIP_ENV = "GAN_SKIP_BROWSER"
MODEL, TILE = "mnist-cdcgan", 28
PLAIN = "plain"  # the same generator without an encoder: not invertible
REFINE = 400  # the inversion panel's default refine passes
STRIP = "from=0&to=1&steps=15&from_label=3&to_label=5&psi=0.50"  # the interpolation the test asks the page for
DIRECTIONS = ["sefa1", "sefa2", "sefa3", "sefa4", "sefa5", "ink", "slant", "width"]  # the shipped model's
# A slider moved as a drag leaves it: its value set, then the "input" event it fires.
SLIDE_JS = """
const input = document.querySelector(`#direction-sliders input[data-direction="${arguments[0]}"]`);
input.value = arguments[1];
input.dispatchEvent(new Event("input", { bubbles: true }));
"""
# The page's own drawing, read back as PNG: decoded pixels, not DOM nodes.
PIXELS_JS = """
const el = document.getElementById(arguments[0]);
const canvas = document.createElement("canvas");
canvas.width = el.naturalWidth ?? el.width;
canvas.height = el.naturalHeight ?? el.height;
canvas.getContext("2d").drawImage(el, 0, 0);
return canvas.toDataURL("image/png");
"""


def _padded(n: int) -> int:
    """Pixels across n tiles: 2 px padding around and between them."""
    return n * (TILE + 2) + 2


@contextlib.contextmanager
def serving(folder: Path, models: Path = ROOT / "models") -> Iterator[str]:
    """`python -m service` on the shipped models (or those under `models`); yields the HTTP base URL."""
    env = {"GAN_PORT": "0", "GAN_METRICS_PORT": "0", "GAN_HTTP_PORT": "0", "GAN_GRACE_SECONDS": "1",
           "GAN_HOST": "127.0.0.1"}  # fmt: skip
    proc, ready = start_server(["--model-repository", str(models)], env, folder)
    try:
        yield f"http://127.0.0.1:{ready['http_port']}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def chrome(width: int = 1200, height: int = 800):
    """Headless Chromium from the system packages; fails (never skips) when it is missing, unless asked to."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        if os.environ.get(SKIP_ENV) == "1":
            pytest.skip(f"{SKIP_ENV}=1 and no {', '.join(missing)}")
        pytest.fail(f"the playground test needs {', '.join(missing)}: `{INSTALL}` (or set {SKIP_ENV}=1 to skip)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                f"--window-size={width},{height}", "--force-device-scale-factor=1", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


@pytest.fixture(scope="module")
def repository(tmp_path_factory) -> Path:
    """The shipped model with its encoder (trained here, tiny, if none is shipped) and PLAIN, a copy without one."""
    models = tmp_path_factory.mktemp("models")
    version = str(shipped_version())
    shipped = ROOT / "models" / MODEL / version
    for name in (MODEL, PLAIN):
        (models / name / version).mkdir(parents=True)
        shutil.copy(shipped / "model.onnx", models / name / version / "model.onnx")
    generator = models / MODEL / version / "model.onnx"
    if (shipped / "encoder.onnx").exists():
        shutil.copy(shipped / "encoder.onnx", generator.parent / "encoder.onnx")
    else:
        command = [sys.executable, "-m", "training.encoder", str(generator), "--preset", "tiny", "--no-progress"]
        made = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert made.returncode == 0, made.stderr[-4000:]
    return models


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, repository) -> Iterator[str]:
    with serving(tmp_path_factory.mktemp("playground"), repository) as url:
        yield url


@pytest.fixture(scope="module")
def driver():
    browser = chrome()
    try:
        yield browser
    finally:
        browser.quit()


def _wait(condition: Callable[[], object], what: str, timeout: float = 10.0):
    end = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)
    return value


def _seq(driver, element: str) -> int:
    return int(driver.find_element("id", element).get_attribute("data-seq"))


def _pixels(driver, element: str) -> np.ndarray:
    """What the page shows in an <img> or <canvas>, decoded by the browser, as RGBA."""
    url = driver.execute_script(PIXELS_JS, element)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGBA"))


def _drawn(driver, element: str, after: int, caption: str = "") -> np.ndarray:
    """Waits until `element` shows a picture newer than `after` whose caption has `caption`; returns its pixels."""
    text = f"{element}-caption"
    _wait(lambda: _seq(driver, element) > after and caption in driver.find_element("id", text).text,
          f"a new #{element} with {caption!r}")  # fmt: skip
    return _pixels(driver, element)


def _server_png(base_url: str, path: str) -> np.ndarray:
    """The same picture straight from the API, decoded by PIL, as RGBA."""
    with urllib.request.urlopen(f"{base_url}/v1/models/{MODEL}/{path}") as response:
        return np.asarray(Image.open(io.BytesIO(response.read())).convert("RGBA"))


def _severe(driver) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def _select(driver, element: str, text: str) -> None:
    Select(driver.find_element("id", element)).select_by_visible_text(text)


def _keys(driver, element: str, *keys: str) -> None:
    driver.find_element("id", element).send_keys(*keys)


def _slider(driver, direction: str):
    return driver.find_element("css selector", f'#direction-sliders input[data-direction="{direction}"]')


def _slider_values(driver) -> dict[str, str]:
    """Each direction's slider: its value and the number shown beside it."""
    shown = {}
    for s in driver.find_elements("css selector", "#direction-sliders input"):
        value = driver.find_element("id", f"{s.get_attribute('id')}-value").text
        shown[s.get_attribute("data-direction")] = f"{s.get_attribute('value')} {value}"
    return shown


def _timing(driver, element: str) -> tuple[float, float]:
    """The server's time and the round trip, in ms, as the page shows them under `element`."""
    text = driver.find_element("id", f"{element}-timing").text
    match = re.fullmatch(r"server ([\d.]+) ms · round trip ([\d.]+) ms", text)
    assert match, text
    return float(match[1]), float(match[2])


def test_page_draws_a_grid_a_class_psi_and_an_interpolation(driver, base_url, tmp_path):
    driver.get(f"{base_url}/")
    first = _drawn(driver, "grid", 0)
    # 16 seeds, 4 columns: real pixels, exactly the server's PNG, and not blank.
    assert first.shape == (_padded(4), _padded(4), 4)
    np.testing.assert_array_equal(first, _server_png(base_url, "images.png?seeds=0-15&label=0&psi=0.70&columns=4"))
    assert first[..., 0].std() > 20
    assert "server" in driver.find_element("id", "grid-timing").text

    # Another class: other pixels, the server's for that class.
    seq = _seq(driver, "grid")
    _select(driver, "label", "7")
    seven = _drawn(driver, "grid", seq)
    assert not np.array_equal(seven, first)
    np.testing.assert_array_equal(seven, _server_png(base_url, "images.png?seeds=0-15&label=7&psi=0.70&columns=4"))

    # ψ by keyboard, four quick steps of 0.05: the page waits for the slider to rest, then draws that value.
    seq = _seq(driver, "grid")
    _keys(driver, "psi", *[Keys.ARROW_LEFT] * 4)
    assert driver.find_element("id", "psi-value").text == "0.50"
    looser = _drawn(driver, "grid", seq, "ψ 0.50")
    np.testing.assert_array_equal(looser, _server_png(base_url, "images.png?seeds=0-15&label=7&psi=0.50&columns=4"))
    # The slider stops at 0.30, and below 0.40 it says that images may fade (1s and 9s lose their ink at 0.2).
    note = driver.find_element("id", "psi-note")
    assert not note.is_displayed()
    _keys(driver, "psi", *[Keys.ARROW_LEFT] * 6)
    assert driver.find_element("id", "psi-value").text == "0.30" and note.is_displayed()
    _keys(driver, "psi", *[Keys.ARROW_RIGHT] * 4)
    assert driver.find_element("id", "psi-value").text == "0.50" and not note.is_displayed()

    # Blended with a 1, half and half (the blend slider's default): soft weights over all ten classes.
    seq = _seq(driver, "grid")
    _select(driver, "blend-label", "1")
    blend = _drawn(driver, "grid", seq, "7 50% + 1 50%")
    soft = "0,0.5,0,0,0,0,0,0.5,0,0"
    np.testing.assert_array_equal(blend, _server_png(base_url, f"images.png?seeds=0-15&soft={soft}&psi=0.50&columns=4"))

    # Interpolation from a 3 to a 5: a strip of 16 frames, and the animation's canvas shows one of them scaled up.
    seq = _seq(driver, "strip")
    _select(driver, "from-label", "3")
    _select(driver, "to-label", "5")
    strip = _drawn(driver, "strip", seq, "class 3 → 5 · 16 frames · ψ 0.50")
    expected = _server_png(base_url, f"interpolation.png?{STRIP}")
    assert strip.shape == (TILE + 4, _padded(16), 4)
    np.testing.assert_array_equal(strip, expected)
    _keys(driver, "frame-slider", Keys.HOME, *[Keys.ARROW_RIGHT] * 5)  # moving the slider pauses the animation
    assert driver.find_element("id", "play").get_attribute("aria-pressed") == "false"
    assert driver.find_element("id", "frame-value").text == "6 / 16"
    canvas = _pixels(driver, "frame")
    scale = canvas.shape[0] // TILE
    x = 2 + 5 * (TILE + 2)
    frame = expected[2 : 2 + TILE, x : x + TILE]
    np.testing.assert_array_equal(canvas, frame.repeat(scale, 0).repeat(scale, 1))
    assert canvas[..., 0].std() > 20

    # Download saves the strip that is shown, byte for byte.
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(tmp_path)})
    driver.find_element("id", "strip-download").click()
    saved = _wait(lambda: list(tmp_path.glob("*.png")), "the download")
    assert [p.name for p in saved] == [f"{MODEL}-v{shipped_version()}-seed0-to-seed1.png"]
    with urllib.request.urlopen(f"{base_url}/v1/models/{MODEL}/interpolation.png?{STRIP}") as response:
        assert saved[0].read_bytes() == response.read()
    # And as an animated GIF: what the server animates from the same frames, there and back.
    driver.find_element("id", "animation-download").click()
    gif = _wait(lambda: list(tmp_path.glob("*.gif")), "the animation's download")
    assert [p.name for p in gif] == [f"{MODEL}-v{shipped_version()}-seed0-to-seed1.gif"]
    with urllib.request.urlopen(f"{base_url}/v1/models/{MODEL}/interpolation.gif?{STRIP}&fps=12&ping_pong=1") as r:
        assert gif[0].read_bytes() == r.read()

    assert _severe(driver) == []  # console errors, CSP violations among them


def test_a_new_token_keeps_the_classes_picked(driver, base_url):
    """Typing a token reloads the model list; the class, the blend and its slider's state, and the direction moved
    stay as they were."""
    driver.get(f"{base_url}/")
    _drawn(driver, "grid", 0)
    seq = _seq(driver, "grid")
    _select(driver, "label", "7")
    _select(driver, "blend-label", "1")
    driver.execute_script(SLIDE_JS, "slant", "1")
    _drawn(driver, "grid", seq, "7 50% + 1 50% · slant +1.00")
    seq = _seq(driver, "grid")
    _keys(driver, "token", "a-token", Keys.TAB)  # "change" fires as the field loses focus
    # The list came back and the grid was drawn again, blend, direction and all.
    _drawn(driver, "grid", seq, "7 50% + 1 50% · slant +1.00")
    picked = [Select(driver.find_element("id", e)).first_selected_option.text for e in ("label", "blend-label")]
    assert picked == ["7", "1"] and driver.find_element("id", "blend").is_enabled()
    assert _slider_values(driver)["slant"] == "1 +1.00"
    _select(driver, "blend-label", "none")
    assert not driver.find_element("id", "blend").is_enabled()


def test_page_shows_the_api_error(driver, base_url):
    driver.get(f"{base_url}/")
    _drawn(driver, "grid", 0)
    _severe(driver)  # drained: only what follows counts
    driver.execute_script("""
        const columns = document.getElementById("columns");
        columns.value = "-1";
        columns.dispatchEvent(new Event("input"));
    """)  # fmt: skip
    error = _wait(lambda: driver.find_element("id", "error").text, "the error line")
    assert error == "Grid: columns: must be >= 0 (got -1)"
    # The grid under the banner is the last one that worked, not the answer: it is faded.
    grid = driver.find_element("id", "grid")
    assert grid.get_attribute("data-state") == "error" and float(grid.value_of_css_property("opacity")) < 0.5
    # The browser logs the failed request itself, and nothing else.
    assert all("400 (Bad Request)" in message for message in _severe(driver))


def test_a_slider_per_direction_moves_the_grid_along_it(driver, base_url):
    driver.get(f"{base_url}/")
    _drawn(driver, "grid", 0)
    with urllib.request.urlopen(f"{base_url}/v1/models") as response:
        listed = next(m for m in json.load(response)["models"] if m["name"] == MODEL)["directions"]
    assert [d["name"] for d in listed] == DIRECTIONS
    # A slider per direction, named, its description as the tooltip, from -3 to 3 in quarters, at 0.
    assert driver.find_element("id", "directions").is_displayed()
    labels = driver.find_elements("css selector", "#direction-sliders label")
    assert [label.text for label in labels] == DIRECTIONS
    sliders = driver.find_elements("css selector", "#direction-sliders input")
    got = [[s.get_attribute(a) for a in ("data-direction", "title", "type", "min", "max", "step")] for s in sliders]
    assert got == [[d["name"], d["description"], "range", "-3", "3", "0.25"] for d in listed]
    assert set(_slider_values(driver).values()) == {"0 0.00"}
    reset = driver.find_element("id", "directions-reset")
    assert not reset.is_enabled()  # nothing to reset

    seq = _seq(driver, "grid")
    _select(driver, "label", "7")
    query = "seeds=0-15&label=7&psi=0.70&columns=4"
    plain = _drawn(driver, "grid", seq, "class 7 · ψ 0.70")
    np.testing.assert_array_equal(plain, _server_png(base_url, f"images.png?{query}"))

    # Slant at 1.5: the same seeds, class, ψ and columns through edit.png, pixel for pixel, and not the plain grid.
    seq = _seq(driver, "grid")
    driver.execute_script(SLIDE_JS, "slant", "1.5")
    assert _slider_values(driver)["slant"] == "1.5 +1.50" and reset.is_enabled()
    slanted = _drawn(driver, "grid", seq, "class 7 · slant +1.50 · ψ 0.70")
    np.testing.assert_array_equal(slanted, _server_png(base_url, f"edit.png?{query}&direction=slant&strengths=1.5"))
    assert slanted.shape == plain.shape and not np.array_equal(slanted, plain)

    # Back to 0: images.png again.
    seq = _seq(driver, "grid")
    driver.execute_script(SLIDE_JS, "slant", "0")
    np.testing.assert_array_equal(_drawn(driver, "grid", seq, "class 7 · ψ 0.70"), plain)
    assert not reset.is_enabled()

    # One direction at a time: ink moved by keyboard puts slant, moved before, back to 0.
    seq = _seq(driver, "grid")
    driver.execute_script(SLIDE_JS, "slant", "-2")
    _drawn(driver, "grid", seq, "slant −2.00")
    seq = _seq(driver, "grid")
    _slider(driver, "ink").send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    inked = _drawn(driver, "grid", seq, "class 7 · ink +0.50 · ψ 0.70")
    values = _slider_values(driver)
    assert values["ink"] == "0.5 +0.50" and values["slant"] == "0 0.00"
    assert [v for name, v in values.items() if name != "ink"] == ["0 0.00"] * 7
    np.testing.assert_array_equal(inked, _server_png(base_url, f"edit.png?{query}&direction=ink&strengths=0.5"))

    # Reset: every slider at 0 and the plain grid.
    seq = _seq(driver, "grid")
    reset.click()
    np.testing.assert_array_equal(_drawn(driver, "grid", seq, "class 7 · ψ 0.70"), plain)
    assert set(_slider_values(driver).values()) == {"0 0.00"} and not reset.is_enabled()
    server, round_trip = _timing(driver, "grid")
    assert 0 < server <= round_trip
    assert _severe(driver) == []


def test_a_direction_keeps_the_grids_blend_and_layout(driver, base_url):
    """Columns 0 lets images.png pick ⌈√n⌉ columns; edit.png would draw one column a strength: the page asks for
    the layout images.png drew. A blend goes as the same soft weights."""
    driver.get(f"{base_url}/")
    _drawn(driver, "grid", 0)
    seq = _seq(driver, "grid")
    for element, value in (("count", "6"), ("columns", "0")):
        driver.find_element("id", element).clear()
        _keys(driver, element, value)
    _select(driver, "label", "7")
    _select(driver, "blend-label", "1")
    plain = _drawn(driver, "grid", seq, "seeds 0-5 · 7 50% + 1 50%")
    query = "seeds=0-5&soft=0,0.5,0,0,0,0,0,0.5,0,0&psi=0.70"
    np.testing.assert_array_equal(plain, _server_png(base_url, f"images.png?{query}&columns=0"))
    assert plain.shape == (_padded(2), _padded(3), 4)
    seq = _seq(driver, "grid")
    driver.execute_script(SLIDE_JS, "width", "-3")
    wide = _drawn(driver, "grid", seq, "width −3.00")
    np.testing.assert_array_equal(
        wide, _server_png(base_url, f"edit.png?{query}&columns=3&direction=width&strengths=-3")
    )
    assert wide.shape == plain.shape and not np.array_equal(wide, plain)
    # Strength 0 through edit.png is the plain grid: nothing changes for anyone who leaves the sliders alone.
    np.testing.assert_array_equal(
        plain, _server_png(base_url, f"edit.png?{query}&columns=3&direction=width&strengths=0")
    )


def _without_directions(source: Path, target: Path) -> None:
    """A copy of a model file as format 2 wrote it, before directions: the same graph, no `directions` key."""
    model = onnx.load(str(source))
    kept = [
        (p.key, "2" if p.key == "format_version" else p.value) for p in model.metadata_props if p.key != "directions"
    ]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    target.parent.mkdir(parents=True)
    onnx.save(model, str(target))


def test_another_model_rebuilds_the_directions(driver, tmp_path):
    """A model that lists none hides the section; coming back finds every slider at 0 and the plain grid."""
    shipped = ROOT / "models" / MODEL / str(shipped_version()) / "model.onnx"
    (tmp_path / "models" / MODEL / "1").mkdir(parents=True)
    shutil.copy(shipped, tmp_path / "models" / MODEL / "1" / "model.onnx")
    _without_directions(shipped, tmp_path / "models" / "older" / "1" / "model.onnx")
    with serving(tmp_path, tmp_path / "models") as url:
        driver.get(f"{url}/")
        _select(driver, "model", MODEL)
        _wait(lambda: driver.find_element("id", "directions").is_displayed(), "the directions")
        _drawn(driver, "grid", 0, "class 0")
        seq = _seq(driver, "grid")
        driver.execute_script(SLIDE_JS, "sefa1", "3")
        _drawn(driver, "grid", seq, "sefa1 +3.00")

        seq = _seq(driver, "grid")
        _select(driver, "model", "older")
        older = _drawn(driver, "grid", seq)
        assert not driver.find_element("id", "directions").is_displayed()
        assert "sefa1" not in driver.find_element("id", "grid-caption").text
        with urllib.request.urlopen(f"{url}/v1/models/older/images.png?seeds=0-15&label=0&psi=0.70&columns=4") as r:
            np.testing.assert_array_equal(older, np.asarray(Image.open(io.BytesIO(r.read())).convert("RGBA")))

        seq = _seq(driver, "grid")
        _select(driver, "model", MODEL)
        back = _drawn(driver, "grid", seq)
        assert driver.find_element("id", "directions").is_displayed()
        assert list(_slider_values(driver)) == DIRECTIONS and set(_slider_values(driver).values()) == {"0 0.00"}
        np.testing.assert_array_equal(back, older)  # the same graph: plain images.png, not the edit
        assert _severe(driver) == []


def test_round_trip_is_never_less_than_the_server_time(driver, base_url):
    """The round trip holds the server's time, but the page reads it off the browser's clock, which is coarse:
    0.1 ms with jitter in Chromium, 1 ms in Firefox and Safari, 100 ms with Firefox's resistFingerprinting. A clock
    that did not move during a call (the coarsest case) once made the page say "round trip 0.0 ms" under a server
    time of several: the round trip shown is never less than the server's."""
    frozen = driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": "performance.now = () => 1e4;"})
    try:
        driver.get(f"{base_url}/")
        _drawn(driver, "grid", 0)
        _drawn(driver, "strip", 0)
        for element in ("grid", "strip"):
            server, round_trip = _timing(driver, element)
            assert 0 < server <= round_trip, (element, server, round_trip)
    finally:
        driver.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": frozen["identifier"]})


# ---- inversion ---------------------------------------------------------------------------------------------------


def _png(pixels: np.ndarray) -> bytes:
    """Pixels as a PNG file (RGBA or grey; the server converts either to the model's grey)."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _decoded(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGBA"))


def _invert(base_url: str, png: bytes, refine: int = REFINE) -> dict:
    """The server's own answer for an image file: POST /v1/models/MODEL/invert."""
    request = urllib.request.Request(f"{base_url}/v1/models/{MODEL}/invert?refine={refine}", data=png, method="POST")
    with urllib.request.urlopen(request) as response:
        return json.load(response)


def _z(answer: dict) -> str:
    return ",".join(repr(v) for v in answer["z"])  # repr: the float64 exactly, as the page's JSON numbers


def _open_inversion(driver, base_url: str) -> None:
    driver.get(f"{base_url}/")
    _drawn(driver, "grid", 0)
    _wait(lambda: driver.find_element("id", "inversion").is_displayed(), "the inversion panel")


def _draw_seven(driver) -> None:
    """A 7 drawn with real pointer actions (a mouse): the bar left to right, then the stem down to the left."""
    pad = driver.find_element("id", "pad")
    side = pad.size["width"]
    u = side / 10  # offsets are from the pad's centre, in CSS pixels
    chain = ActionChains(driver)
    chain.move_to_element_with_offset(pad, int(-2.5 * u), int(-3 * u)).click_and_hold()
    for dx, dy in ((1.5, 0), (1.5, 0), (2, 0), (-1, 2), (-1, 2), (-1, 2.5)):
        chain.move_by_offset(int(dx * u), int(dy * u))
    chain.release().perform()


def _boxed(pad: np.ndarray, side: int = TILE) -> np.ndarray:
    """The pad at the model's size as the page makes it: each pixel the mean of its block, rounded half up."""
    s = pad.shape[0] // side
    sums = pad[..., :3].astype(np.int64).reshape(side, s, side, s, 3).sum((1, 3))
    return ((2 * sums + s * s) // (2 * s * s)).astype(np.uint8)


def _check_inversion(driver, base_url: str, seq: int) -> dict:
    """Waits for a reconstruction newer than `seq`; checks it against the server's answer for the very image the
    page sent (its caption too); returns that answer."""
    shown = _drawn(driver, "reconstruction", seq, f"{REFINE} passes")
    sent = _pixels(driver, "inversion-input")
    assert sent.shape == (TILE, TILE, 4) and sent[..., 0].std() > 20  # what was drawn, at the model's size
    answer = _invert(base_url, _png(sent))
    np.testing.assert_array_equal(shown, _decoded(base64.b64decode(answer["reconstruction"])))
    assert shown.shape == (TILE, TILE, 4) and shown[..., 0].std() > 20
    caption = driver.find_element("id", "reconstruction-caption").text
    assert caption.startswith(f"class {answer['label']} (") and f"distance {answer['distance']:.4f}" in caption
    assert caption.endswith(f" · {answer['passes']} passes") and answer["passes"] == REFINE
    server, round_trip = _timing(driver, "reconstruction")
    assert 0 < server <= round_trip
    return answer


def test_a_drawing_inverts_as_the_server_inverts_it_and_interpolates_from_there(driver, base_url):
    _open_inversion(driver, base_url)
    assert not driver.find_element("id", "invert").is_enabled()  # nothing drawn yet
    seq = _seq(driver, "reconstruction")
    _draw_seven(driver)  # inverted once the stroke ends, without a click
    answer = _check_inversion(driver, base_url, seq)
    # What was sent is the drawing at 28×28, each pixel the mean of its 10×10 block of the pad.
    pad = _pixels(driver, "pad")
    assert pad.shape == (10 * TILE, 10 * TILE, 4) and pad[..., 0].max() == 255
    sent = _pixels(driver, "inversion-input")
    np.testing.assert_array_equal(sent[..., :3], _boxed(pad))
    assert driver.find_element("id", "inversion-input-caption").text == "The drawing at 28×28"

    # From the inverted z and class to seed 2 as a 5: interpolation.png's from_z, pixel for pixel, no truncation.
    driver.find_element("id", "inversion-to").clear()
    _keys(driver, "inversion-to", "2")
    _select(driver, "inversion-to-label", "5")
    seq = _seq(driver, "inversion-strip")
    driver.find_element("id", "inversion-interpolate").click()
    label = answer["label"]
    strip = _drawn(driver, "inversion-strip", seq, f"inverted → seed 2 · class {label} → 5 · 16 frames")
    query = f"from_z={_z(answer)}&from_label={label}&to=2&to_label=5&steps=15&method=slerp"
    expected = _server_png(base_url, f"interpolation.png?{query}")
    assert strip.shape == (TILE + 4, _padded(16), 4)
    np.testing.assert_array_equal(strip, expected)
    # Its first frame is the reconstruction (frame 0 is the z itself, untruncated), its last seed 2 as a 5.
    np.testing.assert_array_equal(strip[2 : 2 + TILE, 2 : 2 + TILE], _pixels(driver, "reconstruction"))
    last = _server_png(base_url, "images.png?seeds=2&label=5&columns=1")[2 : 2 + TILE, 2 : 2 + TILE]
    np.testing.assert_array_equal(strip[2 : 2 + TILE, -2 - TILE : -2], last)

    # Once shown, the strip follows its controls: another class, another strip.
    seq = _seq(driver, "inversion-strip")
    _select(driver, "inversion-to-label", "8")
    again = _drawn(driver, "inversion-strip", seq, f"class {label} → 8")
    np.testing.assert_array_equal(
        again, _server_png(base_url, f"interpolation.png?{query.replace('to_label=5', 'to_label=8')}")
    )
    assert _severe(driver) == []


def test_an_image_file_inverts_as_the_server_inverts_it(driver, base_url, tmp_path):
    """A 28×28 file goes as it is; one of another size is scaled to 28×28 first."""
    _open_inversion(driver, base_url)
    grid = _server_png(base_url, "images.png?seeds=5&label=3&columns=1")  # one 28×28 tile in 2 px of padding
    assert grid.shape == (TILE + 4, TILE + 4, 4)
    three = np.ascontiguousarray(grid[2 : 2 + TILE, 2 : 2 + TILE, 0])
    path = tmp_path / "three.png"
    path.write_bytes(_png(three))
    seq = _seq(driver, "reconstruction")
    driver.find_element("id", "inversion-file").send_keys(str(path))
    answer = _check_inversion(driver, base_url, seq)
    assert driver.find_element("id", "inversion-input-caption").text == "The file"
    np.testing.assert_array_equal(_pixels(driver, "inversion-input")[..., 0], three)
    # The file's own bytes get the same answer: the page sent them as they are.
    assert _invert(base_url, path.read_bytes()) == answer
    # The pad shows it, each pixel a 10×10 block, and a stroke over it would draw on it.
    np.testing.assert_array_equal(_pixels(driver, "pad")[..., 0], three.repeat(10, 0).repeat(10, 1))

    # A 32×32 file (the grid, padding and all): scaled into a 28×28 PNG, which is what the server is asked about.
    big = tmp_path / "grid.png"
    big.write_bytes(_png(np.ascontiguousarray(grid[..., 0])))
    seq = _seq(driver, "reconstruction")
    driver.find_element("id", "inversion-file").send_keys(str(big))
    _check_inversion(driver, base_url, seq)
    assert driver.find_element("id", "inversion-input-caption").text == "The file at 28×28"
    assert _severe(driver) == []


def test_the_inversion_panel_is_for_invertible_models_and_shows_errors(driver, base_url):
    with urllib.request.urlopen(f"{base_url}/v1/models") as response:
        listed = {m["name"]: m["invertible"] for m in json.load(response)["models"]}
    assert listed == {MODEL: True, PLAIN: False}
    _open_inversion(driver, base_url)
    seq = _seq(driver, "grid")
    _select(driver, "model", PLAIN)
    _drawn(driver, "grid", seq)
    assert not driver.find_element("id", "inversion").is_displayed()
    _select(driver, "model", MODEL)
    _wait(lambda: driver.find_element("id", "inversion").is_displayed(), "the inversion panel again")

    # The server's message in the banner; the reconstruction under it is faded, as the grid would be.
    seq = _seq(driver, "reconstruction")
    _draw_seven(driver)
    _drawn(driver, "reconstruction", seq)
    _severe(driver)  # drained: only what follows counts
    driver.find_element("id", "refine").clear()
    _keys(driver, "refine", "20000")
    error = _wait(lambda: driver.find_element("id", "error").text, "the error line")
    assert error == "Inversion: refine: 0, or from 16 (one generation of 16 candidates) to 10,000 (got 20000)"
    shown = driver.find_element("id", "reconstruction")
    assert shown.get_attribute("data-state") == "error" and float(shown.value_of_css_property("opacity")) < 0.5
    assert all("400 (Bad Request)" in message for message in _severe(driver))
    # Clear: a blank pad, no result, no banner.
    driver.find_element("id", "inversion-clear").click()
    assert not driver.find_element("id", "error").is_displayed()
    assert shown.get_attribute("data-state") == "empty" and not driver.find_element("id", "invert").is_enabled()
    assert _pixels(driver, "pad")[..., :3].max() == 0


def test_at_phone_width_a_finger_draws_and_nothing_overflows(driver, base_url):
    """At 420 px the panel fits, and a touch pointer draws (the pad does not scroll the page instead)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 420, "height": 900, "deviceScaleFactor": 1, "mobile": True})  # fmt: skip
    try:
        _open_inversion(driver, base_url)
        pad = driver.find_element("id", "pad")
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", pad)
        assert pad.size["width"] >= 150, pad.size
        seq = _seq(driver, "reconstruction")
        finger = ActionBuilder(driver, mouse=PointerInput(interaction.POINTER_TOUCH, "finger"))
        box = driver.execute_script("const r = arguments[0].getBoundingClientRect(); return [r.x, r.y, r.width];", pad)
        x, y, side = box
        finger.pointer_action.move_to_location(int(x + side / 2), int(y + side * 0.2)).pointer_down()
        for k in range(1, 7):
            finger.pointer_action.move_to_location(int(x + side / 2), int(y + side * (0.2 + 0.1 * k)))
        finger.pointer_action.pointer_up()
        finger.perform()
        _check_inversion(driver, base_url, seq)
        seq = _seq(driver, "inversion-strip")
        driver.find_element("id", "inversion-interpolate").click()
        _drawn(driver, "inversion-strip", seq, "16 frames")
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 420
        assert _severe(driver) == []
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def screenshot(path: Path) -> None:
    """Redraws the README's picture: a grid of one class, an interpolation between two, and a drawn 7 inverted and
    interpolated to seed 1 as a 7 (the shipped model's encoder.onnx)."""
    with tempfile.TemporaryDirectory() as folder, serving(Path(folder)) as url:
        driver = chrome(1200, 1400)
        try:
            # The window's size includes what headless Chromium keeps for its own frame; the page gets exactly this.
            metrics = {"width": 1200, "height": 1400, "deviceScaleFactor": 1, "mobile": False}
            driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
            driver.get(f"{url}/")
            for element, text in (("label", "7"), ("from-label", "3"), ("to-label", "8")):
                _select(driver, element, text)
            _drawn(driver, "grid", 0, "class 7")
            _drawn(driver, "strip", 0, "class 3 → 8")
            _keys(driver, "frame-slider", Keys.HOME, *[Keys.ARROW_RIGHT] * 10)
            seq = _seq(driver, "reconstruction")
            _draw_seven(driver)
            _drawn(driver, "reconstruction", seq)
            _select(driver, "inversion-to-label", "7")
            seq = _seq(driver, "inversion-strip")
            driver.find_element("id", "inversion-interpolate").click()
            _drawn(driver, "inversion-strip", seq)
            driver.execute_script("document.activeElement.blur(); window.scrollTo(0, 0)")  # drawing scrolled down
            driver.save_screenshot(str(path))
            assert _severe(driver) == []
        finally:
            driver.quit()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=screenshot.__doc__)
    parser.add_argument("--screenshot", type=Path, required=True, help="PNG to write, e.g. docs/playground.png")
    screenshot(parser.parse_args().screenshot)


def test_at_phone_width_the_seed_field_has_room_for_a_long_seed(driver, base_url):
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 420, "height": 900, "deviceScaleFactor": 1, "mobile": True})  # fmt: skip
    driver.get(f"{base_url}/")
    seed = driver.find_element("id", "seed")
    # A 10-digit seed (what "Random" gives) at the page's font needs about 7.5 rem; a third of 420 px had 60 px.
    assert seed.size["width"] >= 120, seed.size
    # The directions fit too: every slider on the page, none narrower than a thumb's travel worth having.
    _drawn(driver, "grid", 0)
    sliders = driver.find_elements("css selector", "#direction-sliders input")
    assert len(sliders) == len(DIRECTIONS) and all(s.size["width"] >= 90 for s in sliders), [s.size for s in sliders]
    assert driver.execute_script("return document.documentElement.scrollWidth") <= 420
