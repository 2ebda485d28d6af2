"""``python -m workbench.shapesworld``: render data, train the embedded model, export it, evaluate any model.

python -m workbench.shapesworld train --stage all --run runs/shapesworld    # VAE, then text + MMDiT
python -m workbench.shapesworld export --run runs/shapesworld               # → models/shapesworld-moe
python -m workbench.shapesworld eval --n 200                                # accuracy table from pixels
python -m workbench.shapesworld train-controlnet --time-budget 3600         # Canny ControlNet of the embedded model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from workbench.errors import run_command
from workbench.shapesworld.cli_controlnet import add_controlnet_commands
from workbench.shapesworld.cli_data import add_data_commands


def _train(args: argparse.Namespace) -> int:
    from workbench.shapesworld.model import ShapesWorldSpec
    from workbench.shapesworld.train import (
        TrainConfig,
        finetune_decoder,
        load_trained_vae,
        train_transformer,
        train_vae,
    )

    run = Path(args.run)
    spec = ShapesWorldSpec.micro() if args.micro else ShapesWorldSpec()
    if args.init_from and not (run / "transformer.safetensors").is_file():
        from workbench.shapesworld.train import seed_run_from_model

        seed_run_from_model(Path(args.init_from), run, args.init_step, spec, args.grow_depth)
    elif args.grow_depth is not None:
        raise ValueError(f"--grow-depth {args.grow_depth} needs --init-from and a run folder without checkpoints")
    spec = ShapesWorldSpec.for_run(run, spec)
    spec.save(run)
    common = dict(seed=args.seed, threads=args.threads, checkpoint_every=args.checkpoint_every, device=args.device)
    if args.stage in ("vae", "all"):
        vae_config = TrainConfig(steps=args.vae_steps, batch_size=16, lr=1e-3, warmup=50, **common)
        train_vae(run, spec, vae_config)
    if args.stage == "decoder":
        decoder_config = TrainConfig(steps=args.steps, batch_size=16, lr=5e-4, warmup=20, **common)
        finetune_decoder(run, spec, decoder_config)
    if args.stage in ("transformer", "all"):
        config = TrainConfig(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup=100,
            data_workers=args.data_workers,
            time_budget=args.time_budget,
            two_object_share=args.two_object_share,
            renderer=args.renderer,
            token_loss_weight=args.token_loss,
            token_loss_blocks=tuple(args.token_loss_blocks) if args.token_loss_blocks else None,
            negative_loss_weight=args.negative_loss,
            negative_margin=args.negative_margin,
            compile=args.compile,
            **common,
        )
        vae = load_trained_vae(run, spec, config)
        train_transformer(run, spec, config, vae)
    return 0


def _export(args: argparse.Namespace) -> int:
    from workbench.loading import EMBEDDED_MODEL
    from workbench.shapesworld.export import export_run, folder_size_mb

    out = export_run(
        Path(args.run),
        Path(args.out) if args.out else EMBEDDED_MODEL,
        layouts_from=None if args.layouts_from == "none" else Path(args.layouts_from or EMBEDDED_MODEL),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        shift=args.shift,
    )
    print(f"{out} ({folder_size_mb(out):.1f} MB)")
    return 0


def _load_model(args: argparse.Namespace):
    """The pipeline the flags of :func:`_add_model_arguments` name."""
    import torch

    from workbench import load_pipeline

    return load_pipeline(
        args.model,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        quantization=args.quantization,
        quantize_modulation=not args.keep_modulation,
        int8_backend=args.int8_backend,
    )


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --device and the precision flags of the model a command measures."""
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--quantization", default=None, choices=["int8", "nf4", "fp4"])
    parser.add_argument("--int8-backend", default="auto", choices=["auto", "dynamic", "weight_only", "bitsandbytes"])
    parser.add_argument(
        "--keep-modulation", action="store_true", help="with --quantization: keep the adaLN linears unquantized"
    )


