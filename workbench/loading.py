"""Reading and writing models: diffusers folders, the original single-file checkpoints, the embedded model.

This is the only module that knows checkpoint formats. Weights are safetensors only; pickle checkpoints
(.ckpt/.pt/.pth/.bin) are refused with a message explaining how to convert them. Missing, truncated and
mismatched files raise ValueError naming the file or component.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from workbench.models.mmdit import MMDiT, MMDiTConfig, PatchEmbed, sincos_2d_table
from workbench.models.moe import MoEFeedForward
from workbench.models.text import TextConditioner
from workbench.models.vae import AutoencoderKL, VAEConfig
from workbench.pipeline import GenerationDefaults, Pipeline
from workbench.presets import GENERATION_DEFAULTS, SD3_VAE, guess_family

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shapesworld-moe"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


class ModelFormatError(ValueError):
    """A model path or file that cannot be loaded; the message names the file and what is allowed."""


# ----------------------------------------------------------------------------------------------- files and paths


def _pickle_message(path: Path) -> str:
    return (
        f"{path}: refusing to load a pickle checkpoint (pickles can run arbitrary code). Only .safetensors weights "
        f"are accepted. Convert it once, if you trust its source, with: python -m workbench convert {path}"
    )


def _check_safetensors_path(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelFormatError(_pickle_message(path))
    if not path.is_file():
        raise ModelFormatError(f"{path}: file not found")
    with open(path, "rb") as handle:
        head = handle.read(9)
    looks_safetensors = head[8:9] == b"{"
    if not looks_safetensors and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        raise ModelFormatError(_pickle_message(path))


def read_safetensors(path: str | Path, prefix: str = "", dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file (only keys starting with ``prefix``, prefix kept), optionally cast."""
    path = Path(path)
    _check_safetensors_path(path)
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    tensor = f.get_tensor(key)
                    tensors[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        return tensors
    except (SafetensorError, OSError, RuntimeError) as err:
        size = path.stat().st_size
        raise ModelFormatError(
            f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt download?): {err}"
        ) from err


