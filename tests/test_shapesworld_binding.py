"""The binding terms of the embedded model's training: word positions, the attention-to-mask token loss, the attention
probe, and the hard-negative term."""

from __future__ import annotations

import random

import pytest
import torch

from workbench.models.mmdit import MMDiT, MMDiTConfig
from workbench.shapesworld import binding
from workbench.shapesworld import world as w
from workbench.shapesworld.train import Condition, hard_negatives, negative_loss


def _two(colour_a="red", shape_a="circle", colour_b="blue", shape_b="circle") -> w.Scene:
    objects = [w.ShapeSpec(shape_a, colour_a, 0.25, 0.5, 0.1), w.ShapeSpec(shape_b, colour_b, 0.75, 0.5, 0.1)]
    return w.Scene(128, 128, "white", objects, "", "two")


def test_object_words_of_canonical_paraphrase_partial_and_masked_captions():
    scene = _two()
    canonical = "a red circle to the left of a blue circle on a white background"
    assert binding.object_word_indices(canonical, scene) == [[1, 2], [8, 9]], "equal shapes split by the relation"
    paraphrase = "on a white background, a red circle to the left of a blue circle"
    tokens = w.tokenize(paraphrase)
    a, b = binding.object_word_indices(paraphrase, scene)
    assert [tokens[i] for i in a] == ["red", "circle"] and [tokens[i] for i in b] == ["blue", "circle"]
    assert binding.object_word_indices("a red shape and a blue circle", scene) == [[1], [5, 6]]
    assert binding.object_word_indices("a red circle xq the left of a blue circle", scene) == [[], []]
    one = w.Scene(128, 128, "gray", [w.ShapeSpec("star", "green", 0.5, 0.5, 0.1)], "", "one")
    assert binding.object_word_indices("a small green star at the top on a gray background", one) == [[2, 3]]


def test_word_targets_mark_both_encoders_where_kept():
    scene = _two()
    caption = "a red circle to the left of a blue circle on a white background"
    targets = binding.word_targets([caption, caption], [scene, scene], 24, 48, keep_clip=[True, False])
    assert targets.shape == (2, 2, 48)
    assert targets[0, 0].nonzero().reshape(-1).tolist() == [2, 3, 25, 26], "CLIP after <|startoftext|>, then T5"
    assert targets[1, 0].nonzero().reshape(-1).tolist() == [25, 26], "the dropped CLIP copy is not supervised"


def test_token_loss_is_zero_inside_the_mask_and_one_outside():
    masks = torch.zeros(1, 2, 4)
    masks[0, 0, 0] = 1.0  # object a covers token 0, object b token 3
    masks[0, 1, 3] = 1.0
    words = torch.zeros(1, 2, 3)
    words[0, 0, 0] = 1.0  # word 0 names a, word 1 names b
    words[0, 1, 1] = 1.0
    bound = torch.zeros(1, 4, 3)  # (B, image tokens, text tokens)
    bound[0, 0, 0] = bound[0, 3, 1] = 0.9
    assert binding.token_loss(bound, words, masks).item() == pytest.approx(0.0)
    swapped = bound[:, :, [1, 0, 2]]  # each object's words attended from the other object
    assert binding.token_loss(swapped, words, masks).item() == pytest.approx(1.0)
    uniform = torch.full((1, 4, 3), 0.1, requires_grad=True)
    loss = binding.token_loss(uniform, words, masks)
    assert loss.item() == pytest.approx(0.75)
    loss.backward()
    assert uniform.grad[0, 0, 0] < 0 < uniform.grad[0, 1, 0], "gradient raises attention inside the mask"
    assert binding.token_loss(uniform, torch.zeros_like(words), masks).item() == 0


def test_token_masks_pool_coverage_to_the_token_grid():
    coverage = torch.zeros(1, 2, 32, 32)
    coverage[0, 0, :16, :16] = 1.0
    masks = binding.token_masks(coverage, (2, 2))
    assert masks[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0] and masks[0, 1].sum() == 0


