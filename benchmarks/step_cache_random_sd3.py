"""Step caching on random SD3-layout weights: how far the final latent moves at each ``cache_threshold``.

``python benchmarks/step_cache_random_sd3.py [--depth 2 --size 128 --steps 28 --thresholds 0 0.1 0.2 0.4]``

An MMDiT of SD3-Medium's layout (hidden 1536, 24 heads, patch 2, joint attention dim 4096; ``--depth`` blocks) with
torch's default random initialisation samples one guided image (CFG 7, batch [negative; positive] of random text
embeddings, 333 tokens), Euler with SD3's shift 3, from the same noise at every threshold, through
:class:`workbench.step_cache.StepCache` exactly as the pipeline attaches it. Printed per threshold:
transformer evaluations, the skipped steps, the final latent's largest absolute difference from the first threshold
listed (0 by default) and its mean absolute difference relative to the mean absolute latent, and CPU seconds of the
sampling (one thread; the machine may be shared). Random weights say nothing about image quality; the accuracy side
of the trade is the ShapesWorld evaluation in the README.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the workbench of this checkout

from workbench import flow  # noqa: E402
from workbench.models.mmdit import MMDiT, MMDiTConfig  # noqa: E402
from workbench.step_cache import StepCache  # noqa: E402
from workbench.viz import markdown_header, markdown_row  # noqa: E402

SD3_MEDIUM_LAYOUT = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
TEXT_TOKENS = 77 + 256


def sample(
    model: MMDiT, noise: torch.Tensor, embeds: torch.Tensor, pooled: torch.Tensor, steps: int, threshold: float
) -> tuple[torch.Tensor, StepCache, float]:
    """The final latent ``(1, 16, h, w)`` of a guided Euler run at ``threshold``, its cache and the CPU seconds."""
    sigmas = flow.sigma_schedule(steps, 3.0)
    cache = StepCache(threshold, always=(float(sigmas[0]), float(sigmas[-2])))

    def model_fn(x: torch.Tensor, timestep: torch.Tensor, positive_only: bool = False, skip_layers=()) -> torch.Tensor:
        first = embeds.shape[0] - x.shape[0]
        return model(x, embeds[first:], pooled[first:], timestep).float()

    model.step_cache = cache
    start = time.process_time()
    try:
        with torch.no_grad():
            latent = flow.sample(cache.velocity(flow.cfg_velocity(model_fn, 7.0)), noise, sigmas)
    finally:
        model.step_cache = None
    return latent, cache, time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="image side in px (latent side / 8)")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.4])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = MMDiT(MMDiTConfig(num_layers=args.depth, **SD3_MEDIUM_LAYOUT)).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(args.seed)
    side = args.size // 8
    noise = torch.randn(1, 16, side, side, generator=generator)
    embeds = torch.randn(2, TEXT_TOKENS, SD3_MEDIUM_LAYOUT["joint_attention_dim"], generator=generator)
    pooled = torch.randn(2, SD3_MEDIUM_LAYOUT["pooled_projection_dim"], generator=generator)
    reference = None
    print(
        f"Random SD3-Medium-layout MMDiT, depth {args.depth}, {args.size}², {args.steps} Euler steps, CFG 7, "
        f"seed {args.seed}\n"
    )
    header = ["threshold", "transformer evaluations", "skipped steps", "max abs Δ latent"]
    print(markdown_header([*header, "mean abs Δ / mean abs latent", "CPU s"]))
    for threshold in args.thresholds:
        latent, cache, seconds = sample(model, noise, embeds, pooled, args.steps, threshold)
        reference = latent if reference is None else reference
        delta = (latent - reference).abs()
        relative = float(delta.mean() / reference.abs().mean())
        skipped = ", ".join(map(str, cache.skipped_steps)) or "–"
        errors = [f"{float(delta.max()):.4f}", f"{relative:.4f}"]
        print(markdown_row([f"{threshold:g}", cache.computed, skipped, *errors, f"{seconds:.0f}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
