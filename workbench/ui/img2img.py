"""Image → Image tab: a start image (uploaded or sent from a gallery), strength, the sampler settings of Text → Image;
API ``/img2img``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr
from PIL import Image

from workbench.ui.controls import (
    ResultsPanel,
    SamplingControls,
    SamplingValues,
    gallery_items,
    publish,
    results_panel,
    sampling_controls,
    sampling_defaults,
    sampling_parameters,
    stream_generation,
)
from workbench.ui.session import GPU, MODEL_CONCURRENCY, Workbench, page_errors, stop_handler

DEFAULT_STRENGTH = 0.6


@dataclass
class Img2ImgTab:
    image: gr.Image
    strength: gr.Slider
    controls: SamplingControls
    generate: gr.Button
    stop: gr.Button
    panel: ResultsPanel


def _start_image(image: Image.Image | None) -> Image.Image:
    if image is None:
        raise ValueError("image: upload a start image (or send one from a gallery) first")
    return image.convert("RGB")


def api_function(wb: Workbench):
    """The plain ``/img2img`` endpoint: returns (gallery of PNG paths, first seed used, its parameters text)."""
    defaults = sampling_defaults(wb.pipe)

    @GPU
    @sampling_parameters
    def img2img(
        prompt: str, image: Image.Image | None, strength: float = DEFAULT_STRENGTH, settings: SamplingValues = defaults
    ) -> tuple[list[tuple[str, str]], int, str]:
        """Image → image from ``image`` (resized to width × height) with diffusers' ``strength`` semantics."""
        with page_errors("Image → Image"):
            kwargs = settings.kwargs()
            kwargs.update(image=_start_image(image), strength=float(strength))
            results = publish(wb, wb.generate(prompt, **kwargs), "img2img")
        return gallery_items(results), results[0]["seed"], results[0]["parameters"]

    return img2img


def build(wb: Workbench) -> Img2ImgTab:
    """Build the tab inside the current ``gr.Tab`` and wire its events."""
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(
                label="Start image", type="pil", sources=["upload", "clipboard"], height=256, elem_id="i2i-image"
            )
            strength = gr.Slider(0.05, 1.0, value=DEFAULT_STRENGTH, step=0.05, label="Strength (1 = ignore the image)")
            controls = sampling_controls(wb.pipe, "i2i")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="i2i-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="i2i-stop")
        with gr.Column(scale=1):
            panel = results_panel("i2i")

    @GPU
    @sampling_parameters
    def run(
        prompt: str, image: Image.Image | None, strength: float, settings: SamplingValues, request: gr.Request
    ) -> Iterator[dict]:
        with page_errors("Image → Image"):
            kwargs = settings.kwargs()
            kwargs.update(image=_start_image(image), strength=float(strength))
            yield from stream_generation(wb, panel, request.session_hash, "img2img", prompt, kwargs)

    inputs = [controls.prompt, image, strength, *controls.settings()]
    generate.click(run, inputs, panel.stream_outputs(), api_visibility="private", concurrency_id=MODEL_CONCURRENCY)
    stop.click(stop_handler(wb), None, None, queue=False, api_visibility="private")
    gr.on(
        [],
        api_function(wb),
        inputs,
        [panel.gallery, panel.used_seed, panel.parameters],
        api_name="img2img",
        concurrency_id=MODEL_CONCURRENCY,
    )
    controls.reuse_seed.click(
        lambda results, index: results[index]["seed"] if results else gr.update(),
        [panel.results, panel.selected],
        controls.seed,
        queue=False,
        api_visibility="private",
    )
    return Img2ImgTab(image, strength, controls, generate, stop, panel)
