"""The sampling controls shared by the Text → Image and Image → Image tabs, and their values as pipeline arguments.

Widget values map to :meth:`workbench.Pipeline.__call__` arguments with :func:`generation_kwargs`: seed −1 means a
random seed; dynamic thresholding 0 means off; an empty skip-layer list means no skip-layer guidance; width and
height are multiples of 16 bounded by the model's position table (``pipe.max_image_side``). Handlers take those
values as one :class:`SamplingValues` argument; the :func:`sampling_parameters` decorator spreads it into the named
parameters that Gradio's API shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import gradio as gr

from workbench import Pipeline
from workbench.settings import MAX_SEED, SKIP_LAYER_DEFAULTS, default_value, parse_block_list, setting
from workbench.ui.params import Handler, spread_fields

SIZE_STEP = 16
MAX_BATCH = 8


@dataclass(frozen=True)
class SamplingValues:
    """The values of :meth:`SamplingControls.settings` as one handler argument (see :func:`sampling_parameters`)."""

    negative_prompt: str
    steps: int
    guidance_scale: float
    width: int
    height: int
    seed: int
    batch_count: int
    sampler: str
    shift: float
    flow_temperature: float
    dynamic_thresholding: float
    guidance_interval_low: float
    guidance_interval_high: float
    skip_layers: str
    skip_layer_scale: float
    skip_layer_start: float
    skip_layer_stop: float
    layout_guidance: float
    layout_control: float

    def kwargs(self, **overrides: Any) -> dict:
        """:func:`generation_kwargs` of these values, ``overrides`` (such as ``batch_count=1``) replacing fields;
        raises ValueError on bad values."""
        return generation_kwargs(**vars(replace(self, **overrides)))


def sampling_defaults(pipe: Pipeline) -> SamplingValues:
    """The API endpoints' default settings (:mod:`workbench.settings`' defaults with the model's own): no negative
    prompt, seed −1 (random), one image."""

    def default(name: str):
        return default_value(name, pipe.defaults)

    low, high = default("guidance_interval")
    return SamplingValues(
        negative_prompt=default("negative_prompt"),
        steps=default("num_inference_steps"),
        guidance_scale=default("guidance_scale"),
        width=default("width"),
        height=default("height"),
        seed=-1,
        batch_count=default("num_images"),
        sampler=default("sampler"),
        shift=default("shift"),
        flow_temperature=default("flow_temperature"),
        dynamic_thresholding=0.0,
        guidance_interval_low=low,
        guidance_interval_high=high,
        skip_layers="",
        skip_layer_scale=SKIP_LAYER_DEFAULTS["scale"],
        skip_layer_start=SKIP_LAYER_DEFAULTS["start"],
        skip_layer_stop=SKIP_LAYER_DEFAULTS["stop"],
        layout_guidance=default("layout_guidance"),
        layout_control=default("layout_control"),
    )


def _interval(pipe: Pipeline) -> tuple[float, float]:
    return default_value("guidance_interval", pipe.defaults)


_spread_settings = spread_fields(SamplingValues, "settings")


def sampling_parameters(fn: Handler) -> Handler:
    """Decorator for a handler with a parameter ``settings: SamplingValues``: Gradio sees the widget values of
    :meth:`SamplingControls.settings` in its place (see :func:`workbench.ui.params.spread_fields`); they default to
    the fields of ``settings``'s default (such as :func:`sampling_defaults`) when it has one."""
    return _spread_settings(fn)


