"""Command line: ``python -m workbench <command> …``; every module in ``workbench/cli`` with a ``register`` function
adds one command (the others, like ``common``, are shared helpers).

A user error (a bad value, a missing or unreadable file, an image over the pixel limit, a pickle where tensors were
expected) is one ``error: …`` line on stderr and exit code 2, like argparse's own errors; only real bugs show a
traceback. Ctrl+C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import pickle
import pkgutil
import sys

from PIL import Image

import workbench.cli
from workbench.limits import Limits, guard_image_pixels, image_error_message

USER_ERRORS = (ValueError, OSError, EOFError, pickle.UnpicklingError, Image.DecompressionBombError, Warning)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench", description="SD3 Workbench command line")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in sorted(pkgutil.iter_modules(workbench.cli.__path__), key=lambda m: m.name):
        command = importlib.import_module(f"workbench.cli.{module.name}")
        if hasattr(command, "register"):
            command.register(commands)
    return parser


def error_line(err: BaseException) -> str:
    """The one-line message of a user error."""
    bomb_or_not_image = (Image.DecompressionBombError, Image.DecompressionBombWarning, Image.UnidentifiedImageError)
    if isinstance(err, bomb_or_not_image):
        return image_error_message(err) or str(err)
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    guard_image_pixels(Limits.local().max_image_pixels)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
