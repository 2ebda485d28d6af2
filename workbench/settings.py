"""Every generation setting, stated once: its name, default, allowed values, help text and where it is exposed.

:data:`SETTINGS` lists the settings of :meth:`workbench.Pipeline.__call__` (the *name* is the pipeline keyword). The
pipeline validates its arguments with :meth:`GenerationSettings.resolve`; the command line
(:mod:`workbench.cli.common`), the sweep config (:mod:`workbench.sweep`), the app's controls
(:mod:`workbench.ui.controls`) and the PNG ``parameters`` reader (:mod:`workbench.metadata`) take their flags, keys,
defaults and checks from the same table, so adding a setting means adding one :class:`Setting` (and the code that
uses it).

Conventions:

* A default of :data:`MODEL_DEFAULT` means "the model's own default": the field of the same name in the model's
  :class:`GenerationDefaults` (read from its folder's ``model_index.json``, else its family's preset).
* ``None`` passed for a setting means its default; for the optional settings (``mask_blur``,
  ``dynamic_thresholding_ratio``, ``expert_weights``, ``skip_guidance_layers``) the default ``None`` means "off".
* Every number must be finite; NaN and ±inf are refused with a ValueError naming the parameter, the value and the
  allowed range. Ranges are written as intervals: ``[a, b]`` closed, ``(a, b]`` open at ``a``.
* Seeds: an integer in [0, :data:`MAX_SEED`] (image i of a call uses ``seed + i``), a list of such integers (one
  per image), or ``None`` / a negative integer for a random seed. Text is refused.
* Model-dependent limits (sizes a multiple of 16 inside the position table, block indices below the depth, one
  expert weight per expert) are checked by the pipeline, which knows the model.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from workbench.flow import SAMPLERS

MAX_SEED = 2**32 - 1
MODEL_DEFAULT: Any = type("ModelDefault", (), {"__repr__": lambda self: "MODEL_DEFAULT"})()
"""Marker default: the value comes from the model's :class:`GenerationDefaults`."""


# ------------------------------------------------------------------------------------------------- model defaults


@dataclass
class GenerationDefaults:
    """Per-model defaults, read from the model folder (``model_index.json``'s ``workbench`` entry) or a preset.

    The fields named like a setting (steps, guidance, shift, size, sampler, guidance interval, layout guidance and
    control) are that setting's default for this model; ``prompt`` / ``negative_prompt`` prefill the app; the
    ``latent_rgb_*`` factors drive the live preview; ``layout_controlnet`` is the ControlNet folder (relative to the
    model folder) that ``layout_control`` uses, attached when the model is loaded. The class defaults are
    SD3-Medium's."""

    num_inference_steps: int = 28
    guidance_scale: float = 7.0
    shift: float = 3.0
    height: int = 1024
    width: int = 1024
    sampler: str = "euler"
    prompt: str = ""
    negative_prompt: str = ""
    latent_rgb_factors: list[list[float]] | None = None
    latent_rgb_bias: list[float] | None = None
    guidance_interval: list[float] | None = None
    layout_guidance: float = 0.0
    layout_control: float = 0.0
    layout_controlnet: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> GenerationDefaults:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


