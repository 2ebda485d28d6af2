"""Training a LoRA for a loaded pipeline: a folder of captioned images → a diffusers-format LoRA file.

Data: images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``) with one caption each in ``<stem>.txt`` beside them (the
kohya / diffusers DreamBooth convention), or one ``caption`` for all. Each image is resized (shorter side) and
centre-cropped to ``resolution`` px, encoded once by the VAE (the posterior mean); captions are encoded once by the
frozen text encoders.

Objective: SD3's rectified flow, ``x_t = (1 − t) x0 + t ε`` with target ``ε − x0``, t logit-normal(0, 1) pushed
by the model's default ``shift`` (the schedule it samples with); a ``caption_dropout`` share of the batch sees the
empty prompt, so classifier-free guidance keeps working.

Trainable: the down / up matrices of LoRA layers on the transformer modules whose names end with one of
``targets`` (default: the attention projections of both streams, as diffusers' SD3 DreamBooth LoRA script); up
starts at zero, so step 0 is the base model, down Kaiming-uniform (PEFT's initialisation). The layers are attached
through ``pipe.loras`` like any loaded LoRA, so ``pipe(...)`` during or after training shows their effect.

Output: ``transformer.<module>.lora_A.weight`` / ``lora_B.weight`` plus ``lora_adapter_metadata`` (rank, alpha,
target modules), read by ``pipe.loras.load`` and by diffusers' ``load_lora_weights``.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import save_file
from tqdm import tqdm

from workbench.lora import LoRA, LoRALayer, read_lora_file
from workbench.pipeline import Pipeline, image_to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
DEFAULT_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
TRAINING_NAME = "training"


@dataclass
class LoRATrainConfig:
    """Settings of :func:`train_lora`. ``alpha`` None means alpha = rank (scale 1); ``resolution`` None means the
    model's default height."""

    rank: int = 8
    alpha: float | None = None
    targets: tuple[str, ...] = DEFAULT_TARGETS
    steps: int = 300
    batch_size: int = 4
    lr: float = 1e-3
    resolution: int | None = None
    caption_dropout: float = 0.1
    seed: int = 0
    save_every: int = 100

    def validate(self) -> None:
        checks = [
            ("rank", self.rank, isinstance(self.rank, int) and 1 <= self.rank <= 1024, "an integer in [1, 1024]"),
            ("steps", self.steps, isinstance(self.steps, int) and self.steps >= 1, "an integer ≥ 1"),
            ("batch_size", self.batch_size, isinstance(self.batch_size, int) and self.batch_size >= 1, "≥ 1"),
            ("lr", self.lr, 0 < self.lr <= 1, "in (0, 1]"),
            ("caption_dropout", self.caption_dropout, 0 <= self.caption_dropout < 1, "in [0, 1)"),
            ("alpha", self.alpha, self.alpha is None or self.alpha > 0, "positive (or None: the rank)"),
            ("save_every", self.save_every, self.save_every >= 0, "≥ 0 (0: only at the end)"),
        ]
        for name, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {value!r}")
        if not self.targets:
            raise ValueError("targets must name at least one module suffix, e.g. attn.to_q")


def read_image_folder(folder: str | Path, caption: str | None = None) -> tuple[list[Image.Image], list[str]]:
    """Images of ``folder`` (sorted by name) and their captions (``<stem>.txt``, else ``caption``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"data folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"data folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    images, captions = [], []
    for file in files:
        text_file = file.with_suffix(".txt")
        if text_file.is_file():
            captions.append(text_file.read_text().strip())
        elif caption is not None:
            captions.append(caption)
        else:
            raise ValueError(f"{file.name} has no caption: write {text_file.name} beside it or pass a caption")
        images.append(Image.open(file).convert("RGB"))
    return images, captions


def _centre_crop(image: Image.Image, size: int) -> Image.Image:
    scale = size / min(image.size)
    resized = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))))
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def attach_trainable_lora(pipe: Pipeline, config: LoRATrainConfig) -> LoRA:
    """New LoRA layers (up = 0) on the transformer modules matching ``config.targets``, attached to ``pipe.loras``
    under :data:`TRAINING_NAME`; their tensors require grad."""
    generator = torch.Generator().manual_seed(config.seed)
    alpha = float(config.alpha if config.alpha is not None else config.rank)
    layers = {}
    for name, module in pipe.transformer.named_modules():
        if not any(name == t or name.endswith("." + t) for t in config.targets):
            continue
        if type(module) is not torch.nn.Linear:  # exact type: bitsandbytes' int8 / 4-bit subclasses are not trained
            raise ValueError(f"targets: {name} is a {type(module).__name__}, not a float nn.Linear a LoRA can train")
        bound = 1 / math.sqrt(module.in_features)  # kaiming_uniform(a=√5), as nn.Linear and PEFT initialise
        down = (torch.rand(config.rank, module.in_features, generator=generator) * 2 - 1) * bound
        up = torch.zeros(module.out_features, config.rank)
        layers[("transformer", name)] = LoRALayer(down.requires_grad_(), up.requires_grad_(), alpha / config.rank)
    if not layers:
        raise ValueError(f"targets {list(config.targets)} match no linear layer of the transformer")
    lora = LoRA(TRAINING_NAME, layers, "<training>")
    pipe.loras.attach(lora, 1.0)
    return lora


def lora_tensors(lora: LoRA) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The diffusers-format tensors and safetensors metadata of a transformer LoRA with one rank and one alpha."""
    tensors, alphas, ranks = {}, set(), set()
    for (component, module), layer in lora.layers.items():
        if component != "transformer":
            raise ValueError(f"only transformer LoRAs are written, not {component}")
        tensors[f"transformer.{module}.lora_A.weight"] = layer.down.detach().float().contiguous()
        tensors[f"transformer.{module}.lora_B.weight"] = layer.up.detach().float().contiguous()
        ranks.add(layer.rank)
        alphas.add(round(layer.scale * layer.rank, 6))
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError("the layers of this LoRA differ in rank or alpha; cannot write one lora_alpha")
    config = {
        "transformer.r": ranks.pop(),
        "transformer.lora_alpha": alphas.pop(),
        "transformer.target_modules": sorted(module for _, module in lora.layers),
    }
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True)}


