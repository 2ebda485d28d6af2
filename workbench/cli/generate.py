"""``python -m workbench generate``: one prompt to one PNG, or a prompts file to a folder of PNGs; text→image,
image→image (``--init-image``) or inpainting (``--init-image`` and ``--mask``, white = repaint); any of them with
ControlNets (``--control IMAGE --controlnet PATH[:SCALE] --preprocess canny|blur|none``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from workbench.cli.common import (
    add_model_arguments,
    add_sampling_arguments,
    add_speed_arguments,
    load_from_args,
    sampling_kwargs,
)
from workbench.cli.paths import check_output_file, check_output_folder
from workbench.controlnet import attach_all
from workbench.limits import open_image
from workbench.metadata import save_png
from workbench.preprocess import PREPROCESSORS, preprocess

INPUTS = ("--init-image", "--mask", "--control")
"""The inputs this command takes, so that it has the settings' flags that act on them (--strength, --mask-blur,
--controlnet-scale, --control-start, --control-end)."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="text→image, image→image or inpainting to PNG files")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt")
    source.add_argument("--prompts-file", help="one prompt per non-empty line; line i uses seed + i")
    parser.add_argument("--out", default="output.png", help="output PNG (single prompt)")
    parser.add_argument("--out-dir", default="outputs", help="output folder (prompts file): 0000.png, 0001.png, …")
    parser.add_argument("--init-image", default=None, help="image→image: the starting image")
    parser.add_argument("--mask", default=None, help="inpainting: mask image the size of --init-image, white = repaint")
    parser.add_argument("--control", default=None, help="ControlNet: the control image (resized to the output size)")
    parser.add_argument(
        "--controlnet",
        action="append",
        default=None,
        metavar="PATH[:SCALE]",
        help="ControlNet folder or .safetensors file, optionally with its scale (repeat for several)",
    )
    parser.add_argument(
        "--preprocess", choices=PREPROCESSORS, default="none", help="ControlNet: preprocess --control first"
    )
    add_model_arguments(parser)
    add_speed_arguments(parser)
    add_sampling_arguments(parser, INPUTS)
    parser.set_defaults(run=run)


def _step_bar(total: int | None, description: str):
    bar = tqdm(total=total, desc=description, unit="step", leave=False)

    def callback(step: int, sigma: float, latents) -> None:
        bar.update(1)

    return bar, callback


def run(args: argparse.Namespace) -> int:
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text().splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"--prompts-file {args.prompts_file} is not a text file") from err
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            raise ValueError(f"--prompts-file {args.prompts_file} holds no non-empty line")
    else:
        prompts = [args.prompt]
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image: inpainting repaints the white part of the mask in that image")
    if args.mask_blur is not None and not args.mask:
        raise ValueError("--mask-blur needs --mask: it feathers the paste-back of the kept pixels")
    if args.prompts_file:
        check_output_folder(args.out_dir, "--out-dir")
    else:
        check_output_file(args.out, "--out")
    if bool(args.control) != bool(args.controlnet):
        raise ValueError("--control and --controlnet go together: the control image and the ControlNet that reads it")
    image = open_image(args.init_image, "--init-image").convert("RGB") if args.init_image else None
    control = preprocess(open_image(args.control, "--control"), args.preprocess) if args.control else None
    mask = open_image(args.mask, "--mask") if args.mask else None
    pipe = load_from_args(args)
    report = pipe.acceleration
    if report.compiled or report.fp8:
        print(report.summary(), file=sys.stderr)
    kwargs = sampling_kwargs(args, INPUTS)
    if control is not None:
        attach_all(pipe, args.controlnet)
        for entry in pipe.controlnets:
            entry.preprocessor = args.preprocess
        kwargs.update(control_image=control)
    if image is not None:
        kwargs.update(image=image)
    if mask is not None:
        kwargs.update(mask_image=mask)
    steps = kwargs["num_inference_steps"] or pipe.defaults.num_inference_steps
    outputs = []
    for i, prompt in enumerate(tqdm(prompts, desc="images", disable=len(prompts) == 1)):
        bar, callback = _step_bar(steps, f"image {i + 1}/{len(prompts)}")
        try:
            result = pipe(prompt, seed=args.seed + i, callback=callback, **kwargs)
        finally:
            bar.close()  # an error message then starts on its own line
        path = Path(args.out_dir) / f"{i:04d}.png" if args.prompts_file else Path(args.out)
        outputs.append(save_png(result.images[0], path))
    for path in outputs:
        print(path)
    return 0
