"""The workbench in Debian's Chromium through Playwright: type a prompt, generate, steer an expert on the Experts tab
and see the image change; every failed action shows a message in its own tab and puts no error badge on any widget.
Each test opens its own page (a fresh browser session), so each passes alone and in any order. Screenshots go to
``test-artifacts/browser/``, emptied once when the test run starts (conftest: before the parallel workers).

Needs /usr/bin/chromium (``.ci/install_browser.sh``); Playwright's own browser downloads are not used."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import BROWSER_ARTIFACTS as ARTIFACTS
from PIL import Image
from test_app import launch_app

from workbench.shapesworld.cli_controlnet import EMBEDDED_CONTROLNET

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
TABS = ("Text → Image", "Image → Image", "Video frames", "Experts", "Flow", "PNG info", "Model")
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
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, served):
    """A new page (its own Gradio session) on the app, 1400 × 1000."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(served[1])
    page.locator("#t2i-generate").wait_for(state="visible")
    page.wait_for_timeout(300)  # let the page wire its handlers
    yield page
    page.close()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_timeout(150)


def error_badges(page) -> list[str]:
    """The elem_id (or label) of every widget whose status shows Gradio's red "Error" badge."""
    return page.evaluate(
        """() => Array.from(document.querySelectorAll('span.error')).map(badge => {
            const block = badge.closest('.block');
            return (block && (block.id || block.innerText.slice(0, 40))) || 'unknown';
        })"""
    )


def assert_no_badges_in_any_tab(page, shot: str) -> None:
    """Visit every tab: no widget anywhere shows an error badge; screenshot each tab as ``<shot>-<tab>.png``."""
    for name in TABS:
        open_tab(page, name)
        page.screenshot(path=str(ARTIFACTS / f"{shot}-{slug(name)}.png"), full_page=True)
        assert error_badges(page) == [], f"error badges on the {name} tab"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).replace("--", "-").strip("-")


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


def open_accordion(page, elem_id: str) -> None:
    """Open the accordion ``#elem_id`` unless it is open."""
    if not page.locator(f"#{elem_id} > [data-testid=accordion-content]").first.is_visible():
        page.locator(f"#{elem_id} > button.label-wrap").first.click()
    page.locator(f"#{elem_id} > [data-testid=accordion-content]").first.wait_for(state="visible")


def image_pixels(page, img_selector: str) -> np.ndarray:
    """The RGB pixels of an <img> shown in the page, fetched from its src."""
    src = page.locator(img_selector).first.get_attribute("src")
    response = page.request.get(src)
    assert response.ok, f"could not fetch {src}: {response.status}"
    return np.asarray(Image.open(io.BytesIO(response.body())).convert("RGB"))


def field_value(page, elem_id: str) -> str:
    """The value of a Textbox or Number."""
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def wait_for_text(page, elem_id: str, text: str) -> None:
    """Wait until ``#elem_id`` shows ``text``; on timeout, fail with what it shows instead (and a screenshot)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.locator(f"#{elem_id}").get_by_text(text).first.wait_for(state="visible")
    except PlaywrightTimeout:
        page.screenshot(path=str(ARTIFACTS / f"timeout-{elem_id}.png"), full_page=True)
        shown = page.locator(f"#{elem_id}").first.inner_text(timeout=5_000)
        raise AssertionError(
            f"#{elem_id} did not show {text!r} in {TIMEOUT_MS // 1000} s; it shows {shown!r}"
        ) from None


def test_generate_then_steer_an_expert(page):
    page.locator("#t2i-prompt textarea").fill(BROWSER_PROMPT)
    set_number(page, "t2i-steps", 4)
    page.locator("#t2i-generate").click()
    wait_for_text(page, "t2i-status", "Done")
    page.locator("#t2i-gallery img").first.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "browser-text2img.png"), full_page=True)
    generated = image_pixels(page, "#t2i-gallery img")
    parameters = page.locator("#t2i-parameters textarea").input_value()
    seed = field_value(page, "t2i-used-seed")
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
    set_number(page, "t2i-steps", 2)
    page.locator("#t2i-generate").click()
    wait_for_text(page, "t2i-status", "Done")
    page.locator("#t2i-send-img2img").click()
    page.locator("#i2i-image img").first.wait_for(state="visible")
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


def workbench_png(served, seed: int = 5) -> Path:
    """A PNG made by the served app's pipeline (2 steps), saved with its parameters chunk."""
    wb = served[0].workbench
    out = wb.generate(BROWSER_PROMPT, num_inference_steps=2, seed=seed)
    return Path(wb.save(out.images, "browser-test")[0])


