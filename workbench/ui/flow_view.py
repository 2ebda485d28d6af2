"""Flow tab: the trajectory of one generation (``record_trajectory``): the predicted clean image x̂0 at each step and
the straightness of the path (S value and per-step plot), drawn by :mod:`workbench.viz`. The tab has its own steps
and step-cache threshold (``cache_threshold``, :mod:`workbench.step_cache`; the steps it skipped are listed under
S); the prompt and the other settings come from Text → Image, and the tab says which."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from workbench import GenerationCancelled
from workbench.pipeline import GenerationOutput
from workbench.ui.controls import SamplingControls, SamplingValues, sampling_parameters
from workbench.ui.experts import resolve_seed
from workbench.ui.live import LivePreview, ProgressLine, progress_html
from workbench.ui.results import publish
from workbench.ui.runs import message_html, run_key, stop_button, wire_run, with_messages
from workbench.ui.session import GPU, Step, Workbench, page_errors
from workbench.ui.style import UPSCALE

TAB = "flow"
EXPLANATION = (
    "Rectified flow moves noise to image along a path; a perfectly straight path could be walked in one step. "
    "**S** = Σ Δσ·‖chord − v‖² (per dimension) measures how far the velocities stray from the straight chord from "
    "start noise to final latent: 0 = straight. The strip shows the predicted clean image x̂0 = x − σ·v per step."
)
BORROWED = (
    "Steps and the step-cache threshold are this tab's own. The prompt, negative prompt, guidance, size, sampler, "
    "shift, guidance interval and skip-layer settings come from **Text → Image**; its seed too (−1 there: the last "
    "seed used)."
)


@dataclass
class FlowTab:
    steps: gr.Slider
    generate: gr.Button
    image: gr.Image
    strip: gr.Image
    straightness: gr.Markdown
    plot: gr.Plot
    status: gr.HTML


def settings_line(prompt: str, kwargs: dict, seed: int) -> str:
    """The settings a trace ran with, for the page."""
    low, high = kwargs["guidance_interval"]
    return (
        f"“{prompt}”: {kwargs['num_inference_steps']} steps, {kwargs['sampler']}, shift {kwargs['shift']:g}, "
        f"CFG {kwargs['guidance_scale']:g} (σ {low:g}–{high:g}), {kwargs['width']}×{kwargs['height']}, seed {seed}."
    )


def cache_line(out: GenerationOutput, threshold: float) -> str:
    """Which sampler evaluations step caching skipped (reusing the last residual), for the page; empty when off."""
    if threshold <= 0:
        return ""
    skipped = ", ".join(str(i) for i in out.skipped_steps) or "none"
    return (
        f"Step caching (threshold {threshold:g}): skipped steps {skipped}; "
        f"{out.transformer_evaluations} transformer evaluations."
    )


def build(wb: Workbench, t2i: SamplingControls, last_seed: gr.State) -> FlowTab:
    """Build the tab inside the current ``gr.Tab`` and wire its events; ``t2i`` supplies prompt and settings."""
    gr.Markdown(EXPLANATION)
    gr.Markdown(BORROWED, elem_id="flow-borrowed")
    with gr.Row(equal_height=True):
        steps = gr.Slider(
            2, 150, value=wb.pipe.defaults.num_inference_steps, step=1, label="Steps", elem_id="flow-steps"
        )
        max_frames = gr.Slider(2, 24, value=10, step=1, label="Steps shown in the strip")
        cache_threshold = gr.Slider(
            0, 1, value=0, step=0.01, label="Step-cache threshold (0 = off)", elem_id="flow-cache-threshold"
        )
        generate = gr.Button("Trace a generation", variant="primary", elem_id="flow-generate")
        stop = stop_button("flow-stop")
    status = gr.HTML("", elem_id="flow-status")
    with gr.Row():
        image = gr.Image(
            type="filepath",
            format="png",
            interactive=False,
            show_label=False,
            buttons=[],
            height=320,
            scale=1,
            elem_id="flow-image",
            elem_classes=[UPSCALE],
        )
        with gr.Column(scale=3):
            straightness = gr.Markdown("", elem_id="flow-straightness")
            plot = gr.Plot(label="Deviation from the straight path per step")
    strip = gr.Image(label="Predicted clean image x̂0 per step", interactive=False, elem_id="flow-strip")

    @GPU
    @sampling_parameters
    def run(
        request: gr.Request,
        prompt: str,
        settings: SamplingValues,
        previous_seed: int | None,
        flow_steps: int,
        frames: int,
        cache: float,
    ) -> Iterator[dict]:
        yield from with_messages(status, trace(request, prompt, settings, previous_seed, flow_steps, frames, cache))

    def trace(request, prompt, settings, previous_seed, flow_steps, frames, cache) -> Iterator[dict]:
        from workbench.viz import straightness_plot, trajectory_strip

        with page_errors("Flow"):
            seed = resolve_seed(settings.seed, previous_seed)
            kwargs = settings.kwargs(seed=seed, batch_count=1, steps=flow_steps)
            kwargs["record_trajectory"] = True
            kwargs["cache_threshold"] = float(cache)
            total = kwargs["num_inference_steps"]
            live, line = LivePreview(wb.pipe), ProgressLine(total)
            yield {status: progress_html(0, "Starting…")}

            def work(callback):
                out = wb.pipe(prompt, callback=live.wrap(callback), **kwargs)
                return out, trajectory_strip(wb.pipe, out.trajectory, 0, max_frames=int(frames))

            try:
                for event in wb.stream(run_key(request, TAB), work, total, preview=False):
                    if isinstance(event, Step):
                        update: dict = {status: line.html(event.index + 1)}
                        if (images := live.images()) is not None:
                            update[image] = images[0]
                        yield update
                        continue
                    out, strip_image = event.result
                    result = publish(wb, out, "flow")[0]
                    value = float(out.trajectory.straightness()[0])
                    yield {
                        image: result["path"],
                        strip: strip_image,
                        straightness: f"### S = {value:.4g}\n{settings_line(prompt, kwargs, result['seed'])}\n\n"
                        + cache_line(out, float(cache)),
                        plot: straightness_plot(out.trajectory),
                        last_seed: result["seed"],
                        status: message_html("Done.", "info"),
                    }
            except GenerationCancelled as err:
                yield {status: message_html(f"Stopped: {err}", "warning")}

    wire_run(
        wb,
        TAB,
        generate,
        stop,
        status,
        run,
        [*t2i.inputs(), last_seed, steps, max_frames, cache_threshold],
        [image, strip, straightness, plot, last_seed, status],
    )
    return FlowTab(steps, generate, image, strip, straightness, plot, status)
