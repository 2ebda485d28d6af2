"""ShapesWorld ControlNet commands: ``train-controlnet``, ``export-controlnet`` and ``eval-controlnet``.

``add_controlnet_commands(subparsers)`` adds them to an argparse subparsers object; each sets ``run_command`` (as
:mod:`workbench.shapesworld.cli_data` does): a function of the parsed arguments returning an exit code.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from workbench.loading import EMBEDDED_CONTROLNET, EMBEDDED_MODEL


def run_train(args: argparse.Namespace) -> int:
    from workbench.shapesworld.controlnet_training import ControlNetTrainConfig, train_controlnet

    config = ControlNetTrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        layers=args.layers,
        time_shift=args.time_shift,
        sketch_share=args.sketch_share,
        two_object_share=args.two_object_share,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        threads=args.threads,
        device=args.device,
        time_budget=args.time_budget,
    )
    train_controlnet(Path(args.model), Path(args.run), config)
    return 0


def run_export(args: argparse.Namespace) -> int:
    from workbench.shapesworld.controlnet_training import load_run_controlnet, save_controlnet
    from workbench.shapesworld.export import folder_size_mb

    _, model = load_run_controlnet(Path(args.model), Path(args.run))
    out = save_controlnet(model, Path(args.out))
    print(f"{out} ({folder_size_mb(out):.1f} MB)")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate the model on the same captions and seeds without and with the ControlNet (each caption's control
    image: the edges of its own ground-truth scene) and print both tables."""
    from workbench.loading import load_pipeline
    from workbench.shapesworld.controlnet_training import controlled_generate_fn
    from workbench.shapesworld.evaluate import evaluate, format_table

    pipe = load_pipeline(args.model)
    name = pipe.controlnets.load(args.controlnet)
    call = dict(
        layout_guidance=0.0,  # the ControlNet alone, against the model alone
        layout_control=0.0,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        controlnet_conditioning_scale=args.scale,
    )
    call = {key: value for key, value in call.items() if value is not None}
    arms = {"without ControlNet": None, f"with {name} (scale {args.scale:g})": name}
    for title, arm in arms.items():
        start = time.perf_counter()
        generate = controlled_generate_fn(pipe, arm, args.size, args.size, **call)
        results = evaluate(generate, n=args.n, seed=args.seed, kind=args.kind, height=args.size, width=args.size)
        print(f"\n{title}: {args.n} captions ({args.kind}), seed {args.seed}, {time.perf_counter() - start:.0f} s")
        print(format_table(results))
    return 0


def add_controlnet_commands(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train-controlnet", help="train a Canny-edge ControlNet for a ShapesWorld model (resumes an interrupted run)"
    )
    train.add_argument("--model", default=str(EMBEDDED_MODEL), help="the frozen model (default: the embedded one)")
    train.add_argument("--run", default="runs/controlnet-canny", help="checkpoint folder")
    from workbench.shapesworld.controlnet_training import ControlNetTrainConfig

    defaults = ControlNetTrainConfig()
    train.add_argument("--steps", type=int, default=defaults.steps)
    train.add_argument("--batch-size", type=int, default=defaults.batch_size)
    train.add_argument("--lr", type=float, default=defaults.lr)
    train.add_argument(
        "--layers", type=int, default=defaults.layers, help="ControlNet blocks, copied from the transformer's first"
    )
    train.add_argument(
        "--time-shift", type=float, default=defaults.time_shift, help="shift of the training times towards noise"
    )
    train.add_argument("--two-object-share", type=float, default=defaults.two_object_share)
    train.add_argument(
        "--sketch-share",
        type=float,
        default=defaults.sketch_share,
        help="share of control images made from outline drawings instead of the rendered scene",
    )
    train.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    train.add_argument("--time-budget", type=float, default=None, help="stop (and checkpoint) after this many seconds")
    train.set_defaults(run_command=run_train)
    export = commands.add_parser("export-controlnet", help="write the run's EMA ControlNet as a diffusers folder")
    export.add_argument("--model", default=str(EMBEDDED_MODEL), help="the model the ControlNet was trained on")
    export.add_argument("--run", default="runs/controlnet-canny")
    export.add_argument("--out", default=str(EMBEDDED_CONTROLNET))
    export.set_defaults(run_command=run_export)
    ev = commands.add_parser(
        "eval-controlnet", help="accuracy without and with a ControlNet fed each caption's own scene edges"
    )
    ev.add_argument("--model", default=str(EMBEDDED_MODEL))
    ev.add_argument("--controlnet", default=str(EMBEDDED_CONTROLNET))
    ev.add_argument("--scale", type=float, default=1.0, help="controlnet_conditioning_scale")
    ev.add_argument("--n", type=int, default=200)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--kind", choices=["one", "two", "both"], default="both")
    ev.add_argument("--size", type=int, default=128)
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--guidance", type=float, default=None)
    ev.set_defaults(run_command=run_eval)
