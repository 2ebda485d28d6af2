"""The ControlNet section of the Text → Image and Image → Image tabs (one accordion, built by :func:`controlnet_panel`
in both): a control image (uploaded, or drawn in the editor), a preprocessor (:mod:`workbench.preprocess`) with a
live preview of what the ControlNet will see, the ControlNet (by name, from :class:`ControlNetLibrary`), and the
conditioning scale and start / end fractions (their ranges and defaults from :mod:`workbench.settings`).

Which ControlNets: the operator's (``--controlnet``, ``--controlnet-dir``, the shipped ``models/shapesworld-
controlnet*``; :class:`workbench.ui.hosting.Catalog`), of those only the ones that fit the loaded transformer (read
from their config, without loading weights; the others are skipped with a log line). Visitors choose by name only,
in public mode too: a ControlNet changes the request, not the shared model.

A request with a control image and a ControlNet attaches that ControlNet to the pipeline for that request only
(:meth:`ControlNetLibrary.attached`; its preprocessor recorded, so that the PNG ``parameters`` carry it) and
detaches it afterwards, whatever happens. Model requests run one at a time (one queue concurrency group,
:data:`workbench.ui.session.MODEL_CONCURRENCY`), so no other request sees it. Without a control image (nothing
uploaded, or a blank canvas) nothing changes. The last ControlNet used stays loaded for the next request.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from workbench import Pipeline
from workbench.controlnet import ControlNetEntry, build_controlnet, check_compatible, file_sha256
from workbench.formats.controlnet import convert_original, infer_config, is_original_layout, read_controlnet
from workbench.formats.files import ModelFormatError, read_json
from workbench.models.controlnet import ControlNetConfig, SD3ControlNet
from workbench.preprocess import PREPROCESSORS, preprocess
from workbench.settings import Setting, setting
from workbench.ui.params import Handler, spread_fields
from workbench.ui.session import Workbench, page_errors

LOG = logging.getLogger("workbench.ui")
NONE = "none"
DEFAULT_PREPROCESSOR = "canny"
SCALE, START, END = (
    setting("controlnet_conditioning_scale"),
    setting("control_guidance_start"),
    setting("control_guidance_end"),
)
LABELS = {"controlnet_conditioning_scale": "ControlNet scale", "control_guidance_start": "ControlNet start",
          "control_guidance_end": "ControlNet end"}  # fmt: skip


# ----------------------------------------------------------------------------------------------------- values


@dataclass(frozen=True)
class ControlValues:
    """The section's widget values as one handler argument (see :func:`control_parameters`). ``control_image`` is
    the editor's value (``{"background", "layers", "composite"}``) or an image; ``controlnet`` a name or
    :data:`NONE`."""

    control_image: dict | None
    preprocessor: str
    controlnet: str
    controlnet_conditioning_scale: float
    control_guidance_start: float
    control_guidance_end: float


CONTROL_DEFAULTS = ControlValues(None, DEFAULT_PREPROCESSOR, NONE, SCALE.default, START.default, END.default)
"""The API endpoints' defaults: no control image, so no ControlNet."""

_spread_control = spread_fields(ControlValues, "control")


def control_parameters(fn: Handler) -> Handler:
    """Decorator for a handler with a parameter ``control: ControlValues``: Gradio sees the section's widget values
    (:meth:`ControlNetPanel.inputs`) in its place, defaulting to ``control``'s default when it has one."""
    return _spread_control(fn)


def control_picture(value: dict | Image.Image | None) -> Image.Image | None:
    """The control image of the editor's value, RGB (drawn strokes on a transparent canvas over white); None when
    there is none: nothing uploaded or drawn, or a canvas of one colour."""
    if isinstance(value, dict):
        image = value.get("composite") or value.get("background")
    else:
        image = value
    if image is None:
        return None
    if not isinstance(image, Image.Image):
        raise ValueError("control image: not an image")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(canvas, rgba)
    image = image.convert("RGB")
    if all(low == high for low, high in image.getextrema()):
        return None
    return image