def test_png_info_sends_settings_to_text2img(page, served):
    made = workbench_png(served, seed=77)
    open_tab(page, "Text → Image")
    set_number(page, "t2i-seed", 123)
    page.locator("#t2i-prompt textarea").fill("something else")
    open_tab(page, "PNG info")
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(made))
    page.wait_for_function("() => document.querySelector('#pnginfo-text textarea').value.includes('Seed: 77,')")
    page.locator("#pnginfo-send").click()
    page.locator("#t2i-generate").wait_for(state="visible")
    page.wait_for_function("() => document.querySelector('#t2i-seed input').value === '77'")
    assert page.locator("#t2i-prompt textarea").input_value() == BROWSER_PROMPT


def test_png_without_parameters_says_so_and_sends_nothing(page, served, tmp_path):
    """Defect 2: a PNG without a parameters chunk gave bare "Error" badges, and Send then applied the previous PNG."""
    made = workbench_png(served, seed=77)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(plain)
    open_tab(page, "PNG info")
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(made))
    page.wait_for_function("() => document.querySelector('#pnginfo-text textarea').value.includes('Seed: 77,')")
    assert page.locator("#pnginfo-send").is_enabled()
    page.locator("#pnginfo-image button[aria-label='Remove Image']").first.click()
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(plain))
    wait_for_text(page, "pnginfo-note", "no 'parameters' text chunk")
    page.screenshot(path=str(ARTIFACTS / "pnginfo-no-parameters.png"), full_page=True)
    assert page.locator("#pnginfo-text textarea").input_value() == ""
    assert page.locator("#pnginfo-send").is_disabled()
    assert_no_badges_in_any_tab(page, "pnginfo-no-parameters")
    open_tab(page, "Text → Image")
    assert page.locator("#t2i-seed input").first.input_value() == "-1"


def test_send_to_img2img_before_generating_says_so(page):
    """Defect 3: the button did nothing on Text → Image and put error badges on Image → Image."""
    page.locator("#t2i-send-img2img").click()
    wait_for_text(page, "t2i-status", "Nothing to send yet")
    page.screenshot(path=str(ARTIFACTS / "send-before-generating.png"), full_page=True)
    assert_no_badges_in_any_tab(page, "send-before-generating")
    assert page.locator("#i2i-prompt textarea").input_value() != ""


def test_wrong_model_path_is_a_message_under_load_only(page):
    """Defect 1: a failed load turned the other tabs' settings and the Experts panel into error badges."""
    open_tab(page, "Model")
    page.locator("#model-path textarea, #model-path input").first.fill("/no/such/model")
    page.locator("#model-load").click()
    wait_for_text(page, "model-message", "does not exist")
    page.screenshot(path=str(ARTIFACTS / "model-error.png"), full_page=True)
    assert "does not exist" not in page.locator("#model-info").inner_text()
    assert_no_badges_in_any_tab(page, "model-error")


def test_loading_a_model_resets_the_settings_of_every_tab(page):
    """Defect 1: a successful load ended in "Returned component <Slider> not specified as output"; nothing reset."""
    default_steps = page.locator("#t2i-steps input[type=number]").first.input_value()
    set_number(page, "t2i-steps", 7)
    open_tab(page, "Experts")
    set_number(page, "expert-weight-0", 0.5)
    open_tab(page, "Model")
    page.locator("#model-path textarea, #model-path input").first.fill("")
    page.locator("#model-load").click()
    wait_for_text(page, "model-message", "Loaded")
    assert_no_badges_in_any_tab(page, "model-loaded")
    assert page.locator("#t2i-steps input[type=number]").first.input_value() == default_steps
    assert page.locator("#expert-weight-0 input[type=number]").first.input_value() == "1"


def is_disabled(page, elem_id: str) -> bool:
    return page.locator(f"#{elem_id}").first.is_disabled()


