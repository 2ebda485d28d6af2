"""``python -m workbench export-onnx --out FILE.onnx``: the transformer as ONNX (dynamic batch / height / width),
optionally checked against PyTorch with onnxruntime on CPU."""

from __future__ import annotations

import argparse

import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export-onnx",
        help="export the transformer to ONNX (dynamic batch/height/width) and check it with onnxruntime",
    )
    parser.add_argument("--model", default=None, help="diffusers folder or .safetensors file (default: embedded)")
    parser.add_argument("--out", required=True, help="output .onnx file")
    parser.add_argument("--height", type=int, default=None, help="export size in pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default 17)")
    parser.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens, as when generating")
    parser.add_argument("--expert-weights", default=None, help="bake these weights into the routers, e.g. 1,0,1,1")
    parser.add_argument("--router-temperature", type=float, default=1.0, help="bake this router temperature")
    parser.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch at two sizes")
    parser.add_argument("--tolerance", type=float, default=None, help="largest allowed max |Δ| (default 1e-3)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from workbench import load_pipeline, onnx_export

    if not str(args.out).lower().endswith(".onnx"):
        raise ValueError(f"--out must name a .onnx file, got {args.out!r}")
    pipe = load_pipeline(args.model, device="cpu", dtype=torch.float32)
    height = args.height or pipe.defaults.height
    width = args.width or pipe.defaults.width
    pipe.check_size(height, width)
    if args.expert_weights or args.router_temperature != 1.0:
        weights = None
        if args.expert_weights:
            try:
                weights = [float(w) for w in args.expert_weights.split(",")]
            except ValueError as err:
                raise ValueError(
                    f"--expert-weights must be comma-separated numbers, got {args.expert_weights!r}"
                ) from err
        pipe.transformer.set_routing(weights, args.router_temperature)
    factor = pipe.vae_scale_factor
    tokens = pipe.encode_prompts([pipe.defaults.prompt or ""], None, args.max_sequence_length)[0].shape[1]
    opset = args.opset or onnx_export.DEFAULT_OPSET
    model = pipe.transformer
    path = onnx_export.export_transformer(model, args.out, height // factor, width // factor, tokens, opset)
    print(f"wrote {path} (opset {opset}; inputs {', '.join(onnx_export.INPUT_NAMES)}; {tokens} text tokens)")
    multiple = factor * model.config.patch_size
    other = onnx_export.other_size(height, width, multiple, pipe.max_image_side)
    status = 0
    if args.check:
        shapes = [
            (1, height // factor, width // factor, tokens),
            (2, other[0] // factor, other[1] // factor, max(tokens // 2, 1)),
        ]
        tolerance = args.tolerance if args.tolerance is not None else onnx_export.TOLERANCE
        for result in onnx_export.check_onnx(path, model, shapes, tolerance):
            print(f"check: {result}")
            status = status or (0 if result.passed else 1)
    sides = [height, width, *other]
    low, high = min(sides) // factor, max(sides) // factor
    command = onnx_export.trtexec_command(
        path, model, tokens, (low, low), (height // factor, width // factor), (high, high)
    )
    print(f"TensorRT: {command}")
    return status