def iter_safetensors(path: str | Path, reopen_bytes: int = 64 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of one safetensors file, one at a time, in file order. The file is memory-mapped; it is reopened
    after every ``reopen_bytes`` read so that the pages already read leave the process's resident memory."""
    path = Path(path)
    _check_safetensors_path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        start = 0
        while start < len(keys):
            read = 0
            with safe_open(str(path), framework="pt") as f:
                while start < len(keys) and read < reopen_bytes:
                    tensor = f.get_tensor(keys[start])
                    read += tensor.numel() * tensor.element_size()
                    yield keys[start], tensor
                    start += 1
    except (SafetensorError, OSError) as err:
        size = path.stat().st_size
        raise ModelFormatError(
            f"{path}: not a readable safetensors file ({size} bytes; truncated or corrupt download?): {err}"
        ) from err


def iter_component_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of a diffusers component folder one at a time (single file or sharded)."""
    single = folder / WEIGHTS_NAME
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if single.is_file():
        yield from iter_safetensors(single)
    elif index.is_file():
        for shard in sorted(set(read_json(index)["weight_map"].values())):
            yield from iter_safetensors(folder / shard)
    else:
        _component_weights(folder, None)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFormatError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ModelFormatError(f"{path}: invalid JSON ({err})") from err


def _component_weights(folder: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Weights of a diffusers component folder: single file or sharded (``*.safetensors.index.json``)."""
    single = folder / WEIGHTS_NAME
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if single.is_file():
        return read_safetensors(single, dtype=dtype)
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(read_safetensors(folder / shard, dtype=dtype))
        return state
    pickles = [p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelFormatError(_pickle_message(folder / pickles[0]))
    raise ModelFormatError(f"{folder}: no {WEIGHTS_NAME} (or sharded index) found")


def resolve_model_path(path: str | Path | None, download: bool = False) -> Path:
    """A local folder or file for ``path``: None → the embedded model; a Hugging Face repo id → its local cache
    snapshot (downloaded only when ``download=True``)."""
    if path is None or str(path) in ("", "embedded", "shapesworld-moe"):
        if not (EMBEDDED_MODEL / "model_index.json").is_file():
            raise ModelFormatError(
                f"the embedded model is missing at {EMBEDDED_MODEL}; train it with "
                "`python -m workbench.shapesworld train` or pass a model path"
            )
        return EMBEDDED_MODEL
    local = Path(os.path.expanduser(str(path)))
    if local.exists():
        return local
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(str(path), local_files_only=not download))
        except LocalEntryNotFoundError as err:
            raise ModelFormatError(
                f"model {path!r} is not in the local Hugging Face cache; download it with "
                f"`huggingface-cli download {path}` or load_pipeline({str(path)!r}, download=True)"
            ) from err
    raise ModelFormatError(
        f"model path {str(path)!r} does not exist; expected a diffusers folder (with model_index.json), "
        "a .safetensors checkpoint, a Hugging Face repo id in the local cache, or None for the embedded model"
    )


# ---------------------------------------------------------------------------------------------------- components


def _materialize(model: torch.nn.Module) -> None:
    """Fill buffers left on the meta device after ``load_state_dict(assign=True)``."""
    for module in model.modules():
        if isinstance(module, PatchEmbed) and module.pos_embed.is_meta:
            config = model.config
            table = sincos_2d_table(
                config.inner_dim, config.pos_embed_max_size, config.sample_size // config.patch_size
            )
            module.pos_embed = table.unsqueeze(0)
        if isinstance(module, MoEFeedForward) and module.expert_weights.is_meta:
            module.expert_weights = torch.ones(module.num_experts)


def build_transformer(config: MMDiTConfig, state: dict[str, torch.Tensor], dtype: torch.dtype, source: str) -> MMDiT:
    """An :class:`MMDiT` holding ``state`` (no random init, no second copy of the weights)."""
    with torch.device("meta"):
        model = MMDiT(config)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state) - {"pos_embed.pos_embed"})
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelFormatError(
            f"{source}: weights do not match the transformer config "
            f"(missing {len(missing)}: {missing[:5]}, unexpected {len(unexpected)}: {unexpected[:5]})"
        )
    state = {k: v.to(dtype) if v.is_floating_point() and k != "pos_embed.pos_embed" else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    _materialize(model)
    return model.eval().requires_grad_(False)


def load_transformer(
    folder: Path,
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    device: str | torch.device = "cpu",
    **quantize_options,
) -> MMDiT:
    """The transformer of a diffusers folder, built tensor by tensor from the file
    (:func:`workbench.memory.stream_transformer`; options ``quantize_modulation`` and ``int8_backend``): the weights
    as stored are never all in memory, only the result in ``dtype`` (quantized with ``quantization``). ``device`` is
    where quantized layers are placed."""
    config = MMDiTConfig.from_dict(read_json(folder / "config.json"))
    from workbench import memory

    try:
        model = memory.stream_transformer(
            config, iter_component_tensors(folder), dtype, quantization, device, source=str(folder), **quantize_options
        )
    except ModelFormatError:
        raise
    except ValueError as err:
        raise ModelFormatError(f"weights do not match the transformer config: {err}") from err
    _materialize(model)
    return model


def load_vae(folder: Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    config = VAEConfig.from_dict(read_json(folder / "config.json"))
    vae = AutoencoderKL(config)
    state = _component_weights(folder, dtype)
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFormatError(f"{folder}: weights do not match the VAE config: {err}") from err
    return vae.to(dtype).eval().requires_grad_(False)


def save_component(module: torch.nn.Module, config: dict, folder: Path, dtype: torch.dtype | None = None) -> None:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors`` (diffusers layout); floating-point
    weights are stored in ``dtype`` when given (e.g. float16 to halve the download)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
        for k, v in module.state_dict().items()
    }
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})


