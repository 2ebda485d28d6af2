"""Resource limits of a hosted app and of the command line: the queue, jobs per browser session, upload size, image
pixels (checked from the file header before decoding), the work of one request (frames × steps × images × pixels)
and the age and total size of the output files. Every limit has an environment variable (see :data:`ENV`).

The pixel limit also sets Pillow's decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``) and turns its warning into
an error, so an image over the limit is refused while its header is read, before any pixel is decoded.
"""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image

LOG = logging.getLogger("workbench.limits")

MB = 1024 * 1024
EMPTY_FOLDER_GRACE_S = 120
ENV = {
    "queue_max_size": "WORKBENCH_QUEUE_MAX",
    "jobs_per_session": "WORKBENCH_JOBS_PER_SESSION",
    "max_file_size": "WORKBENCH_MAX_FILE_MB",
    "max_image_pixels": "WORKBENCH_MAX_IMAGE_MEGAPIXELS",
    "max_work": "WORKBENCH_MAX_WORK_MEGAPIXEL_STEPS",
    "output_max_age_s": "WORKBENCH_OUTPUT_MAX_AGE_MIN",
    "output_max_bytes": "WORKBENCH_OUTPUT_MAX_MB",
}
# environment values are in these units (MB, megapixels, minutes); the fields are in bytes, pixels and seconds
_ENV_UNIT = {
    "max_file_size": MB,
    "max_image_pixels": 1_000_000,
    "max_work": 1_000_000,
    "output_max_age_s": 60,
    "output_max_bytes": MB,
}


class LimitError(ValueError):
    """A request over one of the limits; the message names the limit and what to lower."""


@dataclass(frozen=True)
class Limits:
    """One app's limits; ``None`` means unlimited. ``max_work`` counts pixel-steps: frames × steps × images ×
    width × height of one request (SD3 at 1024², 28 steps, 4 images is 117 M)."""

    queue_max_size: int | None = 16
    jobs_per_session: int | None = 2
    max_file_size: int | None = 10 * MB
    max_image_pixels: int | None = 4096 * 4096
    max_work: int | None = 128_000_000
    output_max_age_s: float | None = 3600.0
    output_max_bytes: int | None = 2048 * MB
    cache_check_every_s: int = 600

    @classmethod
    def public(cls, env: Mapping[str, str] | None = None) -> Limits:
        """The limits of a public app, each overridable through its environment variable."""
        return cls().with_env(os.environ if env is None else env)

    @classmethod
    def local(cls, env: Mapping[str, str] | None = None) -> Limits:
        """Looser limits for an app on localhost: no work cap and no output deletion."""
        base = cls(
            queue_max_size=64,
            jobs_per_session=8,
            max_file_size=200 * MB,
            max_image_pixels=8192 * 8192,
            max_work=None,
            output_max_age_s=None,
            output_max_bytes=None,
        )
        return base.with_env(os.environ if env is None else env)

    def with_env(self, env: Mapping[str, str]) -> Limits:
        """These limits with those set in ``env`` (a value of 0 or "none" means unlimited)."""
        changes: dict = {}
        for name, variable in ENV.items():
            text = env.get(variable)
            if text is None or not text.strip():
                continue
            if text.strip().lower() in ("0", "none", "off"):
                changes[name] = None
                continue
            try:
                value = float(text)
            except ValueError as err:
                raise ValueError(f"{variable} must be a number, got {text!r}") from err
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{variable} must be a finite number ≥ 0, got {text!r}")
            value *= _ENV_UNIT.get(name, 1)
            changes[name] = value if name == "output_max_age_s" else int(value)
        return replace(self, **changes)


# ------------------------------------------------------------------------------------------------------------ work


def request_work(steps: int, width: int, height: int, images: int = 1, frames: int = 1) -> int:
    """Pixel-steps of one request: frames × images × steps × width × height."""
    return int(max(frames, 1) * max(images, 1) * max(steps, 0) * max(width, 0) * max(height, 0))


def check_work(limits: Limits, steps: int, width: int, height: int, images: int = 1, frames: int = 1) -> None:
    """LimitError when the request needs more pixel-steps than ``limits.max_work``."""
    if limits.max_work is None:
        return
    work = request_work(steps, width, height, images, frames)
    if work > limits.max_work:
        raise LimitError(
            f"this request is too large for this app: {frames} frame(s) × {images} image(s) × {steps} steps × "
            f"{width}×{height} px = {work / 1e6:.0f} M pixel-steps; the limit is {limits.max_work / 1e6:.0f} M. "
            "Lower the frames, steps, batch or size."
        )


# ---------------------------------------------------------------------------------------------------------- images


def guard_image_pixels(max_pixels: int | None) -> None:
    """Set Pillow's decompression-bomb guard to ``max_pixels`` and make it an error from the first pixel over (by
    default Pillow only warns up to twice its limit). The check runs on the header, in ``Image.open``."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def image_error_message(err: BaseException, what: str = "image") -> str | None:
    """A one-line message for an image that cannot be read (too many pixels, not an image, truncated), or None when
    ``err`` is not about the image file."""
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        limit = Image.MAX_IMAGE_PIXELS
        size = f" ({limit / 1e6:.1f} megapixels)" if limit else ""
        return f"{what}: the image has more pixels than this app accepts{size}; send a smaller image"
    if isinstance(err, Image.UnidentifiedImageError):
        return f"{what}: not an image file Pillow can read (PNG, JPEG, WebP, …)"
    if isinstance(err, (OSError, SyntaxError, EOFError)) and not isinstance(err, (FileNotFoundError, PermissionError)):
        return f"{what}: the image file is damaged or truncated"
    return None


def open_image(path: str | Path, what: str = "image") -> Image.Image:
    """Open and fully decode an image, with the messages of :func:`image_error_message` as ValueError."""
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (FileNotFoundError, IsADirectoryError) as err:
        raise ValueError(f"{what}: no such file: {path}") from err
    except Exception as err:
        message = image_error_message(err, what)
        if message is None:
            raise
        raise ValueError(message) from err


# --------------------------------------------------------------------------------------------------------- outputs


def prune_outputs(folder: str | Path, max_age_s: float | None, max_bytes: int | None, now: float | None = None) -> int:
    """Delete files under ``folder`` older than ``max_age_s``, then the oldest ones until the rest fit in
    ``max_bytes``; empty sub-folders go too. Returns the number of files deleted; errors are logged, never raised."""
    root = Path(folder)
    if (max_age_s is None and max_bytes is None) or not root.is_dir():
        return 0
    now = time.time() if now is None else now
    files, folders = [], []
    for parent, subfolders, names in os.walk(root):  # unlike Path.rglob, os.walk skips what vanishes meanwhile
        folders.extend(Path(parent, name) for name in subfolders)
        for name in names:
            path = Path(parent, name)
            try:
                if path.is_file() and not path.is_symlink():
                    stat = path.stat()
                    files.append((stat.st_mtime, stat.st_size, path))
            except OSError:
                continue
    files.sort()
    total = sum(size for _, size, _ in files)
    deleted = 0
    for mtime, size, path in files:
        too_old = max_age_s is not None and now - mtime > max_age_s
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            continue
        try:
            path.unlink()
        except OSError as err:
            LOG.warning("could not delete output %s: %s", path.name, err)
            continue
        total -= size
        deleted += 1
    for sub in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        try:
            if now - sub.stat().st_mtime > EMPTY_FOLDER_GRACE_S:  # a folder being filled right now stays
                sub.rmdir()
        except OSError:
            pass
    return deleted
