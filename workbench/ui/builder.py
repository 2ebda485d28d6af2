"""The whole workbench as one ``gr.Blocks``: the tabs, the events that cross tabs, and the queue.

Tabs: Text → Image, Image → Image, Video frames, Experts, Flow, PNG info, Model. API endpoints (gradio_client):
``/text2img``, ``/img2img``, ``/frames`` and ``/png_info``; the streaming UI events are private.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from workbench import Pipeline
from workbench.ui import experts, flow_view, img2img, model_tab, pnginfo, text2img, video
from workbench.ui.session import Workbench

TITLE = "SD3 Workbench"
INTRO = (
    "# SD3 Workbench\nSD3-style MMDiT text-to-image with rectified flow and steerable Mixture-of-Experts routing. "
    "Every image is a PNG carrying its settings (see **PNG info**)."
)
CONCURRENCY = 1


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

        img2img.wire_send(t2i.panel, i2i, tabs)
        img2img.wire_send(i2i.panel, i2i, tabs)

        def model_updates(reset_values: bool) -> dict:
            updates: dict = {}
            for part in (t2i.controls, i2i.controls, frames, experts_tab):
                updates.update(part.model_updates(wb.pipe, reset_values))
            return updates

        model_tab.wire(model, wb, model_updates)

        pnginfo.wire_send(info, lambda: wb.pipe, t2i.controls, experts_tab, tabs)
    demo.queue(default_concurrency_limit=CONCURRENCY)
    demo.workbench = wb
    return demo
