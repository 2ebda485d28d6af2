"""Experts tab: a weight per expert and the router temperature of a Mixture-of-Experts model; generates with the
prompt and settings of Text → Image (a random seed −1 is replaced by the seed of the last generation so that runs
compare) and shows expert usage per block and step and which expert each image region chose (from
:mod:`workbench.viz`). A dense model (``pipe.num_experts == 0``) gets a plain notice instead."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from workbench import GenerationCancelled, Pipeline
from workbench.ui.controls import SamplingControls, SamplingValues, sampling_parameters
from workbench.ui.live import LivePreview, ProgressLine, progress_html
from workbench.ui.results import publish
from workbench.ui.runs import message_html, run_key, stop_button, wire_run, with_messages
from workbench.ui.session import GPU, Step, Workbench, page_errors
from workbench.ui.style import UPSCALE

TAB = "experts"

MAX_EXPERT_SLIDERS = 16
REGION_MAP_SIDE = 384  # small renders are upscaled first, so that the legend under the map is legible
ALL = "all"
DENSE_NOTICE = (
    "**This model has no experts** (a dense MMDiT such as SD3-Medium): there is no routing to steer or show. "
    "Load a Mixture-of-Experts model, such as the embedded ShapesWorld model, in the Model tab."
)


@dataclass
class ExpertsTab:
    notice: gr.Markdown
    panel: gr.Column
    weights: list[gr.Slider]
    router_temperature: gr.Slider
    generate: gr.Button
    image: gr.Image
    region_map: gr.Image
    usage: gr.Plot
    shares: gr.Dataframe
    block: gr.Dropdown
    step: gr.Dropdown
    status: gr.HTML

    def model_updates(self, pipe: Pipeline, reset_values: bool) -> dict:
        experts = pipe.num_experts
        updates = {self.notice: gr.update(visible=experts == 0), self.panel: gr.update(visible=experts > 0)}
        for i, slider in enumerate(self.weights):
            updates[slider] = gr.update(visible=i < experts, **({"value": 1.0} if reset_values else {}))
        updates[self.router_temperature] = gr.update(value=1.0) if reset_values else gr.update()
        return updates


def resolve_seed(seed: float | None, last_seed: int | None) -> int:
    """The seed box when it is ≥ 0, else the last seed used in this session (−1 when there is none: random)."""
    if seed is not None and seed >= 0:
        return int(seed)
    return int(last_seed) if last_seed is not None else -1


def expert_weights(weights: list[float], experts: int) -> list[float] | None:
    """Slider values of the model's experts, or None when they are all 1 (the trained routing, bit for bit)."""
    values = [float(w) for w in weights[:experts]]
    if len(values) < experts:
        values += [1.0] * (experts - len(values))
    return None if all(v == 1.0 for v in values) else values


def share_table(rows: list[dict]) -> list[list]:
    return [[row["block"], *[round(v, 3) for k, v in row.items() if k != "block"]] for row in rows]