def gallery_caption(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").first.inner_text()


def test_progress_preview_and_buttons_while_generating(page):
    """Defects 5 and 6: progress with step k of N, it/s and ETA; an x̂0 preview at full size that looks like the final
    image and is replaced by it; Generate disabled and Stop enabled only while running; Seed used empty before."""
    assert field_value(page, "t2i-used-seed") == ""
    assert is_disabled(page, "t2i-stop") and not is_disabled(page, "t2i-generate")
    assert "stop" not in page.locator("#t2i-stop").get_attribute("class").split()  # not red while idle
    page.locator("#t2i-prompt textarea").fill(BROWSER_PROMPT)
    # 150 steps: half of them are still to come when the preview is looked at, even on a fast machine.
    set_number(page, "t2i-steps", 150)
    set_number(page, "t2i-batch", 2)
    page.locator("#t2i-generate").click()
    page.wait_for_function("() => document.querySelector('#t2i-generate').disabled")
    assert not is_disabled(page, "t2i-stop")
    assert "stop" in page.locator("#t2i-stop").get_attribute("class").split()
    page.wait_for_function(
        """() => { const text = document.querySelector('#t2i-status').innerText;
                   const step = text.match(/Step (\\d+) of 150/);
                   return step && Number(step[1]) >= 75 && text.includes('it/s') && text.includes('ETA'); }"""
    )
    assert page.locator("#t2i-status [role=progressbar]").count() == 1
    page.locator("#t2i-gallery").get_by_text("x̂0 preview").first.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "text2img-running.png"), full_page=True)
    preview = image_pixels(page, "#t2i-gallery img")
    wait_for_text(page, "t2i-status", "Done")
    page.screenshot(path=str(ARTIFACTS / "text2img-done.png"), full_page=True)
    assert "x̂0 preview" not in gallery_caption(page, "t2i-gallery")
    final = image_pixels(page, "#t2i-gallery img")
    assert preview.shape == final.shape == (128, 128, 3)
    assert np.abs(preview.astype(int) - final.astype(int)).mean() < 12
    page.wait_for_function(
        "() => !document.querySelector('#t2i-generate').disabled && document.querySelector('#t2i-stop').disabled"
    )
    assert field_value(page, "t2i-used-seed").isdigit()


def test_everyday_settings_in_view_and_ctrl_enter_generates(page):
    """Defect 7: steps, seed and batch count were in a closed accordion, and Generate fell below the fold."""
    for elem_id in ("t2i-steps", "t2i-seed", "t2i-batch", "t2i-generate", "t2i-stop"):
        assert page.locator(f"#{elem_id}").first.is_visible(), elem_id
    open_accordion(page, "t2i-settings")
    box = page.locator("#t2i-generate").bounding_box()
    assert box is not None and box["y"] + box["height"] <= 1000
    open_tab(page, "Image → Image")
    open_accordion(page, "i2i-settings")
    box = page.locator("#i2i-generate").bounding_box()
    assert box is not None and box["y"] + box["height"] <= 1000
    page.screenshot(path=str(ARTIFACTS / "img2img.png"), full_page=True)
    open_tab(page, "Text → Image")
    set_number(page, "t2i-steps", 2)
    page.locator("#t2i-prompt textarea").click()
    page.keyboard.press("Control+Enter")
    wait_for_text(page, "t2i-status", "Done")
    assert "Steps: 2," in field_value(page, "t2i-parameters")


def test_flow_has_its_own_steps_and_says_what_it_borrows(page):
    """Defect 9: a trace silently ran with Text → Image's steps."""
    set_number(page, "t2i-steps", 150)
    open_tab(page, "Flow")
    assert "come from Text → Image" in page.locator("#flow-borrowed").inner_text()
    set_number(page, "flow-steps", 3)
    page.locator("#flow-generate").click()
    wait_for_text(page, "flow-status", "Done")
    page.screenshot(path=str(ARTIFACTS / "flow.png"), full_page=True)
    assert "3 steps" in page.locator("#flow-straightness").inner_text()


def test_stop_is_per_tab_and_removes_the_queued_job(page, served):
    """Defect 4: Flow's Stop stopped the Text → Image run, and the queued trace ran to its end."""
    traces = served[0].workbench.output_dir / "flow"
    before = len(list(traces.glob("*.png"))) if traces.is_dir() else 0
    # The longest Text → Image run the controls allow (150 steps × 8 images, about half a minute on a fast 2-core
    # machine), so that it is still running when its own Stop is pressed below.
    set_number(page, "t2i-steps", 150)
    set_number(page, "t2i-batch", 8)
    page.locator("#t2i-generate").click()
    wait_for_text(page, "t2i-status", "Step")
    open_tab(page, "Flow")
    page.locator("#flow-generate").click()
    wait_for_text(page, "flow-status", "Queued")
    page.locator("#flow-stop").click()
    wait_for_text(page, "flow-status", "Stopped")
    assert not is_disabled(page, "flow-generate")
    open_tab(page, "Text → Image")
    assert "Stopped" not in page.locator("#t2i-status").inner_text()
    page.wait_for_timeout(1000)
    assert "Step" in page.locator("#t2i-status").inner_text()
    page.locator("#t2i-stop").click()
    wait_for_text(page, "t2i-status", "Stopped")
    assert field_value(page, "t2i-used-seed") == ""  # no image yet: no seed
    page.wait_for_timeout(3000)  # time for a queued trace to run, were it still queued
    open_tab(page, "Flow")
    assert "Stopped" in page.locator("#flow-status").inner_text()
    assert (len(list(traces.glob("*.png"))) if traces.is_dir() else 0) == before