def preview(value: dict | Image.Image | None, preprocessor: str) -> Image.Image | None:
    """What the ControlNet sees: :func:`workbench.preprocess.preprocess` of the control image (None without one)."""
    image = control_picture(value)
    return None if image is None else preprocess(image, _preprocessor(preprocessor))


def _preprocessor(name: str | None) -> str:
    name = name or NONE
    if name not in PREPROCESSORS:
        raise ValueError(f"ControlNet preprocessor: must be one of {', '.join(PREPROCESSORS)}, got {name!r}")
    return name


def _number(spec: Setting, value: float) -> float:
    label = LABELS[spec.name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{label} ({spec.name}): must be {spec.range_text}, got {value!r}")
    try:
        return float(spec.check(value))
    except ValueError:
        raise ValueError(f"{label} ({spec.name}): must be {spec.range_text}, got {value!r}") from None


@dataclass(frozen=True)
class ControlRequest:
    """One request's ControlNet: its ``name``, the ``preprocessor`` that made the control image, and the pipeline
    arguments (``control_image``, ``controlnet_conditioning_scale``, ``control_guidance_start`` / ``_end``)."""

    name: str
    preprocessor: str
    kwargs: dict


def control_request(wb: Workbench, library: ControlNetLibrary, values: ControlValues) -> ControlRequest | None:
    """The ControlNet of a request on ``wb``'s pipeline, or None without a control image (then the other values
    do not matter). ValueError naming the field for a control image without a ControlNet, a name that is not one
    of :meth:`ControlNetLibrary.available`, an image over the policy's pixel limit, a preprocessor or a number out
    of range."""
    pipe, max_pixels = wb.pipe, wb.policy.limits.max_image_pixels
    image = control_picture(values.control_image)
    if image is None:
        return None
    preprocessor = _preprocessor(values.preprocessor)
    numbers = {spec.name: _number(spec, getattr(values, spec.name)) for spec in (SCALE, START, END)}
    if numbers[START.name] >= numbers[END.name]:
        raise ValueError(
            f"ControlNet start and end: must satisfy 0 <= start < end <= 1, got start={numbers[START.name]:g}, "
            f"end={numbers[END.name]:g}"
        )
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ValueError(
            f"control image: {image.width}×{image.height} px is more than this app accepts "
            f"({max_pixels / 1e6:.1f} megapixels); send a smaller image"
        )
    name = (values.controlnet or "").strip() or NONE
    names = library.available(pipe)
    if name == NONE:
        if not names:
            raise ValueError("ControlNet: this app has no ControlNet for the loaded model; clear the control image")
        raise ValueError(
            f"ControlNet: choose one for the control image ({', '.join(names)}), or clear the control image"
        )
    if name not in names:
        shown = repr(name if len(name) <= 60 else name[:57] + "…")
        allowed = ", ".join(names) or "none available for the loaded model"
        raise ValueError(f"ControlNet: {shown} is not one of this app's ControlNets; choose one of: {allowed}")
    return ControlRequest(name, preprocessor, {"control_image": preprocess(image, preprocessor), **numbers})


# ---------------------------------------------------------------------------------------------------- library


def read_config(path: Path) -> ControlNetConfig:
    """The config of a ControlNet folder (``config.json``; also a pipeline folder's ``controlnet/``) or single
    ``.safetensors`` file (inferred from the tensor shapes in its header), without reading weights."""
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "controlnet").is_dir():
        path = path / "controlnet"
    if path.is_dir():
        return ControlNetConfig.from_dict(read_json(path / "config.json"))
    if not path.is_file() or path.suffix.lower() != ".safetensors":
        raise ModelFormatError(f"{path}: no such ControlNet folder or .safetensors file")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        state = {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
    if is_original_layout(state):
        state = convert_original(state, str(path))
    return infer_config(state, str(path))


class ControlNetLibrary:
    """The operator's ControlNets by name (``sources``: name → folder or file): which fit a pipeline, and the one
    attached to a request. Configs are read once; the last ControlNet used stays loaded."""

    def __init__(self, sources: Mapping[str, Path]) -> None:
        self.sources = dict(sources)
        self._configs: dict[str, ControlNetConfig | Exception] = {}
        self._available: tuple[weakref.ref, list[str]] | None = None
        self._loaded: tuple[weakref.ref, ControlNetEntry] | None = None
        self._lock = threading.Lock()

    def _config(self, name: str) -> ControlNetConfig:
        if name not in self._configs:
            try:
                self._configs[name] = read_config(self.sources[name])
            except Exception as err:  # noqa: BLE001 - any unreadable file is skipped with a log line
                self._configs[name] = err
        found = self._configs[name]
        if isinstance(found, Exception):
            raise found
        return found

    def available(self, pipe: Pipeline) -> list[str]:
        """The names of the ControlNets that fit ``pipe``'s transformer (:func:`workbench.controlnet.
        check_compatible` on the config); each other one is logged once per pipeline and left out."""
        with self._lock:
            if self._available is not None and self._available[0]() is pipe:
                return list(self._available[1])
            names = []
            for name in self.sources:
                try:
                    with torch.device("meta"):
                        model = SD3ControlNet(self._config(name))
                    check_compatible(model, pipe, name)
                except Exception as err:  # noqa: BLE001
                    LOG.info("ControlNet %r is not offered for %s: %s: %s", name, pipe.name, type(err).__name__, err)
                    continue
                names.append(name)
            self._available = (weakref.ref(pipe), names)
            return list(names)

    def entry(self, pipe: Pipeline, name: str, detailed: bool = False) -> ControlNetEntry:
        """The ControlNet ``name`` built for ``pipe`` (its device and dtype), loaded unless it was the last one
        used. ValueError when it cannot be loaded: the loader's message when ``detailed``, else only the name (the
        reason goes to the server log)."""
        with self._lock:
            if self._loaded is not None and self._loaded[0]() is pipe and self._loaded[1].name == name:
                return self._loaded[1]
            self._loaded = None  # one ControlNet in memory at a time
            path = self.sources[name]
            try:
                config, state, weights = read_controlnet(path, dtype=pipe.dtype)
                model = build_controlnet(config, state, str(path))
                check_compatible(model, pipe, name)
                files = [weights] if weights.is_file() else sorted(weights.glob("*.safetensors"))
                digest = file_sha256(files[0]) if len(files) == 1 else None
            except Exception as err:
                LOG.warning("ControlNet %r could not be loaded: %s: %s", name, type(err).__name__, err)
                if detailed and isinstance(err, ValueError):
                    raise ValueError(f"ControlNet: {err}") from None
                raise ValueError(f"ControlNet: {name!r} could not be loaded") from None
            entry = ControlNetEntry(name, model.to(pipe.device, pipe.dtype), 1.0, str(path), digest)
            self._loaded = (weakref.ref(pipe), entry)
            return entry

    @contextmanager
    def attached(self, wb: Workbench, request: ControlRequest | None) -> Iterator[None]:
        """Within the block, ``wb.pipe``'s ControlNets are ``request``'s alone (with its preprocessor); afterwards
        those it had before. Nothing happens for ``request`` None."""
        if request is None:
            yield
            return
        pipe = wb.pipe
        entry = replace(self.entry(pipe, request.name, wb.policy.free_paths), preprocessor=request.preprocessor)
        controlnets = pipe.controlnets
        with wb.lock:
            saved, controlnets.entries = controlnets.entries, {entry.name: entry}
        try:
            yield
        finally:
            with wb.lock:
                controlnets.entries = saved


# ------------------------------------------------------------------------------------------------------ panel


@dataclass
class ControlNetPanel:
    """The components of one tab's ControlNet section, in the order of :meth:`inputs`."""

    image: gr.ImageEditor
    preprocessor: gr.Radio
    preview: gr.Image
    controlnet: gr.Dropdown
    scale: gr.Slider
    start: gr.Slider
    end: gr.Slider
    library: ControlNetLibrary

    def inputs(self) -> list[gr.components.Component]:
        """The widgets of :class:`ControlValues`, in its field order."""
        return [self.image, self.preprocessor, self.controlnet, self.scale, self.start, self.end]

    def choices(self, pipe: Pipeline) -> list[str]:
        return [NONE, *self.library.available(pipe)]

    def model_updates(self, pipe: Pipeline, reset_values: bool) -> dict:
        """The ControlNets that fit a newly loaded model (the choice back to none when ``reset_values``)."""
        value = {"value": NONE} if reset_values else {}
        return {self.controlnet: gr.update(choices=self.choices(pipe), **value)}


def sent_controlnet(params: dict, choices: list[str]) -> tuple[dict[str, object], str]:
    """The ControlNet section's values for a parsed ``parameters`` chunk sent from PNG info, by
    :class:`ControlNetPanel` field name, and a note for the page. The first ControlNet the PNG names is chosen when
    ``choices`` offers it (with its preprocessor, scale, start and end); else, or without one, the choice is none.
    The control image is never in the PNG, so the note asks for it."""
    named = [item.strip().split(":")[0] for item in str(params.get("controlnets") or "").split(",") if item.strip()]
    if not named:
        return {"controlnet": NONE}, ""
    name = named[0]
    if name not in choices:
        offered = "which this app does not offer for the loaded model"
        return {"controlnet": NONE}, f"This image was made with the ControlNet {name!r}, {offered}. "
    preprocessors = [p.strip() for p in str(params.get("controlnet_preprocessors") or "").split(",")]
    values: dict[str, object] = {"controlnet": name}
    for field, spec in (("scale", SCALE), ("start", START), ("end", END)):
        recorded = params.get(spec.name)
        values[field] = float(spec.default if recorded is None else recorded)
    if preprocessors[0] in PREPROCESSORS:
        values["preprocessor"] = preprocessors[0]
    more = f" (of {', '.join(named)}; the app uses one at a time)" if len(named) > 1 else ""
    note = (
        f"This image was made with the ControlNet {name!r}{more}: it is chosen in Text → Image's ControlNet section; "
        "the PNG does not hold the control image, so add it there. "
    )
    return values, note


def controlnet_panel(wb: Workbench, library: ControlNetLibrary, prefix: str) -> ControlNetPanel:
    """Build the ControlNet accordion inside the current layout and wire its preview. ``prefix`` namespaces the
    ``elem_id`` of each widget."""
    choices = [NONE, *library.available(wb.pipe)]
    with gr.Accordion("ControlNet", open=False, elem_id=f"{prefix}-controlnet"):
        if len(choices) == 1:
            gr.Markdown("No ControlNet of this app fits the loaded model.", elem_id=f"{prefix}-controlnet-note")
        with gr.Row():
            image = gr.ImageEditor(
                label="Control image: upload, or draw an outline",
                type="pil",
                image_mode="RGBA",
                sources=("upload", "clipboard"),
                transforms=(),
                layers=False,
                brush=gr.Brush(colors=["#000000", "#ffffff"], default_size=12, color_mode="fixed"),
                canvas_size=(512, 512),
                format="png",
                height=256,
                elem_id=f"{prefix}-control-image",
            )
            shown = gr.Image(
                label="What the ControlNet sees",
                type="pil",
                format="png",
                interactive=False,
                height=256,
                elem_id=f"{prefix}-control-preview",
            )
        with gr.Row():
            preprocessor = gr.Radio(
                list(PREPROCESSORS), value=DEFAULT_PREPROCESSOR, label="Preprocessor", elem_id=f"{prefix}-preprocess"
            )
            controlnet = gr.Dropdown(choices, value=NONE, label="ControlNet", elem_id=f"{prefix}-controlnet-name")
        with gr.Row():
            sliders = [
                gr.Slider(spec.low, spec.high, value=spec.default, step=step, label=LABELS[spec.name], info=spec.help)
                for spec, step in ((SCALE, 0.05), (START, 0.01), (END, 0.01))
            ]
    panel = ControlNetPanel(image, preprocessor, shown, controlnet, *sliders, library)

    def show(value: dict | None, name: str) -> Image.Image | None:
        with page_errors("ControlNet preview"):
            return preview(value, name)

    gr.on(
        [image.change, preprocessor.change],
        show,
        [image, preprocessor],
        shown,
        queue=False,
        show_progress="hidden",
        trigger_mode="always_last",
        api_visibility="private",
    )
    return panel
