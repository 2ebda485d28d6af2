"""Loading: diffusers folders, original single-file checkpoints, and every refusal with its message."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from workbench import ModelFormatError, load_pipeline, save_pipeline
from workbench.loading import EMBEDDED_MODEL, split_single_file

PROMPT = "a green triangle above a red square"

_TOP = {
    "pos_embed.proj.": "x_embedder.proj.",
    "time_text_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "time_text_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "time_text_embed.text_embedder.linear_1.": "y_embedder.mlp.0.",
    "time_text_embed.text_embedder.linear_2.": "y_embedder.mlp.2.",
    "context_embedder.": "context_embedder.",
    "proj_out.": "final_layer.linear.",
}
_BLOCK = {
    "attn.to_out.0.": "x_block.attn.proj.",
    "attn.to_add_out.": "context_block.attn.proj.",
    "attn2.to_out.0.": "x_block.attn2.proj.",
    "attn.norm_q.": "x_block.attn.ln_q.",
    "attn.norm_k.": "x_block.attn.ln_k.",
    "attn.norm_added_q.": "context_block.attn.ln_q.",
    "attn.norm_added_k.": "context_block.attn.ln_k.",
    "attn2.norm_q.": "x_block.attn2.ln_q.",
    "attn2.norm_k.": "x_block.attn2.ln_k.",
    "norm1.linear.": "x_block.adaLN_modulation.1.",
    "norm1_context.linear.": "context_block.adaLN_modulation.1.",
    "ff.net.0.proj.": "x_block.mlp.fc1.",
    "ff.net.2.": "x_block.mlp.fc2.",
    "ff_context.net.0.proj.": "context_block.mlp.fc1.",
    "ff_context.net.2.": "context_block.mlp.fc2.",
}
_QKV = {
    ("attn.to_q.", "attn.to_k.", "attn.to_v."): "x_block.attn.qkv.",
    ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."): "context_block.attn.qkv.",
    ("attn2.to_q.", "attn2.to_k.", "attn2.to_v."): "x_block.attn2.qkv.",
}


def _swap(t):
    a, b = t.chunk(2)
    return torch.cat([b, a])


def to_original_transformer(state, depth):
    """Independent inverse of the loader's conversion: diffusers names → original MMDiT names."""
    out = {"pos_embed": state["pos_embed.pos_embed"]}
    for key, value in state.items():
        suffix = key.rsplit(".", 1)[1]
        if key.startswith("norm_out.linear."):
            out[f"final_layer.adaLN_modulation.1.{suffix}"] = _swap(value)
        for new, old in _TOP.items():
            if key.startswith(new):
                out[old + suffix] = value
        if not key.startswith("transformer_blocks."):
            continue
        _, index, rest = key.split(".", 2)
        for new, old in _BLOCK.items():
            if rest.startswith(new):
                last_context = int(index) == depth - 1 and new == "norm1_context.linear."
                out[f"joint_blocks.{index}.{old}{suffix}"] = _swap(value) if last_context else value
        for names, old in _QKV.items():
            if rest.startswith(names[0]):
                parts = [state[f"transformer_blocks.{index}.{n}{suffix}"] for n in names]
                out[f"joint_blocks.{index}.{old}{suffix}"] = torch.cat(parts)
    return out


