"""``python -m workbench bench [--quick]``: the memory and speed benchmark, ``benchmarks/bench.py``.

The benchmark compares the workbench with diffusers, so it lives in the repository's ``benchmarks/`` folder, outside
the package (which never imports diffusers at run time). From a checkout this command takes that script's arguments
and runs it; without one (an installed package) it says where the script is.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench.py"


def load_script() -> ModuleType:
    """The module benchmarks/bench.py of this checkout."""
    spec = importlib.util.spec_from_file_location("workbench_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="memory and speed benchmark against diffusers (benchmarks/bench.py; markdown tables)"
    )
    if SCRIPT.is_file():
        script = load_script()
        script.add_arguments(parser)
        parser.set_defaults(run=script.run)
    else:
        parser.add_argument("arguments", nargs="*", help=argparse.SUPPRESS)
        parser.set_defaults(run=_missing)


def _missing(args: argparse.Namespace) -> int:
    raise ValueError(
        "the benchmark is the script benchmarks/bench.py of the repository, not part of the installed package "
        f"(looked for {SCRIPT}); run `python benchmarks/bench.py` from a checkout"
    )
