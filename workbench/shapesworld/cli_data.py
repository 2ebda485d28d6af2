"""ShapesWorld data commands: ``render`` (sample scenes to PNG files) and ``eval-renders`` (evaluator self-check).

``add_data_commands(subparsers)`` adds both to an argparse subparsers object; each sets ``run`` (``parser.set_defaults
(run=fn)``, as in ``workbench/cli``): a function of the parsed arguments returning an exit code.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from workbench.shapesworld.evaluate import evaluate_renders, format_table
from workbench.shapesworld.world import CANVAS_SIZES, CAPTION_STYLES, render, sample_scene


def run_render(args: argparse.Namespace) -> int:
    """Write ``args.n`` scenes as ``00000.png``… and ``captions.txt`` ("file<TAB>caption" per line) to ``out_dir``;
    with ``args.caption_files`` also ``00000.txt``… beside the images (the folder ``workbench train-lora`` reads)."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    height = args.height or args.size
    width = args.width or args.size
    rng = random.Random(args.seed)
    lines = []
    for i in range(args.n):
        scene = sample_scene(rng, height, width, kind=args.kind, caption_style=args.caption_style)
        name = f"{i:05d}.png"
        render(scene).save(out_dir / name)
        if args.caption_files:
            (out_dir / f"{i:05d}.txt").write_text(scene.caption, encoding="utf-8")
        lines.append(f"{name}\t{scene.caption}\n")
    (out_dir / "captions.txt").write_text("".join(lines), encoding="utf-8")
    print(f"wrote {args.n} images ({height}x{width}) and captions.txt to {out_dir}")
    return 0


def run_eval_renders(args: argparse.Namespace) -> int:
    """Print the evaluator's accuracy on the dataset's own renders (PIL or torch, ``--renderer``; with
    ``--through-vae``: after a round trip through a model's VAE); exit code 1 if any attribute is below 99%."""
    vae = None
    if args.through_vae is not None:
        from workbench import load_pipeline

        vae = load_pipeline(args.through_vae or None).vae
    results = evaluate_renders(args.n, args.seed, sizes=args.sizes, vae=vae, renderer=args.renderer)
    print(format_table(results))
    worst = min(acc for result in results.values() for group in result["accuracy"].values() for acc in group.values())
    return 0 if worst >= 0.99 else 1


def add_data_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``render`` and ``eval-renders`` subcommands to ``subparsers``."""
    render_parser = subparsers.add_parser("render", help="render random ShapesWorld scenes to PNG files")
    render_parser.add_argument("--out-dir", required=True, help="folder for the PNGs and captions.txt")
    render_parser.add_argument("--n", type=int, default=16, help="number of images (default 16)")
    render_parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    render_parser.add_argument("--size", type=int, default=128, choices=CANVAS_SIZES, help="square canvas side")
    render_parser.add_argument("--height", type=int, choices=CANVAS_SIZES, help="canvas height (overrides --size)")
    render_parser.add_argument("--width", type=int, choices=CANVAS_SIZES, help="canvas width (overrides --size)")
    render_parser.add_argument("--kind", choices=("one", "two"), help="objects per scene (default: either)")
    render_parser.add_argument(
        "--caption-style",
        choices=CAPTION_STYLES,
        default="canonical",
        help="canonical captions or any (default canonical)",
    )
    render_parser.add_argument(
        "--caption-files", action="store_true", help="also write <stem>.txt per image (the train-lora data format)"
    )
    render_parser.set_defaults(run=run_render)

    check_parser = subparsers.add_parser(
        "eval-renders", help="self-check: score the evaluator on the dataset's renders"
    )
    check_parser.add_argument("--n", type=int, default=200, help="captions per canvas size (default 200)")
    check_parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    check_parser.add_argument(
        "--sizes", type=int, nargs="+", default=list(CANVAS_SIZES), help="square canvas sides (default 96 128 160)"
    )
    check_parser.add_argument(
        "--through-vae",
        nargs="?",
        const="",
        default=None,
        metavar="MODEL",
        help="score the renders after encode → decode through MODEL's VAE (default: the embedded model)",
    )
    check_parser.add_argument(
        "--renderer",
        choices=("pil", "torch"),
        default="pil",
        help="pil: world.render; torch: the trainer's on-device rasteriser (raster.render_scenes)",
    )
    check_parser.set_defaults(run=run_eval_renders)