def shown_width(page, selector: str) -> float:
    """The width in CSS px at which the page draws the picture of the first <img> of ``selector`` (its box scaled by
    the element's object-fit)."""
    page.locator(selector).first.wait_for(state="visible")
    return page.locator(selector).first.evaluate(
        """img => { const fit = getComputedStyle(img).objectFit;
            const k = Math.min(img.clientWidth / img.naturalWidth, img.clientHeight / img.naturalHeight);
            const scale = fit === 'none' ? 1 : fit === 'scale-down' ? Math.min(1, k) : k;
            return scale * img.naturalWidth; }"""
    )


def test_small_renders_fill_their_boxes(page, served):
    """Defect 8: the Experts image and region map, the Flow image, PNG info and the GIF showed at native 128 px;
    the region-map legend was unreadable, Flow's label overlapped its image, the frames gallery overflowed."""
    set_number(page, "t2i-steps", 2)
    open_tab(page, "Experts")
    page.locator("#experts-generate").click()
    wait_for_text(page, "experts-status", "Done")
    page.locator("#experts-region-map img").first.wait_for(state="visible")
    page.screenshot(path=str(ARTIFACTS / "experts.png"), full_page=True)
    assert shown_width(page, "#experts-image img") >= 250
    assert shown_width(page, "#experts-region-map img") >= 250
    legend = page.locator("#experts-region-legend")
    assert "Expert 0:" in legend.inner_text()
    assert float(legend.evaluate("node => getComputedStyle(node).fontSize").removesuffix("px")) >= 12

    open_tab(page, "Flow")
    set_number(page, "flow-steps", 2)
    page.locator("#flow-generate").click()
    wait_for_text(page, "flow-status", "Done")
    assert shown_width(page, "#flow-image img") >= 250
    label = page.locator("#flow-image [data-testid=block-label]")
    assert label.count() == 0 or not label.first.is_visible()

    open_tab(page, "PNG info")
    page.locator("#pnginfo-image input[type=file]").set_input_files(str(workbench_png(served)))
    assert shown_width(page, "#pnginfo-image img") >= 250
    page.screenshot(path=str(ARTIFACTS / "pnginfo.png"), full_page=True)

    open_tab(page, "Video frames")
    set_number(page, "frames-num", 6)
    open_accordion(page, "frames-settings")
    set_number(page, "frames-steps", 1)
    page.locator("#frames-format").get_by_text("gif").click()
    page.locator("#frames-generate").click()
    wait_for_text(page, "frames-status", "Done: 6 frames")
    page.screenshot(path=str(ARTIFACTS / "frames.png"), full_page=True)
    assert shown_width(page, "#frames-gif img") >= 250
    overflow = page.evaluate(
        "() => { const g = document.querySelector('#frames-gallery'); return g.scrollWidth - g.clientWidth; }"
    )
    assert overflow <= 1


def test_frames_progress_counts_frames(page):
    """Defect 6: Video frames counted "Step N of 144" instead of frame k of 6."""
    open_tab(page, "Video frames")
    # Long enough (24 frames × 150 steps, over a minute) that Stop always lands before the last frame.
    set_number(page, "frames-num", 24)
    open_accordion(page, "frames-settings")
    set_number(page, "frames-steps", 150)
    page.locator("#frames-generate").click()
    wait_for_text(page, "frames-status", "Frame 2 of 24")
    status = page.locator("#frames-status").inner_text()
    assert "step" in status and "of 150" in status, status
    page.locator("#frames-stop").click()
    wait_for_text(page, "frames-status", "Stopped")


