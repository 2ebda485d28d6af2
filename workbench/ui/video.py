"""Video frames tab: frame sequences made by the image model (:mod:`workbench.frames`: prompt travel, seed walk,
loopback image→image), played as MP4 or GIF and offered as files with the PNG frames; API ``/frames``.

``workbench.frames`` is imported inside the handlers only, so the rest of the app works without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields

import gradio as gr

from workbench import GenerationCancelled, Pipeline
from workbench.flow import img2img_start
from workbench.ui.live import LivePreview, ProgressLine, progress_html
from workbench.ui.params import Handler, spread_fields
from workbench.ui.runs import message_html, run_key, stop_button, wire_run, with_messages
from workbench.ui.session import GPU, MODEL_CONCURRENCY, Step, Workbench, page_errors
from workbench.ui.style import UPSCALE

TAB = "frames"

MODES = ("auto", "travel", "walk", "loopback")
EASINGS = ("linear", "cosine")
FORMATS = ("mp4", "gif")
DEFAULT_FRAMES = 12
DEFAULT_FPS = 8
DEFAULT_LOOPBACK_STRENGTH = 0.35
HELP = (
    "One key prompt per line. **travel** moves the text conditioning from prompt to prompt with one seed's noise "
    "(needs 2 or more prompts); **walk** moves the starting noise between seeds for one prompt (seeds `0, 5, 9`, or "
    "one seed s for s → s+1); **loopback** feeds each frame back through image → image; **auto** travels with "
    "several prompts and walks with one."
)


@dataclass(frozen=True)
class FramesValues:
    """The values of :meth:`FramesTab.inputs` after the prompts, as one handler argument (spread into one parameter
    each by :func:`frames_parameters`)."""

    negative_prompt: str
    mode: str
    num_frames: int
    fps: float
    seed: str
    loopback_strength: float
    easing: str
    video_format: str
    steps: int
    guidance_scale: float
    width: int
    height: int

    def request(self, prompt: str) -> dict:
        """:func:`frames_request` of ``prompt`` and these values (raises ValueError on bad ones)."""
        values = {k: v for k, v in vars(self).items() if k not in ("fps", "video_format")}
        return frames_request(prompt, **values)


def frames_defaults(pipe: Pipeline) -> FramesValues:
    """The ``/frames`` endpoint's defaults: the tab's, with the model's steps, guidance and size."""
    d = pipe.defaults
    return FramesValues(
        negative_prompt="",
        mode="auto",
        num_frames=DEFAULT_FRAMES,
        fps=DEFAULT_FPS,
        seed="0",
        loopback_strength=DEFAULT_LOOPBACK_STRENGTH,
        easing="linear",
        video_format="mp4",
        steps=d.num_inference_steps,
        guidance_scale=d.guidance_scale,
        width=d.width,
        height=d.height,
    )


_spread_values = spread_fields(FramesValues, "values")


def frames_parameters(fn: Handler) -> Handler:
    """Decorator for a handler with a parameter ``values: FramesValues``: Gradio sees the twelve widget values of
    :class:`FramesValues` in its place (see :func:`workbench.ui.params.spread_fields`); they default to the fields of
    ``values``'s default (such as :func:`frames_defaults`) when it has one."""
    return _spread_values(fn)


@dataclass
class FramesTab:
    prompts: gr.Textbox
    negative_prompt: gr.Textbox
    mode: gr.Radio
    num_frames: gr.Slider
    fps: gr.Slider
    seed: gr.Textbox
    loopback_strength: gr.Slider
    easing: gr.Dropdown
    video_format: gr.Radio
    steps: gr.Slider
    guidance_scale: gr.Slider
    width: gr.Slider
    height: gr.Slider
    generate: gr.Button
    video: gr.Video
    gif: gr.Image
    file: gr.File
    gallery: gr.Gallery
    consistency: gr.Markdown
    status: gr.HTML

    def inputs(self) -> list:
        """The prompts, then the widgets of :class:`FramesValues` in its order."""
        return [self.prompts, *(getattr(self, field.name) for field in fields(FramesValues))]

    def model_updates(self, pipe: Pipeline, reset_values: bool) -> dict:
        d, side = pipe.defaults, pipe.max_image_side
        values = reset_values
        return {
            self.prompts: gr.update(value=d.prompt) if values else gr.update(),
            self.steps: gr.update(value=d.num_inference_steps) if values else gr.update(),
            self.guidance_scale: gr.update(value=d.guidance_scale) if values else gr.update(),
            self.width: gr.update(maximum=side, **({"value": min(d.width, side)} if values else {})),
            self.height: gr.update(maximum=side, **({"value": min(d.height, side)} if values else {})),
        }


