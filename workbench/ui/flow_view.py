"""Flow tab: the trajectory of one generation with the prompt and settings of Text → Image (``record_trajectory``):
the predicted clean image x̂0 at each step and the straightness of the path (S value and per-step plot), drawn by
:mod:`workbench.viz`."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from workbench import GenerationCancelled
from workbench.ui.controls import SamplingControls, SamplingValues, publish, sampling_parameters
from workbench.ui.experts import resolve_seed
from workbench.ui.session import GPU, MODEL_CONCURRENCY, Step, Workbench, page_errors, stop_handler

EXPLANATION = (
    "Rectified flow moves noise to image along a path; a perfectly straight path could be walked in one step. "
    "**S** = Σ Δσ·‖chord − v‖² (per dimension) measures how far the velocities stray from the straight chord from "
    "start noise to final latent: 0 = straight. The strip shows the predicted clean image x̂0 = x − σ·v per step."
)


@dataclass
class FlowTab:
    generate: gr.Button
    image: gr.Image
    strip: gr.Image
    straightness: gr.Markdown
    plot: gr.Plot
    status: gr.Markdown


def build(wb: Workbench, t2i: SamplingControls, last_seed: gr.State) -> FlowTab:
    """Build the tab inside the current ``gr.Tab`` and wire its events; ``t2i`` supplies prompt and settings."""
    gr.Markdown(EXPLANATION)
    with gr.Row():
        max_frames = gr.Slider(2, 24, value=10, step=1, label="Steps shown in the strip")
        generate = gr.Button("Trace a generation", variant="primary", elem_id="flow-generate")
        stop = gr.Button("Stop", variant="stop", elem_id="flow-stop")
    status = gr.Markdown("", elem_id="flow-status")
    with gr.Row():
        image = gr.Image(label="Image", type="filepath", format="png", interactive=False, scale=1)
        with gr.Column(scale=3):
            straightness = gr.Markdown("", elem_id="flow-straightness")
            plot = gr.Plot(label="Deviation from the straight path per step")
    strip = gr.Image(label="Predicted clean image x̂0 per step", interactive=False, elem_id="flow-strip")

    @GPU
    @sampling_parameters
    def run(
        request: gr.Request, prompt: str, settings: SamplingValues, previous_seed: int | None, frames: int
    ) -> Iterator[dict]:
        from workbench.viz import straightness_plot, trajectory_strip

        with page_errors("Flow"):
            kwargs = settings.kwargs(seed=resolve_seed(settings.seed, previous_seed), batch_count=1)
            kwargs["record_trajectory"] = True

            def work(callback):
                out = wb.pipe(prompt, callback=callback, **kwargs)
                return out, trajectory_strip(wb.pipe, out.trajectory, 0, max_frames=int(frames))

            try:
                for event in wb.stream(request.session_hash, work, kwargs["num_inference_steps"]):
                    if isinstance(event, Step):
                        yield {image: event.preview, status: f"Step {event.index + 1} of {event.total}"}
                        continue
                    out, strip_image = event.result
                    result = publish(wb, out, "flow")[0]
                    value = float(out.trajectory.straightness()[0])
                    yield {
                        image: result["path"],
                        strip: strip_image,
                        straightness: f"### S = {value:.4g}\n{kwargs['num_inference_steps']} steps, "
                        f"sampler {kwargs['sampler']}, shift {kwargs['shift']:g}, seed {result['seed']}.",
                        plot: straightness_plot(out.trajectory),
                        last_seed: result["seed"],
                        status: "Done.",
                    }
            except GenerationCancelled as err:
                gr.Warning(f"Stopped: {err}")
                yield {status: f"Stopped: {err}"}

    generate.click(
        run,
        [*t2i.inputs(), last_seed, max_frames],
        [image, strip, straightness, plot, last_seed, status],
        api_visibility="private",
        concurrency_id=MODEL_CONCURRENCY,
    )
    stop.click(stop_handler(wb), None, None, queue=False, api_visibility="private")
    return FlowTab(generate, image, strip, straightness, plot, status)
