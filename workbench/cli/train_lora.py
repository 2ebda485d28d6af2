"""``python -m workbench train-lora``: train a LoRA on a folder of captioned images (see workbench.lora_training)."""

from __future__ import annotations

import argparse

from workbench.cli.common import add_model_arguments, load_from_args
from workbench.lora_training import DEFAULT_TARGETS, LoRATrainConfig, read_image_folder, train_lora


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train-lora", help="train a LoRA on a folder of captioned images")
    parser.add_argument("--data", required=True, help="folder of images with <stem>.txt captions")
    parser.add_argument("--caption", default=None, help="caption for images without a .txt file")
    parser.add_argument("--out", required=True, help="the LoRA file to write (.safetensors, diffusers format)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=None, help="default: the rank")
    parser.add_argument(
        "--targets",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated module-name suffixes to adapt (default: the attention projections)",
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--resolution", type=int, default=None, help="square crop side (default: the model's)")
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from --out's weights and step")
    add_model_arguments(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not args.out.endswith(".safetensors"):
        raise ValueError(f"--out must end with .safetensors, got {args.out!r}")
    config = LoRATrainConfig(
        rank=args.rank,
        alpha=args.alpha,
        targets=tuple(t.strip() for t in args.targets.split(",") if t.strip()),
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        resolution=args.resolution,
        caption_dropout=args.caption_dropout,
        seed=args.seed,
        save_every=args.save_every,
    )
    config.validate()
    images, captions = read_image_folder(args.data, args.caption)
    pipe = load_from_args(args)
    losses = train_lora(pipe, images, captions, config, args.out, resume=args.resume)
    if losses:
        head, tail = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10) :]
        print(f"loss {sum(head) / len(head):.4f} (first tenth) → {sum(tail) / len(tail):.4f} (last tenth)")
    print(args.out)
    return 0
