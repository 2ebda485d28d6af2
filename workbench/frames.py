"""Frame sequences made by the image model, their temporal consistency, and their export as PNGs and a video.

There is no official SD3 video model: a "video" here is a sequence of images whose conditioning or starting noise
changes a little from one frame to the next. Three modes:

- ``travel``: the text conditioning moves between two or more key prompts (linear interpolation of the
  :meth:`Pipeline.encode_prompts` sequence embeds and pooled vectors) while the noise stays that of one seed;
- ``walk``: the starting noise moves between the noises of two or more seeds by spherical interpolation (slerp),
  for one prompt;
- ``loopback``: frame 0 is text→image; frame i is image→image of frame i − 1 at ``loopback_strength``, with the
  conditioning travelling from the first to the last prompt when more than one is given.

Frames are evenly spread over the segments between key prompts (or seeds): frame i of N sits at
``u = i·(K − 1)/(N − 1)`` key positions, i.e. in segment ``j = ⌊u⌋`` at fraction ``u − j`` (then eased), so the first
and last frames are exactly the first and last keys. Frames are PIL RGB images; each carries its ``parameters``
text chunk with the frame keys (``Frame: 3/12, Mode: travel, Travel: 0.2727, Travel to: …``) after the usual ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from workbench.flow import GenerationCancelled
from workbench.metadata import format_parameters, save_png
from workbench.pipeline import Pipeline
from workbench.settings import check_fixed_seeds, setting

MODES = ("travel", "walk", "loopback")
EASINGS = ("linear", "cosine")
VIDEO_SUFFIXES = (".mp4", ".gif")
MAX_FRAMES = 10_000
FPS_RANGE = (1, 60)
FLICKER_TOLERANCE = 1.5 / 255
RESERVED_KWARGS = {
    "prompt": "prompts",
    "seed": "seed",
    "image": "mode='loopback'",
    "strength": "loopback_strength",
    "initial_latents": "mode='walk'",
    "prompt_embeds": "mode='travel'",
    "num_images": "num_frames",
    "callback": "step_callback",
}
FRAME_LABELS = (
    ("frame", "Frame"),
    ("mode", "Mode"),
    ("easing", "Easing"),
    ("travel", "Travel"),
    ("travel_to", "Travel to"),
    ("walk", "Walk"),
    ("walk_to_seed", "Walk to seed"),
)

FrameCallback = Callable[[int, int], "bool | None"]


@dataclass
class FrameSequence:
    """``frames`` (PIL RGB, each with ``info["parameters"]``), the ``mode``, per-frame ``parameters`` dicts (the
    pipeline's keys plus ``frame``, ``num_frames``, ``mode`` and the mode's position keys) and the ``consistency``
    figures of :func:`frame_consistency`."""

    frames: list[Image.Image]
    mode: str
    parameters: list[dict] = field(default_factory=list)
    consistency: dict[str, float] = field(default_factory=dict)

    def save(self, out_dir: str | Path, video_path: str | Path | None = None, fps: float = 8) -> list[Path]:
        """Write ``out_dir/0000.png``, ``0001.png``, … (with their parameters) and, when ``video_path`` is given, the
        video (``.mp4``: H.264 yuv420p; ``.gif``: looping). Returns the PNG paths followed by the video path."""
        if video_path is not None:
            check_video_args(video_path, fps)
        out = Path(out_dir)
        paths = [save_png(frame, out / f"{i:04d}.png") for i, frame in enumerate(self.frames)]
        if video_path is not None:
            paths.append(write_video(self.frames, video_path, fps))
        return paths


# ---------------------------------------------------------------------------------------------------- schedules


def ease(t: float, easing: str = "linear") -> float:
    """``linear``: t; ``cosine``: (1 − cos πt)/2, slow at both keys of a segment."""
    if easing == "linear":
        return t
    if easing == "cosine":
        return 0.0 if t == 0 else 1.0 if t == 1 else (1 - math.cos(math.pi * t)) / 2
    raise ValueError(f"easing must be one of {EASINGS}, got {easing!r}")


def frame_positions(num_frames: int, num_keys: int, easing: str = "linear") -> list[tuple[int, float]]:
    """Per frame, ``(segment j, eased fraction t)`` between key j and key j + 1, t ∈ [0, 1); the last frame is
    ``(num_keys − 1, 0.0)``. Frames are evenly spread: frame i sits at u = i·(num_keys − 1)/(num_frames − 1)."""
    if num_frames < 2 or num_keys < 1:
        raise ValueError(f"need num_frames >= 2 and num_keys >= 1, got {num_frames} and {num_keys}")
    positions = []
    for i in range(num_frames):
        j, remainder = divmod(i * (num_keys - 1), num_frames - 1)
        positions.append((j, ease(remainder / (num_frames - 1), easing)))
    return positions


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation between two tensors of one shape (treated as flat vectors); exactly ``a`` at t = 0
    and ``b`` at t = 1. Falls back to linear interpolation when they are (anti)parallel."""
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    theta = torch.arccos(cos.clamp(-1, 1))
    if float(torch.sin(theta).abs()) < 1e-6:
        mixed = (1 - t) * a64 + t * b64
    else:
        mixed = (torch.sin((1 - t) * theta) * a64 + torch.sin(t * theta) * b64) / torch.sin(theta)
    return mixed.reshape(a.shape).to(a.dtype)


