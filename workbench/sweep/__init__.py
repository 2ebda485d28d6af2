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

The package's modules: :mod:`~workbench.sweep.config` (settings and config validation), :mod:`~workbench.sweep.cells`
(cells, ids, work units), :mod:`~workbench.sweep.results` (the results table), :mod:`~workbench.sweep.run` (one or
many processes) and :mod:`~workbench.sweep.reports` (grids, evaluation table).
"""

from workbench.sweep.cells import Cell, cell_id, expand, work_units
from workbench.sweep.config import (
    DTYPES,
    EVAL_KINDS,
    GRID_OTHERS,
    LATER_KEYS,
    QUANTIZATIONS,
    SETTING_DEFAULTS,
    SETTINGS,
    EvaluateSpec,
    Setting,
    SweepConfig,
    load_config,
    parse_config,
    read_config_file,
)
from workbench.sweep.reports import evaluation_table, format_evaluation, write_evaluation, write_grids
from workbench.sweep.results import PART_PATTERN, RESULTS_NAME, merge_results, read_rows
from workbench.sweep.run import SweepSummary, make_state, pipeline_kwargs, run_sweep

__all__ = [
    "DTYPES",
    "EVAL_KINDS",
    "GRID_OTHERS",
    "LATER_KEYS",
    "PART_PATTERN",
    "QUANTIZATIONS",
    "RESULTS_NAME",
    "SETTINGS",
    "SETTING_DEFAULTS",
    "Cell",
    "EvaluateSpec",
    "Setting",
    "SweepConfig",
    "SweepSummary",
    "cell_id",
    "evaluation_table",
    "expand",
    "format_evaluation",
    "load_config",
    "make_state",
    "merge_results",
    "parse_config",
    "pipeline_kwargs",
    "read_config_file",
    "read_rows",
    "run_sweep",
    "work_units",
    "write_evaluation",
    "write_grids",
]
