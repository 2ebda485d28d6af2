"""What a tab shows while the model runs: a progress line (step k of N or frame k of N, it/s, ETA, a bar) and a live
preview of the predicted clean image x̂0, decoded by the VAE.

The pipeline's step callback gets ``(step, σ, x)`` with ``x`` the latents *after* the step, at the next step's σ. Two
consecutive callbacks therefore give two points of the path at known σ, and the velocity of that step
``v = (x_k − x_{k−1}) / (σ_k − σ_{k−1})``; the clean image it predicts is ``x̂0 = x_k − σ_k·v`` (exactly the sampler's
x̂0 for Euler, the step's effective one for Heun and DPM++ 2M). :class:`X0Tracker` does this bookkeeping in the
worker thread; :class:`LivePreview` decodes the newest x̂0 in the page's thread every few steps, and the last step's
latents (σ = 0, the image itself) when the run ends.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch
from PIL import Image

from workbench import Pipeline

PREVIEW_EVERY = 2  # decode an x̂0 preview every this many steps
VAE_PREVIEW_MAX_SIDE = 512  # above this, the linear latent→RGB map instead of the VAE

StepCallback = Callable[[int, float, torch.Tensor], bool | None]


class X0Tracker:
    """Wraps a pipeline step callback and keeps the newest x̂0 prediction (scaled latents) of the run; a callback
    at a higher σ than the one before starts a new run (the next frame of a sequence)."""

    def __init__(self) -> None:
        self._pending: tuple[float, torch.Tensor] | None = None  # (σ of the last callback, its latents: σ unknown)
        self._known: tuple[float, torch.Tensor] | None = None  # (σ, latents) of the newest point of the path
        self._x0: tuple[int, torch.Tensor] | None = None
        self._lock = threading.Lock()
        self.calls = 0

    def wrap(self, callback: StepCallback) -> StepCallback:
        """``callback`` preceded by :meth:`observe`."""

        def tracked(step: int, sigma: float, latents: torch.Tensor) -> bool | None:
            self.observe(float(sigma), latents)
            return callback(step, sigma, latents)

        return tracked

    def observe(self, sigma: float, latents: torch.Tensor) -> None:
        """One callback: the previous callback's latents lie at this ``sigma``; ``latents`` at the next one's."""
        self.calls += 1
        if self._pending is not None and self._pending[0] > sigma:
            point = (sigma, self._pending[1])
            if self._known is not None and self._known[0] > sigma:
                velocity = (point[1] - self._known[1]) / (sigma - self._known[0])
                with self._lock:
                    self._x0 = (self.calls, point[1] - sigma * velocity)
            self._known = point
        else:
            self._known = None
        self._pending = (sigma, latents.detach().float().cpu().clone())

    def latest(self) -> tuple[int, torch.Tensor] | None:
        """(number of callbacks when it was computed, x̂0 latents) of the newest prediction; None before 3 steps."""
        with self._lock:
            return self._x0


def decode_preview(pipe: Pipeline, latents: torch.Tensor) -> list[Image.Image]:
    """Scaled latents ``(B, C, h, w)`` as images at output size: the VAE when the image is small enough to decode
    every few steps, else the model's linear latent→RGB map, resized smoothly."""
    scale = pipe.vae_scale_factor
    size = (latents.shape[-1] * scale, latents.shape[-2] * scale)
    if max(size) <= VAE_PREVIEW_MAX_SIDE:
        return pipe.decode_latents(latents)
    return [image.resize(size, Image.Resampling.BILINEAR) for image in pipe.preview(latents)]


class LivePreview:
    """The newest x̂0 of a run, decoded at most every :data:`PREVIEW_EVERY` callbacks (in the page's thread)."""

    def __init__(self, pipe: Pipeline, every: int = PREVIEW_EVERY) -> None:
        self.pipe = pipe
        self.every = every
        self.tracker = X0Tracker()
        self._shown = 0

    def wrap(self, callback: StepCallback) -> StepCallback:
        return self.tracker.wrap(callback)

    def images(self) -> list[Image.Image] | None:
        """Decoded images of the newest x̂0 when it is new enough to show, else None (keep the current preview)."""
        latest = self.tracker.latest()
        if latest is None or (self._shown and latest[0] - self._shown < self.every):
            return None
        self._shown = latest[0]
        return decode_preview(self.pipe, latest[1])


class ProgressLine:
    """ "Step k of N · r it/s · ETA m:ss" (or "Frame f of F · step k of n · …" when ``frame_steps`` gives the steps
    of each frame) with a bar; the rate is timed from the first step shown."""

    def __init__(self, total: int, frame_steps: list[int] | None = None) -> None:
        self.total = max(1, total)
        self.frame_steps = frame_steps
        self._first: tuple[int, float] | None = None

    def rate(self, done: int, now: float | None = None) -> float | None:
        """Steps per second since the first step shown (None until two steps are seen)."""
        now = time.monotonic() if now is None else now
        if self._first is None:
            self._first = (done, now)
            return None
        steps, seconds = done - self._first[0], now - self._first[1]
        return steps / seconds if steps > 0 and seconds > 0 else None

    def where(self, done: int) -> str:
        """ "Step k of N", or "Frame f of F · step k of n" for frame sequences."""
        if not self.frame_steps:
            return f"Step {done} of {self.total}"
        before = 0
        for frame, steps in enumerate(self.frame_steps, start=1):
            if done <= before + steps or frame == len(self.frame_steps):
                return f"Frame {frame} of {len(self.frame_steps)} · step {done - before} of {steps}"
            before += steps
        raise AssertionError("unreachable")

    def html(self, done: int, now: float | None = None) -> str:
        """The progress line after ``done`` of :attr:`total` steps."""
        rate = self.rate(done, now)
        parts = [self.where(done)]
        if rate is not None:
            parts.append(f"{rate:.2f} it/s" if rate < 10 else f"{rate:.0f} it/s")
            parts.append(f"ETA {format_seconds((self.total - done) / rate)}")
        return progress_html(done / self.total, " · ".join(parts))


def format_seconds(seconds: float) -> str:
    """``0:07``, ``1:05``, ``1:02:03``."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def progress_html(fraction: float, text: str) -> str:
    """A bar filled to ``fraction`` with ``text`` under it."""
    percent = max(0.0, min(1.0, fraction)) * 100
    return (
        f'<div class="wb-progress" role="progressbar" aria-valuenow="{percent:.0f}" aria-valuemin="0" '
        f'aria-valuemax="100" style="height:8px;border-radius:4px;background:var(--neutral-200, #e5e7eb);">'
        f'<div style="width:{percent:.1f}%;height:100%;border-radius:4px;background:var(--color-accent, #f97316);">'
        f"</div></div><p>{text}</p>"
    )
