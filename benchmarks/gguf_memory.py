"""GGUF memory: a random SD3-width transformer written as GGUF in several types, then loaded with
:func:`workbench.formats.gguf.load_gguf_transformer`; prints file size, bytes the loaded transformer holds, and the
seconds of one forward pass (per-layer dequantization included) as a markdown table.

The file is written as ComfyUI-GGUF writes SD3 (original MMDiT names, ``general.architecture = "sd3"``): 1-D tensors
in F32, 2-D weights in the type when their rows split into whole blocks (else F16), ``pos_embed`` and the patch
convolution in F16. Weights are random (N(0, 0.02²)); K-quants are not listed because the ``gguf`` package cannot
write them.

    python benchmarks/gguf_memory.py                       # SD3-Medium width, 2 blocks; about 2 minutes on 2 cores
    python benchmarks/gguf_memory.py --preset sd3.5-large --blocks 1 --types Q8_0 Q4_0
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

from workbench.formats.gguf import gguf_bytes, load_gguf_transformer  # noqa: E402
from workbench.formats.original import original_module_map  # noqa: E402
from workbench.memory import tensor_bytes  # noqa: E402
from workbench.models.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from workbench.presets import transformer_preset  # noqa: E402
from workbench.viz import markdown_rows  # noqa: E402

MIB = 1 << 20


def original_shapes(config: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """Original-layout tensor names and shapes of a transformer with ``config`` (fused q/k/v rows summed)."""
    with torch.device("meta"):
        model = MMDiT(config)
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {"pos_embed": tuple(model.pos_embed.pos_embed.shape)}
    for old, (targets, _) in original_module_map(config.num_layers).items():
        if targets[0] not in modules:
            continue
        parts = [modules[name] for name in targets]
        rows = sum(part.weight.shape[0] for part in parts)
        shapes[f"{old}.weight"] = (rows, *parts[0].weight.shape[1:])
        if getattr(parts[0], "bias", None) is not None:
            shapes[f"{old}.bias"] = (rows,)
    return shapes


def write_random_gguf(path: Path, shapes: dict[str, tuple[int, ...]], kind: str, seed: int = 0) -> None:
    """Random N(0, 0.02²) tensors of ``shapes`` written as ComfyUI-GGUF would (see the module docstring)."""
    import gguf
    from gguf import quants

    qtype = gguf.GGMLQuantizationType[kind]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), arch="sd3")
    for name, shape in shapes.items():
        values = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)
        if values.ndim == 1:
            writer.add_tensor(name, values)
        elif values.ndim == 2 and shape[1] % block == 0 and kind != "F16":
            writer.add_tensor(name, quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, values.astype(np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def forward_seconds(model: MMDiT, size: int, repeats: int = 2) -> float:
    """Best of ``repeats`` forward passes on one ``size``² image (77 + 256 text tokens)."""
    config = model.config
    latents = torch.randn(1, config.in_channels, size // 8, size // 8)
    context = torch.randn(1, 333, config.joint_attention_dim)
    pooled = torch.randn(1, config.pooled_projection_dim)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            model(latents, context, pooled, torch.tensor([500.0]))
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="sd3-medium", help="width and head layout (workbench.presets)")
    parser.add_argument("--blocks", type=int, default=2, help="joint blocks (the real models have 24 / 38)")
    parser.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q5_1", "Q4_0"])
    parser.add_argument("--size", type=int, default=256, help="image side for the timed forward pass; 0: skip")
    parser.add_argument("--out", type=Path, default=None, help="folder for the .gguf files (default: temporary)")
    args = parser.parse_args()

    config = MMDiTConfig.from_dict(transformer_preset(args.preset, num_layers=args.blocks))
    shapes = original_shapes(config)
    float32_bytes = 4 * sum(int(np.prod(shape)) for shape in shapes.values())
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.out or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        for kind in args.types:
            path = folder / f"{args.preset}-{args.blocks}blocks-{kind}.gguf"
            write_random_gguf(path, shapes, kind)
            model = load_gguf_transformer(path)
            held = tensor_bytes(model)["total"]
            file_size = path.stat().st_size
            row = [
                kind,
                f"{file_size / MIB:.1f}",
                f"{held / MIB:.1f}",
                f"{held / file_size:.3f}",
                f"{gguf_bytes(model) / MIB:.1f}",
                f"{held / float32_bytes:.3f}",
            ]
            if args.size:
                row.append(f"{forward_seconds(model, args.size):.2f}")
            rows.append(row)
            del model
            if args.out is None:
                path.unlink()
    print(
        f"{args.preset} width, {args.blocks} blocks, random weights; float32 would be {float32_bytes / MIB:.1f} MiB "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)\n"
    )
    header = ["type", "file MiB", "transformer in memory MiB", "memory / file", "of which GGUF linears MiB"]
    header += ["memory / float32"] + ([f"s / forward ({args.size}², float32 compute)"] if args.size else [])
    print(markdown_rows(header, rows))


if __name__ == "__main__":
    main()
