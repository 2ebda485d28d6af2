"""User errors on the command line: what counts as one, and how it is reported (one ``error: …`` line on stderr and
exit code 2, like argparse's own errors; only real bugs show a traceback; Ctrl+C exits with 130). Both command lines,
``python -m workbench`` and ``python -m workbench.shapesworld``, run their commands through :func:`run_command`.
"""

from __future__ import annotations

import pickle
import sys
from collections.abc import Callable

from PIL import Image

from workbench.limits import image_error_message

USER_ERRORS = (ValueError, OSError, EOFError, pickle.UnpicklingError, Image.DecompressionBombError, Warning)


def error_line(err: BaseException) -> str:
    """The one-line message of a user error."""
    bomb_or_not_image = (Image.DecompressionBombError, Image.DecompressionBombWarning, Image.UnidentifiedImageError)
    if isinstance(err, bomb_or_not_image):
        return image_error_message(err) or str(err)
    if isinstance(err, OSError) and err.strerror:
        return f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())


def run_command(command: Callable[[], int | None]) -> int:
    """``command()``'s exit code; a user error is printed as one ``error:`` line (exit 2), Ctrl+C exits with 130."""
    try:
        return int(command() or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        return 2
