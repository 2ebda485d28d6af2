"""Image → Image tab: a start image (uploaded or sent from a gallery), strength, an optional inpainting mask painted
over a copy of the start image, the sampler settings and the ControlNet section of Text → Image; API ``/img2img``.

The mask editor (``gr.ImageEditor``) shows the start image as its background; every painted pixel of its brush layers
(alpha > 0) is repainted, as a white pixel of diffusers' ``mask_image``; by default the start image is pasted back
outside the painted part (``paste_back``, edge feathered by ``mask_blur`` px). With nothing painted a request is
plain image→image. API callers pass ``mask`` as the editor's value: ``{"background": …, "layers": [RGBA image the
size of the start image, opaque where to repaint], "composite": …}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr
import numpy as np
from PIL import Image

from workbench.metadata import parse_parameters
from workbench.ui.controlnet_panel import (
    CONTROL_DEFAULTS,
    ControlNetLibrary,
    ControlNetPanel,
    ControlValues,
    control_parameters,
    control_request,
    controlnet_panel,
)
from workbench.ui.controls import (
    SamplingControls,
    SamplingValues,
    sampling_controls,
    sampling_defaults,
    sampling_parameters,
)
from workbench.ui.results import ResultsPanel, gallery_items, publish, results_panel, stream_generation
from workbench.ui.runs import ctrl_enter_js, message_html, run_key, stop_button, wire_run, with_messages
from workbench.ui.session import GPU, MODEL_CONCURRENCY, Workbench, page_errors

TAB = "img2img"

DEFAULT_STRENGTH = 0.6


@dataclass
class Img2ImgTab:
    image: gr.Image
    mask: gr.ImageEditor
    paste_back: gr.Checkbox
    mask_blur: gr.Slider
    strength: gr.Slider
    controls: SamplingControls
    generate: gr.Button
    stop: gr.Button
    panel: ResultsPanel
    controlnet: ControlNetPanel


def _start_image(image: Image.Image | None) -> Image.Image:
    if image is None:
        raise ValueError("image: upload a start image (or send one from a gallery) first")
    return image.convert("RGB")


def painted_mask(editor: dict | None) -> Image.Image | None:
    """The inpainting mask painted in the mask editor (its value: ``background``, ``layers``, ``composite``): a
    grayscale image of the layers' size, white (repaint) wherever a layer has alpha > 0, black elsewhere; None when
    nothing is painted. Raises ValueError naming ``mask`` when the layers differ in size."""
    layers = [layer for layer in (editor or {}).get("layers") or [] if layer is not None]
    painted: np.ndarray | None = None
    for layer in layers:
        alpha = np.asarray(layer.convert("RGBA"))[..., 3] > 0
        if painted is not None and alpha.shape != painted.shape:
            raise ValueError(f"mask: the painted layers differ in size ({painted.shape[::-1]} and {alpha.shape[::-1]})")
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    return Image.fromarray(painted.astype(np.uint8) * 255)


def _image_kwargs(
    image: Image.Image | None, strength: float, mask: dict | None, paste_back: bool = False, mask_blur: float = 4
) -> dict:
    """Pipeline arguments of the start image, strength and the painted mask (none when nothing is painted); with
    ``paste_back`` the start image is pasted back outside the mask, feathered by ``mask_blur`` px."""
    kwargs = {"image": _start_image(image), "strength": float(strength)}
    painted = painted_mask(mask)
    if painted is not None:
        kwargs["mask_image"] = painted
        if paste_back:
            kwargs["mask_blur"] = float(mask_blur)
    return kwargs


def _mask_canvas(image: Image.Image | None) -> dict | None:
    """The mask editor's value for a new start image: the image as background, nothing painted."""
    return None if image is None else {"background": image, "layers": [], "composite": image}


NOTHING_TO_SEND = "Nothing to send yet: generate an image first."


def wire_send(panel: ResultsPanel, target: Img2ImgTab, tabs: gr.Tabs) -> None:
    """``panel``'s "Send to Image → Image": the selected image becomes ``target``'s start image, with the prompts it
    was made with; before any generation it only says so in ``panel``'s status line (nothing else changes)."""

    def send(results: list[dict], index: int) -> dict:
        if not results:
            return {panel.status: message_html(NOTHING_TO_SEND, "warning")}
        chosen = results[min(index, len(results) - 1)]
        params = parse_parameters(chosen["parameters"])
        return {
            target.image: chosen["path"],
            target.controls.prompt: params.get("prompt", ""),
            target.controls.negative_prompt: params.get("negative_prompt", ""),
            tabs: gr.Tabs(selected="img2img"),
        }

    panel.send_to_img2img.click(
        send,
        [panel.results, panel.selected],
        [panel.status, target.image, target.controls.prompt, target.controls.negative_prompt, tabs],
        queue=False,
        show_progress="hidden",
        api_visibility="private",
    )


