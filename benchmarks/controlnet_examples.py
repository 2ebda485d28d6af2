"""The README's ControlNet examples: outlines drawn as a user would (black strokes on white), the embedded model
without and with its Canny ControlNet, and what the evaluator reads from each image.

    python benchmarks/controlnet_examples.py --out docs/examples/controlnet

Writes ``sketch_i.png``, ``edges_i.png``, ``plain_i.png`` and ``controlled_i.png`` per example and prints a markdown
table (the images and the evaluator's reading of the objects' shape, colour and position).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.loading import EMBEDDED_MODEL, load_pipeline  # noqa: E402
from workbench.preprocess import canny  # noqa: E402
from workbench.shapesworld.cli_controlnet import EMBEDDED_CONTROLNET  # noqa: E402
from workbench.shapesworld.controlnet_training import outline_drawing  # noqa: E402
from workbench.shapesworld.evaluate import read_image  # noqa: E402
from workbench.shapesworld.world import ShapeSpec  # noqa: E402
from workbench.viz import markdown_rows  # noqa: E402

EXAMPLES: tuple[tuple[str, str, tuple[float, float], float], ...] = (
    ("a large red circle at the top left on a white background", "star", (0.72, 0.70), 0.2),
    ("a blue square at the center on a black background", "triangle", (0.30, 0.66), 0.17),
    ("a green triangle at the bottom on a gray background", "square", (0.70, 0.28), 0.15),
)
"""(caption, the shape drawn, its centre as fractions of the canvas, its radius as a fraction): each sketch puts a
different shape somewhere else than the caption says, so the image shows which of the two wins."""


def sketch(shape: str, centre: tuple[float, float], radius: float, size: int = 128) -> Image.Image:
    """An outline of ``shape`` in black 3 px strokes on white, as drawn with the app's brush."""
    return outline_drawing([ShapeSpec(shape, "red", centre[0], centre[1], radius)], size, size, stroke=3)


def _reading(image: Image.Image) -> str:
    objects = read_image(image)["objects"]
    return "; ".join(f"{o['colour']} {o['shape']}, {o['position']}" for o in objects) or "nothing read"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/examples/controlnet")
    parser.add_argument("--controlnet", default=str(EMBEDDED_CONTROLNET))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(EMBEDDED_MODEL)
    pipe.controlnets.load(args.controlnet)
    rows = []
    for i, (caption, shape, centre, radius) in enumerate(EXAMPLES):
        drawn = sketch(shape, centre, radius)
        edges = canny(drawn)
        plain = pipe(caption, seed=args.seed + i).images[0]
        controlled = pipe(
            caption, seed=args.seed + i, control_image=edges, controlnet_conditioning_scale=args.scale
        ).images[0]
        for name, image in (("sketch", drawn), ("edges", edges), ("plain", plain), ("controlled", controlled)):
            image.save(out / f"{name}_{i}.png")
        images = [f"![]({out / f'{name}_{i}.png'})" for name in ("sketch", "plain", "controlled")]
        rows.append([caption, *images, _reading(plain), _reading(controlled)])
    header = ["caption", "drawn outline (control)", "without ControlNet", "with ControlNet", "read", "read"]
    print(markdown_rows(header, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
