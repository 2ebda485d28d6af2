"""Command line: ``python -m workbench <command> …``; every module in ``workbench/cli`` with a ``register`` function
adds one command (the others, like ``common``, are shared helpers)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import workbench.cli


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
    try:
        return int(args.run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
