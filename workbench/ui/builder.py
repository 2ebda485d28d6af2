"""The whole workbench as one ``gr.Blocks``: the tabs, the events that cross tabs, and the queue.

Tabs: Text → Image, Image → Image, Video frames, Experts, Flow, PNG info, Model. API endpoints (gradio_client):
``/text2img``, ``/img2img``, ``/frames`` and ``/png_info``; the streaming UI events are private.

Text → Image and Image → Image share one :class:`~workbench.ui.controlnet_panel.ControlNetLibrary` (the operator's
ControlNets that fit the loaded model; refreshed when the model changes and when a page loads). The hosting policy
(:mod:`workbench.ui.hosting`) decides the Model tab (read-only in public mode, with no model
events at all), the queue's size, the per-session job limit, Gradio's cache cleaning and the image pixel limit;
:mod:`workbench.ui.guard` checks every event's inputs on the server.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from workbench import Pipeline
from workbench.limits import guard_image_pixels
from workbench.ui import experts, flow_view, guard, img2img, model_tab, pnginfo, text2img, video
from workbench.ui.controlnet_panel import ControlNetLibrary
from workbench.ui.hosting import HostingPolicy
from workbench.ui.session import Workbench

TITLE = "SD3 Workbench"
INTRO = (
    "# SD3 Workbench\nSD3-style MMDiT text-to-image with rectified flow and steerable Mixture-of-Experts routing. "
    "Every image is a PNG carrying its settings (see **PNG info**)."
)
CONCURRENCY = 1


def build_app(
    pipe_or_path: Pipeline | str | Path | None = None,
    output_dir: str | Path = "outputs",
    policy: HostingPolicy | None = None,
) -> gr.Blocks:
    """The workbench app on ``pipe_or_path`` (a loaded Pipeline, a model path, or None for the embedded model).
    PNGs are written under ``output_dir``. ``policy`` (default: a private app on localhost) sets public mode and
    the limits. The returned Blocks is queued and carries the shared state as ``demo.workbench``; launch it with
    ``demo.launch(**launch_options(demo))``."""
    policy = policy or HostingPolicy()
    limits = policy.limits
    guard_image_pixels(limits.max_image_pixels)
    wb = Workbench.create(pipe_or_path, output_dir, policy)
    controlnets = ControlNetLibrary(policy.catalog.controlnets)
    cache = None if limits.output_max_age_s is None else (limits.cache_check_every_s, int(limits.output_max_age_s))
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=cache) as demo:
        gr.Markdown(INTRO)
        if policy.public:
            gr.Markdown(policy.model_note, elem_id="public-note")
        last_seed = gr.State(None)
        with gr.Tabs() as tabs:
            with gr.Tab("Text → Image", id="text2img"):
                t2i = text2img.build(wb, last_seed, controlnets)
            with gr.Tab("Image → Image", id="img2img"):
                i2i = img2img.build(wb, controlnets)
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
            for part in (t2i.controls, i2i.controls, frames, experts_tab, t2i.controlnet, i2i.controlnet):
                updates.update(part.model_updates(wb.pipe, reset_values))
            return updates

        if model.changeable:
            model_tab.wire(model, wb, model_updates)

        pnginfo.wire_send(info, lambda: wb.pipe, t2i.controls, t2i.controlnet, experts_tab, tabs)
        if model.changeable:  # the model may have changed since the page was built: offer what fits it now
            panels = (t2i.controlnet, i2i.controlnet)
            demo.load(
                lambda: {p.controlnet: gr.update(choices=p.choices(wb.pipe)) for p in panels},
                None,
                [p.controlnet for p in panels],
                queue=False,
                show_progress="hidden",
                api_visibility="private",
            )
    # api_open=False: queued events cannot be called directly (POST /gradio_api/run/…) past the queue's limits
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=limits.queue_max_size, api_open=not policy.public)
    guard.install(demo, limits)
    if policy.public:  # Gradio's own cache: by age through delete_cache, and by size with the outputs
        wb.cache_dirs.append(Path(demo.GRADIO_CACHE))
    demo.workbench = wb
    return demo


def launch_options(demo: gr.Blocks) -> dict:
    """``demo.launch`` options that belong to its policy: the upload size limit and the outputs folder."""
    wb: Workbench = demo.workbench
    return {"max_file_size": wb.policy.limits.max_file_size, "allowed_paths": [str(wb.output_dir)]}
