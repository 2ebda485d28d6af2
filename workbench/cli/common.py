"""Arguments shared by the generating commands: model choice and sampling settings."""

from __future__ import annotations

import argparse

import torch

from workbench.pipeline import parse_block_list

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None, help="diffusers folder, .safetensors file or repo id (default: embedded)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--quantization", default=None, choices=["int8", "nf4", "fp4"])
    parser.add_argument("--offload", default=None, choices=["model", "sequential"])
    parser.add_argument("--text-encoders-from", default=None, help="diffusers folder with tokenizers (single files)")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:STRENGTH]",
        help="attach a LoRA (.safetensors: diffusers, PEFT or kohya format), strength 1 unless given; repeatable",
    )
    parser.add_argument(
        "--fuse-loras", action="store_true", help="add the LoRAs into the weights (no per-step cost; float weights)"
    )


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--guidance", type=float, default=None, help="default: the model's")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--sampler", default=None, choices=["euler", "heun", "dpmpp_2m"])
    parser.add_argument("--shift", type=float, default=None)
    parser.add_argument("--max-sequence-length", type=int, default=256)
    parser.add_argument("--expert-weights", default=None, help="comma-separated weight per expert, e.g. 1,0.5,1,1")
    parser.add_argument("--router-temperature", type=float, default=1.0)
    parser.add_argument("--flow-temperature", type=float, default=1.0)
    parser.add_argument("--dynamic-thresholding", type=float, default=None)
    parser.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("LOW", "HIGH"),
        help="guidance only for sigma in [LOW, HIGH] (default: the model's, else everywhere)",
    )
    parser.add_argument(
        "--skip-layers", default=None, help="skip-layer guidance on these blocks, e.g. 7,8,9 (SD3.5 Medium)"
    )
    parser.add_argument("--slg-scale", type=float, default=2.8, help="skip-layer guidance scale")
    parser.add_argument("--slg-start", type=float, default=0.01, help="skip-layer guidance from this fraction of steps")
    parser.add_argument("--slg-stop", type=float, default=0.2, help="… up to this fraction of steps")


def load_from_args(args: argparse.Namespace):
    from workbench import load_pipeline
    from workbench.lora import parse_lora_spec

    specs = [parse_lora_spec(spec) for spec in getattr(args, "lora", [])]
    pipe = load_pipeline(
        args.model,
        device=args.device,
        dtype=DTYPES[args.dtype],
        quantization=args.quantization,
        offload=args.offload,
        text_encoders_from=args.text_encoders_from,
    )
    for path, strength in specs:
        pipe.loras.load(path, strength=strength)
    if getattr(args, "fuse_loras", False):
        pipe.loras.fuse()
    return pipe


def sampling_kwargs(args: argparse.Namespace) -> dict:
    weights = None
    if args.expert_weights:
        try:
            weights = [float(w) for w in args.expert_weights.split(",")]
        except ValueError as err:
            raise ValueError(f"--expert-weights must be comma-separated numbers, got {args.expert_weights!r}") from err
    return dict(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        height=args.height,
        width=args.width,
        sampler=args.sampler,
        shift=args.shift,
        max_sequence_length=args.max_sequence_length,
        expert_weights=weights,
        router_temperature=args.router_temperature,
        flow_temperature=args.flow_temperature,
        dynamic_thresholding_ratio=args.dynamic_thresholding,
        guidance_interval=args.guidance_interval,
        skip_guidance_layers=parse_block_list("--skip-layers", args.skip_layers) or None,
        skip_layer_guidance_scale=args.slg_scale,
        skip_layer_guidance_start=args.slg_start,
        skip_layer_guidance_stop=args.slg_stop,
    )
