"""PNG info tab: read the ``parameters`` chunk of a PNG made by the workbench (or another SD tool) and send its
settings back to Text → Image (expert weights and router temperature to the Experts tab); API ``/png_info``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from workbench import Pipeline
from workbench.metadata import read_parameters
from workbench.ui.controlnet_panel import ControlNetPanel, sent_controlnet
from workbench.ui.controls import SamplingControls, parameters_to_settings
from workbench.ui.session import page_errors
from workbench.ui.style import UPSCALE


@dataclass
class PngInfoTab:
    image: gr.Image
    text: gr.Textbox
    parsed: gr.JSON
    send: gr.Button
    note: gr.Markdown


def png_info(image: str | None) -> dict:
    """The parsed ``parameters`` of a PNG file (``{}`` when no file is given)."""
    if not image:
        return {}
    with page_errors("PNG info"):
        return read_parameters(image)


def settings_updates(params: dict, pipe: Pipeline, controls: SamplingControls) -> dict:
    """Updates of the Text → Image widgets from parsed parameters."""
    settings = parameters_to_settings(params, pipe)
    return {getattr(controls, name): gr.update(value=value) for name, value in settings.items()}


def expert_settings(params: dict, experts: int) -> tuple[list[float], float, str]:
    """(slider values for ``experts`` experts, router temperature, a note for the page) from parsed parameters."""
    weights = params.get("expert_weights")
    temperature = float(params.get("router_temperature") or 1.0)
    values, note = [1.0] * experts, ""
    if isinstance(weights, list) and len(weights) == experts:
        values = [float(w) for w in weights]
    elif weights is not None:
        note = f"Expert weights {weights} do not fit this model's {experts} sliders; they were not set. "
    if params.get("strength") is not None:
        held = "a start image and an inpainting mask" if params.get("mask_size") else "a start image"
        note += f"This image was made with Image → Image from {held} the PNG does not hold. "
    if weights is not None or temperature != 1.0:
        note += (
            "This image was made with steered routing: the weights are set in the **Experts** tab; generate there "
            "to reproduce it."
        )
    return values, temperature, note


def build() -> PngInfoTab:
    """Build the tab inside the current ``gr.Tab``; the Send button is wired by the app builder."""
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(
                label="PNG made by the workbench or another SD tool",
                type="filepath",
                image_mode=None,
                format="png",
                sources=["upload"],
                height=420,
                elem_id="pnginfo-image",
                elem_classes=[UPSCALE],
            )
        with gr.Column(scale=1):
            text = gr.Textbox(
                label="parameters chunk", lines=4, interactive=False, buttons=["copy"], elem_id="pnginfo-text"
            )
            parsed = gr.JSON(label="Parsed")
            send = gr.Button("Send to Text → Image", variant="primary", interactive=False, elem_id="pnginfo-send")
            note = gr.Markdown("", elem_id="pnginfo-note")

    image.change(
        shown, image, [text, parsed, send, note], queue=False, show_progress="hidden", api_visibility="private"
    )
    gr.on([], png_info, image, parsed, api_name="png_info")
    return PngInfoTab(image, text, parsed, send, note)


def shown(path: str | None) -> tuple[str, dict, dict, str]:
    """The tab's view of a dropped PNG: (parameters text, parsed parameters, Send button update, note). A PNG without
    a readable ``parameters`` chunk clears the previous one's, disables Send and says why in the note."""
    if not path:
        return "", {}, gr.update(interactive=False), ""
    try:
        params = read_parameters(path)
    except (OSError, ValueError) as err:
        return "", {}, gr.update(interactive=False), f"**No settings to read:** {err}"
    return read_text(path), params, gr.update(interactive=True), ""


def wire_send(
    tab: PngInfoTab,
    pipe: Callable[[], Pipeline],
    controls: SamplingControls,
    controlnet: ControlNetPanel,
    experts_tab,
    tabs,
) -> None:
    """Send applies the parsed settings to Text → Image (``controls`` and its ``controlnet`` section) and the expert
    weights and router temperature to ``experts_tab`` (an :class:`workbench.ui.experts.ExpertsTab`), then shows Text →
    Image; with nothing parsed it only says so in the tab's note. ``pipe()`` is the loaded pipeline."""

    def send(params: dict) -> dict:
        if not params:
            return {tab.note: "Drop a PNG with a parameters chunk first."}
        model = pipe()
        values, temperature, note = expert_settings(params, model.num_experts)
        updates = settings_updates(params, model, controls)
        updates.update({slider: value for slider, value in zip(experts_tab.weights, values)})
        updates[experts_tab.router_temperature] = temperature
        control, control_note = sent_controlnet(params, controlnet.choices(model))
        updates.update({getattr(controlnet, field): gr.update(value=value) for field, value in control.items()})
        updates[tab.note] = control_note + note
        updates[tabs] = gr.Tabs(selected="text2img")
        return updates

    tab.send.click(
        send,
        tab.parsed,
        [
            *controls.inputs(),
            # the ControlNet section without its control image, which no PNG holds (listing the editor as an
            # output here kept Text → Image's Stop from ending its run in the browser test)
            controlnet.preprocessor,
            controlnet.controlnet,
            controlnet.scale,
            controlnet.start,
            controlnet.end,
            *experts_tab.weights,
            experts_tab.router_temperature,
            tab.note,
            tabs,
        ],
        queue=False,
        show_progress="hidden",
        api_visibility="private",
    )


def read_text(path: str) -> str:
    from PIL import Image

    with Image.open(path) as opened:
        return str(opened.info.get("parameters", ""))
