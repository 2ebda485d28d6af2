"""``python -m workbench frames``: a frame sequence (prompt travel, seed walk or loopback) to PNGs and a video."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from workbench.cli.common import add_model_arguments, add_sampling_arguments, load_from_args, sampling_kwargs
from workbench.cli.paths import check_output_file, check_output_folder
from workbench.frames import EASINGS, FPS_RANGE, MODES, VIDEO_SUFFIXES, format_consistency, make_frames

DEFAULT_STRENGTH = 0.35


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "frames",
        help="frame sequences: prompt travel, seed walk, loopback image→image; PNGs plus an MP4 or GIF",
    )
    parser.add_argument("--prompt", required=True, help="the (first) prompt")
    parser.add_argument("--via", action="append", default=[], help="a key prompt between first and last (repeatable)")
    parser.add_argument("--prompt-end", default=None, help="the last prompt (travel; loopback: moves towards it)")
    parser.add_argument("--mode", default="travel", choices=MODES)
    parser.add_argument("--frames", type=int, default=12, help="number of frames (>= 2)")
    parser.add_argument("--fps", type=float, default=8)
    parser.add_argument("--seed-end", type=int, default=None, help="walk: the last seed (default: --seed + 1)")
    parser.add_argument("--strength", type=float, default=None, help=f"loopback strength (default {DEFAULT_STRENGTH})")
    parser.add_argument("--vary-seed", action="store_true", help="loopback: frame i uses seed + i")
    parser.add_argument("--easing", default="linear", choices=EASINGS)
    parser.add_argument(
        "--out-dir",
        default=None,
        help="folder for 0000.png, 0001.png, … (default: next to --out, in a folder named after it; else ./frames)",
    )
    parser.add_argument("--out", default=None, help="video file, .mp4 or .gif (default: OUT_DIR/video.mp4)")
    add_model_arguments(parser)
    add_sampling_arguments(parser)
    parser.set_defaults(run=run)


def _check_mode_options(args: argparse.Namespace) -> None:
    if args.seed_end is not None and args.mode != "walk":
        raise ValueError(f"--seed-end applies to --mode walk only, got --mode {args.mode}")
    if args.strength is not None and args.mode != "loopback":
        raise ValueError(f"--strength applies to --mode loopback only, got --mode {args.mode}")
    if args.vary_seed and args.mode != "loopback":
        raise ValueError(f"--vary-seed applies to --mode loopback only, got --mode {args.mode}")
    if args.mode == "travel" and args.prompt_end is None:
        raise ValueError("--mode travel needs --prompt-end (the prompt to travel to)")
    if args.mode == "walk" and (args.prompt_end is not None or args.via):
        raise ValueError("--mode walk uses one prompt; --prompt-end and --via belong to travel and loopback")
    if args.frames < 2:
        raise ValueError(f"--frames must be at least 2, got {args.frames}")
    if not FPS_RANGE[0] <= args.fps <= FPS_RANGE[1]:
        raise ValueError(f"--fps must be from {FPS_RANGE[0]} to {FPS_RANGE[1]}, got {args.fps:g}")
    if args.out is not None and Path(args.out).suffix.lower() not in VIDEO_SUFFIXES:
        raise ValueError(f"--out must end in one of {VIDEO_SUFFIXES}, got {args.out!r}")


def output_paths(out: str | None, out_dir: str | None) -> tuple[Path, Path]:
    """(folder of the PNG frames, video file): ``--out-dir`` and ``--out`` when given; the frames of
    ``--out clips/walk.mp4`` alone go to ``clips/walk_frames/``; with neither, ``./frames`` and its ``video.mp4``."""
    if out_dir is None:
        out_dir = str(Path(out).with_name(Path(out).stem + "_frames")) if out else "frames"
    video = Path(out) if out else Path(out_dir) / "video.mp4"
    check_output_folder(out_dir, "--out-dir")
    check_output_file(video, "--out")
    return Path(out_dir), video


def run(args: argparse.Namespace) -> int:
    _check_mode_options(args)
    prompts = [args.prompt, *args.via] + ([args.prompt_end] if args.prompt_end is not None else [])
    seed = [args.seed, args.seed + 1 if args.seed_end is None else args.seed_end] if args.mode == "walk" else args.seed
    out_dir, video = output_paths(args.out, args.out_dir)
    pipe = load_from_args(args)
    bar = tqdm(total=args.frames, desc=f"{args.mode} frames", unit="frame")

    def progress(index: int, total: int) -> None:
        bar.update(1)

    try:
        sequence = make_frames(
            pipe,
            prompts,
            mode=args.mode,
            num_frames=args.frames,
            seed=seed,
            loopback_strength=DEFAULT_STRENGTH if args.strength is None else args.strength,
            easing=args.easing,
            vary_seed=args.vary_seed,
            callback=progress,
            **sampling_kwargs(args),
        )
    finally:
        bar.close()
    paths = sequence.save(out_dir, video, fps=args.fps)
    print(f"{len(sequence.frames)} frames in {out_dir}; video {paths[-1]}")
    print(f"consistency: {format_consistency(sequence.consistency)}")
    return 0