def _lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return a.clone() if t == 0 else torch.lerp(a, b, t)


# -------------------------------------------------------------------------------------------------- consistency


def _as_float(frame: Image.Image | np.ndarray) -> np.ndarray:
    array = np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32)


def frame_consistency(
    frames: Sequence[Image.Image | np.ndarray], flicker_tolerance: float = FLICKER_TOLERANCE
) -> dict[str, float]:
    """Temporal consistency of N ≥ 2 equally sized frames, on the 0–1 pixel scale (uint8 frames are divided by 255).

    With f[t] a frame and Δ[t] = f[t] − f[t−1] (per pixel and channel):

    - ``mean_abs_change``: mean of |Δ[t]| over t = 1…N−1 and all pixels and channels;
    - ``max_abs_change``: the largest per-pair mean of |Δ[t]| (the biggest jump);
    - ``mean_second_difference``: mean of |f[t+1] − 2f[t] + f[t−1]| = |Δ[t+1] − Δ[t]| over t = 1…N−2 (0 when N = 2);
    - ``flicker`` ∈ [0, 1]: the share of the change around each interior frame that reverses direction,
      Σ 2·min(|Δ[t]|, |Δ[t+1]|)·[Δ[t]·Δ[t+1] < 0]  /  Σ (|Δ[t]| + |Δ[t+1]|), sums over t = 1…N−2 and all pixels
      and channels (0 when N = 2 or nothing changes). Equivalently Σ (|Δ[t+1] − Δ[t]| − ||Δ[t+1]| − |Δ[t]||) over
      the same denominator: the second difference without the part a change of speed explains. It is 0 when every
      pixel moves monotonically over every three consecutive frames (a fade, or an object moving over a pixel, even
      with hard edges) and 1 for a pure back-and-forth A, B, A, B. The plain ratio Σ|Δ²f| / Σ(|Δ[t]| + |Δ[t+1]|)
      would score a hard edge moving across a pixel (a step) as 1, so it does not separate motion from flicker.
      For this figure only, differences with |Δ| < ``flicker_tolerance`` (default 1.5/255: one uint8 rounding
      step) count as no change, so that rounding noise on an almost still sequence does not read as flicker.
    """
    if len(frames) < 2:
        raise ValueError(f"frames must hold at least 2 frames, got {len(frames)}")
    previous = _as_float(frames[0])
    shape = previous.shape
    changes: list[float] = []
    last_delta = last_moved = np.zeros(0, np.float32)
    second_total = reversal_total = pair_total = 0.0
    for index, frame in enumerate(frames[1:], start=1):
        current = _as_float(frame)
        if current.shape != shape:
            raise ValueError(f"frames must share one size: frame 0 is {shape}, frame {index} is {current.shape}")
        delta = current - previous
        magnitude = np.abs(delta)
        changes.append(float(magnitude.mean()))
        moved = np.where(magnitude < flicker_tolerance, 0, delta)
        if index > 1:
            second_total += float(np.abs(delta - last_delta).sum(dtype=np.float64))
            moved_magnitude, last_moved_magnitude = np.abs(moved), np.abs(last_moved)
            reverses = moved * last_moved < 0
            reversal = 2 * np.minimum(moved_magnitude, last_moved_magnitude)[reverses]
            reversal_total += float(reversal.sum(dtype=np.float64))
            pair_total += float((moved_magnitude + last_moved_magnitude).sum(dtype=np.float64))
        last_delta, last_moved, previous = delta, moved, current
    interior = len(frames) - 2
    return {
        "mean_abs_change": float(np.mean(changes)),
        "max_abs_change": float(np.max(changes)),
        "mean_second_difference": second_total / (interior * previous.size) if interior else 0.0,
        "flicker": reversal_total / pair_total if pair_total > 0 else 0.0,
    }


def format_consistency(consistency: dict[str, float]) -> str:
    """One line: ``mean change 0.0123, max change 0.0456, second difference 0.0031, flicker 0.082``."""
    return (
        f"mean change {consistency['mean_abs_change']:.4f}, max change {consistency['max_abs_change']:.4f}, "
        f"second difference {consistency['mean_second_difference']:.4f}, flicker {consistency['flicker']:.3f}"
    )


# ------------------------------------------------------------------------------------------------------ export


