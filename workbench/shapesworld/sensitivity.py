"""How much a model's velocity depends on each part of a caption: a quick probe of what its conditioning encodes.

For ``n`` random canonical captions c, a training-like input ``x_σ = (1 − σ)·x0 + σ·ε`` (x0 the VAE latent of the
caption's render) and a few noise levels σ, the probe compares the velocity for c with the velocity for an edited
caption c′, relative to how much the caption matters at all::

    sensitivity = mean over captions of ‖v(x_σ, c) − v(x_σ, c′)‖ / ‖v(x_σ, c) − v(x_σ, "")‖

0 means the edit is ignored; values near those of replacing a word by another show it is understood. Edits of one
object: another colour, another shape, the mirrored position (center → top left). Edits of two objects: object a in a
third colour, the two colours swapped, the two shapes swapped (pairs with equal shapes left out) and the relation
flipped (left ↔ right, above ↔ below). Swaps and flips keep the words and change only which object they belong to,
so they measure binding; a bag-of-words model scores 0 on them.

v is the transformer alone (the weights) by default; with ``layout_control`` > 0 it is the velocity the sampler gets
(:meth:`Pipeline.conditional_velocity`), the layout ControlNet drawing each caption's planned layout.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from workbench.pipeline import Pipeline
from workbench.settings import GenerationSettings
from workbench.shapesworld.world import (
    PALETTE_OBJECTS,
    SHAPES,
    canonical_caption,
    images_to_tensor,
    parse_caption,
    random_canonical_captions,
    render,
    scene_from_caption,
)
from workbench.viz import markdown_rows

SIGMAS: tuple[float, ...] = (0.9, 0.6, 0.3)
_MIRROR = {
    "top left": "bottom right",
    "top": "bottom",
    "top right": "bottom left",
    "left": "right",
    "center": "top left",
    "right": "left",
    "bottom left": "top right",
    "bottom": "top",
    "bottom right": "top left",
}
_FLIP = {"to the left of": "to the right of", "to the right of": "to the left of", "above": "below", "below": "above"}


def _next(options: Sequence[str], value: str, avoid: Sequence[str] = ()) -> str:
    """The first option after ``value`` (cyclically) that is not ``value`` and not in ``avoid``."""
    start = list(options).index(value)
    for step in range(1, len(options)):
        candidate = options[(start + step) % len(options)]
        if candidate not in avoid:
            return candidate
    raise ValueError(f"no option besides {value!r} and {list(avoid)!r}")


def _swap(a: dict, first: str, second: str) -> None:
    a[first], a[second] = a[second], a[first]


ONE_EDITS: dict[str, Callable[[dict], None]] = {
    "colour": lambda a: a.update(colour=_next(tuple(PALETTE_OBJECTS), a["colour"])),
    "shape": lambda a: a.update(shape=_next(SHAPES, a["shape"])),
    "position": lambda a: a.update(position=_MIRROR[a["position"]]),
}
TWO_EDITS: dict[str, Callable[[dict], None]] = {
    "colour of a": lambda a: a.update(
        colour_a=_next(tuple(PALETTE_OBJECTS), a["colour_a"], avoid=(a["colour_a"], a["colour_b"]))
    ),
    "colours swapped": lambda a: _swap(a, "colour_a", "colour_b"),
    "shapes swapped": lambda a: _swap(a, "shape_a", "shape_b"),
    "relation flipped": lambda a: a.update(relation=_FLIP[a["relation"]]),
}


def edited_caption(caption: str, edit: str) -> str | None:
    """``caption`` with the named edit of ONE_EDITS / TWO_EDITS applied; None where the edit changes nothing (shapes
    swapped between two equal shapes)."""
    attributes = parse_caption(caption)
    edits = TWO_EDITS if "relation" in attributes else ONE_EDITS
    if edit not in edits:
        raise ValueError(f"edit must be one of {list(edits)} for this caption, got {edit!r}")
    if edit == "shapes swapped" and attributes["shape_a"] == attributes["shape_b"]:
        return None
    edits[edit](attributes)
    return canonical_caption(attributes)


@torch.no_grad()
def caption_sensitivity(
    pipe: Pipeline,
    n: int = 64,
    seed: int = 0,
    sigmas: Sequence[float] = SIGMAS,
    size: int = 128,
    layout_control: float = 0.0,
) -> dict[str, dict[str, dict[float, float]]]:
    """{"one"|"two": {edit: {σ: sensitivity}}} on ``n`` captions of each kind (see the module docstring).

    ``layout_control`` 0 probes the transformer alone (the weights); > 0 probes the velocity the sampler gets at that
    layout control (:meth:`Pipeline.conditional_velocity`): each caption's planned layout (caption i planned with seed
    i, the scene of its render) drawn through the layout ControlNet. The empty caption has no layout, so dropping
    the caption drops the control too."""
    settings = GenerationSettings.resolve(
        pipe.defaults, height=size, width=size, layout_guidance=0.0, layout_control=layout_control
    )
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, dict[str, dict[float, float]]] = {}
    for kind, edits in (("one", ONE_EDITS), ("two", TWO_EDITS)):
        captions = random_canonical_captions(n, seed, kind)
        pixels = images_to_tensor(
            [render(scene_from_caption(c, random.Random(i), size, size)) for i, c in enumerate(captions)]
        )
        clean = pipe.vae.scale_latents(pipe.encode_image(pixels).mode()).float().cpu()
        noise = torch.randn(clean.shape, generator=generator)
        base_velocity = pipe.conditional_velocity(captions, settings, range(n))
        empty_velocity = pipe.conditional_velocity([""] * n, settings, range(n))
        edited = {}  # edit -> (indices of the captions it changes, their velocity)
        for edit in edits:
            changed = [edited_caption(c, edit) for c in captions]
            keep = [i for i, c in enumerate(changed) if c is not None]
            edited[edit] = (keep, pipe.conditional_velocity([changed[i] for i in keep], settings, keep))
        out[kind] = {edit: {} for edit in edits}
        for sigma in sigmas:
            x = (1 - sigma) * clean + sigma * noise
            base = base_velocity(x, sigma)
            scale = (base - empty_velocity(x, sigma)).flatten(1).norm(dim=1)
            for edit, (keep, velocity) in edited.items():
                ratio = (base[keep] - velocity(x[keep], sigma)).flatten(1).norm(dim=1) / scale[keep].clamp_min(1e-8)
                out[kind][edit][sigma] = float(ratio.mean())
    return out


def format_sensitivity(result: dict[str, dict[str, dict[float, float]]]) -> str:
    """:func:`caption_sensitivity` as a markdown table: one row per edit, one column per σ."""
    sigmas = sorted({s for edits in result.values() for values in edits.values() for s in values}, reverse=True)
    rows = [
        [kind, edit, *(f"{values[s]:.3f}" for s in sigmas)]
        for kind, edits in result.items()
        for edit, values in edits.items()
    ]
    return markdown_rows(["objects", "edit", *(f"σ = {s:g}" for s in sigmas)], rows)