def parse_seeds(text: str | int | float) -> int | list[int]:
    """``"7"`` → 7; ``"0, 5, 9"`` → [0, 5, 9]."""
    parts = [p for p in str(text).replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    try:
        seeds = [int(float(p)) for p in parts]
    except ValueError as err:
        raise ValueError(f"seed must be an integer or comma-separated integers, got {text!r}") from err
    if not seeds:
        raise ValueError("seed must be an integer or comma-separated integers, got nothing")
    return seeds[0] if len(seeds) == 1 else seeds


def frames_request(
    prompt: str,
    negative_prompt: str,
    mode: str,
    num_frames: float,
    seed: str | int,
    loopback_strength: float,
    easing: str,
    steps: float,
    guidance_scale: float,
    width: float,
    height: float,
) -> dict:
    """Widget values → keyword arguments of ``make_frames`` (prompts one per non-empty line; mode "auto" travels
    with several prompts and walks with one)."""
    prompts = [line.strip() for line in str(prompt).splitlines() if line.strip()]
    if not prompts:
        raise ValueError("prompt: give at least one prompt (one per line)")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "auto":
        mode = "travel" if len(prompts) > 1 else "walk"
    return {
        "prompts": prompts,
        "mode": mode,
        "num_frames": int(num_frames),
        "seed": parse_seeds(seed),
        "loopback_strength": float(loopback_strength),
        "easing": easing,
        "negative_prompt": negative_prompt or "",
        "num_inference_steps": int(steps),
        "guidance_scale": float(guidance_scale),
        "width": int(width),
        "height": int(height),
    }


def frame_steps(request: dict) -> list[int]:
    """Sampler steps of each frame (loopback frames after the first run only the strength's share)."""
    steps, frames = request["num_inference_steps"], request["num_frames"]
    if request["mode"] != "loopback":
        return [steps] * frames
    return [steps] + [steps - img2img_start(steps, request["loopback_strength"])] * (frames - 1)


def total_steps(request: dict) -> int:
    """Sampler steps of the whole sequence."""
    return sum(frame_steps(request))


def render(wb: Workbench, request: dict, video_format: str, fps: float, step_callback=None):
    """Run ``make_frames`` and save PNG frames plus the video; returns (sequence, video path, PNG paths)."""
    from workbench.frames import make_frames

    if video_format not in FORMATS:
        raise ValueError(f"video_format must be one of {FORMATS}, got {video_format!r}")
    sequence = make_frames(wb.pipe, step_callback=step_callback, **request)
    folder = wb.new_folder("frames")
    paths = sequence.save(folder, video_path=folder / f"frames.{video_format}", fps=float(fps))
    return sequence, str(paths[-1]), [str(p) for p in paths[:-1]]


def api_function(wb: Workbench):
    """The plain ``/frames`` endpoint: returns (video or GIF file, gallery of PNG frames, consistency line)."""
    defaults = frames_defaults(wb.pipe)

    @GPU
    @frames_parameters
    def frames(prompt: str, values: FramesValues = defaults) -> tuple[str, list[tuple[str, str]], str]:
        """A frame sequence from one or more prompts (one per line); see the tab's help for the modes."""
        from workbench.frames import format_consistency

        with page_errors("Video frames"):
            request = values.request(prompt)
            with wb.lock:
                sequence, video, pngs = render(wb, request, values.video_format, values.fps)
        return video, [(p, f"frame {i}") for i, p in enumerate(pngs)], format_consistency(sequence.consistency)

    return frames


def build(wb: Workbench) -> FramesTab:
    """Build the tab inside the current ``gr.Tab`` and wire its events."""
    d, side = wb.pipe.defaults, wb.pipe.max_image_side
    with gr.Row():
        with gr.Column(scale=1):
            gr.Markdown(HELP)
            prompts = gr.Textbox(label="Prompts (one per line)", value=d.prompt, lines=4, elem_id="frames-prompts")
            negative = gr.Textbox(label="Negative prompt", value=d.negative_prompt)
            mode = gr.Radio(list(MODES), value="auto", label="Mode")
            with gr.Row():
                num_frames = gr.Slider(2, 96, value=DEFAULT_FRAMES, step=1, label="Frames", elem_id="frames-num")
                fps = gr.Slider(1, 30, value=DEFAULT_FPS, step=1, label="Frames per second")
            with gr.Row():
                seed = gr.Textbox(value="0", label="Seed (walk: several, comma-separated)")
                easing = gr.Dropdown(list(EASINGS), value="linear", label="Easing")
                video_format = gr.Radio(list(FORMATS), value="mp4", label="Format", elem_id="frames-format")
            loopback_strength = gr.Slider(
                0.05, 1.0, value=DEFAULT_LOOPBACK_STRENGTH, step=0.05, label="Loopback strength"
            )
            with gr.Accordion("Settings", open=False, elem_id="frames-settings"):
                with gr.Row():
                    steps = gr.Slider(
                        1, 150, value=d.num_inference_steps, step=1, label="Steps", elem_id="frames-steps"
                    )
                    guidance = gr.Slider(0, 20, value=d.guidance_scale, step=0.1, label="Guidance (CFG)")
                with gr.Row():
                    width = gr.Slider(16, side, value=min(d.width, side), step=16, label="Width")
                    height = gr.Slider(16, side, value=min(d.height, side), step=16, label="Height")
            with gr.Row():
                generate = gr.Button("Make frames", variant="primary", elem_id="frames-generate")
                stop = stop_button("frames-stop")
        with gr.Column(scale=1):
            status = gr.HTML("", elem_id="frames-status")
            preview = gr.Image(
                label="Live preview (x̂0)",
                interactive=False,
                visible=False,
                height=320,
                elem_id="frames-preview",
                elem_classes=[UPSCALE],
            )
            video = gr.Video(
                label="Video", interactive=False, loop=True, autoplay=True, height=320, elem_id="frames-video"
            )
            gif = gr.Image(
                label="GIF", interactive=False, visible=False, height=320, elem_id="frames-gif", elem_classes=[UPSCALE]
            )
            file = gr.File(label="Download", interactive=False)
            consistency = gr.Markdown("", label="Consistency")
            gallery = gr.Gallery(
                label="Frames (PNG with parameters)", format="png", columns=6, height="auto", elem_id="frames-gallery"
            )

    tab = FramesTab(
        prompts,
        negative,
        mode,
        num_frames,
        fps,
        seed,
        loopback_strength,
        easing,
        video_format,
        steps,
        guidance,
        width,
        height,
        generate,
        video,
        gif,
        file,
        gallery,
        consistency,
        status,
    )

    @GPU
    @frames_parameters
    def run(prompt: str, values: FramesValues, request: gr.Request) -> Iterator[dict]:
        yield from with_messages(status, make(prompt, values, request))

    def make(prompt: str, values: FramesValues, request: gr.Request) -> Iterator[dict]:
        from workbench.frames import format_consistency

        with page_errors("Video frames"):
            frames = values.request(prompt)
            live, line = LivePreview(wb.pipe), ProgressLine(total_steps(frames), frame_steps(frames))
            yield {status: progress_html(0, "Starting…")}
            work = lambda callback: render(wb, frames, values.video_format, values.fps, live.wrap(callback))  # noqa: E731
            try:
                for event in wb.stream(run_key(request, TAB), work, total_steps(frames), preview=False):
                    if isinstance(event, Step):
                        update: dict = {status: line.html(event.index + 1)}
                        if (images := live.images()) is not None:
                            update[preview] = gr.update(value=images[0], visible=True)
                        yield update
                        continue
                    sequence, path, pngs = event.result
                    is_mp4 = values.video_format == "mp4"
                    yield {
                        preview: gr.update(value=None, visible=False),
                        video: gr.update(value=path if is_mp4 else None, visible=is_mp4),
                        gif: gr.update(value=None if is_mp4 else path, visible=not is_mp4),
                        file: path,
                        gallery: [(p, f"frame {i}") for i, p in enumerate(pngs)],
                        consistency: f"Consistency: {format_consistency(sequence.consistency)}",
                        status: message_html(f"Done: {len(pngs)} frames, mode {frames['mode']}.", "info"),
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
        tab.inputs(),
        [preview, status, video, gif, file, gallery, consistency],
    )
    gr.on(
        [],
        api_function(wb),
        tab.inputs(),
        [file, gallery, consistency],
        api_name="frames",
        concurrency_id=MODEL_CONCURRENCY,
    )
    return tab