def save_pipeline(
    pipe: Pipeline, folder: str | Path, extra: dict | None = None, weight_dtype: torch.dtype | None = None
) -> Path:
    """Save a pipeline in the diffusers folder layout, with the generation defaults under ``workbench``;
    transformer and VAE weights in ``weight_dtype`` when given."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_component(pipe.transformer, pipe.transformer.config.to_dict(), folder / "transformer", weight_dtype)
    vae_config = {"_class_name": "AutoencoderKL", **pipe.vae.config.to_dict()}
    save_component(pipe.vae, vae_config, folder / "vae", weight_dtype)
    pipe.text_encoders.save_pretrained(folder)
    scheduler = {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": pipe.defaults.shift,
    }
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "transformer": ["workbench", type(pipe.transformer).__name__],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        **pipe.text_encoders.model_index_entries(),
        "workbench": {**vars(pipe.defaults), **(extra or {})},
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


# ------------------------------------------------------------------------------------------------- diffusers folder


def _defaults_for(folder: Path, index: dict, transformer: MMDiT) -> GenerationDefaults:
    data = dict(GENERATION_DEFAULTS.get(guess_family(transformer.config.to_dict()) or "", {}))
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    if scheduler_file.is_file():
        data["shift"] = float(read_json(scheduler_file).get("shift", 3.0))
    data.update(index.get("workbench", {}))
    return GenerationDefaults.from_dict(data)


def load_diffusers_folder(
    folder: Path,
    device: str | torch.device,
    dtype: torch.dtype,
    quantization: str | None = None,
    quantize_options: dict | None = None,
) -> Pipeline:
    index = read_json(folder / "model_index.json")
    for component in ("transformer", "vae"):
        if not (folder / component).is_dir():
            raise ModelFormatError(f"{folder}: the model folder has no {component}/ subfolder")
    transformer = load_transformer(folder / "transformer", dtype, quantization, device, **(quantize_options or {}))
    vae = load_vae(folder / "vae", torch.float32 if dtype == torch.float16 and str(device) == "cpu" else dtype)
    config = transformer.config
    text = TextConditioner.from_folder(
        folder, config.joint_attention_dim, config.pooled_projection_dim, device="cpu", dtype=torch.float32
    )
    name = index.get("workbench", {}).get("name") or folder.name
    return Pipeline(transformer, vae, text, name, _defaults_for(folder, index, transformer), "cpu", dtype)


# ------------------------------------------------------------------------------------------- original single file

_BLOCK_RULES = [
    (r"x_block\.attn\.proj\.", "attn.to_out.0."),
    (r"x_block\.attn\.ln_q\.", "attn.norm_q."),
    (r"x_block\.attn\.ln_k\.", "attn.norm_k."),
    (r"x_block\.attn2\.proj\.", "attn2.to_out.0."),
    (r"x_block\.attn2\.ln_q\.", "attn2.norm_q."),
    (r"x_block\.attn2\.ln_k\.", "attn2.norm_k."),
    (r"context_block\.attn\.proj\.", "attn.to_add_out."),
    (r"context_block\.attn\.ln_q\.", "attn.norm_added_q."),
    (r"context_block\.attn\.ln_k\.", "attn.norm_added_k."),
    (r"x_block\.adaLN_modulation\.1\.", "norm1.linear."),
    (r"context_block\.adaLN_modulation\.1\.", "norm1_context.linear."),
    (r"x_block\.mlp\.fc1\.", "ff.net.0.proj."),
    (r"x_block\.mlp\.fc2\.", "ff.net.2."),
    (r"context_block\.mlp\.fc1\.", "ff_context.net.0.proj."),
    (r"context_block\.mlp\.fc2\.", "ff_context.net.2."),
]
_TOP_RULES = {
    "x_embedder.proj.": "pos_embed.proj.",
    "t_embedder.mlp.0.": "time_text_embed.timestep_embedder.linear_1.",
    "t_embedder.mlp.2.": "time_text_embed.timestep_embedder.linear_2.",
    "y_embedder.mlp.0.": "time_text_embed.text_embedder.linear_1.",
    "y_embedder.mlp.2.": "time_text_embed.text_embedder.linear_2.",
    "context_embedder.": "context_embedder.",
    "final_layer.linear.": "proj_out.",
    "final_layer.adaLN_modulation.1.": "norm_out.linear.",
}
_QKV = {
    "x_block.attn.qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
    "x_block.attn2.qkv.": ("attn2.to_q.", "attn2.to_k.", "attn2.to_v."),
    "context_block.attn.qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."),
}


def original_module_map(depth: int) -> dict[str, tuple[tuple[str, ...], bool]]:
    """Original MMDiT module names (``joint_blocks.3.x_block.attn.qkv``) → the diffusers modules that hold their
    output rows, in order (three for a fused q/k/v), and whether the two row halves swap (the adaLN modulation of
    the final layer and of the last block's context stream: the original is (shift, scale), diffusers (scale,
    shift)). Used to read LoRAs written against the original layout."""
    names: dict[str, tuple[tuple[str, ...], bool]] = {}
    for old, new in _TOP_RULES.items():
        names[old.rstrip(".")] = ((new.rstrip("."),), old.startswith("final_layer.adaLN"))
    for i in range(depth):
        for pattern, new in _BLOCK_RULES:
            old = pattern.replace("\\.", ".").rstrip(".")
            swap = i == depth - 1 and old.startswith("context_block.adaLN_modulation")
            names[f"joint_blocks.{i}.{old}"] = ((f"transformer_blocks.{i}.{new.rstrip('.')}",), swap)
        for old, split in _QKV.items():
            targets = tuple(f"transformer_blocks.{i}.{name.rstrip('.')}" for name in split)
            names[f"joint_blocks.{i}.{old.rstrip('.')}"] = (targets, False)
    return names


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(shift, scale) → (scale, shift) along the output axis; the original and diffusers orders differ."""
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def convert_original_transformer(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original MMDiT keys (``joint_blocks.*``, ``x_embedder.*``, …, prefix already stripped) → diffusers keys."""
    out: dict[str, torch.Tensor] = {}
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"joint_blocks\.(\d+)\.", k)))
    for key, value in state.items():
        if key == "pos_embed":
            out["pos_embed.pos_embed"] = value
            continue
        if key.startswith("final_layer.adaLN_modulation.1."):
            out[_TOP_RULES["final_layer.adaLN_modulation.1."] + key.rsplit(".", 1)[1]] = _swap_halves(value)
            continue
        top = next((new for old, new in _TOP_RULES.items() if key.startswith(old)), None)
        if top is not None:
            out[top + key.split(".")[-1]] = value
            continue
        match = re.match(r"joint_blocks\.(\d+)\.(.*)$", key)
        if match is None:
            raise ModelFormatError(f"unknown key in the original MMDiT layout: {key}")
        index, rest = int(match.group(1)), match.group(2)
        prefix = f"transformer_blocks.{index}."
        qkv = next((names for old, names in _QKV.items() if rest.startswith(old)), None)
        if qkv is not None:
            for name, chunk in zip(qkv, value.chunk(3, dim=0)):
                out[prefix + name + rest.rsplit(".", 1)[1]] = chunk.contiguous()
            continue
        for pattern, new in _BLOCK_RULES:
            if re.match(pattern, rest):
                converted = re.sub(pattern, new, rest, count=1)
                last_context = index == depth - 1 and rest.startswith("context_block.adaLN_modulation")
                out[prefix + converted] = _swap_halves(value) if last_context else value
                break
        else:
            raise ModelFormatError(f"unknown key in the original MMDiT layout: {key}")
    return out


def infer_transformer_config(state: dict[str, torch.Tensor]) -> MMDiTConfig:
    """Transformer config from diffusers-named tensor shapes. The head size is read from the qk-norm weights when
    present, else 64 (every SD3-family model)."""
    proj = state["pos_embed.proj.weight"]
    inner, patch = proj.shape[0], proj.shape[-1]
    norm_q = state.get("transformer_blocks.0.attn.norm_q.weight")
    head_dim = int(norm_q.shape[0]) if norm_q is not None else 64
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    dual = tuple(i for i in range(depth) if f"transformer_blocks.{i}.attn2.to_q.weight" in state)
    pos = state.get("pos_embed.pos_embed")
    return MMDiTConfig(
        sample_size=128,
        patch_size=patch,
        in_channels=proj.shape[1],
        num_layers=depth,
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=state["context_embedder.weight"].shape[1],
        caption_projection_dim=state["context_embedder.weight"].shape[0],
        pooled_projection_dim=state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
        out_channels=state["proj_out.weight"].shape[0] // patch**2,
        pos_embed_max_size=int(round(pos.shape[1] ** 0.5)) if pos is not None else 96,
        dual_attention_layers=dual,
        qk_norm="rms_norm" if "transformer_blocks.0.attn.norm_q.weight" in state else None,
    )


_VAE_RULES = [
    (r"^(encoder|decoder)\.mid\.block_(\d)\.", lambda m: f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}."),
    (r"^(encoder|decoder)\.mid\.attn_1\.norm\.", lambda m: f"{m[1]}.mid_block.attentions.0.group_norm."),
    (r"^(encoder|decoder)\.mid\.attn_1\.q\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_q."),
    (r"^(encoder|decoder)\.mid\.attn_1\.k\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_k."),
    (r"^(encoder|decoder)\.mid\.attn_1\.v\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_v."),
    (r"^(encoder|decoder)\.mid\.attn_1\.proj_out\.", lambda m: f"{m[1]}.mid_block.attentions.0.to_out.0."),
    (r"^encoder\.down\.(\d+)\.block\.(\d+)\.", lambda m: f"encoder.down_blocks.{m[1]}.resnets.{m[2]}."),
    (r"^encoder\.down\.(\d+)\.downsample\.", lambda m: f"encoder.down_blocks.{m[1]}.downsamplers.0."),
    (r"^(encoder|decoder)\.norm_out\.", lambda m: f"{m[1]}.conv_norm_out."),
]


def convert_original_vae(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM autoencoder keys (``first_stage_model.`` stripped) → diffusers AutoencoderKL keys."""
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"decoder\.up\.(\d+)\.", k)))
    out = {}
    for key, value in state.items():
        new = key.replace("nin_shortcut", "conv_shortcut")
        up = re.match(r"^decoder\.up\.(\d+)\.(block|upsample)\.(.*)$", new)
        if up:
            level = levels - 1 - int(up[1])
            rest = f"resnets.{up[3]}" if up[2] == "block" else f"upsamplers.0.{up[3]}"
            new = f"decoder.up_blocks.{level}.{rest}"
        for pattern, repl in _VAE_RULES:
            new = re.sub(pattern, repl, new)
        if ".attentions.0.to_" in new or ".attentions.0.to_out" in new:
            value = value.reshape(value.shape[0], -1) if value.dim() == 4 else value
        out[new] = value
    return out


