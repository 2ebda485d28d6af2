"""The embedded model's layout source for layout guidance (:mod:`workbench.layout_guidance`): a canonical caption
implies a layout, and the dataset's own scene sampler draws one.

For each prompt that parses as a canonical caption (``world.parse_caption``), a scene that matches it is sampled with
the image's seed (``world.scene_from_caption``: the positions, sizes and relation the caption states, the rest as
in the training data) and rasterised (``raster.render_scenes``); each object's coverage is its region, and its
colour and shape words (``binding.object_word_indices``, both text encoders' copies) are its words; the Canny edges of
the scene's render are its control image (``layout_control``, through the embedded ControlNet, which was trained on
such edges). Other prompts (paraphrases, free text) get no layout and are sampled as without guidance or control.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from workbench.layout_guidance import Layout
from workbench.preprocess import canny
from workbench.shapesworld.binding import word_targets
from workbench.shapesworld.raster import render_scenes
from workbench.shapesworld.world import render, scene_from_caption, vocabulary

if TYPE_CHECKING:
    from workbench.pipeline import Pipeline


class CaptionLayouts:
    """A :data:`workbench.layout_guidance.LayoutSource` for a model with ShapesWorld's word-level text encoders;
    ``clip_length``: the CLIP-style sequence's length (the T5-style sequence follows it)."""

    def __init__(self, clip_length: int) -> None:
        self.clip_length = clip_length

    def __call__(
        self, prompts: Sequence[str], seeds: Sequence[int], height: int, width: int, sequence_length: int
    ) -> list[Layout | None]:
        scenes = []
        for prompt, seed in zip(prompts, seeds):
            try:
                scenes.append(scene_from_caption(prompt, random.Random(seed), height, width))
            except ValueError:  # not a canonical caption
                scenes.append(None)
        known = [(i, scene) for i, scene in enumerate(scenes) if scene is not None]
        layouts: list[Layout | None] = [None] * len(scenes)
        if not known:
            return layouts
        _, cover = render_scenes([scene for _, scene in known])
        captions = [prompts[i] for i, _ in known]
        words = word_targets(captions, [scene for _, scene in known], self.clip_length, sequence_length)
        for row, (i, scene) in enumerate(known):
            count = len(scene.objects)
            layouts[i] = Layout(words[row, :count], cover[row, :count].cpu(), canny(render(scene)))
        return layouts


def has_caption_vocabulary(pipe: Pipeline) -> bool:
    """Whether ``pipe``'s text encoders tokenize ShapesWorld captions word by word (word-level tokenizers holding
    every word of the captions), so that word positions are known."""
    tokenizers = [pipe.text_encoders.clip_l_tokenizer, pipe.text_encoders.t5_tokenizer]
    words = set(vocabulary())
    for tokenizer in tokenizers:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or type(backend.model).__name__ != "WordLevel" or not words <= set(tokenizer.get_vocab()):
            return False
    return True


def attach_caption_layouts(pipe: Pipeline, layout_controlnet: str | Path | None = None) -> bool:
    """Give ``pipe`` the caption layout source when its text encoders are ShapesWorld's (the embedded model and
    models trained like it), and ``layout_controlnet`` (a ControlNet folder) as its layout ControlNet
    (``layout_control``); returns whether it did. Other models keep theirs (None: layout guidance and layout control
    refused). :func:`workbench.loading.load_pipeline` calls it with the ControlNet the model folder names."""
    if not has_caption_vocabulary(pipe):
        return False
    pipe.layout_source = CaptionLayouts(pipe.text_encoders.tokenizer_max_length)
    if layout_controlnet is not None:
        pipe.controlnets.load_layout(layout_controlnet)
    return True
