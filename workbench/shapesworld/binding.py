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

from collections.abc import Sequence

import torch

from workbench.layout_guidance import AttentionProbe, token_loss, token_masks
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


__all__ = ["AttentionProbe", "object_word_indices", "token_loss", "token_masks", "word_targets"]
