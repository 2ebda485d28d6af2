"""Text → Image tab, A1111-style: the prompt with Generate and Stop beside it (Ctrl+Enter generates), the everyday
settings in view, the rest under "More" and the ControlNet section (:mod:`workbench.ui.controlnet_panel`); on the
right the results column (:mod:`workbench.ui.results`) with live
x̂0 previews, progress, generation info, seed, download and the session history; API ``/text2img``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

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
from workbench.ui.runs import ctrl_enter_js, run_key, stop_button, wire_run, with_messages
from workbench.ui.session import GPU, MODEL_CONCURRENCY, Workbench, page_errors
from workbench.ui.style import stylesheet

TAB = "text2img"


@dataclass
class Text2ImgTab:
    controls: SamplingControls
    generate: gr.Button
    stop: gr.Button
    panel: ResultsPanel
    controlnet: ControlNetPanel


def api_function(wb: Workbench, controlnets: ControlNetLibrary | None = None):
    """The plain ``/text2img`` endpoint: returns (gallery of PNG paths, first seed used, its parameters text)."""
    defaults = sampling_defaults(wb.pipe)
    library = controlnets or ControlNetLibrary(wb.policy.catalog.controlnets)

    @GPU
    @sampling_parameters
    @control_parameters
    def text2img(
        prompt: str, settings: SamplingValues = defaults, control: ControlValues = CONTROL_DEFAULTS
    ) -> tuple[list[tuple[str, str]], int, str]:
        """Text → image. Returns the images (PNG files with a ``parameters`` chunk), the seed of the first image
        (image i used seed + i) and the first image's parameters. With a ``control_image`` and a ``controlnet``
        (a name), that ControlNet guides the image."""
        with page_errors("Text → Image"):
            kwargs = settings.kwargs()
            request = control_request(wb, library, control)
            with library.attached(wb, request):
                out = wb.generate(prompt, **kwargs, **(request.kwargs if request else {}))
            results = publish(wb, out, "text2img")
        return gallery_items(results), results[0]["seed"], results[0]["parameters"]

    return text2img


def build(wb: Workbench, last_seed: gr.State, controlnets: ControlNetLibrary | None = None) -> Text2ImgTab:
    """Build the tab inside the current ``gr.Tab`` and wire its events. ``controlnets``: the app's ControlNets
    (default: those of ``wb``'s policy)."""
    stylesheet()
    generate = gr.Button("Generate", variant="primary", elem_id="t2i-generate", render=False, size="lg")
    stop = stop_button("t2i-stop", render=False)
    with gr.Row():
        with gr.Column(scale=1):
            controls = sampling_controls(wb.pipe, "t2i", prompt_side=[generate, stop])
            library = controlnets or ControlNetLibrary(wb.policy.catalog.controlnets)
            cn = controlnet_panel(wb, library, "t2i")
        with gr.Column(scale=1):
            panel = results_panel("t2i")

    @GPU
    @sampling_parameters
    @control_parameters
    def run(
        prompt: str, settings: SamplingValues, control: ControlValues, history: list[dict], request: gr.Request
    ) -> Iterator[dict]:
        def body() -> Iterator[dict]:
            with page_errors("Text → Image"):
                kwargs = settings.kwargs()
                wanted = control_request(wb, cn.library, control)
                kwargs.update(wanted.kwargs if wanted else {})
                key = run_key(request, TAB)
                with cn.library.attached(wb, wanted):
                    for update in stream_generation(wb, panel, key, "text2img", prompt, kwargs, history):
                        if panel.used_seed in update:
                            update[last_seed] = int(update[panel.used_seed])
                        yield update

        yield from with_messages(panel.status, body())

    wire_run(
        wb,
        TAB,
        generate,
        stop,
        panel.status,
        run,
        [*controls.inputs(), *cn.inputs(), panel.history_results],
        [*panel.stream_outputs(), last_seed],
    )
    controls.prompt.focus(None, None, None, js=ctrl_enter_js("t2i-prompt", "t2i-generate"), queue=False)
    gr.on(
        [],
        api_function(wb, cn.library),
        [*controls.inputs(), *cn.inputs()],
        [panel.gallery, panel.api_seed, panel.parameters],
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
    return Text2ImgTab(controls, generate, stop, panel, cn)
