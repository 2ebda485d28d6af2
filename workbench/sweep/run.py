"""Running a sweep on one process or across ``torchrun`` / ``accelerate launch`` processes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from workbench.metadata import save_png
from workbench.sweep.cells import Cell, expand, work_units
from workbench.sweep.config import SETTINGS, SweepConfig
from workbench.sweep.reports import write_evaluation, write_grids
from workbench.sweep.results import RESULTS_NAME, count_part_rows, merge_results, read_rows

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
        self.control_image = None
        if config.control_image is not None:
            from workbench.limits import open_image
            from workbench.preprocess import preprocess

            self.control_image = preprocess(open_image(config.control_image, "control_image"), config.preprocess)

    def get(self, quantization: str | None):
        if self.key != quantization:
            from workbench import load_pipeline

            self.pipe = None
            dtype = getattr(torch, self.config.dtype)
            self.pipe = load_pipeline(self.config.model, self.device, dtype, quantization=quantization)
            if self.config.lora is not None:
                self.pipe.loras.load(self.config.lora, name="sweep")
            if self.config.controlnet is not None:
                self.pipe.controlnets.load(self.config.controlnet, name="sweep")
                self.pipe.controlnets.entries["sweep"].preprocessor = self.config.preprocess
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
        **({"control_image": models.control_image} if models.control_image is not None else {}),
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
                bar.n = min(count_part_rows(out_dir), generated)
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