@dataclass
class SamplingControls:
    """Components of one tab's prompt and sampler settings, in the order of :meth:`inputs`."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    steps: gr.Slider
    guidance_scale: gr.Slider
    width: gr.Slider
    height: gr.Slider
    seed: gr.Number
    batch_count: gr.Slider
    sampler: gr.Dropdown
    shift: gr.Slider
    flow_temperature: gr.Slider
    dynamic_thresholding: gr.Slider
    guidance_interval_low: gr.Slider
    guidance_interval_high: gr.Slider
    skip_layers: gr.Textbox
    skip_layer_scale: gr.Slider
    skip_layer_start: gr.Slider
    skip_layer_stop: gr.Slider
    layout_guidance: gr.Slider
    layout_control: gr.Slider
    reuse_seed: gr.Button
    random_seed: gr.Button

    def settings(self) -> list[gr.components.Component]:
        """Everything after the prompt, in the order of :class:`SamplingValues` (and :func:`generation_kwargs`)."""
        return [getattr(self, field.name) for field in fields(SamplingValues)]

    def inputs(self) -> list[gr.components.Component]:
        return [self.prompt, *self.settings()]

    def model_updates(self, pipe: Pipeline, reset_values: bool) -> dict:
        """Updates for a newly loaded model: size bounds always, defaults too when ``reset_values``."""
        d, side = pipe.defaults, pipe.max_image_side
        values = reset_values
        low, high = _interval(pipe)
        return {
            self.prompt: gr.update(value=d.prompt) if values else gr.update(),
            self.negative_prompt: gr.update(value=d.negative_prompt) if values else gr.update(),
            self.steps: gr.update(value=d.num_inference_steps) if values else gr.update(),
            self.guidance_scale: gr.update(value=d.guidance_scale) if values else gr.update(),
            self.width: gr.update(maximum=side, **({"value": min(d.width, side)} if values else {})),
            self.height: gr.update(maximum=side, **({"value": min(d.height, side)} if values else {})),
            self.sampler: gr.update(value=d.sampler) if values else gr.update(),
            self.shift: gr.update(value=d.shift) if values else gr.update(),
            self.guidance_interval_low: gr.update(value=low) if values else gr.update(),
            self.guidance_interval_high: gr.update(value=high) if values else gr.update(),
            self.skip_layers: gr.update(
                placeholder=f"off; block indices 0–{len(pipe.transformer.transformer_blocks) - 1}, e.g. 7,8,9"
            ),
        }


def sampling_controls(
    pipe: Pipeline, prefix: str, prompt_lines: int = 2, prompt_side: Sequence[gr.components.Component] = ()
) -> SamplingControls:
    """Build the prompt box, the negative prompt, the everyday settings (steps, guidance, size, seed, batch count)
    and the "More" accordion with the rest inside the current layout. ``prompt_side``: components created with
    ``render=False`` (such as Generate and Stop) to show in a column beside the prompt. ``prefix`` namespaces the
    ``elem_id`` of each widget (for tests and styling)."""
    d = pipe.defaults
    side = pipe.max_image_side
    with gr.Row(equal_height=True):
        prompt = gr.Textbox(label="Prompt", value=d.prompt, lines=prompt_lines, elem_id=f"{prefix}-prompt", scale=4)
        if prompt_side:
            with gr.Column(scale=1, min_width=140):
                for component in prompt_side:
                    component.render()
    negative = gr.Textbox(label="Negative prompt", value=d.negative_prompt, lines=1, elem_id=f"{prefix}-negative")
    with gr.Row():
        steps = gr.Slider(1, 150, value=d.num_inference_steps, step=1, label="Steps", elem_id=f"{prefix}-steps")
        guidance = gr.Slider(0, 20, value=d.guidance_scale, step=0.1, label="Guidance (CFG)")
    with gr.Row():
        width = gr.Slider(SIZE_STEP, side, value=min(d.width, side), step=SIZE_STEP, label="Width")
        height = gr.Slider(SIZE_STEP, side, value=min(d.height, side), step=SIZE_STEP, label="Height")
    with gr.Row(equal_height=True):
        seed = gr.Number(
            value=-1,
            precision=0,
            minimum=-1,
            maximum=MAX_SEED,
            label="Seed (−1 = random)",
            elem_id=f"{prefix}-seed",
        )
        random_seed = gr.Button("Random", scale=0, min_width=70, elem_id=f"{prefix}-random-seed")
        reuse_seed = gr.Button("Reuse last", scale=0, min_width=90, elem_id=f"{prefix}-reuse-seed")
        batch = gr.Slider(1, MAX_BATCH, value=1, step=1, label="Batch count", elem_id=f"{prefix}-batch")
    with gr.Accordion("More", open=False, elem_id=f"{prefix}-settings"):
        with gr.Row():
            sampler = gr.Dropdown(list(setting("sampler").choices), value=d.sampler, label="Sampler")
            shift = gr.Slider(0.1, 10, value=d.shift, step=0.1, label="Shift")
        with gr.Row():
            flow_temperature = gr.Slider(
                0.5, 1.5, value=default_value("flow_temperature"), step=0.01, label="Flow temperature (noise scale)"
            )
            dynamic = gr.Slider(0, 1, value=0, step=0.005, label="Dynamic thresholding ratio (0 = off)")
        low, high = _interval(pipe)
        with gr.Row():
            interval_low = gr.Slider(0, 1, value=low, step=0.01, label="Guidance interval: lowest σ")
            interval_high = gr.Slider(0, 1, value=high, step=0.01, label="Guidance interval: highest σ")
        with gr.Row():
            skip_layers = gr.Textbox(
                value="",
                label="Skip-layer guidance: blocks",
                placeholder=f"off; block indices 0–{len(pipe.transformer.transformer_blocks) - 1}, e.g. 7,8,9",
                elem_id=f"{prefix}-skip-layers",
            )
            skip_scale = gr.Slider(0, 10, value=SKIP_LAYER_DEFAULTS["scale"], step=0.1, label="SLG scale")
            skip_start = gr.Slider(0, 1, value=SKIP_LAYER_DEFAULTS["start"], step=0.01, label="SLG start")
            skip_stop = gr.Slider(0, 1, value=SKIP_LAYER_DEFAULTS["stop"], step=0.01, label="SLG stop")
        with gr.Row():
            layout = gr.Slider(
                0,
                1,
                value=d.layout_guidance,
                step=0.01,
                label="Layout guidance (0 = off)",
                info="steer each object's words to where the caption's planned layout puts it",
                elem_id=f"{prefix}-layout-guidance",
            )
            layout_control = gr.Slider(
                0,
                2,
                value=d.layout_control,
                step=0.05,
                label="Layout control (0 = off)",
                info="draw the caption's planned layout through the model's layout ControlNet",
                elem_id=f"{prefix}-layout-control",
            )
    random_seed.click(lambda: -1, None, seed, queue=False, api_visibility="private")
    return SamplingControls(
        prompt,
        negative,
        steps,
        guidance,
        width,
        height,
        seed,
        batch,
        sampler,
        shift,
        flow_temperature,
        dynamic,
        interval_low,
        interval_high,
        skip_layers,
        skip_scale,
        skip_start,
        skip_stop,
        layout,
        layout_control,
        reuse_seed,
        random_seed,
    )


def _int(name: str, value: float | int | None) -> int:
    if value is None or float(value) != int(float(value)):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(float(value))


def generation_kwargs(
    negative_prompt: str = "",
    steps: float = 20,
    guidance_scale: float = 4.0,
    width: float = 128,
    height: float = 128,
    seed: float = -1,
    batch_count: float = 1,
    sampler: str = "euler",
    shift: float = 1.0,
    flow_temperature: float = 1.0,
    dynamic_thresholding: float = 0.0,
    guidance_interval_low: float = 0.0,
    guidance_interval_high: float = 1.0,
    skip_layers: str = "",
    skip_layer_scale: float = SKIP_LAYER_DEFAULTS["scale"],
    skip_layer_start: float = SKIP_LAYER_DEFAULTS["start"],
    skip_layer_stop: float = SKIP_LAYER_DEFAULTS["stop"],
    layout_guidance: float = 0.0,
    layout_control: float = 0.0,
) -> dict:
    """Widget values → keyword arguments of the pipeline call (names as in :meth:`workbench.Pipeline.__call__`)."""
    seed_value = _int("seed", seed)
    ratio = float(dynamic_thresholding or 0.0)
    layers = parse_block_list("skip_layers", skip_layers)
    return {
        "negative_prompt": negative_prompt or "",
        "num_inference_steps": _int("steps", steps),
        "guidance_scale": float(guidance_scale),
        "width": _int("width", width),
        "height": _int("height", height),
        "seed": None if seed_value < 0 else seed_value,
        "num_images": _int("batch_count", batch_count),
        "sampler": sampler,
        "shift": float(shift),
        "flow_temperature": float(flow_temperature),
        "dynamic_thresholding_ratio": ratio if ratio > 0 else None,
        "guidance_interval": (float(guidance_interval_low), float(guidance_interval_high)),
        "skip_guidance_layers": layers or None,
        "skip_layer_guidance_scale": float(skip_layer_scale),
        "skip_layer_guidance_start": float(skip_layer_start),
        "skip_layer_guidance_stop": float(skip_layer_stop),
        "layout_guidance": float(layout_guidance),
        "layout_control": float(layout_control),
    }


SAMPLER_ALIASES = {"euler": "euler", "heun": "heun", "dpm++ 2m": "dpmpp_2m", "dpmpp_2m": "dpmpp_2m"}


def _clamp_size(value: int, side: int) -> int:
    return max(SIZE_STEP, min(side, round(value / SIZE_STEP) * SIZE_STEP))


def parameters_to_settings(params: dict, pipe: Pipeline) -> dict[str, object]:
    """A parsed ``parameters`` chunk (:func:`workbench.metadata.read_parameters`) → widget values by
    :class:`SamplingControls` field name. Keys the chunk lacks take the model's defaults; sizes are brought into the
    model's range (multiples of 16 up to ``pipe.max_image_side``); samplers of other tools map to ours by name."""
    d = pipe.defaults
    sampler = SAMPLER_ALIASES.get(str(params.get("sampler", d.sampler)).lower(), d.sampler)
    side = pipe.max_image_side
    interval = params.get("guidance_interval") or (0.0, 1.0)  # absent: guidance at every step, as other tools do
    return {
        "prompt": str(params.get("prompt", "")),
        "negative_prompt": str(params.get("negative_prompt", "")),
        "steps": int(params.get("steps", d.num_inference_steps)),
        "guidance_scale": float(params.get("guidance_scale", d.guidance_scale)),
        "width": _clamp_size(int(params.get("width", d.width)), side),
        "height": _clamp_size(int(params.get("height", d.height)), side),
        "seed": int(params.get("seed", -1)),
        "batch_count": 1,
        "sampler": sampler,
        "shift": float(params.get("shift", d.shift)),
        "flow_temperature": float(params.get("flow_temperature") or 1.0),
        "dynamic_thresholding": float(params.get("dynamic_thresholding_ratio") or 0.0),
        "guidance_interval_low": float(interval[0]),
        "guidance_interval_high": float(interval[1]),
        "skip_layers": ",".join(str(i) for i in params.get("skip_guidance_layers") or []),
        "skip_layer_scale": float(params.get("skip_layer_guidance_scale", SKIP_LAYER_DEFAULTS["scale"])),
        "skip_layer_start": float(params.get("skip_layer_guidance_start", SKIP_LAYER_DEFAULTS["start"])),
        "skip_layer_stop": float(params.get("skip_layer_guidance_stop", SKIP_LAYER_DEFAULTS["stop"])),
        "layout_guidance": float(params.get("layout_guidance") or 0.0),
        "layout_control": float(params.get("layout_control") or 0.0),
    }
