"""``python -m workbench sweep --config sweep.yaml``: a grid of prompts × seeds × settings (or a ShapesWorld
evaluation per settings cell), on one process or split across ``torchrun`` / ``accelerate launch`` processes."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="parameter sweep / X-Y grids / evaluation table (multi-process with torchrun or accelerate launch)",
        description="Run or resume a sweep described by a YAML or JSON config (see docs/scale_out.md).",
    )
    parser.add_argument("--config", required=True, help="sweep config, .yaml/.yml or .json")
    parser.add_argument("--output-dir", default=None, help="override the config's output_dir")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the cells, generate nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from workbench import sweep

    config = sweep.load_config(args.config, args.output_dir)
    if args.dry_run:
        cells = sweep.expand(config)
        for cell in cells:
            print(f"{cell.id}  {cell.file}")
        units = sweep.work_units(config, cells)
        print(f"{len(cells)} cells in {len(units)} batches; varying axes: {config.varying_axes() or 'none'}")
        return 0
    state = sweep.make_state(config.device)
    try:
        summary = sweep.run_sweep(config, state, progress=not args.no_progress)
        if state.is_main_process:
            print(
                f"{summary.cells} cells: {summary.generated} generated, {summary.skipped} already done "
                f"({summary.seconds:.1f} s, {state.num_processes} process{'es' if state.num_processes > 1 else ''})"
            )
            print(f"results: {config.output_dir / sweep.RESULTS_NAME}")
            for path in summary.grids:
                print(f"grid: {path}")
            if summary.evaluation:
                print(summary.evaluation)
    finally:
        if state.num_processes > 1:
            state.destroy_process_group()
    return 0