def check_video_args(video_path: str | Path, fps: float) -> None:
    """Raise ValueError unless ``video_path`` ends in .mp4 / .gif and ``fps`` is a number from 1 to 60."""
    suffix = Path(video_path).suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"video_path must end in one of {VIDEO_SUFFIXES}, got {str(video_path)!r}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not FPS_RANGE[0] <= fps <= FPS_RANGE[1]:
        raise ValueError(f"fps must be a number from {FPS_RANGE[0]} to {FPS_RANGE[1]}, got {fps!r}")


def write_video(frames: Sequence[Image.Image], path: str | Path, fps: float = 8) -> Path:
    """Write ``frames`` (PIL, one size) as ``.mp4`` (imageio-ffmpeg, libx264, yuv420p, both sides even) or ``.gif``
    (Pillow, looping, ``1000/fps`` ms per frame; Pillow merges consecutive identical frames into one longer frame).
    Returns the path."""
    check_video_args(path, fps)
    if len(frames) < 1:
        raise ValueError("frames must hold at least one frame")
    sizes = {frame.size for frame in frames}
    if len(sizes) != 1:
        raise ValueError(f"frames must share one size, got {sorted(sizes)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = [frame.convert("RGB") for frame in frames]
    if path.suffix.lower() == ".gif":
        rgb[0].save(path, save_all=True, append_images=rgb[1:], loop=0, duration=round(1000 / fps))
        return path
    width, height = rgb[0].size
    if width % 2 or height % 2:
        raise ValueError(f"an MP4 (yuv420p) needs even sides, got {width}x{height}")
    import imageio.v2 as imageio

    writer = imageio.get_writer(
        path,
        format="FFMPEG",
        mode="I",
        fps=fps,
        codec="libx264",
        pixelformat="yuv420p",
        macro_block_size=2,
        quality=8,
        ffmpeg_log_level="error",
    )
    try:
        for frame in rgb:
            writer.append_data(np.asarray(frame))
    finally:
        writer.close()
    return path


# -------------------------------------------------------------------------------------------------- parameters


def _format_extra(value: object) -> str:
    if isinstance(value, float):
        return f"{round(value, 4):g}"
    text = str(value)
    return json.dumps(text) if ("," in text or ":" in text or '"' in text) else text


def format_frame_parameters(params: dict) -> str:
    """The ``parameters`` text of a frame: :func:`workbench.metadata.format_parameters` followed by the frame keys
    (``Frame: i/N``, ``Mode``, ``Easing``, ``Travel``, ``Travel to``, ``Walk``, ``Walk to seed``), which
    :func:`workbench.metadata.parse_parameters` keeps under their labels."""
    items = []
    for key, label in FRAME_LABELS:
        value = params.get(key)
        if value is None:
            continue
        if key == "frame":
            items.append(f"{label}: {value}/{params['num_frames']}")
        else:
            items.append(f"{label}: {_format_extra(value)}")
    return format_parameters(params) + (", " + ", ".join(items) if items else "")


# ---------------------------------------------------------------------------------------------------- generation


def _validate(
    prompts: Sequence[str],
    mode: str,
    num_frames: int,
    seeds: list[int],
    loopback_strength: float,
    easing: str,
    generation_kwargs: dict,
) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts) or len(prompts) < 1:
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if mode == "travel" and len(prompts) < 2:
        raise ValueError(f"prompts: mode='travel' needs at least 2 prompts, got {len(prompts)}")
    if mode == "walk" and len(prompts) != 1:
        raise ValueError(f"prompts: mode='walk' uses exactly 1 prompt, got {len(prompts)} (use mode='travel')")
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or not 2 <= num_frames <= MAX_FRAMES:
        raise ValueError(f"num_frames must be an integer from 2 to {MAX_FRAMES}, got {num_frames!r}")
    if mode == "walk" and len(seeds) < 2:
        raise ValueError(f"seed: mode='walk' needs at least 2 seeds, got {seeds}")
    if mode != "walk" and len(seeds) != 1:
        raise ValueError(f"seed must be one integer for mode={mode!r}, got {seeds}")
    if loopback_strength is None:  # the setting's check lets None through (its default)
        raise ValueError("loopback_strength must be a number in (0, 1], got None")
    setting("strength").check(loopback_strength, "loopback_strength")  # the image→image strength's range
    if easing not in EASINGS:
        raise ValueError(f"easing must be one of {EASINGS}, got {easing!r}")
    for key, instead in RESERVED_KWARGS.items():
        if key in generation_kwargs:
            raise ValueError(f"generation_kwargs: {key!r} is set by make_frames; use {instead} instead")


def _seed_list(seed: int | Sequence[int], mode: str) -> list[int]:
    checked = check_fixed_seeds(seed)  # the seed setting's check, negative (random) seeds refused
    if isinstance(checked, list):
        return checked
    return check_fixed_seeds([checked, checked + 1] if mode == "walk" else [checked])