# ---------------------------------------------------------------------------------------------------- value checks


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return isinstance(value, float) and math.isfinite(value) and value == int(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _bound(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class Setting:
    """One generation setting.

    ``kind``: ``int``, ``float``, ``choice`` (one of ``choices``), ``text``, ``interval`` (a pair low ≤ high of
    sigmas in [0, 1]), ``blocks`` (a non-empty list of block indices), ``weights`` (expert weights: one list, or a
    mapping block → list) or ``seed``. Numbers lie in ``[low, high]`` (``(low, high]`` with ``open_low``).
    ``cli``: the shared command-line flag (:func:`workbench.cli.common.add_sampling_arguments`), None if absent;
    ``cli_needs``: the command-line input the flag acts on (``--init-image``, ``--mask``, ``--control``), so that
    only the commands that take that input get the flag; None: every generating command;
    ``sweep``: the sweep-config key, None if absent; ``app``: exposed by the app's generation endpoints
    (:class:`workbench.ui.controls.SamplingValues`); ``png``: the label in the PNG ``parameters`` chunk.
    ``cli_default`` replaces ``default`` on the command line (the seed: 0 there, so that files reproduce);
    ``rule`` replaces the range in error messages where it says more."""

    name: str
    kind: str
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] = ()
    cli: str | None = None
    cli_needs: str | None = None
    sweep: str | None = None
    app: bool = False
    png: str | None = None
    cli_default: Any = MODEL_DEFAULT
    rule: str | None = None

    @property
    def optional(self) -> bool:
        """True when the setting can be off (its default is None)."""
        return self.default is None

    @property
    def range_text(self) -> str:
        """The allowed values in words (for messages and help)."""
        if self.rule:
            return self.rule
        if self.kind in ("int", "float"):
            left = "(" if self.open_low else "["
            kind = "an integer" if self.kind == "int" else "a finite number"
            return f"{kind} in {left}{_bound(self.low)}, {_bound(self.high)}]"
        if self.kind == "choice":
            return "one of " + ", ".join(repr(c) for c in self.choices)
        return self.kind

    def check(self, value: Any, name: str | None = None) -> Any:
        """The validated, normalised value (int, float, str, tuple or list); ValueError naming ``name`` (default:
        the setting's own name), the value and what is allowed. ``None`` is returned as is."""
        if value is None:
            return None
        return _CHECKS[self.kind](self, name or self.name, value)


def _check_int(setting: Setting, name: str, value: Any) -> int:
    if not _is_integer(value) or not setting.low <= value <= setting.high:
        if setting.rule:
            raise ValueError(f"{name} must be {setting.rule}, got {value!r}")
        raise ValueError(
            f"{name} must be an integer between {_bound(setting.low)} and {_bound(setting.high)}, got {value!r}"
        )
    return int(value)


def _check_float(setting: Setting, name: str, value: Any) -> float:
    ok = _is_number(value) and math.isfinite(value)
    low, high = setting.low, setting.high
    if ok:
        ok = (low < value if setting.open_low else low <= value) and value <= high
    if not ok:
        if setting.rule:
            raise ValueError(f"{name} must be {setting.rule}, got {value!r}")
        if setting.open_low:
            raise ValueError(f"{name} must be in ({_bound(low)}, {_bound(high)}], got {value!r}")
        raise ValueError(f"{name} must be between {_bound(low)} and {_bound(high)}, got {value!r}")
    return float(value)


def _check_choice(setting: Setting, name: str, value: Any) -> str:
    if value not in setting.choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in setting.choices)}; got {value!r}")
    return value


