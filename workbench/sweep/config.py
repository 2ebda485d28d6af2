"""Sweep configs: every sweepable setting (the generation settings' checks come from :mod:`workbench.settings`),
and the validation of a config mapping into a :class:`SweepConfig`."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench import settings
from workbench.preprocess import PREPROCESSORS
from workbench.settings import MAX_SEED, check_fixed_seeds

QUANTIZATIONS = ("int8", "nf4", "fp4")
DTYPES = ("float32", "bfloat16", "float16")
EVAL_KINDS = ("one", "two", "both")
GRID_OTHERS = ("first", "all")


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


# -------------------------------------------------------------------------------------------------------- settings


def _number(key: str, value: Any, low: float | None, high: float | None, integer: bool, open_low: bool) -> Any:
    if value is None:
        return None
    wrong_type = isinstance(value, bool) or not isinstance(value, (int, float))
    if integer and (wrong_type or int(value) != value):
        raise ValueError(f"{key} must be an integer or null, got {value!r}")
    if wrong_type or not math.isfinite(value):
        raise ValueError(f"{key} must be a number or null, got {value!r}")
    below = low is not None and (value <= low if open_low else value < low)
    if below or (high is not None and value > high):
        bracket = "(" if open_low else "["
        raise ValueError(f"{key} must be in {bracket}{low}, {high if high is not None else '∞'}], got {value!r}")
    return int(value) if integer else float(value)


def _float(low: float | None = None, high: float | None = None, open_low: bool = False) -> Callable[[str, Any], Any]:
    return lambda key, value: _number(key, value, low, high, False, open_low)


def _choice(options: Sequence[str], allow_none: bool = True) -> Callable[[str, Any], Any]:
    def check(key: str, value: Any) -> Any:
        if (value is None or value == "none") and allow_none:
            return None
        if value not in options:
            allowed = ", ".join(repr(o) for o in options) + (", null" if allow_none else "")
            raise ValueError(f"{key} must be one of {allowed}; got {value!r}")
        return value

    return check


@dataclass(frozen=True)
class Setting:
    """One sweepable setting: the pipeline keyword it feeds (``None``: chosen at load time), its validator, its
    short label for file names and whether a list value is a single value rather than an axis."""

    kwarg: str | None
    check: Callable[[str, Any], Any]
    label: str
    list_valued: bool = False


def _generation(key: str, spec: settings.Setting) -> Setting:
    """The sweep setting ``key`` for a generation setting: checked by ``spec``; a list is one value for the
    list-valued kinds (expert weights, guidance interval, skip layers) and an axis otherwise."""

    def check(key: str, value: Any) -> Any:
        if value == "none" and spec.kind == "choice":
            value = None
        checked = spec.check(value, key)
        return list(checked) if isinstance(checked, tuple) else checked

    label = _LABELS.get(key, key.replace("_", ""))
    return Setting(spec.name, check, label, spec.kind in ("weights", "interval", "blocks"))


_LABELS = {  # short labels in file names; a key not listed is its own label without underscores
    "guidance": "cfg",
    "expert_weights": "ew",
    "router_temperature": "rt",
    "flow_temperature": "ft",
    "dynamic_thresholding": "dt",
    "guidance_interval": "gi",
    "skip_layers": "slg",
    "skip_layer_scale": "slgs",
    "skip_layer_start": "slga",
    "skip_layer_stop": "slgb",
    "negative_prompt": "neg",
    "max_sequence_length": "msl",
    "controlnet_conditioning_scale": "cn",
    "layout_guidance": "lg",
    "layout_control": "lc",
}
_SWEEP_KEYS = {spec.sweep: spec for spec in settings.SETTINGS if spec.sweep}
SETTINGS: dict[str, Setting] = {
    **{key: _generation(key, spec) for key, spec in _SWEEP_KEYS.items()},
    "quantization": Setting(None, _choice(QUANTIZATIONS), "q"),
    "lora_strength": Setting(None, _float(-10, 10), "lora"),
}
"""Every sweepable setting by config key: the generation settings that have a sweep key (their checks come from
:data:`workbench.settings.SETTINGS`), then the load-time ones (``kwarg`` None)."""
SETTING_DEFAULTS: dict[str, Any] = {
    key: spec.default
    for key, spec in _SWEEP_KEYS.items()
    if spec.default is not None and spec.default is not settings.MODEL_DEFAULT
}
"""The fixed defaults (a missing key takes None: the model's default, or off)."""
LATER_KEYS: dict[str, Any] = {
    "skip_layer_start": 0.01,
    "skip_layer_stop": 0.2,
    "cache_threshold": 0.0,
    "controlnet_conditioning_scale": 1.0,
    "layout_guidance": 0.0,
    "layout_control": 0.0,
}
"""Setting keys added after the first sweeps, with their defaults; a cell at these defaults keeps its old id."""
GENERAL_KEYS = (
    "model",
    "lora",
    "controlnet",
    "control_image",
    "preprocess",
    "device",
    "dtype",
    "height",
    "width",
    "output_dir",
    "prompts",
    "prompts_file",
    "seeds",
    "evaluate",
    "grids",
    "batch_size",
    "threads",
)


def _axis_values(key: str, raw: Any) -> list[Any]:
    """A setting's value(s) from the config: a list is an axis, anything else one value. For list-valued
    settings (expert weights) a list of numbers is one value and a list of lists / mappings / nulls an axis."""
    setting = SETTINGS[key]
    is_axis = isinstance(raw, list) and (
        not setting.list_valued or (bool(raw) and all(v is None or isinstance(v, (list, Mapping)) for v in raw))
    )
    values = raw if is_axis else [raw]
    if not values:
        raise ValueError(f"{key} must not be an empty list")
    checked = [setting.check(key, v) for v in values]
    seen = set()
    for value in checked:
        token = canonical(value)
        if token in seen:
            raise ValueError(f"{key} lists the value {value!r} twice")
        seen.add(token)
    return checked


# ---------------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class EvaluateSpec:
    """ShapesWorld evaluation per settings cell: ``n`` canonical captions of ``kind`` drawn with ``seed``; caption
    i uses image seed ``seed * 100_000 + i`` (as :func:`workbench.shapesworld.evaluate.evaluate`)."""

    n: int = 200
    kind: str = "both"
    seed: int = 0


@dataclass
class SweepConfig:
    """A validated sweep. ``axes`` maps every name in :data:`SETTINGS` to its list of values (one value = fixed)."""

    output_dir: Path
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    axes: dict[str, list[Any]] = field(default_factory=dict)
    model: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    height: int | None = None
    width: int | None = None
    evaluate: EvaluateSpec | None = None
    grid_pairs: list[tuple[str, str]] | None = None
    grid_others: str = "first"
    grids_enabled: bool = True
    batch_size: int = 1
    threads: int | None = 1
    lora: str | None = None
    controlnet: str | None = None
    control_image: str | None = None
    preprocess: str = "none"

    def varying_axes(self) -> list[str]:
        """Axes with more than one value, in grid order: prompt, seed (not when evaluating), then settings."""
        names = [] if self.evaluate else [n for n, v in (("prompt", self.prompts), ("seed", self.seeds)) if len(v) > 1]
        return names + [name for name, values in self.axes.items() if len(values) > 1]

    def axis_values(self, name: str) -> list[Any]:
        if name in ("prompt", "seed"):
            return self.prompts if name == "prompt" else self.seeds
        return self.axes[name]


def read_config_file(path: str | Path) -> dict:
    """Parse a ``.json``, ``.yaml`` or ``.yml`` sweep config into a mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as err:
        raise ValueError(f"config file {path}: cannot parse ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def _positive_size(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive integer (pixels) or null, got {value!r}")
    return value


def _prompts(data: Mapping[str, Any]) -> list[str]:
    if "prompts" in data and "prompts_file" in data:
        raise ValueError("give either prompts or prompts_file, not both")
    if "prompts_file" in data:
        file = data["prompts_file"]
        if not isinstance(file, str) or not Path(file).is_file():
            raise ValueError(f"prompts_file must name an existing text file, got {file!r}")
        prompts = [line.strip() for line in Path(file).read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"prompts_file {file!r} holds no non-empty line")
    else:
        prompts = data.get("prompts")
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
    if len(set(prompts)) != len(prompts):
        duplicate = next(p for p in prompts if prompts.count(p) > 1)
        raise ValueError(f"prompts lists {duplicate!r} twice")
    return prompts


def _seeds(value: Any) -> list[int]:
    """``seeds``: an integer, a list of them or ``{start, count}``; each checked as the ``seed`` setting (fixed)."""
    if isinstance(value, Mapping):
        unknown = set(value) - {"start", "count"}
        if unknown or "count" not in value:
            raise ValueError(f"seeds as a mapping needs 'count' (and optionally 'start'), got {dict(value)!r}")
        start, count = value.get("start", 0), value["count"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, count)) or count < 1:
            raise ValueError(f"seeds start and count must be integers with count >= 1, got {dict(value)!r}")
        value = list(range(start, start + count))
    seeds = check_fixed_seeds(value, "seeds")
    seeds = seeds if isinstance(seeds, list) else [seeds]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds lists a seed twice: {seeds}")
    return seeds


def _evaluate(value: Any) -> EvaluateSpec | None:
    if value is None or value is False:
        return None
    if value is True:
        return EvaluateSpec()
    if not isinstance(value, Mapping):
        raise ValueError(f"evaluate must be a mapping {{n, kind, seed}} or true, got {value!r}")
    unknown = sorted(set(value) - {"n", "kind", "seed"})
    if unknown:
        raise ValueError(f"evaluate has unknown keys {unknown}; allowed: n, kind, seed")
    n = _number("evaluate.n", value.get("n", 200), 1, 100_000, True, False)
    seed = _number("evaluate.seed", value.get("seed", 0), 0, MAX_SEED // 100_000 - 1, True, False)
    kind = _choice(EVAL_KINDS, allow_none=False)("evaluate.kind", value.get("kind", "both"))
    if n is None or seed is None:
        raise ValueError(f"evaluate.n and evaluate.seed must be integers, got {dict(value)!r}")
    return EvaluateSpec(n, kind, seed)


def _grids(value: Any, config: SweepConfig) -> None:
    if value is False:
        config.grids_enabled = False
        return
    if value is None or value is True:
        return
    if not isinstance(value, Mapping):
        raise ValueError(f"grids must be a mapping {{pairs, others}}, true or false, got {value!r}")
    unknown = sorted(set(value) - {"pairs", "others"})
    if unknown:
        raise ValueError(f"grids has unknown keys {unknown}; allowed: pairs, others")
    config.grid_others = _choice(GRID_OTHERS, allow_none=False)("grids.others", value.get("others", "first"))
    pairs = value.get("pairs")
    if pairs is None or pairs == "all":
        return
    varying = config.varying_axes()
    if not isinstance(pairs, list):
        raise ValueError(f"grids.pairs must be a list of [x, y] axis names or 'all', got {pairs!r}")
    checked = []
    for pair in pairs:
        if not (isinstance(pair, list) and len(pair) == 2 and pair[0] != pair[1]):
            raise ValueError(f"grids.pairs entries must be two different axis names [x, y], got {pair!r}")
        for name in pair:
            if name not in varying:
                raise ValueError(f"grids.pairs names axis {name!r}, but the varying axes are {varying}")
        checked.append((pair[0], pair[1]))
    config.grid_pairs = checked


def parse_config(data: Mapping[str, Any], output_dir: str | Path | None = None) -> SweepConfig:
    """Validate a config mapping; every error is a ValueError naming the key, the value and what is allowed.

    ``output_dir`` overrides the config's. Relative paths are relative to the current directory.
    """
    allowed = (*GENERAL_KEYS, *SETTINGS)
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ValueError(f"unknown config keys {unknown}; allowed: {', '.join(allowed)}")
    out = output_dir if output_dir is not None else data.get("output_dir")
    if not isinstance(out, (str, Path)) or not str(out):
        raise ValueError(f"output_dir must be a folder path, got {out!r}")
    evaluate = _evaluate(data.get("evaluate"))
    if evaluate is not None:
        clash = [k for k in ("prompts", "prompts_file", "seeds") if k in data]
        if clash:
            raise ValueError(f"with evaluate the captions and seeds come from the evaluation; remove {clash}")
    model = data.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise ValueError(f"model must be a path or repo id string (or null for the embedded model), got {model!r}")
    device = data.get("device", "auto")
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps|xpu(:\d+)?", device):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda', 'cuda:N', 'mps' or 'xpu', got {device!r}")
    lora = data.get("lora")
    if lora is not None and (not isinstance(lora, str) or not lora.endswith(".safetensors")):
        raise ValueError(f"lora must be the path of a .safetensors LoRA file, got {lora!r}")
    if lora is None and data.get("lora_strength") is not None:
        raise ValueError(f"lora_strength {data['lora_strength']!r} given without a lora file")
    controlnet, control_image = data.get("controlnet"), data.get("control_image")
    for key, value in (("controlnet", controlnet), ("control_image", control_image)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{key} must be a path, got {value!r}")
    if (controlnet is None) != (control_image is None):
        raise ValueError("controlnet and control_image go together: the ControlNet and the image it reads")
    if controlnet is None and data.get("controlnet_conditioning_scale") not in (None, 1.0):
        raise ValueError(
            f"controlnet_conditioning_scale {data['controlnet_conditioning_scale']!r} given without a controlnet"
        )
    preprocess = _choice(PREPROCESSORS, allow_none=False)("preprocess", data.get("preprocess", "none"))
    batch_size = _number("batch_size", data.get("batch_size", 1), 1, 64, True, False) or 1
    threads = _number("threads", data.get("threads", 1), 1, 1024, True, False)
    config = SweepConfig(
        output_dir=Path(out),
        prompts=[] if evaluate else _prompts(data),
        seeds=[] if evaluate else _seeds(data.get("seeds", 0)),
        axes={},
        model=model,
        device=device,
        dtype=_choice(DTYPES, allow_none=False)("dtype", data.get("dtype", "float32")),
        height=_positive_size("height", data.get("height")),
        width=_positive_size("width", data.get("width")),
        evaluate=evaluate,
        batch_size=batch_size,
        threads=threads,
        lora=lora,
        controlnet=controlnet,
        control_image=control_image,
        preprocess=preprocess,
    )
    # quantization first: cells are ordered so that each process loads each model variant at most once
    order = ["quantization"] + [k for k in data if k in SETTINGS and k != "quantization"]
    order += [k for k in SETTINGS if k not in order]
    for key in order:
        config.axes[key] = _axis_values(key, data[key]) if key in data else [SETTING_DEFAULTS.get(key)]
    _grids(data.get("grids"), config)
    return config


def load_config(path: str | Path, output_dir: str | Path | None = None) -> SweepConfig:
    """Read and validate a sweep config file (YAML or JSON)."""
    return parse_config(read_config_file(path), output_dir)