def test_text_uses_fonts_that_exist_offline(page):
    """Defect 10: the "Attach LoRA" label rendered with mixed glyphs (web fonts that need the network)."""
    open_tab(page, "Model")
    family = page.evaluate("() => getComputedStyle(document.querySelector('#lora-attach')).fontFamily")
    assert family.split(",")[0].strip().strip('"') in ("DejaVu Sans", "Liberation Sans"), family
    page.screenshot(path=str(ARTIFACTS / "model.png"), full_page=True)


def test_bad_input_is_a_message_in_its_own_tab(page):
    """A failed action shows its message next to its own controls and changes nothing elsewhere."""
    open_accordion(page, "t2i-settings")
    page.locator("#t2i-skip-layers textarea, #t2i-skip-layers input").first.fill("7;8")
    page.locator("#t2i-generate").click()
    wait_for_text(page, "t2i-status", "skip_layers")
    assert "Error" in page.locator("#t2i-status").inner_text()
    page.wait_for_function("() => !document.querySelector('#t2i-generate').disabled")
    open_tab(page, "Image → Image")
    page.locator("#i2i-generate").click()
    wait_for_text(page, "i2i-status", "upload a start image")
    page.screenshot(path=str(ARTIFACTS / "img2img-error.png"), full_page=True)
    assert_no_badges_in_any_tab(page, "bad-input")


def test_history_reuse_seed_and_download(page):
    """The session history shows every image of this session; a click shows one in the gallery again with its seed
    and generation info; "Reuse last" puts the selected image's seed in the seed box; the PNG can be downloaded."""
    assert page.locator("#t2i-download").first.is_disabled()
    set_number(page, "t2i-steps", 2)
    seeds = []
    for seed in (11, 22):
        set_number(page, "t2i-seed", seed)
        page.locator("#t2i-generate").click()
        wait_for_text(page, "t2i-status", f"seed {seed}.")
        seeds.append(field_value(page, "t2i-used-seed"))
    assert seeds == ["11", "22"]
    assert not page.locator("#t2i-download").first.is_disabled()
    open_accordion(page, "t2i-history-box")
    page.locator("#t2i-history img").nth(1).wait_for(state="visible")
    assert page.locator("#t2i-history img").count() == 2
    page.locator("#t2i-history img").nth(1).click()  # newest first: the second is the first generation
    page.wait_for_function(
        "() => document.querySelector('#t2i-used-seed textarea, #t2i-used-seed input').value === '11'"
    )
    assert "Seed: 11," in field_value(page, "t2i-parameters")
    set_number(page, "t2i-seed", -1)
    page.locator("#t2i-reuse-seed").click()
    page.wait_for_function("() => document.querySelector('#t2i-seed input').value === '11'")
    with page.expect_download() as download:
        page.locator("#t2i-download").first.click()
    assert download.value.suggested_filename.endswith(".png")


@pytest.mark.skipif(not EMBEDDED_CONTROLNET.is_dir(), reason="no shipped ShapesWorld ControlNet in this checkout")
def test_draw_an_outline_and_generate_with_the_shipped_controlnet(page):
    """The ControlNet section end to end as a user meets it: pick the brush, draw a stroke on the canvas, see the
    Canny preview, choose the shipped ControlNet, generate; the PNG parameters name it and its preprocessor."""
    open_accordion(page, "t2i-controlnet")
    editor = page.locator("#t2i-control-image")
    editor.get_by_label("Brush").first.click()
    canvas = editor.locator("canvas").first
    box = canvas.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.3)
    page.mouse.down()
    for k in range(1, 21):
        page.mouse.move(box["x"] + box["width"] * (0.3 + 0.02 * k), box["y"] + box["height"] * 0.3, steps=2)
    page.mouse.up()
    page.locator("#t2i-control-preview img").first.wait_for(state="visible")
    edges = image_pixels(page, "#t2i-control-preview img")
    assert edges.max() == 255 and (edges > 0).mean() < 0.2  # white Canny edges around the stroke on black
    page.locator("#t2i-controlnet-name").click()
    page.get_by_role("option", name=EMBEDDED_CONTROLNET.name).click()
    set_number(page, "t2i-steps", 4)
    page.locator("#t2i-generate").click()
    wait_for_text(page, "t2i-status", "Done")
    page.screenshot(path=str(ARTIFACTS / "browser-controlnet.png"), full_page=True)
    parameters = page.locator("#t2i-parameters textarea").input_value()
    assert f'ControlNet: "{EMBEDDED_CONTROLNET.name}:1:' in parameters
    assert "ControlNet preprocessor: canny" in parameters
    assert not error_badges(page)