def save_lora(lora: LoRA, path: str | Path, extra_metadata: dict[str, str] | None = None) -> Path:
    """Write ``lora`` as a diffusers-format ``.safetensors`` file; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors, metadata = lora_tensors(lora)
    save_file(tensors, str(path), metadata={**metadata, **(extra_metadata or {})})
    return path


def _encode(pipe: Pipeline, images: Sequence[Image.Image], captions: Sequence[str], size: int):
    with torch.no_grad():
        latents = []
        for image in images:
            pixels = image_to_tensor(_centre_crop(image, size), size, size)
            latents.append(pipe.vae.scale_latents(pipe.encode_image(pixels).mode()).float())
        unique = sorted(set(captions)) + [""]
        embeds, pooled = pipe.encode_prompts(unique, None, 256)
    index = {caption: i for i, caption in enumerate(unique)}
    return torch.cat(latents), embeds, pooled, torch.tensor([index[c] for c in captions]), index[""]


def _shifted_times(batch: int, shift: float, generator: torch.Generator) -> torch.Tensor:
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    return shift * t / (1 + (shift - 1) * t)


def train_lora(
    pipe: Pipeline,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    config: LoRATrainConfig,
    out: str | Path,
    resume: bool = False,
    progress: bool = True,
) -> list[float]:
    """Train a LoRA on ``images`` / ``captions`` and write it to ``out`` (every ``save_every`` steps and at the end;
    the file's metadata records the step). With ``resume`` and an existing ``out`` of the same rank and targets,
    training continues from its weights and step (the optimizer's moments start afresh). Returns the loss of every
    step run here. The LoRA stays attached to ``pipe`` as :data:`TRAINING_NAME` afterwards."""
    config.validate()
    if len(images) != len(captions) or not images:
        raise ValueError(f"give one caption per image: {len(images)} images, {len(captions)} captions")
    size = config.resolution or pipe.defaults.height
    pipe.check_size(size, size)
    if pipe.transformer.training or any(p.requires_grad for p in pipe.transformer.parameters()):
        pipe.transformer.eval().requires_grad_(False)
    pipe.loras.unfuse()  # a fused set would fuse the new layers too, and their hooks would not run
    lora = attach_trainable_lora(pipe, config)
    start = _resume(lora, Path(out)) if resume and Path(out).is_file() else 0
    latents, embeds, pooled, caption_index, empty = _encode(pipe, images, captions, size)
    parameters = [t for layer in lora.layers.values() for t in (layer.down, layer.up)]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(config.seed + start)
    picker = random.Random(config.seed + start)
    losses: list[float] = []
    bar = tqdm(range(start, config.steps), desc="LoRA", unit="step", disable=not progress)
    for step in bar:
        rows = torch.tensor([picker.randrange(len(images)) for _ in range(config.batch_size)])
        text = caption_index[rows].clone()
        text[torch.rand(len(rows), generator=generator) < config.caption_dropout] = empty
        x0 = latents[rows]
        t = _shifted_times(len(rows), pipe.defaults.shift, generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * noise
        timestep = (t * 1000).to(pipe.device)
        prediction = pipe.transformer(x_t.to(pipe.device, pipe.dtype), embeds[text], pooled[text], timestep)
        loss = (prediction.float() - (noise - x0).to(prediction.device)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if done == config.steps or (config.save_every and done % config.save_every == 0):
            save_lora(lora, out, {"workbench_step": str(done), "workbench_caption_count": str(len(set(captions)))})
    return losses


def _resume(lora: LoRA, path: Path) -> int:
    tensors, metadata, _ = read_lora_file(path)
    for (_, module), layer in lora.layers.items():
        down, up = (
            tensors.get(f"transformer.{module}.lora_A.weight"),
            tensors.get(f"transformer.{module}.lora_B.weight"),
        )
        if down is None or up is None or down.shape != layer.down.shape or up.shape != layer.up.shape:
            raise ValueError(f"{path}: cannot resume: it has no matching LoRA for {module} (other rank or targets?)")
        with torch.no_grad():
            layer.down.copy_(down)
            layer.up.copy_(up)
    return int(metadata.get("workbench_step", "0"))
