"""Reading and writing models: diffusers folders, the original single-file checkpoints, the embedded model.

What the files mean lives in :mod:`workbench.formats` (safetensors and JSON reading, the refusal of pickles, the
original single-file layout); this module builds the models and the :class:`~workbench.pipeline.Pipeline` from them.
Weights are safetensors only; pickle checkpoints (.ckpt/.pt/.pth/.bin) are refused with a message explaining how to
convert them. Missing, truncated and mismatched files raise ValueError naming the file or component.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

from workbench import memory
from workbench.acceleration import accelerate_pipeline, check_switch
from workbench.controlnet import attach_all  # also registers the pipeline extension pipe.controlnets
from workbench.formats.files import (
    PICKLE_SUFFIXES,
    ModelFormatError,
    _pickle_message,
    iter_safetensors,
    read_json,
    read_safetensors,
    require_matching_keys,
)
from workbench.formats.original import (
    infer_transformer_config,
    infer_vae_config,
    split_single_file,
)
from workbench.models.mmdit import MMDiT, MMDiTConfig, PatchEmbed, sincos_2d_table
from workbench.models.moe import MoEFeedForward
from workbench.models.text import DEFAULT_COMPONENTS, SLOTS, TextConditioner
from workbench.models.vae import AutoencoderKL, VAEConfig
from workbench.pipeline import GenerationDefaults, Pipeline
from workbench.presets import GENERATION_DEFAULTS, guess_family
from workbench.shapesworld.layout import attach_caption_layouts

EMBEDDED_MODEL = Path(__file__).resolve().parent.parent / "models" / "shapesworld-moe"
EMBEDDED_CONTROLNET = EMBEDDED_MODEL.with_name("shapesworld-controlnet-canny")
"""The embedded model's ControlNet (Canny edges or outline drawings; also its layout ControlNet)."""
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


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
    require_matching_keys(model, state, source, "the transformer config", optional={"pos_embed.pos_embed"})
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


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A diffusers ``vae/`` folder (ours or diffusers' ``save_pretrained``), strict key matching. Config keys that
    are absent take :class:`VAEConfig`'s (SD3) defaults, except ``use_quant_conv`` / ``use_post_quant_conv``, which
    then follow the presence of those weights."""
    folder = Path(folder)
    raw = read_json(folder / "config.json")
    class_name = raw.get("_class_name", "AutoencoderKL")
    if class_name != "AutoencoderKL":
        raise ModelFormatError(f"{folder / 'config.json'} describes {class_name!r}, not 'AutoencoderKL'")
    state = _component_weights(folder, dtype)
    for key in ("quant_conv", "post_quant_conv"):
        raw.setdefault(f"use_{key}", f"{key}.weight" in state)
    vae = AutoencoderKL(VAEConfig.from_dict(raw))
    try:
        vae.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ModelFormatError(f"{folder}: weights do not match the VAE config: {err}") from err
    return vae.to(dtype).eval().requires_grad_(False)


def save_vae(vae: AutoencoderKL, folder: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write a VAE as a diffusers ``vae/`` folder (``config.json`` with ``"_class_name": "AutoencoderKL"``)."""
    save_component(vae, {"_class_name": "AutoencoderKL", **vae.config.to_dict()}, Path(folder), dtype)


def load_text_encoders(
    path: str | Path,
    joint_attention_dim: int,
    pooled_projection_dim: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    components: Sequence[str] = DEFAULT_COMPONENTS,
    **kwargs: Any,
) -> TextConditioner:
    """Load text_encoder/ + tokenizer/ (CLIP-L), text_encoder_2/ + tokenizer_2/ (CLIP-G) and text_encoder_3/ +
    tokenizer_3/ (T5) of a diffusers-layout folder, offline and from safetensors only.

    A component not listed in ``components``, or whose encoder subfolder is missing, is None. ``kwargs`` go to
    :class:`TextConditioner` (clip_l_hidden_size, clip_g_hidden_size, clip_sequence_length). Raises ValueError when
    the sizes do not fit the transformer's (see ``TextConditioner.validate``).
    """
    root = Path(path)
    unknown = sorted(set(components) - set(DEFAULT_COMPONENTS))
    if unknown:
        raise ValueError(f"unknown text components {unknown}; choose among {list(DEFAULT_COMPONENTS)}")
    pairs: dict[str, tuple | None] = {}
    for name, slot in SLOTS.items():
        encoder_dir = root / slot.encoder_folder
        if slot.encoder_folder not in components or not (encoder_dir / "config.json").is_file():
            pairs[name] = None
            continue
        tokenizer_dir = root / slot.tokenizer_folder
        if not tokenizer_dir.is_dir():
            raise ValueError(f"{slot.title}: {encoder_dir} exists but its tokenizer folder {tokenizer_dir} does not")
        _check_text_architecture(name, slot.title, encoder_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        model_class = T5EncoderModel if name == "t5" else CLIPTextModelWithProjection
        encoder = model_class.from_pretrained(
            str(encoder_dir), local_files_only=True, use_safetensors=True, dtype=dtype
        )
        pairs[name] = (tokenizer, encoder)
    conditioner = TextConditioner(
        **pairs, joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim, **kwargs
    )
    conditioner.to(device)
    conditioner._dtype = dtype
    return conditioner


def _check_text_architecture(name: str, title: str, encoder_dir: Path) -> None:
    architectures = read_json(encoder_dir / "config.json").get("architectures") or []
    expected = "T5EncoderModel" if name == "t5" else "CLIPTextModelWithProjection"
    allowed = {expected, "T5ForConditionalGeneration"} if name == "t5" else {expected}
    if architectures and not set(architectures) & allowed:
        raise ValueError(f"{title}: {encoder_dir} holds {architectures[0]} but SD3 needs {expected}")


def save_text_encoders(text: TextConditioner, folder: str | Path) -> None:
    """Write the present encoders (safetensors + config.json) and tokenizers in diffusers' folder layout."""
    root = Path(folder)
    for name in text.present:
        slot = SLOTS[name]
        getattr(text, name).save_pretrained(str(root / slot.encoder_folder))
        getattr(text, f"{name}_tokenizer").save_pretrained(str(root / slot.tokenizer_folder))


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
    save_vae(pipe.vae, folder / "vae", weight_dtype)
    save_text_encoders(pipe.text_encoders, folder)
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
    text = load_text_encoders(
        folder, config.joint_attention_dim, config.pooled_projection_dim, device="cpu", dtype=torch.float32
    )
    name = index.get("workbench", {}).get("name") or folder.name
    return Pipeline(transformer, vae, text, name, _defaults_for(folder, index, transformer), "cpu", dtype)


# ------------------------------------------------------------------------------------------- original single file


def load_single_file(
    file: Path, device: str | torch.device, dtype: torch.dtype, text_encoders_from: str | Path | None = None
) -> Pipeline:
    """Load ``sd3_medium.safetensors``-style checkpoints. Text encoders and tokenizers come from
    ``text_encoders_from`` (a diffusers folder of the same family); weights stored in the file replace theirs."""
    if file.suffix.lower() == ".gguf":  # a quantized transformer alone: workbench.formats.gguf
        from workbench.formats.gguf import load_gguf_transformer

        parts, transformer = {}, load_gguf_transformer(file, dtype)
        config = transformer.config
    else:
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
    text = load_text_encoders(
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
    controlnet: str | Path | Sequence[str | Path] | None = None,
    compile: bool | str = "auto",
    fp8: bool | str = False,
) -> Pipeline:
    """Load a model: ``None`` (the embedded ShapesWorld model), a diffusers folder, a Hugging Face repo id in the
    local cache, a single ``.safetensors`` checkpoint, or a ``.gguf`` transformer (ComfyUI-GGUF or
    stable-diffusion.cpp, kept quantized; VAE and text encoders from ``text_encoders_from``). ``quantization`` ∈
    {None, "int8", "nf4", "fp4"} (a diffusers folder's transformer is quantized while it is read); ``offload`` ∈
    {None, "model", "sequential"}; the keyword options are those of :func:`workbench.memory.prepare`.
    ``controlnet``: one or several ControlNet folders or files (``PATH:SCALE`` allowed) attached to
    ``pipe.controlnets`` (:mod:`workbench.controlnet`). ``compile`` / ``fp8`` (True, False or "auto"): the speed
    switch of :func:`workbench.acceleration.accelerate_pipeline` (what it did: ``pipe.acceleration``); "auto"
    compiles on CUDA and not on the CPU; fp8 is off unless asked, since it changes the numbers."""

    memory.check_options(quantization, offload, attention_chunk_size, int8_backend, vae_tile_threshold)
    compile, fp8 = check_switch(compile, "compile"), check_switch(fp8, "fp8")
    folder = resolve_model_path(path, download=download)
    if folder.is_file():
        if folder.suffix.lower() not in (".safetensors", ".gguf"):
            if folder.suffix.lower() in PICKLE_SUFFIXES:
                raise ModelFormatError(_pickle_message(folder))
            raise ModelFormatError(f"{folder}: unsupported file type; expected a .safetensors or .gguf checkpoint")
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
    pipe = memory.prepare(
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
    if controlnet is not None:
        attach_all(pipe, controlnet)
    attach_caption_layouts(pipe, _layout_controlnet(pipe, folder))
    accelerate_pipeline(pipe, compile=compile, fp8=fp8)
    return pipe


def _layout_controlnet(pipe: Pipeline, folder: Path) -> Path | None:
    """The layout ControlNet the model folder names (``layout_controlnet`` in its defaults, relative to it); when
    it is missing, a warning and the model's ``layout_control`` default becomes 0."""
    name = pipe.defaults.layout_controlnet
    if name is None or not folder.is_dir():
        return None
    path = (folder / name).resolve()
    if not (path / "config.json").is_file():
        warnings.warn(f"{folder.name}: its layout ControlNet {name!r} is missing; layout control is off", stacklevel=3)
        pipe.defaults = replace(pipe.defaults, layout_control=0.0)
        return None
    return path
