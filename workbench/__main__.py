"""Command line: ``python -m workbench <command> …``; every module in ``workbench/cli`` with a ``register`` function
adds one command (the others, like ``common``, are shared helpers).

A user error (a bad value, a missing or unreadable file, an image over the pixel limit, a pickle where tensors were
expected) is one ``error: …`` line on stderr and exit code 2 (:mod:`workbench.errors`).
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import workbench.cli
from workbench.errors import run_command
from workbench.limits import Limits, guard_image_pixels


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="SD3 Workbench command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(workbench.cli.__path__), key=lambda m: m.name):
        command = importlib.import_module(f"workbench.cli.{module.name}")
        if hasattr(command, "register"):
            command.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    guard_image_pixels(Limits.local().max_image_pixels)
    return run_command(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