def to_original_vae(state, levels):
    out = {}
    for key, value in state.items():
        new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        new = new.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        for a, b in (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")):
            if "mid_block.attentions.0." + a in new:
                new = new.replace("mid_block.attentions.0." + a, "mid.attn_1." + b)
                if value.dim() == 2:
                    value = value[:, :, None, None]
        if new.startswith("encoder.down_blocks."):
            _, _, level, kind, rest = new.split(".", 4)
            new = f"encoder.down.{level}." + (f"block.{rest}" if kind == "resnets" else f"downsample.{rest[2:]}")
        if new.startswith("decoder.up_blocks."):
            _, _, level, kind, rest = new.split(".", 4)
            new = f"decoder.up.{levels - 1 - int(level)}." + (
                f"block.{rest}" if kind == "resnets" else f"upsample.{rest[2:]}"
            )
        out[new] = value
    return out


@pytest.fixture(scope="module")
def sd35_folder(tmp_path_factory):
    from tiny_sd3 import save_tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("tiny_sd35")
    save_tiny_sd3_pipeline(folder, seed=1, variant="sd35")
    return folder


def _image(pipe, **kw):
    out = pipe(PROMPT, height=32, width=32, num_inference_steps=3, guidance_scale=3.0, seed=4, max_sequence_length=32)
    return np.asarray(out.images[0], dtype=np.int16)


def test_single_file_checkpoint_converts_and_matches(sd35_folder, tmp_path):
    reference = load_pipeline(sd35_folder)
    depth = reference.transformer.config.num_layers
    levels = len(reference.vae.config.block_out_channels)
    state = {
        f"model.diffusion_model.{k}": v
        for k, v in to_original_transformer(reference.transformer.state_dict(), depth).items()
    }
    state.update({f"first_stage_model.{k}": v for k, v in to_original_vae(reference.vae.state_dict(), levels).items()})
    clip_l = reference.text_encoders.clip_l.state_dict()
    state.update({f"text_encoders.clip_l.transformer.{k}": v.clone() for k, v in clip_l.items()})
    file = tmp_path / "sd35_tiny_incl_clips.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))

    parts = split_single_file(state)
    for key, value in reference.transformer.state_dict().items():
        assert torch.equal(parts["transformer"][key], value), key
    converted = load_pipeline(file, text_encoders_from=sd35_folder)
    assert converted.transformer.config.dual_attention_layers == reference.transformer.config.dual_attention_layers
    assert converted.transformer.config.qk_norm == "rms_norm"
    assert np.abs(_image(converted) - _image(reference)).max() == 0


def test_single_file_without_tokenizers_says_what_is_missing(sd35_folder, tmp_path):
    reference = load_pipeline(sd35_folder)
    depth = reference.transformer.config.num_layers
    state = {
        f"model.diffusion_model.{k}": v
        for k, v in to_original_transformer(reference.transformer.state_dict(), depth).items()
    }
    file = tmp_path / "transformer_only.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    with pytest.raises(ModelFormatError, match="holds no VAE"):
        load_pipeline(file)


def test_unknown_path_lists_what_is_accepted(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist; expected a diffusers folder"):
        load_pipeline(tmp_path / "nope")
    with pytest.raises(ModelFormatError, match="not a model folder"):
        load_pipeline(tmp_path)
    with pytest.raises(ModelFormatError, match="not in the local Hugging Face cache"):
        load_pipeline("someone/not-cached-model")


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "pytorch_model.bin", "disguised.safetensors"])
def test_pickle_checkpoints_are_refused(tmp_path, name):
    file = tmp_path / name
    torch.save({"weight": torch.zeros(2)}, file)
    with pytest.raises(ModelFormatError, match="refusing to load a pickle checkpoint.*python -m workbench convert"):
        load_pipeline(file)


