"""What a sweep leaves besides its images: labelled X/Y grids and the evaluation table per settings cell."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from workbench import viz
from workbench.sweep.cells import Cell, slug
from workbench.sweep.config import SweepConfig, canonical

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
        suffix = "".join(f"__{a}={slug(config.axis_values(a)[i], 16)}" for a, i in others.items())
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
    return value if isinstance(value, str) else canonical(value)


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
