"""TextConditioner equals diffusers' SD3 encode_prompt; validation names components and sizes; word tokenizers."""

from __future__ import annotations

import pytest
import torch
from tiny_sd3 import (
    CLIP_MAX_LENGTH,
    JOINT_ATTENTION_DIM,
    POOLED_PROJECTION_DIM,
    T5_MAX_LENGTH,
    VOCABULARY,
    build_tiny_sd3_components,
    save_tiny_sd3_pipeline,
)
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from workbench.loading import load_text_encoders, save_text_encoders
from workbench.models.text import TextConditioner
from workbench.shapesworld.tokenizer import build_word_tokenizers, tiny_clip_config, tiny_t5_config

diffusers = pytest.importorskip("diffusers")

PROMPTS = ["a large red circle at the top left on a white background", "A blue star, below a green square!"]
NEGATIVES = ["a purple triangle", ""]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(folder, diffusers pipeline) for the tiny model with T5 and without."""
    out = {}
    for with_t5 in (True, False):
        folder = tmp_path_factory.mktemp("t5" if with_t5 else "no_t5")
        out[with_t5] = (folder, save_tiny_sd3_pipeline(folder, with_t5=with_t5))
    return out


def _load(folder, **kwargs) -> TextConditioner:
    return load_text_encoders(
        folder, joint_attention_dim=JOINT_ATTENTION_DIM, pooled_projection_dim=POOLED_PROJECTION_DIM, **kwargs
    )


def _reference(pipe, prompts, negatives, max_sequence_length):
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompts,
            prompts,
            prompts,
            negative_prompt=negatives,
            do_classifier_free_guidance=True,
            max_sequence_length=max_sequence_length,
        )
    return pos, neg, pooled, neg_pooled


@pytest.mark.parametrize("with_t5", [True, False])
@pytest.mark.parametrize("max_sequence_length", [T5_MAX_LENGTH, 7])
def test_encode_matches_diffusers(saved, with_t5, max_sequence_length):
    folder, pipe = saved[with_t5]
    conditioner = _load(folder)
    assert conditioner.present == (("clip_l", "clip_g", "t5") if with_t5 else ("clip_l", "clip_g"))
    pos, neg, pooled, neg_pooled = _reference(pipe, PROMPTS, NEGATIVES, max_sequence_length)

    embeds, pooled_ours = conditioner.encode(PROMPTS, max_sequence_length=max_sequence_length)
    assert embeds.shape == (2, CLIP_MAX_LENGTH + max_sequence_length, JOINT_ATTENTION_DIM)
    assert pooled_ours.shape == (2, POOLED_PROJECTION_DIM)
    torch.testing.assert_close(embeds, pos, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled_ours, pooled, atol=1e-6, rtol=0)

    both, both_pooled = conditioner.encode_with_negative(PROMPTS, NEGATIVES, max_sequence_length=max_sequence_length)
    torch.testing.assert_close(both, torch.cat([neg, pos]), atol=1e-6, rtol=0)
    torch.testing.assert_close(both_pooled, torch.cat([neg_pooled, pooled]), atol=1e-6, rtol=0)


def test_single_prompt_and_default_negative(saved):
    folder, pipe = saved[True]
    conditioner = _load(folder)
    pos, neg, pooled, neg_pooled = _reference(pipe, "a cat", None, 16)
    both, both_pooled = conditioner.encode_with_negative("a cat", max_sequence_length=16)
    torch.testing.assert_close(both, torch.cat([neg, pos]), atol=1e-6, rtol=0)
    torch.testing.assert_close(both_pooled, torch.cat([neg_pooled, pooled]), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 negative prompts given for 1 prompts"):
        conditioner.encode_with_negative(["a cat"], ["a", "b"])


def test_t5_length_capped_by_tokenizer(saved):
    folder, _ = saved[True]
    conditioner = _load(folder)
    embeds, _ = conditioner.encode(["a dog"], max_sequence_length=256)
    assert embeds.shape == (1, CLIP_MAX_LENGTH + T5_MAX_LENGTH, JOINT_ATTENTION_DIM)
    no_t5 = _load(saved[False][0])
    embeds, _ = no_t5.encode(["a dog"], max_sequence_length=20)
    assert embeds.shape == (1, CLIP_MAX_LENGTH + 20, JOINT_ATTENTION_DIM)
    assert embeds[:, CLIP_MAX_LENGTH:].abs().max() == 0


def test_missing_clip_layout(saved):
    folder, _ = saved[True]
    full = _load(folder)
    embeds, pooled = full.encode(PROMPTS, max_sequence_length=8)

    no_g = _load(folder, components=("text_encoder", "text_encoder_3"))
    assert no_g.components == ("text_encoder", "text_encoder_3")
    e, p = no_g.encode(PROMPTS, max_sequence_length=8)
    torch.testing.assert_close(e[:, :, :16], embeds[:, :, :16])
    assert e[:, :CLIP_MAX_LENGTH, 16:].abs().max() == 0
    torch.testing.assert_close(e[:, CLIP_MAX_LENGTH:], embeds[:, CLIP_MAX_LENGTH:])
    torch.testing.assert_close(p[:, :32], pooled[:, :32])
    assert p[:, 32:].abs().max() == 0

    no_l = _load(folder, components=("text_encoder_2", "text_encoder_3"), clip_l_hidden_size=16)
    assert no_l.clip_widths == (16, 16) and no_l.pooled_widths == (32, 32)
    e, p = no_l.encode(PROMPTS, max_sequence_length=8)
    assert e[:, :CLIP_MAX_LENGTH, :16].abs().max() == 0
    torch.testing.assert_close(e[:, :, 16:], embeds[:, :, 16:])
    assert p[:, :32].abs().max() == 0
    torch.testing.assert_close(p[:, 32:], pooled[:, 32:])
    with pytest.raises(ValueError, match="32 .* = 48 exceed .* CLIP-L is absent: give its width as clip_l_hidden_size"):
        _load(folder, components=("text_encoder_2", "text_encoder_3"))

    t5_only = _load(folder, components=("text_encoder_3",))
    e, p = t5_only.encode(PROMPTS, max_sequence_length=8)
    assert e.shape == (2, 77 + 8, JOINT_ATTENTION_DIM) and p.shape == (2, POOLED_PROJECTION_DIM)
    assert e[:, :77].abs().max() == 0 and p.abs().max() == 0


def test_save_pretrained_round_trip(saved, tmp_path):
    folder, _ = saved[True]
    conditioner = _load(folder)
    save_text_encoders(conditioner, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "text_encoder",
        "text_encoder_2",
        "text_encoder_3",
        "tokenizer",
        "tokenizer_2",
        "tokenizer_3",
    ]
    assert (tmp_path / "text_encoder_3" / "model.safetensors").is_file()
    again = _load(tmp_path)
    for a, b in zip(conditioner.encode(PROMPTS, 12), again.encode(PROMPTS, 12)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_to_dtype(saved):
    conditioner = _load(saved[True][0]).to("cpu", torch.bfloat16)
    embeds, pooled = conditioner.encode(PROMPTS, max_sequence_length=8)
    assert embeds.dtype == pooled.dtype == torch.bfloat16
    assert conditioner.dtype == torch.bfloat16 and conditioner.device == torch.device("cpu")
    loaded = _load(saved[True][0], dtype=torch.bfloat16)
    assert loaded.encode(["a"], 4)[0].dtype == torch.bfloat16


def test_validation_names_component_and_sizes():
    components = build_tiny_sd3_components(seed=0)
    tokenizers = build_word_tokenizers(VOCABULARY, clip_max_length=CLIP_MAX_LENGTH, t5_max_length=T5_MAX_LENGTH)
    clip_l = (components["tokenizer"], components["text_encoder"])
    clip_g = (components["tokenizer_2"], components["text_encoder_2"])
    t5 = (components["tokenizer_3"], components["text_encoder_3"])
    dims = dict(joint_attention_dim=JOINT_ATTENTION_DIM, pooled_projection_dim=POOLED_PROJECTION_DIM)
    TextConditioner(clip_l, clip_g, t5, **dims).validate()

    wrong_g = CLIPTextModelWithProjection(tiny_clip_config(tokenizers.clip_info, 16, 1, 2, projection_dim=24))
    with pytest.raises(ValueError) as error:
        TextConditioner(clip_l, (tokenizers.clip, wrong_g), t5, **dims)
    assert str(error.value) == (
        "text_encoder_2 (CLIP-G): projection_dim is 24 but the transformer expects pooled_projection_dim "
        "64 = 32 (text_encoder) + 32 (text_encoder_2)"
    )

    wrong_t5 = T5EncoderModel(tiny_t5_config(tokenizers.t5_info, d_model=24, heads=2))
    with pytest.raises(ValueError, match=r"text_encoder_3 \(T5\): d_model is 24 .* joint_attention_dim 32"):
        TextConditioner(clip_l, clip_g, (tokenizers.t5, wrong_t5), **dims)

    with pytest.raises(
        ValueError, match=r"16 \(text_encoder \(CLIP-L\)\) \+ 16 .* = 32 exceed .* joint_attention_dim 24"
    ):
        TextConditioner(clip_l, clip_g, None, joint_attention_dim=24, pooled_projection_dim=POOLED_PROJECTION_DIM)

    with pytest.raises(
        ValueError, match=r"text_encoder \(CLIP-L\): projection_dim is 32 .* pooled_projection_dim is only 16"
    ):
        TextConditioner(clip_l, None, None, joint_attention_dim=32, pooled_projection_dim=16)

    with pytest.raises(
        ValueError, match=r"text_encoder_2 \(CLIP-G\): hidden_size is 16 but the transformer expects 20"
    ):
        TextConditioner(clip_l, clip_g, t5, clip_g_hidden_size=20, **dims)

    bad_eos = CLIPTextModelWithProjection(tiny_clip_config(tokenizers.clip_info, 16, 1, 2, 32))
    bad_eos.config.eos_token_id = 5
    with pytest.raises(ValueError, match=r"text_encoder \(CLIP-L\): config eos_token_id is 5 .* EOS id is 1"):
        TextConditioner((tokenizers.clip, bad_eos), clip_g, t5, **dims)

    short = CLIPTextModelWithProjection(tiny_clip_config(tokenizers.clip_info, 16, 1, 2, 32, max_positions=40))
    short.config.vocab_size = 10
    with pytest.raises(ValueError, match=r"text_encoder \(CLIP-L\): the tokenizer has \d+ tokens .* vocab_size is 10"):
        TextConditioner((tokenizers.clip, short), clip_g, t5, **dims)


def test_load_text_encoders_validates(saved):
    folder, _ = saved[True]
    with pytest.raises(
        ValueError, match=r"text_encoder_2 \(CLIP-G\): projection_dim is 32 .* 48 = 32 \(text_encoder\)"
    ):
        load_text_encoders(folder, joint_attention_dim=JOINT_ATTENTION_DIM, pooled_projection_dim=48)
    with pytest.raises(ValueError, match=r"text_encoder_3 \(T5\): d_model is 32 .* joint_attention_dim 64"):
        load_text_encoders(folder, joint_attention_dim=64, pooled_projection_dim=POOLED_PROJECTION_DIM)


def test_diffusers_reloads_tiny_pipeline(saved):
    from diffusers import StableDiffusion3Pipeline

    folder, pipe = saved[True]
    reloaded = StableDiffusion3Pipeline.from_pretrained(folder)
    for a, b in zip(_reference(pipe, PROMPTS, None, 10), _reference(reloaded, PROMPTS, None, 10)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    no_t5 = StableDiffusion3Pipeline.from_pretrained(saved[False][0], text_encoder_3=None, tokenizer_3=None)
    assert no_t5.text_encoder_3 is None


def test_tiny_components_seeded():
    a = build_tiny_sd3_components(seed=3, variant="sd35")
    b = build_tiny_sd3_components(seed=3, variant="sd35")
    c = build_tiny_sd3_components(seed=4, variant="sd35")
    assert a["transformer"].config.num_layers == 3 and a["transformer"].config.qk_norm == "rms_norm"
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        sa, sb, sc = a[name].state_dict(), b[name].state_dict(), c[name].state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
        assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    wa, wb = a["text_encoder"].state_dict(), a["text_encoder_2"].state_dict()
    assert any(not torch.equal(wa[k], wb[k]) for k in wa)
    assert 2 ** (len(a["vae"].config.block_out_channels) - 1) == 8


def test_word_tokenizer_round_trip(tmp_path):
    words = build_word_tokenizers(VOCABULARY, clip_max_length=12, t5_max_length=10)
    texts = ["A RED circle, at the top left.", "", "zebra riding a horse", "a b c d e f g h i j k l m n o p"]
    for name, tokenizer, length in (("clip", words.clip, 12), ("t5", words.t5, 10)):
        tokenizer.save_pretrained(tmp_path / name)
        loaded = AutoTokenizer.from_pretrained(tmp_path / name, local_files_only=True)
        assert loaded.model_max_length == length
        for kwargs in (dict(padding="max_length", max_length=length, truncation=True), dict(padding="longest")):
            assert loaded(texts, **kwargs).input_ids == tokenizer(texts, **kwargs).input_ids
        assert (loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id) == (
            tokenizer.pad_token_id,
            tokenizer.eos_token_id,
            tokenizer.unk_token_id,
        )

    clip = words.clip(texts, padding="max_length", max_length=12, truncation=True).input_ids
    t5 = words.t5(texts, padding="max_length", max_length=10, truncation=True).input_ids
    assert all(len(row) == 12 and row[0] == 0 and 1 in row for row in clip)
    assert clip[3][-1] == 1, "truncation keeps the EOS"
    assert all(len(row) == 10 and 1 in row for row in t5)
    assert t5[1] == [1] + [0] * 9


def test_word_tokenizer_ids_stable():
    words = build_word_tokenizers(["Red", "circle", "red", ",", "blue"])
    assert words.clip_info.bos_token_id == 0
    assert (words.clip_info.eos_token_id, words.clip_info.pad_token_id, words.clip_info.unk_token_id) == (1, 1, 2)
    assert (words.t5_info.pad_token_id, words.t5_info.eos_token_id, words.t5_info.unk_token_id) == (0, 1, 2)
    assert words.clip_info.vocab_size == words.t5_info.vocab_size == 7
    assert words.clip("Red, blue circle!").input_ids == [0, 3, 5, 6, 4, 2, 1]
    assert words.t5("Red, blue circle!").input_ids == [3, 5, 6, 4, 2, 1]
    assert words.clip.decode([0, 3, 5, 6, 4, 1], skip_special_tokens=True) == "red, blue circle"
    clip_config = tiny_clip_config(words.clip_info, 16, 1, 2, 8)
    assert (clip_config.bos_token_id, clip_config.eos_token_id, clip_config.pad_token_id) == (0, 1, 1)
    assert clip_config.vocab_size == 7 and clip_config.max_position_embeddings == 24
    t5_config = tiny_t5_config(words.t5_info)
    assert (t5_config.pad_token_id, t5_config.eos_token_id, t5_config.decoder_start_token_id) == (0, 1, 0)
    with pytest.raises(ValueError, match="not a single token"):
        build_word_tokenizers(["red circle"])
    with pytest.raises(ValueError, match="not a single token"):
        build_word_tokenizers(["</s>"])