def test_truncated_weights_name_the_file(tiny_sd3_folder, tmp_path):
    folder, _ = tiny_sd3_folder
    copy = tmp_path / "truncated"
    shutil.copytree(folder, copy)
    weights = copy / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match=r"transformer/diffusion_pytorch_model.safetensors: not a readable"):
        load_pipeline(copy)
    (copy / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no diffusion_pytorch_model.safetensors"):
        load_pipeline(copy)


def test_mismatched_text_encoder_names_component_and_sizes(tiny_sd3_folder, tmp_path):
    from tiny_sd3 import make_t5_tokenizer
    from transformers import T5Config, T5EncoderModel

    folder, _ = tiny_sd3_folder
    copy = tmp_path / "mismatch"
    shutil.copytree(folder, copy)
    shutil.rmtree(copy / "text_encoder_3")
    config = json.loads((folder / "text_encoder_3" / "config.json").read_text())
    config = {k: v for k, v in config.items() if k in T5Config().to_dict()}
    config["d_model"] = 24
    T5EncoderModel(T5Config(**config)).save_pretrained(copy / "text_encoder_3")
    make_t5_tokenizer(copy / "tokenizer_3")
    with pytest.raises(ValueError, match=r"text_encoder_3 \(T5\).*24.*32"):
        load_pipeline(copy)


def test_save_pipeline_round_trip(tiny_sd3_folder, tmp_path):
    folder, _ = tiny_sd3_folder
    pipe = load_pipeline(folder)
    saved = save_pipeline(pipe, tmp_path / "copy")
    again = load_pipeline(saved)
    kwargs = dict(height=32, width=32, num_inference_steps=2, seed=1, max_sequence_length=32)
    assert np.array_equal(np.asarray(pipe(PROMPT, **kwargs).images[0]), np.asarray(again(PROMPT, **kwargs).images[0]))
    assert json.loads((saved / "model_index.json").read_text())["workbench"]["num_inference_steps"] >= 1


def test_embedded_model_path_is_in_the_repo():
    assert EMBEDDED_MODEL.parent.name == "models"


def test_repo_id_resolves_from_the_local_hugging_face_cache(tiny_sd3_folder, tmp_path, monkeypatch):
    folder, _ = tiny_sd3_folder
    cache = tmp_path / "hub"
    repo = cache / "models--someone--tiny-sd3"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    pipe = load_pipeline("someone/tiny-sd3")
    assert pipe.name == snapshot.name
    image = pipe(PROMPT, height=32, width=32, num_inference_steps=1, seed=0, max_sequence_length=32).images[0]
    assert image.size == (32, 32)


def test_single_file_conversion_equals_diffusers_converters(sd35_folder):
    """Our original → diffusers renaming (VAE and MMDiT) equals diffusers' own single-file converters on the same
    original-layout tensors, key for key and value for value."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    from workbench.formats.original import convert_original_transformer, convert_original_vae

    reference = load_pipeline(sd35_folder)
    levels = len(reference.vae.config.block_out_channels)
    original_vae = to_original_vae(reference.vae.state_dict(), levels)
    config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    theirs = single_file_utils.convert_ldm_vae_checkpoint(
        {f"first_stage_model.{k}": v for k, v in original_vae.items()}, config
    )
    ours = convert_original_vae(original_vae)
    assert set(ours) == set(theirs) == set(reference.vae.state_dict())
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    original = to_original_transformer(reference.transformer.state_dict(), reference.transformer.config.num_layers)
    theirs = single_file_utils.convert_sd3_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in original.items()}
    )
    ours = convert_original_transformer(original)
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_single_file_loads_every_text_encoder_group(sd35_folder, tmp_path):
    """clip_l, clip_g and t5xxl groups of a single file replace the companion folder's encoder weights, with the
    names diffusers' own single-file converters give them."""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    reference = load_pipeline(sd35_folder)
    depth = reference.transformer.config.num_layers
    state = {
        f"model.diffusion_model.{k}": v
        for k, v in to_original_transformer(reference.transformer.state_dict(), depth).items()
    }
    generator = torch.Generator().manual_seed(0)
    groups = {"clip_l": "clip_l", "clip_g": "clip_g", "t5xxl": "t5"}
    expected = {}
    for group, slot in groups.items():
        encoder = getattr(reference.text_encoders, slot)
        assert encoder is not None, slot
        for key, value in encoder.state_dict().items():
            if key == "encoder.embed_tokens.weight":
                continue  # tied to T5's shared.weight; SD3 files store that one
            changed = value
            if value.is_floating_point():
                changed = value + 0.01 * torch.randn(value.shape, generator=generator)
            state[f"text_encoders.{group}.transformer.{key}"] = changed
            expected[(slot, key)] = changed
    theirs = {
        "clip_l": single_file_utils.convert_ldm_clip_checkpoint(state, "text_encoders.clip_l.transformer."),
        "clip_g": single_file_utils.convert_ldm_clip_checkpoint(state, "text_encoders.clip_g.transformer."),
        "t5": single_file_utils.convert_sd3_t5_checkpoint_to_diffusers(state),
    }
    for (slot, key), value in expected.items():
        assert theirs[slot][key] is value, (slot, key)
    file = tmp_path / "with_text_encoders.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    converted = load_pipeline(file, text_encoders_from=sd35_folder)
    for (slot, key), value in expected.items():
        loaded = getattr(converted.text_encoders, slot).state_dict()[key]
        assert torch.equal(loaded, value.to(loaded.dtype)), (slot, key)


def test_weights_that_do_not_match_the_config_name_what_differs():
    from workbench.formats.files import require_matching_keys

    module = torch.nn.Linear(2, 3)
    require_matching_keys(module, ["weight", "bias"], "x.safetensors", "a linear")
    require_matching_keys(module, ["weight"], "x.safetensors", "a linear", optional={"bias"})
    with pytest.raises(ModelFormatError, match=r"x.safetensors: weights do not match a linear \(missing 1: \['bias'\]"):
        require_matching_keys(module, ["weight", "extra"], "x.safetensors", "a linear")
