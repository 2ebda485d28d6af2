"""Take the README's app screenshots: the app on the embedded model in headless Chromium (1400 × 1000), one
generation on Text → Image and one on Experts, written as ``docs/screenshots/text2img.png`` and ``experts.png``.

    .venv/bin/python docs/screenshots/take_screenshots.py        # needs /usr/bin/chromium and Playwright (dev deps)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
PROMPT = "a large red circle at the top left on a white background"


def set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")
    page.wait_for_timeout(300)


def main() -> None:
    sys.path.insert(0, str(ROOT))
    from playwright.sync_api import sync_playwright

    from app import build_app

    with tempfile.TemporaryDirectory() as outputs:
        demo = build_app(None, output_dir=outputs)
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
        try:
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(120_000)
                page.goto(url)
                page.locator("#t2i-generate").wait_for(state="visible")
                page.wait_for_timeout(500)
                page.locator("#t2i-prompt textarea").fill(PROMPT)
                set_number(page, "t2i-seed", 7)
                set_number(page, "t2i-batch", 4)
                page.locator("#t2i-generate").click()
                page.locator("#t2i-status").get_by_text("Done").wait_for(state="visible")
                page.wait_for_timeout(1000)
                page.screenshot(path=str(HERE / "text2img.png"))

                page.get_by_role("tab", name="Experts").click()
                set_number(page, "expert-weight-2", 0)
                page.locator("#experts-generate").click()
                page.locator("#experts-status").get_by_text("Done").wait_for(state="visible")
                page.wait_for_timeout(1000)
                page.screenshot(path=str(HERE / "experts.png"))
                browser.close()
        finally:
            demo.close()


if __name__ == "__main__":
    main()
