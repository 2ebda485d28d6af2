"""Parameter sweeps: prompts × seeds × settings, split across processes, resumable, with X/Y grids and a results table.

A sweep is described by a config mapping (YAML or JSON; see ``docs/scale_out.md``): prompts (or a prompts file),
seeds, and for every setting in :data:`SETTINGS` either one value or a list of values (an *axis*). The grid is the
cartesian product; every cell is one image whose id is a short hash of everything that determines its pixels
(prompt, seed, all settings, model, size, dtype), so a rerun recognises finished cells and skips them.

Output folder layout::

    images/<readable name>-<id>.png   one PNG per cell, parameters in its ``parameters`` text chunk
    results.jsonl                     one JSON row per cell (merged by the main process)
    results.part-<rank>.jsonl         rows a process has written and the main process has not merged yet
    grids/<x>-vs-<y>[…].png           labelled X/Y image grids, one per pair of varying axes
    evaluation.md / evaluation.json   accuracy per settings cell (only with ``evaluate``)

Processes: under ``torchrun`` or ``accelerate launch`` the pending work is split with accelerate's
``PartialState().split_between_processes`` (gloo on CPU); otherwise one process does it all. Seeds come from the
cell, never from the rank, and work is batched in units fixed by the config, so a cell's image is the same on 1 or
N processes (on CPU with the same number of threads per process: the ``threads`` key, 1 by default).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from workbench import settings, viz
from workbench.metadata import save_png
from workbench.settings import MAX_SEED

RESULTS_NAME = "results.jsonl"
PART_PATTERN = "results.part-*.jsonl"
QUANTIZATIONS = ("int8", "nf4", "fp4")
DTYPES = ("float32", "bfloat16", "float16")
EVAL_KINDS = ("one", "two", "both")
GRID_OTHERS = ("first", "all")


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
LATER_KEYS: dict[str, Any] = {"skip_layer_start": 0.01, "skip_layer_stop": 0.2}
"""Setting keys added after the first sweeps, with their defaults; a cell at these defaults keeps its old id."""
GENERAL_KEYS = (
    "model",
    "lora",
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
        token = _canonical(value)
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
    if isinstance(value, Mapping):
        unknown = set(value) - {"start", "count"}
        if unknown or "count" not in value:
            raise ValueError(f"seeds as a mapping needs 'count' (and optionally 'start'), got {dict(value)!r}")
        start, count = value.get("start", 0), value["count"]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, count)) or count < 1:
            raise ValueError(f"seeds start and count must be integers with count >= 1, got {dict(value)!r}")
        seeds = list(range(start, start + count))
    elif isinstance(value, int) and not isinstance(value, bool):
        seeds = [value]
    elif isinstance(value, list) and value and all(isinstance(s, int) and not isinstance(s, bool) for s in value):
        seeds = list(value)
    else:
        raise ValueError(f"seeds must be an integer, a non-empty list of integers or {{start, count}}, got {value!r}")
    if any(not 0 <= s <= MAX_SEED for s in seeds):
        raise ValueError(f"seeds must be between 0 and {MAX_SEED}, got {seeds}")
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


# ----------------------------------------------------------------------------------------------------------- cells


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _slug(value: Any, limit: int = 24) -> str:
    if value is None:
        return "default"
    text = f"{value:g}" if isinstance(value, float) else value if isinstance(value, str) else _canonical(value)
    return re.sub(r"[^A-Za-z0-9.]+", "_", str(text)).strip("_")[:limit] or "empty"


@dataclass(frozen=True)
class Cell:
    """One image of the sweep. ``coords`` holds the index of this cell's value on every axis ("prompt", "seed" or
    "sample", and each setting); ``settings`` every setting's value (``None``: the model's default)."""

    id: str
    name: str
    prompt: str
    seed: int
    settings: dict[str, Any]
    coords: dict[str, int]

    @property
    def file(self) -> str:
        return f"images/{self.name}-{self.id}.png"

    @property
    def settings_key(self) -> str:
        return _canonical(self.settings)


def cell_id(config: SweepConfig, prompt: str, seed: int, settings: Mapping[str, Any]) -> str:
    """Ten hex digits of the SHA-1 of everything that determines the image."""
    identity = {
        "prompt": prompt,
        "seed": seed,
        "settings": dict(settings),
        "model": config.model,
        "height": config.height,
        "width": config.width,
        "dtype": config.dtype,
    }
    if config.lora is not None:
        identity["lora"] = config.lora
    else:
        identity["settings"].pop("lora_strength", None)  # ids of sweeps without a LoRA stay as they were
    for key, default in LATER_KEYS.items():  # keys added after sweeps were run: absent from ids at their default
        if identity["settings"].get(key) == default:
            identity["settings"].pop(key)
    return hashlib.sha1(_canonical(identity).encode()).hexdigest()[:10]


def _samples(config: SweepConfig) -> list[tuple[str, int, dict[str, int], str]]:
    """(prompt, seed, coords, name prefix) of every image per settings cell."""
    if config.evaluate is not None:
        from workbench.shapesworld.world import random_canonical_captions

        spec = config.evaluate
        captions = random_canonical_captions(spec.n, spec.seed, spec.kind)
        return [(c, spec.seed * 100_000 + i, {"sample": i}, f"e{i:04d}") for i, c in enumerate(captions)]
    return [
        (prompt, seed, {"prompt": pi, "seed": si}, f"p{pi}-s{seed}")
        for pi, prompt in enumerate(config.prompts)
        for si, seed in enumerate(config.seeds)
    ]


def expand(config: SweepConfig) -> list[Cell]:
    """All cells in run order: settings (quantization outermost), then prompts, then seeds (or evaluation samples)."""
    names = list(config.axes)
    varying = [n for n in names if len(config.axes[n]) > 1]
    cells = []
    for indices in itertools.product(*(range(len(config.axes[n])) for n in names)):
        settings = {n: config.axes[n][i] for n, i in zip(names, indices)}
        label = "-".join(f"{SETTINGS[n].label}{_slug(settings[n])}" for n in varying)
        for prompt, seed, coords, prefix in _samples(config):
            name = f"{prefix}-{label}" if label else prefix
            all_coords = {**coords, **dict(zip(names, indices))}
            cells.append(Cell(cell_id(config, prompt, seed, settings), name, prompt, seed, settings, all_coords))
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError("two cells of this sweep have the same settings; remove the duplicated values")
    return cells


def work_units(config: SweepConfig, cells: Sequence[Cell]) -> list[list[Cell]]:
    """Batches of up to ``batch_size`` consecutive cells sharing their settings; fixed by the config alone, so a
    cell is computed in the same batch whatever the number of processes."""
    units: list[list[Cell]] = []
    for _, group in itertools.groupby(cells, key=lambda c: c.settings_key):
        group = list(group)
        units += [group[i : i + config.batch_size] for i in range(0, len(group), config.batch_size)]
    return units


# ---------------------------------------------------------------------------------------------------- result table


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSON-lines file; a truncated last line (a crash mid-write) is ignored."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "id" in row:
            rows.append(row)
    return rows


def merge_results(output_dir: Path, order: Sequence[str] = ()) -> list[dict]:
    """Fold every ``results.part-*.jsonl`` into ``results.jsonl`` (one row per id, the newest wins, ids in
    ``order`` first, in that order), replace it atomically and delete the parts. Returns the merged rows."""
    parts = sorted(output_dir.glob(PART_PATTERN))
    rows = {r["id"]: r for r in read_rows(output_dir / RESULTS_NAME)}
    for part in parts:
        rows.update({r["id"]: r for r in read_rows(part)})
    rank = {cid: i for i, cid in enumerate(order)}
    merged = sorted(rows.values(), key=lambda r: rank.get(r["id"], len(rank)))
    if parts or not (output_dir / RESULTS_NAME).exists():
        output_dir.mkdir(parents=True, exist_ok=True)
        temporary = output_dir / f".{RESULTS_NAME}.tmp"
        temporary.write_text("".join(json.dumps(r) + "\n" for r in merged))
        os.replace(temporary, output_dir / RESULTS_NAME)
        for part in parts:
            part.unlink()
    return merged


def _count_part_rows(output_dir: Path) -> int:
    return sum(part.read_text().count("\n") for part in output_dir.glob(PART_PATTERN))


# ------------------------------------------------------------------------------------------------------ processes


def make_state(device: str = "auto"):
    """accelerate's ``PartialState``: distributed when launched by ``torchrun`` / ``accelerate launch`` (gloo on
    CPU), a single process otherwise."""
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=cpu, **({"backend": "gloo"} if cpu and distributed else {}))


def _device_for(config: SweepConfig, state) -> torch.device:
    if config.device == "auto" or (config.device == "cuda" and state.num_processes > 1):
        return torch.device(state.device)
    return torch.device(config.device)


class _Models:
    """Loads the pipeline for one quantization at a time and checks the sweep's model-dependent values on it."""

    def __init__(self, config: SweepConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.key: object = ()
        self.pipe = None

    def get(self, quantization: str | None):
        if self.key != quantization:
            from workbench import load_pipeline

            self.pipe = None
            dtype = getattr(torch, self.config.dtype)
            self.pipe = load_pipeline(self.config.model, self.device, dtype, quantization=quantization)
            if self.config.lora is not None:
                self.pipe.loras.load(self.config.lora, name="sweep")
            self.key = quantization
            self._check(self.pipe)
        return self.pipe

    def _check(self, pipe) -> None:
        d = pipe.defaults
        pipe.check_size(self.config.height or d.height, self.config.width or d.width)
        for weights in self.config.axes["expert_weights"]:
            if weights is None:
                continue
            if not pipe.num_experts:
                raise ValueError(f"expert_weights {weights!r} given, but model {pipe.name!r} has no experts")
            try:
                pipe.transformer.set_routing(weights, 1.0)
            except ValueError as err:
                raise ValueError(f"expert_weights value {weights!r}: {err}") from err
            finally:
                pipe.transformer.set_routing(None, 1.0)


def pipeline_kwargs(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A cell's settings as pipeline keyword arguments (load-time settings such as quantization left out)."""
    return {SETTINGS[k].kwarg: v for k, v in settings.items() if SETTINGS[k].kwarg is not None}


def _generate_unit(
    config: SweepConfig, models: _Models, unit: Sequence[Cell], rank: int
) -> list[tuple[Cell, Any, dict]]:
    """Generate one batch; returns (cell, image, row) per cell."""
    pipe = models.get(unit[0].settings["quantization"])
    if config.lora is not None:
        strength = unit[0].settings["lora_strength"]
        pipe.loras.set_strength("sweep", 1.0 if strength is None else strength)
    start = time.perf_counter()
    out = pipe(
        [c.prompt for c in unit],
        seed=[c.seed for c in unit],
        height=config.height,
        width=config.width,
        **pipeline_kwargs(unit[0].settings),
    )
    seconds = (time.perf_counter() - start) / len(unit)
    results = []
    for cell, image, parameters in zip(unit, out.images, out.parameters):
        row = {
            "id": cell.id,
            "name": cell.name,
            "file": cell.file,
            "prompt": cell.prompt,
            "seed": cell.seed,
            "settings": cell.settings,
            "parameters": parameters,
            "seconds": round(seconds, 4),
            "process": rank,
        }
        if config.evaluate is not None:
            from workbench.shapesworld.evaluate import score

            scores = score(cell.prompt, image)
            row.update(sample=cell.coords["sample"], kind="two" if "relation" in scores else "one", scores=scores)
        results.append((cell, image, row))
    return results


@dataclass
class SweepSummary:
    """What a run did. ``rows`` (the merged table), ``grids`` and ``evaluation`` are filled on the main process."""

    cells: int
    generated: int
    skipped: int
    output_dir: Path
    rows: list[dict] = field(default_factory=list)
    grids: list[Path] = field(default_factory=list)
    evaluation: str | None = None
    seconds: float = 0.0


def run_sweep(config: SweepConfig, state=None, progress: bool = True) -> SweepSummary:
    """Run (or resume) a sweep on this process's share of the pending work; see the module docstring."""
    begin = time.perf_counter()
    state = state if state is not None else make_state(config.device)
    device = _device_for(config, state)
    if config.threads and device.type == "cpu":
        torch.set_num_threads(config.threads)
    out_dir = config.output_dir
    cells = expand(config)
    units = work_units(config, cells)
    models = _Models(config, device)
    models.get(units[0][0].settings["quantization"])
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        merge_results(out_dir, [c.id for c in cells])
    state.wait_for_everyone()
    recorded = {r["id"]: r for r in read_rows(out_dir / RESULTS_NAME)}

    def done(cell: Cell) -> bool:
        return cell.id in recorded and (out_dir / recorded[cell.id]["file"]).is_file()

    pending = [u for u in units if not all(done(c) for c in u)]
    generated = sum(len(u) for u in pending)
    part = out_dir / f"results.part-{state.process_index}.jsonl"
    bar = tqdm(total=generated, desc="sweep", unit="img", disable=not (progress and state.is_main_process))
    with state.split_between_processes(pending) as share:
        for unit in share:
            for cell, image, row in _generate_unit(config, models, unit, state.process_index):
                save_png(image, out_dir / cell.file)
                with open(part, "a") as handle:
                    handle.write(json.dumps(row) + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
            if state.is_main_process:
                bar.n = min(_count_part_rows(out_dir), generated)
                bar.refresh()
    state.wait_for_everyone()
    bar.n = generated
    bar.close()
    summary = SweepSummary(len(cells), generated, len(cells) - generated, out_dir)
    if state.is_main_process:
        summary.rows = merge_results(out_dir, [c.id for c in cells])
        by_id = {r["id"]: r for r in summary.rows}
        if config.grids_enabled:
            summary.grids = write_grids(config, cells, by_id)
        if config.evaluate is not None:
            summary.evaluation = write_evaluation(config, cells, by_id)
    summary.seconds = time.perf_counter() - begin
    return summary


# ----------------------------------------------------------------------------------------------------------- grids


def _value_label(config: SweepConfig, axis: str, index: int) -> str:
    value = config.axis_values(axis)[index]
    if axis == "prompt":
        return f"p{index}: {value}"
    return f"{axis}={value if value is not None else 'default'}"


def _grid_specs(config: SweepConfig) -> Iterator[tuple[str, str | None, dict[str, int]]]:
    """(x axis, y axis or None, fixed coords of the other axes) for every grid to draw."""
    varying = config.varying_axes()
    if len(varying) == 1:
        yield varying[0], None, {}
        return
    pairs = config.grid_pairs if config.grid_pairs is not None else list(itertools.combinations(varying, 2))
    for x, y in pairs:
        others = [a for a in varying if a not in (x, y)]
        if config.grid_others == "all":
            combos = itertools.product(*(range(len(config.axis_values(a))) for a in others))
        else:
            combos = [tuple(0 for _ in others)]
        for combo in combos:
            yield x, y, dict(zip(others, combo))


def write_grids(config: SweepConfig, cells: Sequence[Cell], rows: Mapping[str, dict]) -> list[Path]:
    """Draw the X/Y grids of the varying axes into ``output_dir/grids``; axes not in a grid sit at their first value
    (``grids.others: first``) or get one grid per combination (``all``). Evaluation sweeps show sample 0."""
    fixed_base = {"sample": 0} if config.evaluate else {}
    lookup = {}
    for cell in cells:
        lookup[tuple(sorted(cell.coords.items()))] = cell
    all_axes = {a: 0 for a in (["sample"] if config.evaluate else ["prompt", "seed"]) + list(config.axes)}
    written = []
    for x, y, others in _grid_specs(config):
        xs = range(len(config.axis_values(x)))
        ys = range(len(config.axis_values(y))) if y else [0]
        grid = []
        for yi in ys:
            line = []
            for xi in xs:
                coords = {**all_axes, **fixed_base, **others, x: xi, **({y: yi} if y else {})}
                cell = lookup.get(tuple(sorted(coords.items())))
                path = config.output_dir / rows[cell.id]["file"] if cell and cell.id in rows else None
                line.append(Image.open(path).convert("RGB") if path and path.is_file() else None)
            grid.append(line)
        title = ", ".join(_value_label(config, a, i) for a, i in others.items())
        row_labels = [_value_label(config, y, yi) for yi in ys] if y else [""]
        image = viz.labelled_grid(grid, [_value_label(config, x, xi) for xi in xs], row_labels, title)
        suffix = "".join(f"__{a}={_slug(config.axis_values(a)[i], 16)}" for a, i in others.items())
        name = f"{x}-vs-{y}{suffix}.png" if y else f"{x}.png"
        path = config.output_dir / "grids" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------------ evaluation


def evaluation_table(config: SweepConfig, cells: Sequence[Cell], rows: Mapping[str, dict]) -> list[dict]:
    """Accuracy per settings cell and caption kind: [{"settings": {varying setting: value}, "kind", "n",
    "accuracy": {attribute: fraction}}] in sweep order."""
    varying = [a for a in config.axes if len(config.axes[a]) > 1]
    groups: dict[str, dict[str, dict[str, list[int]]]] = {}
    labels: dict[str, dict[str, Any]] = {}
    for cell in cells:
        row = rows.get(cell.id)
        if row is None or "scores" not in row:
            continue
        labels.setdefault(cell.settings_key, {a: cell.settings[a] for a in varying})
        totals = groups.setdefault(cell.settings_key, {}).setdefault(row["kind"], {})
        for key, value in row["scores"].items():
            hit_total = totals.setdefault(key, [0, 0])
            hit_total[0] += int(bool(value))
            hit_total[1] += 1
    table = []
    for key, kinds in groups.items():
        for kind in sorted(kinds):
            totals = kinds[kind]
            accuracy = {k: hit / total for k, (hit, total) in totals.items()}
            table.append({"settings": labels[key], "kind": kind, "n": totals["all"][1], "accuracy": accuracy})
    return table


def _table_value(value: Any, present: bool) -> str:
    if not present:
        return "defaults"
    if value is None:
        return "default"
    return value if isinstance(value, str) else _canonical(value)


def format_evaluation(table: Sequence[dict], setting_names: Sequence[str]) -> str:
    """The evaluation table as markdown: one row per settings cell and kind, one column per attribute."""
    from workbench.shapesworld.evaluate import TABLE_COLUMNS

    names = list(setting_names) or ["settings"]
    header = [*names, "kind", "n", *TABLE_COLUMNS]
    rows = []
    for entry in table:
        values = [_table_value(entry["settings"].get(n), n in entry["settings"]) for n in names]
        accuracy = entry["accuracy"]
        cells = [f"{100 * accuracy[c]:.1f}%" if c in accuracy else "–" for c in TABLE_COLUMNS]
        rows.append([*values, entry["kind"], str(entry["n"]), *cells])
    return viz.markdown_rows(header, rows)


def write_evaluation(config: SweepConfig, cells: Sequence[Cell], rows: Mapping[str, dict]) -> str:
    """Write ``evaluation.json`` and ``evaluation.md`` into the output folder; returns the markdown."""
    table = evaluation_table(config, cells, rows)
    markdown = format_evaluation(table, [a for a in config.axes if len(config.axes[a]) > 1])
    spec = config.evaluate
    header = {"n": spec.n, "kind": spec.kind, "seed": spec.seed, "model": config.model}
    (config.output_dir / "evaluation.json").write_text(json.dumps({**header, "table": table}, indent=2) + "\n")
    (config.output_dir / "evaluation.md").write_text(markdown + "\n")
    return markdown
