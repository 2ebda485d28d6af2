"""The cells of a sweep: one image each, with an id that is a hash of everything that determines its pixels, and
the work units (batches) they are computed in."""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workbench.sweep.config import LATER_KEYS, SETTINGS, SweepConfig, canonical

# ----------------------------------------------------------------------------------------------------------- cells


def slug(value: Any, limit: int = 24) -> str:
    if value is None:
        return "default"
    text = f"{value:g}" if isinstance(value, float) else value if isinstance(value, str) else canonical(value)
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
        return canonical(self.settings)


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
    if config.controlnet is not None:
        identity["controlnet"] = [config.controlnet, config.control_image, config.preprocess]
    for key, default in LATER_KEYS.items():  # keys added after sweeps were run: absent from ids at their default
        if identity["settings"].get(key) == default:
            identity["settings"].pop(key)
    return hashlib.sha1(canonical(identity).encode()).hexdigest()[:10]


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
        label = "-".join(f"{SETTINGS[n].label}{slug(settings[n])}" for n in varying)
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