def make_frames(
    pipe: Pipeline,
    prompts: Sequence[str],
    mode: str = "travel",
    num_frames: int = 12,
    seed: int | Sequence[int] = 0,
    loopback_strength: float = 0.35,
    easing: str = "linear",
    vary_seed: bool = False,
    callback: FrameCallback | None = None,
    step_callback: Callable | None = None,
    **generation_kwargs,
) -> FrameSequence:
    """Generate ``num_frames`` ≥ 2 frames with ``pipe`` (a :class:`workbench.Pipeline`).

    - ``mode="travel"``: ``prompts`` (≥ 2 keys) are encoded once; frame i is generated from the linear
      interpolation of the neighbouring keys' embeds and pooled vectors (``prompt_embeds``) with ``seed``'s noise,
      so frame 0 and the last frame are the single images of the first and last prompt for that seed.
    - ``mode="walk"``: one prompt; ``seed`` is a list of ≥ 2 key seeds (an int s means [s, s + 1]); frame i starts
      from the slerp of the neighbouring seeds' noises (``initial_latents``).
    - ``mode="loopback"``: frame 0 is text→image with ``seed``; frame i is image→image of frame i − 1 at
      ``loopback_strength`` with seed ``seed`` (or ``seed + i`` when ``vary_seed``); with ≥ 2 prompts the
      conditioning travels as in ``travel``.

    ``easing`` ("linear" | "cosine") shapes the motion within each segment. ``generation_kwargs`` go to every
    pipeline call (height, width, num_inference_steps, guidance_scale, negative_prompt, sampler, …); layout guidance
    and layout control are off unless given (a layout is planned per prompt and seed, so it would jump between
    frames instead of moving).
    ``callback(frame_index, num_frames)`` runs after each finished frame (0-based index); returning ``False``
    stops and raises :class:`GenerationCancelled`, as does ``step_callback`` (the pipeline's per-step callback)
    returning ``False``. Raises ValueError naming the parameter for any invalid argument, before generating.
    """
    seeds = _seed_list(seed, mode)
    generation_kwargs = {"layout_guidance": 0.0, "layout_control": 0.0, **generation_kwargs}
    _validate(prompts, mode, num_frames, seeds, loopback_strength, easing, generation_kwargs)
    prompts = list(prompts)
    keys = len(seeds) if mode == "walk" else len(prompts)
    positions = frame_positions(num_frames, keys, easing)
    height = generation_kwargs.get("height") or pipe.defaults.height
    width = generation_kwargs.get("width") or pipe.defaults.width
    pipe.check_size(height, width)

    conditioning = None
    if len(prompts) > 1:
        max_length = generation_kwargs.get("max_sequence_length", 256)
        embeds, pooled = pipe.encode_prompts(prompts, None, max_length)
        conditioning = (embeds, pooled)
    noises = [pipe.initial_noise(s, height, width) for s in seeds] if mode == "walk" else None

    frames: list[Image.Image] = []
    parameters: list[dict] = []
    for i, (j, t) in enumerate(positions):
        nxt = min(j + 1, keys - 1)
        call = dict(generation_kwargs, callback=step_callback)
        extra: dict = {"frame": i, "num_frames": num_frames, "mode": mode}
        if easing != "linear":
            extra["easing"] = easing
        if conditioning is not None:
            embeds, pooled = conditioning
            call["prompt_embeds"] = (
                _lerp(embeds[j : j + 1], embeds[nxt : nxt + 1], t),
                _lerp(pooled[j : j + 1], pooled[nxt : nxt + 1], t),
            )
            extra["travel"] = t
            if t > 0:
                extra["travel_to"] = prompts[nxt]
        prompt = prompts[j] if mode != "walk" else prompts[0]
        if mode == "walk":
            call["initial_latents"] = slerp(noises[j], noises[nxt], t)
            call["seed"] = seeds[j]
            extra["walk"] = t
            if t > 0:
                extra["walk_to_seed"] = seeds[nxt]
        elif mode == "loopback":
            call["seed"] = seeds[0] + i if vary_seed else seeds[0]
            if frames:
                call.update(image=frames[-1], strength=loopback_strength, height=height, width=width)
        else:
            call["seed"] = seeds[0]
        out = pipe(prompt, **call)
        image = out.images[0]
        params = {**out.parameters[0], **extra}
        image.info["parameters"] = format_frame_parameters(params)
        frames.append(image)
        parameters.append(params)
        if callback is not None and callback(i, num_frames) is False:
            raise GenerationCancelled(f"frame generation cancelled after frame {i + 1} of {num_frames}")
    return FrameSequence(frames, mode, parameters, frame_consistency(frames))