def test_attention_probe_reproduces_the_joint_attention():
    torch.manual_seed(0)
    config = MMDiTConfig(
        sample_size=8,
        patch_size=2,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=8,
    )
    model = MMDiT(config)
    outputs = []
    handle = model.transformer_blocks[1].attn.register_forward_hook(lambda m, a, out: outputs.append(out[0]))
    with binding.AttentionProbe(model, [1]) as probe:
        model(torch.randn(2, 16, 8, 8), torch.randn(2, 5, 16), torch.randn(2, 8), torch.tensor([500.0, 900.0]))
    handle.remove()
    attention = model.transformer_blocks[1].attn
    x, context = probe.inputs[0]
    values = torch.cat([attention._heads(attention.to_v(x)), attention._heads(attention.add_v_proj(context))], dim=2)
    probs = probe.probabilities()[0]
    assert probs.shape == (2, 2, 16, 21)
    expected = attention.to_out[0](attention._merge(probs @ values, x.dtype))
    assert torch.allclose(expected, outputs[0], atol=1e-5)
    maps = probe.maps()[0]
    assert maps.shape == (2, 16, 5) and torch.allclose(maps, probs[..., 16:].mean(1))
    assert not model.transformer_blocks[1].attn._forward_pre_hooks, "the probe removes its hooks"


def test_hard_negatives_swap_only_which_object_the_words_belong_to():
    captions = [
        "a red circle to the left of a blue square on a white background",
        "a red circle at the top on a white background",
        "red circle to the left of blue square, white background",
        "a green star above a yellow star on a gray background",
    ]
    negatives = dict(hard_negatives(captions, random.Random(0)))
    assert set(negatives) == {0, 3}, "only two-object canonical captions get a negative"
    assert negatives[0] != captions[0]
    assert negatives[3] in {
        "a yellow star above a green star on a gray background",
        "a green star below a yellow star on a gray background",
    }
    for index, negative in negatives.items():
        bag = sorted(w.tokenize(negative))
        flipped = {"left": "right", "right": "left", "above": "below", "below": "above"}
        assert bag == sorted(w.tokenize(captions[index])) or bag == sorted(
            flipped.get(t, t) for t in w.tokenize(captions[index])
        )


class _FakeText:
    tokenizer_max_length = 2

    def t5_sequence_length(self, max_sequence_length: int = 256) -> int:
        return 2

    def embed(self, captions, max_sequence_length=256):
        codes = torch.tensor([[float(len(c))] for c in captions])
        return codes[:, None, :].expand(-1, 4, 1).clone(), codes


class _FakePipe:
    text_encoders = _FakeText()


def test_negative_loss_pushes_only_until_the_margin():
    captions = ["a red circle to the left of a blue square on a white background", "a red circle at the top"]
    condition = Condition(torch.zeros(2, 4, 1), torch.zeros(2, 1), captions, [True, True], [True, True])
    x_t, t, target = torch.zeros(2, 1, 2, 2), torch.tensor([0.5, 0.5]), torch.zeros(2, 1, 2, 2)
    per_sample = torch.tensor([0.2, 0.2])
    offset = torch.tensor(0.1, requires_grad=True)

    def far(x, embeds, pooled, timestep):  # the negative's error (1.21) is far above err(c) + margin
        return x + 1.0 + offset

    loss = negative_loss(_FakePipe(), far, condition, x_t, t, target, per_sample, step=0, margin=0.05)
    assert loss.item() == 0.0

    def near(x, embeds, pooled, timestep):  # the negative explains the image as well as the caption does
        return x + per_sample[0].sqrt() + 0 * offset

    loss = negative_loss(_FakePipe(), near, condition, x_t, t, target, per_sample, step=0, margin=0.05)
    assert loss.item() == pytest.approx(0.05, abs=1e-6), "err(c′) = err(c): the whole margin is the loss"