def _eval(args: argparse.Namespace) -> int:
    from workbench.lora import parse_lora_spec
    from workbench.pipeline import parse_block_list
    from workbench.shapesworld.evaluate import evaluate, format_table
    from workbench.shapesworld.failures import format_breakdown

    pipe = _load_model(args)
    pipe.check_size(args.size, args.size)  # before the progress bar starts
    for spec in args.lora:
        path, strength = parse_lora_spec(spec)
        pipe.loras.load(path, strength=strength)
    settings = dict(
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        shift=args.shift,
        sampler=args.sampler,
        guidance_interval=args.guidance_interval,
        skip_guidance_layers=parse_block_list("--skip-layers", args.skip_layers) or None,
        cache_threshold=args.cache_threshold,
        layout_guidance=args.layout_guidance,
        layout_control=args.layout_control,
    )

    routed = pipe.num_experts > 1
    top_k = pipe.transformer.moe_layers[0].top_k if routed else 0  # num_experts for soft routing
    shares: list[tuple[int, object]] = []
    evaluations: list[int] = []  # transformer block-stack runs per generate call (step caching skips some)

    def generate(captions: list[str], seeds: list[int]):
        out = pipe(captions, seed=list(seeds), height=args.size, width=args.size, record_routing=routed, **settings)
        if routed:
            shares.append((len(captions), out.routing.token_share(top_k)))
        evaluations.append(out.transformer_evaluations)
        return out.images

    start = time.perf_counter()
    results = evaluate(
        generate,
        n=args.n,
        seed=args.seed,
        kind=args.kind,
        height=args.size,
        width=args.size,
        batch_size=args.batch_size,
        progress=True,
    )
    seconds = time.perf_counter() - start
    print(format_table(results))
    if args.breakdown:
        print("\n" + format_breakdown(results["records"]))
    if args.records:
        Path(args.records).parent.mkdir(parents=True, exist_ok=True)
        with open(args.records, "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in results["records"])
    if shares:
        total = sum(count * share for count, share in shares) / sum(count for count, _ in shares)
        blocks = pipe.transformer.config.moe_layers
        print(f"\nshare of routed tokens per expert (top-{top_k}), over all steps and images:")
        for block, row in zip(blocks, total.tolist()):
            print(f"  block {block}: " + " / ".join(f"{100 * value:.1f} %" for value in row))
    if evaluations:
        print(f"\ntransformer evaluations per image: {sum(evaluations) / len(evaluations):.2f}")
    print(f"\n{args.n} fresh canonical captions ({args.kind}), seed {args.seed}, {seconds:.0f} s")
    return 0


def _sensitivity(args: argparse.Namespace) -> int:
    from workbench.shapesworld.sensitivity import caption_sensitivity, format_sensitivity

    pipe = _load_model(args)
    result = caption_sensitivity(pipe, n=args.n, seed=args.seed, sigmas=args.sigmas, layout_control=args.layout_control)
    print(format_sensitivity(result))
    probed = f"layout control {args.layout_control:g}" if args.layout_control else "the transformer alone"
    probed += f", {args.quantization or args.dtype}"
    print(f'\n‖v(c) − v(c′)‖ / ‖v(c) − v("")‖ over {args.n} captions per kind, seed {args.seed}, {probed}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m workbench.shapesworld", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the embedded model (resumes an interrupted run)")
    train.add_argument("--run", default="runs/shapesworld", help="checkpoint folder")
    train.add_argument(
        "--stage",
        choices=["vae", "transformer", "all", "decoder"],
        default="all",
        help="all = vae then transformer; decoder = sharpen the VAE decoder on the frozen latent space",
    )
    train.add_argument("--vae-steps", type=int, default=1000)
    train.add_argument("--steps", type=int, default=2000, help="transformer steps")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=4e-4)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=None)
    train.add_argument("--checkpoint-every", type=int, default=100)
    train.add_argument("--micro", action="store_true", help="seconds-sized model (smoke test)")
    train.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (transformer stage)")
    train.add_argument(
        "--data-workers", type=int, default=0, help="processes rendering batches ahead of the model (transformer stage)"
    )
    train.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds for the transformer steps: --steps is lowered to what fits, keeping the cosine schedule whole",
    )
    train.add_argument(
        "--two-object-share",
        type=float,
        default=None,
        help="probability of a two-object scene in the transformer's batches (default: one or two equally likely)",
    )
    train.add_argument(
        "--renderer",
        choices=["torch", "pil"],
        default="torch",
        help="torch: scenes rasterised on the training device (gives the object masks); pil: PIL in --data-workers",
    )
    train.add_argument(
        "--token-loss",
        type=float,
        default=0.0,
        help="weight of the attention-to-mask loss (each object's words attend to its image tokens)",
    )
    train.add_argument(
        "--token-loss-blocks", type=int, nargs="+", default=None, help="blocks whose attention it supervises (all)"
    )
    train.add_argument(
        "--negative-loss",
        type=float,
        default=0.0,
        help="weight of the hard-negative term (two-object captions with colours/shapes swapped or relation flipped); "
        "at weight 1 it diverged in the README's ablation",
    )
    train.add_argument("--negative-margin", type=float, default=0.05, help="margin of the hard-negative term")
    train.add_argument("--compile", action="store_true", help="torch.compile the transformer for training")
    train.add_argument(
        "--init-from", default=None, help="seed an empty run folder from an exported model (models/shapesworld-moe)"
    )
    train.add_argument(
        "--init-step",
        type=int,
        default=None,
        help="schedule step the seeded run resumes at (default: the model's training_step)",
    )
    train.add_argument(
        "--grow-depth",
        type=int,
        default=None,
        help="with --init-from: deepen the transformer to this many blocks first (new blocks start as identity)",
    )
    train.set_defaults(run_command=_train)
    export = commands.add_parser("export", help="write the run's EMA weights as the model folder")
    export.add_argument("--run", default="runs/shapesworld")
    export.add_argument("--out", default=None, help="default: models/shapesworld-moe")
    export.add_argument("--steps", type=int, default=None)
    export.add_argument("--guidance", type=float, default=None)
    export.add_argument("--shift", type=float, default=None)
    export.add_argument(
        "--layouts-from",
        default=None,
        help="model folder whose planned-layout defaults the export keeps (default: models/shapesworld-moe; none: off)",
    )
    export.set_defaults(run_command=_export)
    ev = commands.add_parser("eval", help="accuracy of a model on fresh canonical captions, read from pixels")
    _add_model_arguments(ev)
    ev.add_argument("--n", type=int, default=200)
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--kind", choices=["one", "two", "both"], default="both")
    ev.add_argument("--size", type=int, default=128)
    ev.add_argument("--batch-size", type=int, default=8, help="images generated per call (each has its own seed)")
    ev.add_argument("--steps", type=int, default=None)
    ev.add_argument("--guidance", type=float, default=None)
    ev.add_argument("--shift", type=float, default=None)
    ev.add_argument("--sampler", default=None, choices=["euler", "heun", "dpmpp_2m"])
    ev.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"))
    ev.add_argument("--skip-layers", default=None, help="skip-layer guidance blocks, e.g. 2,3")
    ev.add_argument(
        "--cache-threshold", type=float, default=0.0, help="step caching threshold (workbench.step_cache); 0 = off"
    )
    ev.add_argument(
        "--layout-guidance",
        type=float,
        default=None,
        help="attention-to-layout guidance strength (workbench.layout_guidance); 0 = off (default: the model's)",
    )
    ev.add_argument(
        "--layout-control",
        type=float,
        default=None,
        help="scale of the layout ControlNet on each caption's planned layout; 0 = off (default: the model's)",
    )
    ev.add_argument("--lora", action="append", default=[], metavar="FILE[:STRENGTH]", help="attach a LoRA; repeatable")
    ev.add_argument("--breakdown", action="store_true", help="also print where it fails (per shape, size, reason)")
    ev.add_argument("--records", default=None, help="write each caption's scores and reading to this JSONL file")
    ev.set_defaults(run_command=_eval)
    sens = commands.add_parser(
        "sensitivity", help="how much the velocity changes when a caption's colour, shape, position or binding changes"
    )
    _add_model_arguments(sens)
    sens.add_argument("--n", type=int, default=64, help="captions per kind")
    sens.add_argument("--seed", type=int, default=0)
    sens.add_argument("--sigmas", type=float, nargs="+", default=[0.9, 0.6, 0.3])
    sens.add_argument(
        "--layout-control",
        type=float,
        default=0.0,
        help="0: the transformer alone (the weights); > 0: the sampler's velocity with each caption's planned layout "
        "drawn through the layout ControlNet at this scale (the default generation uses the model's layout control)",
    )
    sens.set_defaults(run_command=_sensitivity)
    add_data_commands(commands)
    add_controlnet_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = getattr(args, "run_command", None) or args.run
    return run_command(lambda: handler(args))


if __name__ == "__main__":
    sys.exit(main())
