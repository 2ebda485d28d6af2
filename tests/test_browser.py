"""The workbench in Debian's Chromium through Playwright: type a prompt, generate, steer an expert on the Experts tab
and see the image change; a wrong model path shows a message. Screenshots go to ``test-artifacts/``.

Needs /usr/bin/chromium (``.ci/install_browser.sh``); Playwright's own browser downloads are not used."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_app import launch_app

from workbench.metadata import read_parameters

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 60_000
BROWSER_PROMPT = "a small blue star at the center on a black background"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (.ci/install_browser.sh)"
    ),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    demo, url = launch_app(tmp_path_factory.mktemp("browser-outputs"))
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(served[1])
        page.locator("#t2i-generate").wait_for(state="visible")
        yield page
        browser.close()


def set_number(page, elem_id: str, value: int | float) -> None:
    """Type into the number box of a Slider or Number and commit it."""
    box = page.locator(f"#{elem_id} input[type=number]").first
    slider = page.locator(f"#{elem_id} input[type=range]")
    for _ in range(20):  # the page may still be wiring its handlers and reset a value typed too early
        box.fill(str(value))
        box.press("Enter")
        box.blur()
        page.wait_for_timeout(250)
        if not slider.count() or slider.first.input_value() == str(value):
            return
    raise AssertionError(f"#{elem_id} did not take the value {value}")


def image_pixels(page, img_selector: str) -> np.ndarray:
    """The RGB pixels of an <img> shown in the page, fetched from its src."""
    src = page.locator(img_selector).first.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, f"could not fetch {src}: {response.status}"
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def wait_for_text(page, elem_id: str, text: str) -> None:
    page.locator(f"#{elem_id}").get_by_text(text).first.wait_for(state="visible")


def test_generate_then_steer_an_expert(page):
    page.locator("#t2i-prompt textarea").fill(BROWSER_PROMPT)
    page.locator("#t2i-settings").get_by_text("Settings").first.click()
    set_number(page, "t2i-steps", 4)
    page.locator("#t2i-generate").click()
    wait_for_text(page, "t2i-status", "Done")
    page.locator("#t2i-gallery img").first.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "browser-text2img.png"), full_page=True)
    generated = image_pixels(page, "#t2i-gallery img")
    parameters = page.locator("#t2i-parameters textarea").input_value()
    seed = page.locator("#t2i-used-seed input").first.input_value()
    assert parameters.startswith(BROWSER_PROMPT) and "Steps: 4," in parameters and f"Seed: {seed}," in parameters

    page.get_by_role("tab", name="Experts").click()
    page.locator("#experts-generate").click()  # the seed box says −1: the Experts tab reuses the last seed
    wait_for_text(page, "experts-status", f"seed {seed}, expert weights as trained")
    as_trained = image_pixels(page, "#experts-image img")
    np.testing.assert_array_equal(as_trained, generated)

    set_number(page, "expert-weight-0", 0)
    page.locator("#experts-generate").click()
    wait_for_text(page, "experts-status", "expert weights [0.0")
    page.locator("#experts-region-map img").first.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "browser-experts.png"), full_page=True)
    steered = image_pixels(page, "#experts-image img")
    assert steered.shape == generated.shape
    assert np.abs(steered.astype(int) - generated.astype(int)).mean() > 0.5


@pytest.mark.slow
def test_img2img_frames_and_flow_tabs(page):
    page.get_by_role("tab", name="Text → Image").click()
    page.locator("#t2i-send-img2img").click()
    page.locator("#i2i-image img").first.wait_for(state="visible")
    page.locator("#i2i-settings").get_by_text("Settings").first.click()
    set_number(page, "i2i-steps", 4)
    page.locator("#i2i-generate").click()
    wait_for_text(page, "i2i-status", "Done")
    assert "Denoising strength: 0.6" in page.locator("#i2i-parameters textarea").input_value()

    page.get_by_role("tab", name="Video frames").click()
    page.locator("#frames-prompts textarea").fill(
        f"{BROWSER_PROMPT}\na large green square at the top on a white background"
    )
    set_number(page, "frames-num", 3)
    page.locator("#frames-settings").get_by_text("Settings").first.click()
    set_number(page, "frames-steps", 2)
    page.locator("#frames-generate").click()
    wait_for_text(page, "frames-status", "Done: 3 frames, mode travel")
    page.locator("#frames-video video").first.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "browser-frames.png"), full_page=True)

    page.get_by_role("tab", name="Flow").click()
    page.locator("#flow-generate").click()
    wait_for_text(page, "flow-status", "Done")
    page.locator("#flow-strip img").first.wait_for(state="visible")
    assert page.locator("#flow-straightness").inner_text().startswith("S = ")
    page.screenshot(path=str(ARTIFACTS / "browser-flow.png"), full_page=True)


def test_png_info_sends_settings_to_text2img(page, served):
    made = sorted((served[0].workbench.output_dir / "text2img").glob("*.png"))[0]
    seed = read_parameters(made)["seed"]
    page.get_by_role("tab", name="Text → Image").click()
    set_number(page, "t2i-seed", 123)
    page.locator("#t2i-prompt textarea").fill("something else")
    page.get_by_role("tab", name="PNG info").click()
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(made))
    page.locator("#pnginfo-send").wait_for(state="visible")
    page.wait_for_function(f"() => document.querySelector('#pnginfo-text textarea').value.includes('Seed: {seed},')")
    page.locator("#pnginfo-send").click()
    page.locator("#t2i-generate").wait_for(state="visible")
    page.wait_for_function(f"() => document.querySelector('#t2i-seed input').value === '{seed}'")
    assert page.locator("#t2i-prompt textarea").input_value() == BROWSER_PROMPT


def test_wrong_model_path_shows_a_message(page):
    page.get_by_role("tab", name="Model").click()
    page.locator("#model-path textarea, #model-path input").first.fill("/no/such/model")
    page.locator("#model-load").click()
    page.get_by_text("does not exist").first.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "browser-model-error.png"), full_page=True)
    assert "does not exist" not in page.locator("#model-info").inner_text()
