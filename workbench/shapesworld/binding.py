"""Attention-to-mask supervision for the embedded model: each object's words attend to that object's image tokens.

TokenCompose (arXiv 2312.03626) ties each noun token's cross-attention map to its object's segmentation mask. In the
MMDiT the image queries of every block attend jointly to image and text keys, so the map of text token j is the
attention probability ``P(n → j)`` of every image token n (mean over heads), normalised over n into a distribution
``A_j``. ShapesWorld's renderer knows every object's exact coverage, so the loss is, for every word that names an
object's colour or shape,

    L_token(j) = 1 − Σ_n A_j(n) · M_o(n),

with ``M_o(n)`` the fraction of image token n covered by object o (its pixels pooled to the token grid). In a
two-object scene the words of object a are thereby pulled away from object b's tokens: the binding the flow loss
alone learns last and slowest.

Conventions: text positions are those of ``TextConditioner.embed`` for the embedded model: the CLIP-style sequence
first (``<|startoftext|>`` at 0, word i at 1 + i, ``clip_length`` positions), then the T5-style sequence (word i at
``clip_length + i``); words are ``world.tokenize`` tokens of the caption actually encoded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from workbench.models.mmdit import MMDiT
from workbench.shapesworld.world import PALETTE_OBJECTS, SHAPES, Scene, tokenize

_SPLIT_WORDS = frozenset({"to", "above", "below", "and"})  # first word of a relation, or "and" in a partial caption


def object_word_indices(caption: str, scene: Scene) -> list[list[int]]:
    """For each object of ``scene``, the indices (into ``world.tokenize(caption)``) of the words naming its colour
    or shape. Two-object captions name object a before the relation and object b after it; a caption whose
    relation word is missing (masked) gives no words for either."""
    tokens = tokenize(caption)
    objects = scene.objects
    if len(objects) == 1:
        names = {objects[0].colour, objects[0].shape}
        return [[i for i, t in enumerate(tokens) if t in names]]
    split = next((i for i, t in enumerate(tokens) if t in _SPLIT_WORDS), None)
    if split is None:
        return [[] for _ in objects]
    spans = (range(0, split), range(split + 1, len(tokens)))
    result = []
    for spec, span in zip(objects, spans):
        names = {spec.colour, spec.shape}
        result.append([i for i in span if tokens[i] in names and tokens[i] in (*PALETTE_OBJECTS, *SHAPES)])
    return result


def word_targets(
    captions: Sequence[str],
    scenes: Sequence[Scene],
    clip_length: int,
    sequence_length: int,
    keep_clip: Sequence[bool] | None = None,
    keep_t5: Sequence[bool] | None = None,
    max_objects: int = 2,
) -> torch.Tensor:
    """``(B, max_objects, sequence_length)`` indicator of the text positions that name each object (both encoders'
    copies of a word, each only where that encoder's output was kept)."""
    out = torch.zeros(len(captions), max_objects, sequence_length)
    for b, (caption, scene) in enumerate(zip(captions, scenes)):
        for o, indices in enumerate(object_word_indices(caption, scene)):
            for i in indices:
                if (keep_clip is None or keep_clip[b]) and 1 + i < clip_length:
                    out[b, o, 1 + i] = 1.0
                if (keep_t5 is None or keep_t5[b]) and clip_length + i < sequence_length:
                    out[b, o, clip_length + i] = 1.0
    return out


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
        for attention, (x, context) in zip(self.attentions, self.inputs):
            a = attention
            q, k, _ = a._qkv(x, a.to_q, a.to_k, a.to_v, a.norm_q, a.norm_k)
            _, ck, _ = attention._qkv(
                context,
                attention.add_q_proj,
                attention.add_k_proj,
                attention.add_v_proj,
                attention.norm_added_q,
                attention.norm_added_k,
            )
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
