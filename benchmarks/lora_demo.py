"""LoRA end to end on the embedded model: teach it that "red" means blue, then measure what the strength does.

1. Renders ``--images`` one-object ShapesWorld scenes whose caption says "red", drawing the red objects in the
   palette's blue, and ``--keep`` scenes of the other colours drawn as usual, into ``--out/data`` (PNG + caption
   .txt, the format ``python -m workbench train-lora`` reads). (A colour outside the palette would not do: the
   embedded VAE only knows the palette, and decodes pink as red.)
2. Trains a LoRA on them (``train_lora``, the code of the command) and writes ``--out/red-is-blue.safetensors``.
3. Generates ``--n`` fresh "red" captions and ``--n`` captions of the other colours at LoRA strengths 0, 0.5 and 1
   and prints, per strength, how the evaluator reads the object of the red captions (red / blue / other), the
   colour accuracy on the other captions (the LoRA should leave them alone) and the seconds per image (hooks; at
   strength 0 they skip their work), then the seconds per image with the LoRA fused into the weights.

    python benchmarks/lora_demo.py --out runs/lora-demo          # about 4 minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, when run as a script

from workbench import load_pipeline  # noqa: E402
from workbench.lora_training import LoRATrainConfig, read_image_folder, train_lora  # noqa: E402
from workbench.shapesworld import world  # noqa: E402
from workbench.shapesworld.evaluate import read_image, score  # noqa: E402
from workbench.viz import markdown_header, markdown_row  # noqa: E402


def render_dataset(folder: Path, count: int, keep: int, seed: int) -> None:
    """``count`` scenes captioned "red" drawn in blue, then ``keep`` scenes of the other colours drawn as usual (the
    regularisation images of DreamBooth's prior preservation: without them the LoRA also blues the other colours)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    original = world.PALETTE_OBJECTS["red"]
    written = {"red": 0, "other": 0}
    try:
        while written["red"] < count or written["other"] < keep:
            scene = world.sample_scene(rng, 128, 128, kind="one")
            group = "red" if scene.objects[0].colour == "red" else "other"
            if written[group] >= (count if group == "red" else keep):
                continue
            world.PALETTE_OBJECTS["red"] = world.PALETTE_OBJECTS["blue"] if group == "red" else original
            index = written["red"] + written["other"]
            world.render(scene).save(folder / f"{index:04d}.png")
            (folder / f"{index:04d}.txt").write_text(scene.caption)
            written[group] += 1
    finally:
        world.PALETTE_OBJECTS["red"] = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/lora-demo")
    parser.add_argument("--images", type=int, default=64, help="red-captioned scenes drawn in blue")
    parser.add_argument("--keep", type=int, default=64, help="scenes of the other colours, drawn as usual")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n", type=int, default=48, help="captions per group for the measurement")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    render_dataset(out / "data", args.images, args.keep, seed=0)
    images, captions = read_image_folder(out / "data")
    pipe = load_pipeline()
    config = LoRATrainConfig(rank=8, steps=args.steps, batch_size=8, lr=2e-3, save_every=0)
    start = time.perf_counter()
    losses = train_lora(pipe, images, captions, config, out / "red-is-blue.safetensors")
    tenth = max(1, len(losses) // 10)
    print(
        f"trained {args.steps} steps × 8 images in {time.perf_counter() - start:.0f} s; loss "
        f"{np.mean(losses[:tenth]):.4f} (first tenth) → {np.mean(losses[-tenth:]):.4f} (last tenth)"
    )
    pipe.loras.remove()
    pipe.loras.load(out / "red-is-blue.safetensors")

    pool = world.random_canonical_captions(12 * args.n, seed=7, kind="one")
    red = [c for c in pool if " red " in f" {c} "][: args.n]
    other = [c for c in pool if " red " not in f" {c} "][: args.n]
    print(markdown_header(["strength", "red captions read as red", "… as blue", "other colours right", "s / image"]))
    for strength in (0.0, 0.5, 1.0):
        pipe.loras.set_strength("red-is-blue", strength)
        read = {"red": 0, "blue": 0}
        begin = time.perf_counter()
        for i, caption in enumerate(red):
            objects = read_image(pipe(caption, seed=1000 + i).images[0])["objects"]
            colour = objects[0]["colour"] if objects else None
            read[colour] = read.get(colour, 0) + 1
        seconds = (time.perf_counter() - begin) / len(red)
        right = sum(score(c, pipe(c, seed=2000 + i).images[0])["colour"] for i, c in enumerate(other))
        n = len(red)
        counts = [f"{read['red']}/{n}", f"{read['blue']}/{n}", f"{right}/{len(other)}"]
        print(markdown_row([f"{strength:g}", *counts, f"{seconds:.2f}"]))
    pipe.loras.fuse()
    begin = time.perf_counter()
    for i, caption in enumerate(red):
        pipe(caption, seed=1000 + i)
    seconds = (time.perf_counter() - begin) / len(red)
    print(f"strength 1 fused into the weights (pipe.loras.fuse()): {seconds:.2f} s / image")


if __name__ == "__main__":
    main()
