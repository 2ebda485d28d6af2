"""Generation parameters as the ``parameters`` PNG text chunk that other SD tools (A1111, Forge, ComfyUI readers) use.

Format::

    <prompt>
    Negative prompt: <negative prompt>
    Steps: 20, Sampler: euler, CFG scale: 5, Seed: 42, Size: 128x128, Model: shapesworld-moe, Shift: 3, ...

Values containing a comma or colon are JSON-quoted. Workbench-specific keys (expert weights, router temperature,
flow temperature, dynamic thresholding, strength, the LoRAs as ``name:strength:sha256[:10]``; for inpainting the
mask's size ``WxH`` and its coverage, the repainted fraction of the latent grid) follow the standard ones.
"""

from __future__ import annotations

import json
import re
from io import BytesIO
from pathlib import Path

from PIL import Image, PngImagePlugin

from workbench.settings import SETTINGS

PARAMETER_KEYS = {"num_inference_steps": "steps"}
"""Keys of the parameters dict that differ from the generation setting's name (:mod:`workbench.settings`)."""
_SETTING_BY_KEY = {PARAMETER_KEYS.get(s.name, s.name): s for s in SETTINGS if s.png}
_OTHER_LABELS = {"size": "Size", "model": "Model", "mask_size": "Mask size", "mask_coverage": "Mask coverage"}
_OTHER_LABELS["loras"] = "LoRAs"
_OTHER_LABELS.update(
    controlnets="ControlNet", controlnet_preprocessors="ControlNet preprocessor", layout_controlnet="Layout ControlNet"
)
KEY_ORDER = [
    (key, _SETTING_BY_KEY[key].png if key in _SETTING_BY_KEY else _OTHER_LABELS[key])
    for key in (
        "steps",
        "sampler",
        "guidance_scale",
        "seed",
        "size",
        "model",
        "shift",
        "strength",
        "mask_size",
        "mask_coverage",
        "mask_blur",
        "flow_temperature",
        "dynamic_thresholding_ratio",
        "expert_weights",
        "router_temperature",
        "max_sequence_length",
        "guidance_interval",
        "skip_guidance_layers",
        "skip_layer_guidance_scale",
        "skip_layer_guidance_start",
        "skip_layer_guidance_stop",
        "cache_threshold",
        "layout_guidance",
        "layout_control",
        "layout_controlnet",
        "loras",
        "controlnets",
        "controlnet_preprocessors",
        "controlnet_conditioning_scale",
        "control_guidance_start",
        "control_guidance_end",
    )
]
"""(parameters key, label) in the order of the settings line; settings' labels come from :mod:`workbench.settings`."""
_INTEGER_KEYS = {key for key, s in _SETTING_BY_KEY.items() if s.kind in ("int", "seed")}
_FLOAT_KEYS = {key for key, s in _SETTING_BY_KEY.items() if s.kind == "float"} | {"mask_coverage"}
LABEL_TO_KEY = {label: key for key, label in KEY_ORDER}


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, separators=(",", ":"))
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or '"' in text) else text


def format_parameters(params: dict) -> str:
    """Render a parameter dict (keys as in :data:`KEY_ORDER` plus ``prompt``, ``negative_prompt``, ``height``,
    ``width``) as the ``parameters`` text. ``None`` values are left out."""
    lines = [params.get("prompt", "")]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = dict(params)
    if "height" in fields and "width" in fields:
        fields["size"] = f"{fields['width']}x{fields['height']}"
    items = [f"{label}: {_format_value(fields[key])}" for key, label in KEY_ORDER if fields.get(key) is not None]
    lines.append(", ".join(items))
    return "\n".join(lines)


_ITEM = re.compile(r'\s*([^:,]+):\s*("(?:\\.|[^"\\])*"|\[[^\]]*\]|\{[^}]*\}|[^,]*)(?:,|$)')


def _parse_value(key: str, raw: str) -> object:
    raw = raw.strip()
    if raw.startswith(("[", "{", '"')):
        value = json.loads(raw)
        if key == "expert_weights" and isinstance(value, dict):
            return {int(k): v for k, v in value.items()}
        return value
    if key in _INTEGER_KEYS:
        return int(raw)
    if key in _FLOAT_KEYS:
        return float(raw)
    return raw


def parse_parameters(text: str) -> dict:
    """Inverse of :func:`format_parameters`; unknown keys of other tools are kept under their own label."""
    lines = text.strip("\n").split("\n")
    settings_line = lines[-1] if len(lines) > 1 and re.match(r"^\s*Steps:", lines[-1]) else ""
    body = lines[:-1] if settings_line else lines
    negative_at = next((i for i, line in enumerate(body) if line.startswith("Negative prompt:")), None)
    prompt_lines = body if negative_at is None else body[:negative_at]
    params: dict = {"prompt": "\n".join(prompt_lines)}
    if negative_at is not None:
        params["negative_prompt"] = "\n".join(body[negative_at:])[len("Negative prompt:") :].strip()
    for match in _ITEM.finditer(settings_line):
        label, raw = match.group(1).strip(), match.group(2)
        if not label:
            continue
        key = LABEL_TO_KEY.get(label, label)
        if key == "size":
            width, height = (int(v) for v in raw.strip().split("x"))
            params["width"], params["height"] = width, height
            continue
        try:
            params[key] = _parse_value(key, raw)
        except (ValueError, json.JSONDecodeError):
            params[key] = raw.strip()
    return params


def png_bytes(image: Image.Image, parameters: str | None = None) -> bytes:
    """Encode ``image`` as PNG with the ``parameters`` text chunk (taken from ``image.info`` when not given)."""
    info = PngImagePlugin.PngInfo()
    text = parameters if parameters is not None else image.info.get("parameters")
    if text:
        info.add_text("parameters", text)
    buffer = BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def save_png(image: Image.Image, path: str | Path, parameters: str | None = None) -> Path:
    """Write ``image`` to ``path`` as PNG keeping its ``parameters`` chunk; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, parameters))
    return path


def read_parameters(image: Image.Image | str | Path) -> dict:
    """Parameters stored in a PNG (path or opened image); raises ValueError when it carries none."""
    opened = Image.open(image) if isinstance(image, (str, Path)) else image
    text = opened.info.get("parameters")
    if not text:
        raise ValueError("image has no 'parameters' text chunk (was it saved as PNG by an SD tool?)")
    return parse_parameters(text)
