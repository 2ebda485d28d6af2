"""The whole workbench as one ``gr.Blocks``: the tabs, the events that cross tabs, and the queue.

Tabs: Text → Image, Image → Image, Video frames, Experts, Flow, PNG info, Model. API endpoints (gradio_client):
``/text2img``, ``/img2img``, ``/frames`` and ``/png_info``; the streaming UI events are private.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from workbench import Pipeline
from workbench.ui import experts, flow_view, img2img, model_tab, pnginfo, text2img, video
from workbench.ui.controls import ResultsPanel
from workbench.ui.session import Workbench

TITLE = "SD3 Workbench"
INTRO = (
    "# SD3 Workbench\nSD3-style MMDiT text-to-image with rectified flow and steerable Mixture-of-Experts routing. "
    "Every image is a PNG carrying its settings (see **PNG info**)."
)
CONCURRENCY = 1


def _send_to_img2img(panel: ResultsPanel, target: img2img.Img2ImgTab, tabs: gr.Tabs) -> None:
    def send(results: list[dict], index: int, prompt: str, negative: str):
        if not results:
            raise gr.Error("Nothing to send yet: generate an image first")
        return results[min(index, len(results) - 1)]["path"], prompt, negative, gr.Tabs(selected="img2img")

    panel.send_to_img2img.click(
        send,
        [panel.results, panel.selected, target.controls.prompt, target.controls.negative_prompt],
        [target.image, target.controls.prompt, target.controls.negative_prompt, tabs],
        queue=False,
        api_visibility="private",
    )


def build_app(pipe_or_path: Pipeline | str | Path | None = None, output_dir: str | Path = "outputs") -> gr.Blocks:
    """The workbench app on ``pipe_or_path`` (a loaded Pipeline, a model path, or None for the embedded model).
    PNGs are written under ``output_dir``. The returned Blocks is queued and carries the shared state as
    ``demo.workbench``; launch it with ``demo.launch(...)``."""
    wb = Workbench.create(pipe_or_path, output_dir)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        last_seed = gr.State(None)
        with gr.Tabs() as tabs:
            with gr.Tab("Text → Image", id="text2img"):
                t2i = text2img.build(wb, last_seed)
            with gr.Tab("Image → Image", id="img2img"):
                i2i = img2img.build(wb)
            with gr.Tab("Video frames", id="frames"):
                frames = video.build(wb)
            with gr.Tab("Experts", id="experts"):
                experts_tab = experts.build(wb, t2i.controls, last_seed)
            with gr.Tab("Flow", id="flow"):
                flow_view.build(wb, t2i.controls, last_seed)
            with gr.Tab("PNG info", id="pnginfo"):
                info = pnginfo.build()
            with gr.Tab("Model", id="model"):
                model = model_tab.build(wb)

        _send_to_img2img(t2i.panel, i2i, tabs)
        _send_to_img2img(i2i.panel, i2i, tabs)

        def model_updates(reset_values: bool) -> dict:
            updates: dict = {}
            for part in (t2i.controls, i2i.controls, frames, experts_tab):
                updates.update(part.model_updates(wb.pipe, reset_values))
            return updates

        model_tab.wire(model, wb, model_updates)

        def send_settings(params: dict):
            if not params:
                raise gr.Error("Drop a PNG with a parameters chunk first")
            values, temperature, note = pnginfo.expert_settings(params, wb.pipe.num_experts)
            updates = pnginfo.settings_updates(params, wb.pipe, t2i.controls)
            sliders = experts_tab.weights[: len(values)]
            updates.update({slider: value for slider, value in zip(sliders, values)})
            updates[experts_tab.router_temperature] = temperature
            updates[info.note] = note
            updates[tabs] = gr.Tabs(selected="text2img")
            return updates

        info.send.click(
            send_settings,
            info.parsed,
            [*t2i.controls.inputs(), *experts_tab.weights, experts_tab.router_temperature, info.note, tabs],
            queue=False,
            api_visibility="private",
        )
    demo.queue(default_concurrency_limit=CONCURRENCY)
    demo.workbench = wb
    return demo
