"""``python -m workbench bench [--quick]``: the memory and speed benchmark (see :mod:`workbench.bench`)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from workbench import bench

    parser = subparsers.add_parser("bench", help="memory and speed benchmark against diffusers (markdown tables)")
    bench.add_arguments(parser)
    parser.set_defaults(run=bench.run)
