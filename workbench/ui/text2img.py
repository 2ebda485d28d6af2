"""Text → Image tab: prompt and sampler settings, live preview per step, Stop, a gallery of PNGs; API ``/text2img``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

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


@dataclass
class Text2ImgTab:
    controls: SamplingControls
    generate: gr.Button
    stop: gr.Button
    panel: ResultsPanel


def api_function(wb: Workbench):
    """The plain ``/text2img`` endpoint: returns (gallery of PNG paths, first seed used, its parameters text)."""
    defaults = sampling_defaults(wb.pipe)

    @GPU
    @sampling_parameters
    def text2img(prompt: str, settings: SamplingValues = defaults) -> tuple[list[tuple[str, str]], int, str]:
        """Text → image. Returns the images (PNG files with a ``parameters`` chunk), the seed of the first image
        (image i used seed + i) and the first image's parameters."""
        with page_errors("Text → Image"):
            kwargs = settings.kwargs()
            results = publish(wb, wb.generate(prompt, **kwargs), "text2img")
        return gallery_items(results), results[0]["seed"], results[0]["parameters"]

    return text2img


def build(wb: Workbench, last_seed: gr.State) -> Text2ImgTab:
    """Build the tab inside the current ``gr.Tab`` and wire its events."""
    with gr.Row():
        with gr.Column(scale=1):
            controls = sampling_controls(wb.pipe, "t2i")
            with gr.Row():
                generate = gr.Button("Generate", variant="primary", elem_id="t2i-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="t2i-stop")
        with gr.Column(scale=1):
            panel = results_panel("t2i")

    @GPU
    @sampling_parameters
    def run(prompt: str, settings: SamplingValues, request: gr.Request) -> Iterator[dict]:
        with page_errors("Text → Image"):
            kwargs = settings.kwargs()
            for update in stream_generation(wb, panel, request.session_hash, "text2img", prompt, kwargs):
                if panel.used_seed in update:
                    update[last_seed] = update[panel.used_seed]
                yield update

    generate.click(
        run,
        controls.inputs(),
        [*panel.stream_outputs(), last_seed],
        api_visibility="private",
        concurrency_id=MODEL_CONCURRENCY,
    )
    stop.click(stop_handler(wb), None, None, queue=False, api_visibility="private")
    gr.on(
        [],
        api_function(wb),
        controls.inputs(),
        [panel.gallery, panel.used_seed, panel.parameters],
        api_name="text2img",
        concurrency_id=MODEL_CONCURRENCY,
    )
    controls.reuse_seed.click(
        lambda results, index: results[index]["seed"] if results else gr.update(),
        [panel.results, panel.selected],
        controls.seed,
        queue=False,
        api_visibility="private",
    )
    return Text2ImgTab(controls, generate, stop, panel)