def api_function(wb: Workbench, controlnets: ControlNetLibrary | None = None):
    """The plain ``/img2img`` endpoint: returns (gallery of PNG paths, first seed used, its parameters text)."""
    defaults = sampling_defaults(wb.pipe)
    library = controlnets or ControlNetLibrary(wb.policy.catalog.controlnets)

    @GPU
    @sampling_parameters
    @control_parameters
    def img2img(
        prompt: str,
        image: Image.Image | None,
        strength: float = DEFAULT_STRENGTH,
        settings: SamplingValues = defaults,
        mask: dict | None = None,
        paste_back: bool = True,
        mask_blur: float = 4,
        control: ControlValues = CONTROL_DEFAULTS,
    ) -> tuple[list[tuple[str, str]], int, str]:
        """Image → image from ``image`` (resized to width × height) with diffusers' ``strength`` semantics;
        inpainting where ``mask`` (the mask editor's value, see :func:`painted_mask`) is painted, with the start
        image pasted back outside it when ``paste_back`` (edge feathered by ``mask_blur`` px). With a
        ``control_image`` and a ``controlnet`` (a name), that ControlNet guides the image."""
        with page_errors("Image → Image"):
            kwargs = settings.kwargs()
            kwargs.update(_image_kwargs(image, strength, mask, paste_back, mask_blur))
            request = control_request(wb, library, control)
            with library.attached(wb, request):
                out = wb.generate(prompt, **kwargs, **(request.kwargs if request else {}))
            results = publish(wb, out, "img2img")
        return gallery_items(results), results[0]["seed"], results[0]["parameters"]

    return img2img


def build(wb: Workbench, controlnets: ControlNetLibrary | None = None) -> Img2ImgTab:
    """Build the tab inside the current ``gr.Tab`` and wire its events. ``controlnets``: the app's ControlNets
    (default: those of ``wb``'s policy)."""
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                image = gr.Image(
                    label="Start image", type="pil", sources=["upload", "clipboard"], height=256, elem_id="i2i-image"
                )
                mask = gr.ImageEditor(
                    label="Mask: paint to repaint",
                    type="pil",
                    image_mode="RGBA",
                    sources=(),
                    transforms=(),
                    layers=False,
                    brush=gr.Brush(colors=[("#ff00ff", 0.6)], color_mode="fixed"),
                    format="png",
                    height=256,
                    elem_id="i2i-mask",
                )
            with gr.Row():
                paste_back = gr.Checkbox(True, label="Keep the unpainted pixels (paste the start image back)")
                mask_blur = gr.Slider(0, 32, value=4, step=1, label="Mask blur (px)")
            strength = gr.Slider(0.05, 1.0, value=DEFAULT_STRENGTH, step=0.05, label="Strength (1 = ignore the image)")
            generate = gr.Button("Generate", variant="primary", elem_id="i2i-generate", render=False, size="lg")
            stop = stop_button("i2i-stop", render=False)
            controls = sampling_controls(wb.pipe, "i2i", prompt_side=[generate, stop])
            library = controlnets or ControlNetLibrary(wb.policy.catalog.controlnets)
            cn = controlnet_panel(wb, library, "i2i")
        with gr.Column(scale=1):
            panel = results_panel("i2i")

    @GPU
    @sampling_parameters
    @control_parameters
    def run(
        prompt: str,
        image: Image.Image | None,
        strength: float,
        settings: SamplingValues,
        mask: dict | None,
        paste_back: bool,
        mask_blur: float,
        control: ControlValues,
        history: list[dict],
        request: gr.Request,
    ) -> Iterator[dict]:
        def body() -> Iterator[dict]:
            with page_errors("Image → Image"):
                kwargs = settings.kwargs()
                kwargs.update(_image_kwargs(image, strength, mask, paste_back, mask_blur))
                wanted = control_request(wb, cn.library, control)
                kwargs.update(wanted.kwargs if wanted else {})
                key = run_key(request, TAB)
                with cn.library.attached(wb, wanted):
                    yield from stream_generation(wb, panel, key, "img2img", prompt, kwargs, history)

        yield from with_messages(panel.status, body())

    image.change(_mask_canvas, image, mask, queue=False, api_visibility="private")
    inputs = [controls.prompt, image, strength, *controls.settings(), mask, paste_back, mask_blur, *cn.inputs()]
    wire_run(wb, TAB, generate, stop, panel.status, run, [*inputs, panel.history_results], panel.stream_outputs())
    controls.prompt.focus(None, None, None, js=ctrl_enter_js("i2i-prompt", "i2i-generate"), queue=False)
    gr.on(
        [],
        api_function(wb, cn.library),
        inputs,
        [panel.gallery, panel.api_seed, panel.parameters],
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
    return Img2ImgTab(image, mask, paste_back, mask_blur, strength, controls, generate, stop, panel, cn)
