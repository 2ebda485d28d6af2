"""Arguments shared by the generating commands: model choice and sampling settings."""

from __future__ import annotations

import argparse

import torch

from workbench.settings import MODEL_DEFAULT, SETTINGS, parse_block_list, setting

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


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """``--compile`` and ``--fp8``: the speed switch (:func:`workbench.acceleration.accelerate_pipeline`)."""
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="torch.compile the transformer blocks and VAE decoder (auto: on CUDA, not on the CPU; the first image "
        "of a size compiles)",
    )
    parser.add_argument(
        "--fp8",
        default="off",
        choices=["auto", "on", "off"],
        help="float8 transformer linears via torchao (CUDA, compute capability ≥ 8.9; auto: where it can run)",
    )


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def sampling_flags(inputs: tuple[str, ...] = ()) -> dict[str, str]:
    """Generation setting name → its command-line flag, for every :data:`workbench.settings.SETTINGS` entry with one;
    a flag that acts on an input (:attr:`Setting.cli_needs`, e.g. ``--strength`` on ``--init-image``) only when the
    command takes that input (``inputs``)."""
    return {spec.name: spec.cli for spec in SETTINGS if spec.cli and (not spec.cli_needs or spec.cli_needs in inputs)}


def add_sampling_arguments(parser: argparse.ArgumentParser, inputs: tuple[str, ...] = ()) -> None:
    """The flags of :func:`sampling_flags`, with their settings' defaults and help texts; a default of the model's
    own is None here (the pipeline fills it in)."""
    flags = sampling_flags(inputs)
    for spec in SETTINGS:
        if spec.name not in flags:
            continue
        default = spec.cli_default if spec.cli_default is not MODEL_DEFAULT else spec.default
        default = None if default is MODEL_DEFAULT else default
        shown = "the model's" if spec.default is MODEL_DEFAULT and default is None else default
        options: dict = {"default": default, "help": spec.help + (f" (default: {shown})" if shown is not None else "")}
        if spec.kind in ("int", "seed"):
            options["type"] = int
        elif spec.kind == "float":
            options["type"] = float
        elif spec.kind == "choice":
            options["choices"] = list(spec.choices)
        elif spec.kind == "interval":
            options.update(type=float, nargs=2, metavar=("LOW", "HIGH"))
        elif spec.kind == "weights":
            options["help"] = "comma-separated: " + options["help"] + ", e.g. 1,0.5,1,1"
        elif spec.kind == "blocks":
            options["help"] = "comma-separated: " + options["help"]
        parser.add_argument(spec.cli, **options)


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
        compile=getattr(args, "compile", False),  # commands without --compile (training) never compile
        fp8=getattr(args, "fp8", False),
    )
    for path, strength in specs:
        pipe.loras.load(path, strength=strength)
    if getattr(args, "fuse_loras", False):
        pipe.loras.fuse()
    return pipe


def sampling_kwargs(args: argparse.Namespace, inputs: tuple[str, ...] = ()) -> dict:
    """The parsed sampling flags (:func:`add_sampling_arguments` with the same ``inputs``) as pipeline keyword
    arguments, all but the seed, which each command spreads over its images; ValueError naming the flag for an
    unreadable list."""
    kwargs = {}
    for name, flag in sampling_flags(inputs).items():
        if name == "seed":
            continue
        value = getattr(args, _dest(flag))
        kind = setting(name).kind
        if kind == "weights" and value is not None:
            try:
                value = [float(w) for w in value.split(",")]
            except ValueError as err:
                raise ValueError(f"{flag} must be comma-separated numbers, got {value!r}") from err
        elif kind == "blocks":
            value = parse_block_list(flag, value) or None
        kwargs[name] = value
    return kwargs