def _check_text(setting: Setting, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def _check_interval(setting: Setting, name: str, value: Any) -> tuple[float, float]:
    pair = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
    if not pair or not all(_is_number(v) for v in value):
        raise ValueError(f"{name} must be a pair (low, high) of sigmas, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not 0 <= low <= high <= 1:  # also False for NaN
        raise ValueError(f"{name} must satisfy 0 <= low <= high <= 1, got {value!r}")
    return low, high


def _check_blocks(setting: Setting, name: str, value: Any) -> list[int]:
    is_list = isinstance(value, Sequence) and not isinstance(value, str)
    if not is_list or not value or not all(_is_integer(v) and not isinstance(v, float) and v >= 0 for v in value):
        raise ValueError(f"{name} must be a non-empty list of block indices such as [7, 8, 9], got {value!r}")
    return [int(v) for v in value]


def _weight_list(name: str, value: Any) -> list[float]:
    is_list = isinstance(value, Sequence) and not isinstance(value, str)
    if not is_list or not value or not all(_is_number(v) and math.isfinite(v) for v in value):
        raise ValueError(f"{name} must be a list of finite numbers (one weight per expert), got {value!r}")
    if any(v < 0 for v in value) or sum(value) <= 0:
        raise ValueError(f"{name} weights must be >= 0 and not all zero, got {value!r}")
    return [float(v) for v in value]


def _check_weights(setting: Setting, name: str, value: Any) -> list[float] | dict[int, list[float]]:
    if not isinstance(value, Mapping):
        return _weight_list(name, value)
    out = {}
    for block, weights in value.items():
        if not _is_integer(block) and not (isinstance(block, str) and block.strip().isdigit()):
            raise ValueError(f"{name} block keys must be integers, got {block!r}")
        out[int(block)] = _weight_list(f"{name}[{block}]", weights)
    if not out:
        raise ValueError(f"{name} must not be an empty mapping")
    return dict(sorted(out.items()))


def _check_seed(setting: Setting, name: str, value: Any, random: bool = True) -> int | list[int]:
    wording = f"an integer in [0, {MAX_SEED}]" + (" (negative: random)" if random else "") + " or a list of them"
    if isinstance(value, Sequence) and not isinstance(value, str):
        if not value or not all(_is_integer(s) and not isinstance(s, float) for s in value):
            raise ValueError(f"{name} must be {wording}, got {value!r}")
        seeds = [int(s) for s in value]
        if any(not 0 <= s <= MAX_SEED for s in seeds):
            raise ValueError(f"every {name} must be between 0 and {MAX_SEED}, got {seeds}")
        return seeds
    if not _is_integer(value) or isinstance(value, float):
        raise ValueError(f"{name} must be {wording}, got {value!r}")
    if value > MAX_SEED or (value < 0 and not random):
        fixed = "" if random else " (a fixed seed; no random -1)"
        raise ValueError(f"{name} must be between 0 and {MAX_SEED}{fixed}, got {value}")
    return int(value)


def check_fixed_seeds(value: Any, name: str = "seed") -> int | list[int]:
    """``value`` checked as the ``seed`` setting is, except that it must reproduce: a negative (random) seed is
    refused too. For tools that need known seeds (frame sequences)."""
    return _check_seed(BY_NAME["seed"], name, value, random=False)


_CHECKS = {
    "int": _check_int,
    "float": _check_float,
    "choice": _check_choice,
    "text": _check_text,
    "interval": _check_interval,
    "blocks": _check_blocks,
    "weights": _check_weights,
    "seed": _check_seed,
}

# ------------------------------------------------------------------------------------------------------ the table

SLG_HELP = "skip-layer guidance (diffusers' semantics; SD3.5 Medium's recommendation: blocks 7,8,9)"

SETTINGS: tuple[Setting, ...] = (
    Setting("negative_prompt", "text", "", "the negative prompt", cli="--negative-prompt", sweep="negative_prompt",
            app=True),
    Setting("height", "int", MODEL_DEFAULT, "image height in px, a multiple of 16", 1, 1 << 16,
            cli="--height", app=True, rule="a positive multiple of 16"),
    Setting("width", "int", MODEL_DEFAULT, "image width in px, a multiple of 16", 1, 1 << 16,
            cli="--width", app=True, rule="a positive multiple of 16"),
    Setting("num_inference_steps", "int", MODEL_DEFAULT, "sampler steps", 1, 1000,
            cli="--steps", sweep="steps", app=True, png="Steps"),
    Setting("guidance_scale", "float", MODEL_DEFAULT, "classifier-free guidance scale; <= 1 turns it off", 0, 100,
            cli="--guidance", sweep="guidance", app=True, png="CFG scale"),
    Setting("seed", "seed", None, "seed of image 0 (image i: seed + i); negative: random", cli="--seed",
            app=True, png="Seed", cli_default=0),
    Setting("max_sequence_length", "int", 256, "T5 tokens", 1, 512, cli="--max-sequence-length",
            sweep="max_sequence_length", png="Max sequence length"),
    Setting("strength", "float", 0.6, "image→image: how much of the schedule runs (diffusers' strength)", 0, 1,
            open_low=True, cli="--strength", cli_needs="--init-image", png="Denoising strength"),
    Setting("mask_blur", "float", None, "inpainting: paste the start image back outside the mask, edge feathered by "
            "this many px (A1111: 4); off by default", 0, 64, cli="--mask-blur", cli_needs="--mask", png="Mask blur",
            rule="a radius in [0, 64] px and needs mask_image"),
    Setting("sampler", "choice", MODEL_DEFAULT, "the sampler", choices=SAMPLERS, cli="--sampler", sweep="sampler",
            app=True, png="Sampler"),
    Setting("expert_weights", "weights", None, "MoE: one weight per expert (or block → weights); all ones by default",
            cli="--expert-weights", sweep="expert_weights", png="Expert weights"),
    Setting("router_temperature", "float", 1.0, "MoE router softmax temperature", 0, 100, open_low=True,
            cli="--router-temperature", sweep="router_temperature", png="Router temperature"),
    Setting("flow_temperature", "float", 1.0, "scale of the starting noise", 0, 10, open_low=True,
            cli="--flow-temperature", sweep="flow_temperature", app=True, png="Flow temperature"),
    Setting("dynamic_thresholding_ratio", "float", None, "clamp x̂0 to this quantile of |x̂0|; off by default", 0, 1,
            open_low=True, cli="--dynamic-thresholding", sweep="dynamic_thresholding", app=True,
            png="Dynamic thresholding"),
    Setting("shift", "float", MODEL_DEFAULT, "SD3 timestep shift", 0, 100, open_low=True,
            cli="--shift", sweep="shift", app=True, png="Shift"),
    Setting("num_images", "int", 1, "images per prompt", 1, 64, app=True),
    Setting("guidance_interval", "interval", MODEL_DEFAULT,
            "guidance only for sigma in [LOW, HIGH] (a model without one: everywhere)", cli="--guidance-interval",
            sweep="guidance_interval", app=True, png="Guidance interval"),
    Setting("skip_guidance_layers", "blocks", None, SLG_HELP + "; off by default", cli="--skip-layers",
            sweep="skip_layers", app=True, png="Skip layers"),
    Setting("skip_layer_guidance_scale", "float", 2.8, "skip-layer guidance scale", 0, 100, cli="--slg-scale",
            sweep="skip_layer_scale", app=True, png="SLG scale"),
    Setting("skip_layer_guidance_start", "float", 0.01, "skip-layer guidance from this fraction of the steps", 0, 1,
            cli="--slg-start", sweep="skip_layer_start", app=True, png="SLG start"),
    Setting("skip_layer_guidance_stop", "float", 0.2, "… up to this fraction of the steps", 0, 1, cli="--slg-stop",
            sweep="skip_layer_stop", app=True, png="SLG stop"),
    Setting("cache_threshold", "float", 0.0, "step caching (TeaCache-style, workbench.step_cache): reuse the last "
            "transformer residual while the summed relative change of the first block's input stays below this; "
            "0 = off", 0, 10, cli="--cache-threshold", sweep="cache_threshold", png="Cache threshold"),
    Setting("layout_guidance", "float", MODEL_DEFAULT, "attention-to-layout guidance "
            "(workbench.layout_guidance): after the first step, move the latents so that each object's words attend "
            "to where the prompt's layout puts it; needs the model's layout source (the embedded model reads "
            "canonical captions); 0 = off", 0, 10,
            cli="--layout-guidance", sweep="layout_guidance", app=True, png="Layout guidance"),
    Setting("layout_control", "float", MODEL_DEFAULT, "layout control: draw each image's layout (from the "
            "model's layout source) as the control image of the model's layout ControlNet, at this scale (the "
            "embedded model's: Canny edges of the planned scene); 0 = off", 0, 10,
            cli="--layout-control", sweep="layout_control", app=True, png="Layout control"),
    Setting("controlnet_conditioning_scale", "float", 1.0, "ControlNet: scale of the residuals (times each "
            "ControlNet's own scale)", 0, 10, cli="--controlnet-scale", cli_needs="--control",
            sweep="controlnet_conditioning_scale", png="ControlNet scale"),
    Setting("control_guidance_start", "float", 0.0, "ControlNet: active from this fraction of the steps", 0, 1,
            cli="--control-start", cli_needs="--control", png="ControlNet start"),
    Setting("control_guidance_end", "float", 1.0, "ControlNet: … up to this fraction of the steps", 0, 1,
            cli="--control-end", cli_needs="--control", png="ControlNet end"),
)  # fmt: skip
BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
SKIP_LAYER_DEFAULTS = {
    "scale": BY_NAME["skip_layer_guidance_scale"].default,
    "start": BY_NAME["skip_layer_guidance_start"].default,
    "stop": BY_NAME["skip_layer_guidance_stop"].default,
}


def setting(name: str) -> Setting:
    """The :class:`Setting` called ``name`` (a pipeline keyword); KeyError naming the known ones otherwise."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no generation setting {name!r}; known: {', '.join(BY_NAME)}") from None


def default_value(name: str, model: GenerationDefaults | None = None) -> Any:
    """The default of setting ``name``: fixed, or the model's (``model``, else :class:`GenerationDefaults`'s)."""
    spec = setting(name)
    if spec.default is not MODEL_DEFAULT:
        return spec.default
    value = getattr(model or GenerationDefaults(), name)
    if name == "guidance_interval":
        return (0.0, 1.0) if value is None else tuple(float(v) for v in value)
    return value


def parse_block_list(name: str, text: str | None) -> list[int]:
    """``"7, 8,9"`` → ``[7, 8, 9]``; empty or None → ``[]``; ValueError naming ``name`` otherwise."""
    items = [item.strip() for item in (text or "").split(",") if item.strip()]
    try:
        return [int(item) for item in items]
    except ValueError:
        raise ValueError(f"{name} must be comma-separated block indices such as 7,8,9, got {text!r}") from None


# ------------------------------------------------------------------------------------------------ the settings object


@dataclass(frozen=True)
class GenerationSettings:
    """A validated, complete set of generation settings (every field of :data:`SETTINGS`; see the module
    docstring for the conventions). Build it with :meth:`resolve`, which fills the defaults; direct construction
    validates too, with SD3-Medium's :class:`GenerationDefaults` for the model-dependent fields."""

    negative_prompt: str | list[str] = ""
    height: int = GenerationDefaults.height
    width: int = GenerationDefaults.width
    num_inference_steps: int = GenerationDefaults.num_inference_steps
    guidance_scale: float = GenerationDefaults.guidance_scale
    seed: int | list[int] | None = None
    max_sequence_length: int = 256
    strength: float = 0.6
    mask_blur: float | None = None
    sampler: str = GenerationDefaults.sampler
    expert_weights: list[float] | dict[int, list[float]] | None = None
    router_temperature: float = 1.0
    flow_temperature: float = 1.0
    dynamic_thresholding_ratio: float | None = None
    shift: float = GenerationDefaults.shift
    num_images: int = 1
    guidance_interval: tuple[float, float] = (0.0, 1.0)
    skip_guidance_layers: tuple[int, ...] = ()
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2
    cache_threshold: float = 0.0
    layout_guidance: float = 0.0
    layout_control: float = 0.0
    controlnet_conditioning_scale: float = 1.0
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    _checked: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._checked:
            return
        for spec in SETTINGS:
            value = getattr(self, spec.name)
            if spec.name == "negative_prompt" and isinstance(value, list):
                continue  # one per prompt; the pipeline checks the count
            if spec.name == "skip_guidance_layers" and (value is None or value == ()):
                checked = ()
            else:
                checked = spec.check(value)
                if spec.name == "skip_guidance_layers":
                    checked = tuple(checked)
            if checked is None and not spec.optional:
                checked = default_value(spec.name)
            object.__setattr__(self, spec.name, checked)
        if self.skip_guidance_layers and not self.skip_layer_guidance_start < self.skip_layer_guidance_stop:
            raise ValueError(
                "skip_layer_guidance_start and skip_layer_guidance_stop must satisfy 0 <= start < stop <= 1, "
                f"got start={self.skip_layer_guidance_start}, stop={self.skip_layer_guidance_stop}"
            )
        if not self.control_guidance_start < self.control_guidance_end:
            raise ValueError(
                "control_guidance_start and control_guidance_end must satisfy 0 <= start < end <= 1, "
                f"got start={self.control_guidance_start}, end={self.control_guidance_end}"
            )

    @classmethod
    def resolve(cls, model: GenerationDefaults | None = None, **given: Any) -> GenerationSettings:
        """Settings from keyword arguments named as :data:`SETTINGS`; a missing or ``None`` value takes the default
        (the model's for :data:`MODEL_DEFAULT` ones; ``sampler=""`` too). ValueError for an unknown name or a bad
        value."""
        unknown = sorted(set(given) - set(BY_NAME))
        if unknown:
            raise ValueError(f"unknown generation settings {unknown}; known: {', '.join(BY_NAME)}")
        values = {}
        for spec in SETTINGS:
            value = given.get(spec.name)
            if spec.name == "sampler" and value == "":
                value = None
            if value is None and not spec.optional:
                value = default_value(spec.name, model)
            values[spec.name] = value
        return cls(**values)

    def kwargs(self) -> dict[str, Any]:
        """The settings as :meth:`workbench.Pipeline.__call__` keyword arguments."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