def region_map(state: dict | None, block: str, step: str) -> tuple:
    """Redraw the region map of the last routing record for one block/step (``"all"`` averages): (the image
    overlaid with each region's expert colour, upscaled to about :data:`REGION_MAP_SIDE` px; its legend as HTML)."""
    from PIL import Image

    from workbench.viz import expert_assignment, expert_region_map

    if not state:
        return None, ""
    chosen = {
        "batch_index": state["batch_index"],
        "block": None if block in (None, ALL) else int(block),
        "step": None if step in (None, ALL) else int(step),
    }
    with page_errors("Region map"):
        image = Image.open(state["image"]).convert("RGB")
        scale = max(1, -(-REGION_MAP_SIDE // max(image.size)))
        large = image.resize((image.width * scale, image.height * scale), Image.Resampling.LANCZOS)
        overlay = expert_region_map(state["record"], large, legend=False, **chosen)
        return overlay, region_legend(expert_assignment(state["record"], **chosen), state["record"])


def region_legend(assignment, record) -> str:
    """HTML legend of a region map: each expert's colour swatch and share of the image tokens that chose it."""
    import numpy as np

    from workbench.viz import expert_colour

    experts = int(record.entries[0]["gates"].shape[-1])
    shares = np.bincount(assignment.ravel(), minlength=experts) / assignment.size
    items = []
    for expert in range(experts):
        r, g, b = expert_colour(expert)
        items.append(
            f'<span style="display:inline-flex;align-items:center;margin:2px 14px 2px 0">'
            f'<span style="width:16px;height:16px;border-radius:3px;margin-right:6px;background:rgb({r},{g},{b})">'
            f"</span>Expert {expert}: {100 * shares[expert]:.0f}%</span>"
        )
    return f'<div class="wb-region-legend">{"".join(items)}</div>'


def build(wb: Workbench, t2i: SamplingControls, last_seed: gr.State) -> ExpertsTab:
    """Build the tab inside the current ``gr.Tab`` and wire its events; ``t2i`` supplies prompt and settings."""
    experts = wb.pipe.num_experts
    notice = gr.Markdown(DENSE_NOTICE, visible=experts == 0)
    with gr.Column(visible=experts > 0) as panel:
        gr.Markdown(
            "Scale each expert's routing probability (0 = never chosen, 1 = as trained), or sharpen/flatten the "
            "router with its temperature, then generate with the prompt and settings of **Text → Image**. A seed of "
            "−1 there reuses the last seed used, so the images compare."
        )
        with gr.Row():
            with gr.Column(scale=1):
                weights = [
                    gr.Slider(
                        0,
                        2,
                        value=1.0,
                        step=0.05,
                        label=f"Expert {i} weight",
                        visible=i < experts,
                        elem_id=f"expert-weight-{i}",
                    )
                    for i in range(MAX_EXPERT_SLIDERS)
                ]
                temperature = gr.Slider(0.1, 5.0, value=1.0, step=0.05, label="Router temperature")
                with gr.Row():
                    reset = gr.Button("Reset to trained routing", elem_id="experts-reset")
                    generate = gr.Button("Generate with these weights", variant="primary", elem_id="experts-generate")
                    stop = stop_button("experts-stop")
                status = gr.HTML("", elem_id="experts-status")
            with gr.Column(scale=1):
                with gr.Row():
                    image = gr.Image(
                        label="Image",
                        type="filepath",
                        format="png",
                        interactive=False,
                        height=320,
                        elem_id="experts-image",
                        elem_classes=[UPSCALE],
                    )
                    region = gr.Image(
                        label="Expert per region",
                        interactive=False,
                        height=360,
                        elem_id="experts-region-map",
                        elem_classes=[UPSCALE],
                    )
                legend = gr.HTML("", elem_id="experts-region-legend")
                with gr.Row():
                    block = gr.Dropdown([ALL], value=ALL, label="Region map: block")
                    step = gr.Dropdown([ALL], value=ALL, label="Region map: step")
        usage = gr.Plot(label="Expert usage by block and step")
        shares = gr.Dataframe(
            headers=["block", *(f"expert_{e}" for e in range(experts)), "entropy"],
            label="Mean routing share per block",
            interactive=False,
        )
    routing = gr.State(None)

    @GPU
    @sampling_parameters
    def run(
        request: gr.Request,
        prompt: str,
        settings: SamplingValues,
        previous_seed: int | None,
        router_temperature: float,
        *weight_values: float,
    ) -> Iterator[dict]:
        yield from with_messages(
            status, steered(request, prompt, settings, previous_seed, router_temperature, weight_values)
        )

    def steered(request, prompt, settings, previous_seed, router_temperature, weight_values) -> Iterator[dict]:
        from workbench.viz import conditional_indices, expert_share_per_block, expert_usage_heatmap

        with page_errors("Experts"):
            if wb.pipe.num_experts == 0:
                raise ValueError("this model has no experts: load a Mixture-of-Experts model in the Model tab")
            kwargs = settings.kwargs(seed=resolve_seed(settings.seed, previous_seed), batch_count=1)
            kwargs.update(
                expert_weights=expert_weights(list(weight_values), wb.pipe.num_experts),
                router_temperature=float(router_temperature),
                record_routing=True,
            )
            total = kwargs["num_inference_steps"]
            live, line = LivePreview(wb.pipe), ProgressLine(total)
            yield {status: progress_html(0, "Starting…")}
            try:
                work = lambda callback: wb.pipe(prompt, callback=live.wrap(callback), **kwargs)  # noqa: E731
                for event in wb.stream(run_key(request, TAB), work, total, preview=False):
                    if isinstance(event, Step):
                        update: dict = {status: line.html(event.index + 1)}
                        if (images := live.images()) is not None:
                            update[image] = images[0]
                        yield update
                        continue
                    out = event.result
                    result = publish(wb, out, "experts")[0]
                    index = conditional_indices(out.routing, 1)[0]
                    state = {"record": out.routing, "image": result["path"], "batch_index": index}
                    rows = expert_share_per_block(out.routing, batch_index=index)
                    headers = list(rows[0].keys())
                    done = (
                        f"Done: seed {result['seed']}, expert weights {kwargs['expert_weights'] or 'as trained'}, "
                        f"router temperature {router_temperature:g}."
                    )
                    yield {
                        image: result["path"],
                        **dict(zip((region, legend), region_map(state, ALL, ALL))),
                        usage: expert_usage_heatmap(out.routing, batch_index=index),
                        shares: gr.update(value=share_table(rows), headers=headers),
                        block: gr.update(choices=[ALL, *map(str, out.routing.blocks())], value=ALL),
                        step: gr.update(choices=[ALL, *map(str, out.routing.steps())], value=ALL),
                        routing: state,
                        last_seed: result["seed"],
                        status: message_html(done, "info"),
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
        [*t2i.inputs(), last_seed, temperature, *weights],
        [image, region, legend, usage, shares, block, step, routing, last_seed, status],
    )
    reset.click(
        lambda: [1.0] * (MAX_EXPERT_SLIDERS + 1), None, [*weights, temperature], queue=False, api_visibility="private"
    )
    gr.on(
        [block.input, step.input],
        region_map,
        [routing, block, step],
        [region, legend],
        queue=False,
        api_visibility="private",
    )
    return ExpertsTab(notice, panel, weights, temperature, generate, image, region, usage, shares, block, step, status)