def infer_vae_config(state: dict[str, torch.Tensor]) -> VAEConfig:
    """VAE config from tensor shapes; GroupNorm's group count is not stored, so it is min(32, narrowest level)
    (32 for every SD3-family VAE)."""
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.", k)))
    channels = [state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in range(levels)]
    per_block = 1 + max(
        int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.0\.resnets\.(\d+)", k))
    )
    data = {
        **SD3_VAE,
        "block_out_channels": channels,
        "layers_per_block": per_block,
        "latent_channels": state["encoder.conv_out.weight"].shape[0] // 2,
        "use_quant_conv": "quant_conv.weight" in state,
        "use_post_quant_conv": "post_quant_conv.weight" in state,
        "mid_block_add_attention": "encoder.mid_block.attentions.0.to_q.weight" in state,
        "norm_num_groups": min(32, min(channels)),
    }
    return VAEConfig.from_dict(data)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def split_single_file(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Split a single-file checkpoint into diffusers-named ``transformer`` and ``vae`` state dicts and the raw
    ``text_encoders.*`` groups (``clip_l``, ``clip_g``, ``t5xxl``) in transformers' own names."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    mmdit = _strip(state, "model.diffusion_model.")
    if not mmdit and any(k.startswith("joint_blocks.") for k in state):
        mmdit = {k: v for k, v in state.items() if not k.startswith(("first_stage_model.", "text_encoders."))}
    if mmdit:
        parts["transformer"] = convert_original_transformer(mmdit)
    elif any(k.startswith("transformer_blocks.") for k in state):
        parts["transformer"] = dict(state)
    vae = _strip(state, "first_stage_model.")
    if vae:
        parts["vae"] = convert_original_vae(vae)
    for name in ("clip_l", "clip_g", "t5xxl"):
        group = _strip(state, f"text_encoders.{name}.transformer.")
        if group:
            parts[name] = group
    return parts


def load_single_file(
    file: Path, device: str | torch.device, dtype: torch.dtype, text_encoders_from: str | Path | None = None
) -> Pipeline:
    """Load ``sd3_medium.safetensors``-style checkpoints. Text encoders and tokenizers come from
    ``text_encoders_from`` (a diffusers folder of the same family); weights stored in the file replace theirs."""
    parts = split_single_file(read_safetensors(file))
    if "transformer" not in parts:
        raise ModelFormatError(f"{file}: no MMDiT weights found (expected keys model.diffusion_model.*)")
    transformer_state = parts["transformer"]
    config = infer_transformer_config(transformer_state)
    transformer = build_transformer(config, transformer_state, dtype, str(file))
    vae_state = parts.get("vae")
    companion = Path(text_encoders_from) if text_encoders_from else None
    if vae_state is None:
        if companion is None:
            raise ModelFormatError(f"{file}: holds no VAE (first_stage_model.*); pass text_encoders_from=FOLDER")
        vae = load_vae(companion / "vae", dtype)
    else:
        vae = AutoencoderKL(infer_vae_config(vae_state))
        vae.load_state_dict(vae_state, strict=True)
        vae = vae.to(dtype).eval().requires_grad_(False)
    if companion is None:
        raise ModelFormatError(
            f"{file}: a single-file checkpoint carries no tokenizers; pass text_encoders_from= a diffusers folder "
            "of the same family (e.g. a local snapshot of stabilityai/stable-diffusion-3-medium-diffusers)"
        )
    text = TextConditioner.from_folder(
        companion, config.joint_attention_dim, config.pooled_projection_dim, device="cpu", dtype=torch.float32
    )
    text.load_weights({k: v for k, v in parts.items() if k in ("clip_l", "clip_g", "t5xxl")})
    defaults = GenerationDefaults.from_dict(GENERATION_DEFAULTS.get(guess_family(config.to_dict()) or "", {}))
    return Pipeline(transformer, vae, text, file.stem, defaults, "cpu", dtype)


# ---------------------------------------------------------------------------------------------------------- entry


def load_pipeline(
    path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    offload: str | None = None,
    text_encoders_from: str | Path | None = None,
    download: bool = False,
    *,
    attention_chunk_size: int | None = None,
    quantize_text_encoders: bool = False,
    quantize_modulation: bool = True,
    int8_backend: str = "auto",
    cpu_kernels: bool | None = None,
    vae_tile_threshold: int | None = None,
) -> Pipeline:
    """Load a model: ``None`` (the embedded ShapesWorld model), a diffusers folder, a Hugging Face repo id in the
    local cache, or a single ``.safetensors`` checkpoint. ``quantization`` ∈ {None, "int8", "nf4", "fp4"} (a
    diffusers folder's transformer is quantized while it is read); ``offload`` ∈ {None, "model", "sequential"};
    the keyword options are those of :func:`workbench.memory.prepare`."""
    from workbench import memory

    memory.check_options(quantization, offload, attention_chunk_size, int8_backend, vae_tile_threshold)
    folder = resolve_model_path(path, download=download)
    if folder.is_file():
        if folder.suffix.lower() != ".safetensors":
            if folder.suffix.lower() in PICKLE_SUFFIXES:
                raise ModelFormatError(_pickle_message(folder))
            raise ModelFormatError(f"{folder}: unsupported file type; expected a .safetensors checkpoint")
        pipe = load_single_file(folder, device, dtype, text_encoders_from)
    elif (folder / "model_index.json").is_file():
        stream_device = "cpu" if offload is not None else device
        backend = memory.resolve_int8_backend(int8_backend, device, dtype) if quantization == "int8" else int8_backend
        options = {"quantize_modulation": quantize_modulation, "int8_backend": backend}
        pipe = load_diffusers_folder(folder, stream_device, dtype, quantization, options)
    else:
        raise ModelFormatError(
            f"{folder}: not a model folder (no model_index.json); expected a diffusers-layout folder with "
            "model_index.json, transformer/, vae/, text_encoder*/ and tokenizer*/"
        )
    return memory.prepare(
        pipe,
        device=device,
        quantization=quantization,
        offload=offload,
        attention_chunk_size=attention_chunk_size,
        quantize_text_encoders=quantize_text_encoders,
        quantize_modulation=quantize_modulation,
        int8_backend=int8_backend,
        cpu_kernels=cpu_kernels,
        vae_tile_threshold=vae_tile_threshold,
    )
