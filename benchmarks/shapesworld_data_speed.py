"""How fast ShapesWorld training data is made: scenes sampled, PIL renders and the torch rasteriser, in images/s.

    python benchmarks/shapesworld_data_speed.py [--device cuda] [--batch-size 256] [--batches 8]

Prints one markdown row per stage: sampling scenes (Python, one process), rendering them with PIL (one process: the
work each rendering worker does), rasterising them with torch on ``--device`` (the trainer's default), and encoding
them with the embedded model's VAE on ``--device``. Times are the median of ``--batches`` batches after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

from workbench.memory import cpu_has_bf16  # noqa: E402
from workbench.shapesworld.raster import SceneTensors, rasterize  # noqa: E402
from workbench.shapesworld.world import images_to_tensor, render, sample_batch_scenes  # noqa: E402


def _median_seconds(fn, batches: int) -> float:
    fn(0)
    times = []
    for i in range(batches):
        start = time.perf_counter()
        fn(i + 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    args = parser.parse_args()
    device = torch.device(args.device)
    size, batch = args.size, args.batch_size

    def scenes(i: int):
        return sample_batch_scenes(i, batch, size, size, two_object_share=0.5)

    prepared = {i: scenes(i) for i in range(args.batches + 1)}
    packed = {i: SceneTensors.from_scenes(s).to(device) for i, s in prepared.items()}

    from workbench import load_pipeline
    from workbench.viz import markdown_header, markdown_row

    torch.set_num_threads(args.threads)
    vae = load_pipeline(device=device).vae
    images = rasterize(packed[0])[0].div(127.5).sub(1).to(vae.dtype)
    bf16 = device.type == "cuda" or cpu_has_bf16()  # the trainer's choice
    stages = {
        "sample scenes (Python)": lambda i: scenes(i),
        "pack scenes as tensors": lambda i: SceneTensors.from_scenes(prepared[i]),
        "render with PIL (one process)": lambda i: images_to_tensor([render(s) for s in prepared[i]], uint8=True),
        f"rasterise with torch on {device}": lambda i: rasterize(packed[i]),
        f"VAE encode on {device} ({'bf16 autocast' if bf16 else 'fp32'})": lambda i: vae.encode(images),
    }
    print(markdown_header([f"stage ({batch} images of {size}², {device})", "s / batch", "images / s"]))
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for name, fn in stages.items():
            seconds = _median_seconds(fn, args.batches)
            print(markdown_row([name, f"{seconds:.4f}", f"{batch / seconds:,.0f}"]))


if __name__ == "__main__":
    main()
