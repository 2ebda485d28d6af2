"""Attention-to-layout guidance: at sampling time, move the latents so that each object's words attend to where a
layout puts that object, and the attention probe and token loss it shares with the embedded model's training.

In an MMDiT every block's image queries attend jointly to image and text keys, so the map of text token j is the
attention probability ``P(n → j)`` of every image token n (mean over heads), normalised over n into a distribution
``A_j``. With ``M_o(n)`` the fraction of image token n inside object o's region, the token loss (after TokenCompose,
arXiv 2312.03626) of every word j that names object o is ``1 − Σ_n A_j(n) · M_o(n)``. Training lowers it through the
weights (``workbench/shapesworld/binding.py``); guidance lowers it through the latents: after the first sampler step,
``LAYOUT_ITERATIONS`` gradient steps ``x ← x − strength · σ · g / rms(g)`` (``g`` the loss gradient of each image's
latents, ``rms`` its root mean square), in the spirit of Attend-and-Excite (arXiv 2301.13826) and layout guidance
(arXiv 2304.03373). The positive prompts' conditioning is used; images without a layout are left alone.

A :class:`Layout` comes from a :data:`LayoutSource` set on the pipeline (``pipe.layout_source``); the embedded model's
reads the layout from canonical ShapesWorld captions (:mod:`workbench.shapesworld.layout`). Measured on the embedded
model with ``python -m workbench.shapesworld eval --layout-guidance S`` (README, "Planned layouts").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from workbench.flow import NUM_TRAIN_TIMESTEPS, LatentConstraint
from workbench.models.mmdit import MMDiT
from workbench.quantization import input_gradients

LAYOUT_ITERATIONS = 3
"""Gradient steps on the latents after the first sampler step."""


@dataclass(frozen=True)
class Layout:
    """Where one image's objects go: ``words (O, L)`` 1 at the text positions (of the joint text sequence the
    transformer sees) that name object o, else 0; ``regions (O, H, W)`` in [0, 1], object o's coverage at any
    resolution (pooled to the token grid); ``control``: the layout drawn as the control image of the model's layout
    ControlNet (``layout_control``; the embedded model's: Canny edges of the planned scene, PIL RGB), or None."""

    words: torch.Tensor
    regions: torch.Tensor
    control: object = None


LayoutSource = Callable[[Sequence[str], Sequence[int], int, int, int], "list[Layout | None]"]
"""``source(prompts, seeds, height, width, sequence_length)`` → one :class:`Layout` (or None: none known) per image."""


def token_masks(coverage: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Pixel coverage ``(B, O, H, W)`` → fraction of each image token covered ``(B, O, gh·gw)``, row-major like the
    transformer's token order."""
    pooled = F.adaptive_avg_pool2d(coverage.float(), grid)
    return pooled.flatten(2)


class AttentionProbe:
    """Records, during a forward of an :class:`MMDiT`, the inputs of the joint attention of chosen blocks, and turns
    them into image → text attention probabilities ``(B, N, L)`` (mean over heads, softmax over all N + L keys).

    Use as a context manager around the forward; :meth:`maps` afterwards (gradients flow through it)."""

    def __init__(self, model: MMDiT, blocks: Sequence[int] | None = None) -> None:
        indices = range(len(model.transformer_blocks)) if blocks is None else blocks
        self.attentions = [model.transformer_blocks[i].attn for i in indices]
        self.inputs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> AttentionProbe:
        self.inputs.clear()
        for attention in self.attentions:
            self._handles.append(attention.register_forward_pre_hook(self._record))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, module: nn.Module, args: tuple) -> None:
        self.inputs.append((args[0], args[1]))

    def probabilities(self) -> list[torch.Tensor]:
        """Per probed block, the joint attention's probabilities of the image queries over all keys
        ``(B, heads, N, N + L)`` (image keys first, as in the attention itself)."""
        out = []
        for a, (x, context) in zip(self.attentions, self.inputs):
            q, k, _ = a._qkv(x, a.to_q, a.to_k, a.to_v, a.norm_q, a.norm_k)
            _, ck, _ = a._qkv(context, a.add_q_proj, a.add_k_proj, a.add_v_proj, a.norm_added_q, a.norm_added_k)
            keys = torch.cat([k, ck], dim=2).float()
            out.append((q.float() @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(dim=-1))
        return out

    def maps(self) -> list[torch.Tensor]:
        """Per probed block, ``P(image token n → text token j)`` ``(B, N, L)``, the mean over heads."""
        return [probs[..., probs.shape[2] :].mean(dim=1) for probs in self.probabilities()]


def token_loss(attention: torch.Tensor, words: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """TokenCompose's token loss, averaged over every (sample, object, word) that has a word and a mask.

    ``attention (B, N, L)``: image → text probabilities; ``words (B, O, L)``: 0/1 word positions per object;
    ``masks (B, O, N)``: token coverage per object. Returns a scalar (0 when nothing is supervised)."""
    spatial = attention / attention.sum(dim=1, keepdim=True).clamp_min(1e-12)  # A_j(n), a distribution over n
    inside = torch.einsum("bnl,bon->bol", spatial, masks.to(spatial.dtype))  # Σ_n A_j(n) M_o(n) per object, word
    has_mask = (masks.sum(dim=-1, keepdim=True) > 0).to(spatial.dtype)
    weight = words.to(spatial.dtype) * has_mask
    count = weight.sum()
    if count == 0:
        return attention.sum() * 0
    return ((1 - inside) * weight).sum() / count


def _batch_targets(
    layouts: Sequence[Layout | None], sequence_length: int, grid: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``words (B, O, L)`` and ``masks (B, O, N)`` of a batch; zeros where an image has no layout."""
    objects = max((layout.words.shape[0] for layout in layouts if layout is not None), default=0)
    words = torch.zeros(len(layouts), objects, sequence_length)
    masks = torch.zeros(len(layouts), objects, grid[0] * grid[1])
    for b, layout in enumerate(layouts):
        if layout is None:
            continue
        count = layout.words.shape[0]
        length = min(sequence_length, layout.words.shape[1])
        words[b, :count, :length] = layout.words[:, :length]
        masks[b, :count] = token_masks(layout.regions[None], grid)[0]
    return words, masks


@contextmanager
def _bare(transformer: MMDiT) -> Iterator[None]:
    """Within the block, ``transformer`` runs without the generation's step cache and routing record, so that the
    guidance's own evaluations neither count as sampler steps nor appear in the routing record."""
    saved = transformer.step_cache, transformer.routing_record
    transformer.step_cache = None
    transformer.record_routing(None)
    try:
        yield
    finally:
        transformer.step_cache = saved[0]
        transformer.record_routing(saved[1])


def layout_constraint(
    transformer: MMDiT,
    layouts: Sequence[Layout | None],
    embeds: torch.Tensor,
    pooled: torch.Tensor,
    strength: float,
    iterations: int = LAYOUT_ITERATIONS,
) -> LatentConstraint | None:
    """The sampler constraint (:data:`workbench.flow.LatentConstraint`) of layout guidance: after step 0, move the
    latents ``x (B, C, h, w)`` toward ``layouts`` (one per image) in ``iterations`` gradient steps of size
    ``strength · σ``; later steps are untouched. ``embeds (B, L, D)``, ``pooled (B, P)``: the positive prompts'
    conditioning. None when ``strength`` is 0 or no image has a layout."""
    if strength == 0 or all(layout is None for layout in layouts):
        return None
    patch = transformer.config.patch_size

    def step(x: torch.Tensor, sigma: float, words: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            latent = x.detach().to(embeds.dtype).requires_grad_(True)
            timestep = torch.full((x.shape[0],), sigma * NUM_TRAIN_TIMESTEPS, device=x.device)
            with AttentionProbe(transformer) as probe, _bare(transformer), input_gradients(transformer):
                transformer(latent, embeds, pooled, timestep)
                maps = probe.maps()  # runs the probed blocks' projections again, so inside input_gradients
            loss = sum(token_loss(m, words, masks) for m in maps) / len(maps)
            (gradient,) = torch.autograd.grad(loss, latent)
        gradient = gradient.float()
        rms = gradient.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12)[:, None, None, None]
        return (x - strength * sigma * gradient / rms).to(x.dtype)

    def constraint(index: int, sigma_next: float, x: torch.Tensor) -> torch.Tensor:
        if index != 0:
            return x
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        words, masks = (t.to(x.device) for t in _batch_targets(layouts, embeds.shape[1], grid))
        for _ in range(iterations):
            x = step(x, float(sigma_next), words, masks)
        return x

    return constraint
