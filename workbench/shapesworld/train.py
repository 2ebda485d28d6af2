"""Training the embedded model on ShapesWorld: first the VAE, then text encoders + MoE-MMDiT with rectified flow.

Objective (SD3): ``x_t = (1 − t)·x0 + t·ε``, target ``v = ε − x0``, t logit-normal(0, 1) then shifted by
resolution (``s = sqrt(N / 64)`` for N image tokens), plus the MoE load-balancing loss, and optionally two binding
terms: the attention-to-mask token loss (:mod:`workbench.shapesworld.binding`, weight ``token_loss_weight``) and a
hard-negative term (``negative_loss_weight``): for a two-object canonical caption c and its edit c′ that keeps the
words but swaps which object they belong to (colours swapped, shapes swapped or relation flipped), the flow error
with c′ must exceed the error with c by ``negative_margin``: ``relu(err(c) + m − err(c′))``, err(c) held fixed.
Scenes are rendered on the training device by :mod:`workbench.shapesworld.raster` (``renderer="torch"``, which also
gives the object masks) or by PIL in worker processes (``renderer="pil"``). Classifier-free guidance
is learned through empty captions, random word masking and independent dropout of the CLIP and T5 conditioning.
Runs on CPU with bf16 autocast where the CPU has fast bf16 (AMX / AVX-512 BF16), keeps an EMA of the weights,
clips gradients, logs loss per timestep bin, and checkpoints (safetensors + JSON) so a run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from workbench.memory import cpu_has_bf16
from workbench.models.vae import AutoencoderKL
from workbench.pipeline import Pipeline
from workbench.shapesworld.binding import AttentionProbe, token_loss, token_masks, word_targets
from workbench.shapesworld.model import ShapesWorldSpec, build_pipeline
from workbench.shapesworld.raster import SceneTensors, rasterize
from workbench.shapesworld.sensitivity import edited_caption
from workbench.shapesworld.world import Scene, make_batch, sample_batch_scenes, uint8_to_unit

SIZES = ((128, 128), (128, 128), (128, 128), (96, 96), (160, 160), (96, 128), (128, 96), (160, 128), (128, 160))
TIME_BINS = 10
LOG_EVERY = 20  # steps between reading the logged numbers back from the device (each read waits for it)


@dataclass
class TrainConfig:
    """Hyper-parameters of one stage; stored beside the checkpoint."""

    steps: int = 2000
    batch_size: int = 32
    lr: float = 3e-4
    warmup: int = 200
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    aux_loss_weight: float = 0.01
    caption_dropout: float = 0.1
    encoder_dropout: float = 0.1
    word_mask_prob: float = 0.1
    kl_weight: float = 1e-6
    foreground_weight: float = 20.0
    checkpoint_every: int = 200
    seed: int = 0
    bf16: bool | None = None
    threads: int | None = None
    device: str = "cpu"
    data_workers: int = 0
    time_budget: float | None = None
    two_object_share: float | None = None
    renderer: str = "torch"
    token_loss_weight: float = 0.0
    token_loss_blocks: tuple[int, ...] | None = None
    negative_loss_weight: float = 0.0
    negative_margin: float = 0.05
    compile: bool = False


def _autocast(enabled: bool, device_type: str = "cpu"):
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled)


def _lr_at(step: int, config: TrainConfig, warm_from: int = 0) -> float:
    """Linear warm-up over ``config.warmup`` steps counted from ``warm_from`` (the first step of a run whose
    optimizer state was not restored), then cosine decay to a tenth of ``config.lr`` at ``config.steps``."""
    warm = min(1.0, (step + 1 - warm_from) / max(1, config.warmup))
    progress = min(1.0, step / max(1, config.steps))
    return config.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of a module's floating-point parameters, with the usual warm-up."""

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        state = module.state_dict()
        torch._foreach_lerp_(list(self.shadow.values()), [state[k].float() for k in self.shadow], 1 - decay)

    def copy_to(self, module: torch.nn.Module) -> None:
        state = module.state_dict()
        state.update({k: v.to(state[k].dtype) for k, v in self.shadow.items()})
        module.load_state_dict(state)


def _checkpoint_paths(run: Path, stage: str) -> tuple[Path, Path]:
    return run / f"{stage}.safetensors", run / f"{stage}.json"


def _save_checkpoint(run: Path, stage: str, tensors: dict[str, torch.Tensor], state: dict) -> None:
    weights, meta = _checkpoint_paths(run, stage)
    run.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(weights)
    meta.write_text(json.dumps(state, indent=1))


def _optimizer_tensors(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, torch.Tensor]:
    out = {}
    for param, state in optimizer.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                out[f"opt.{names[id(param)]}.{key}"] = state[key]
        if "step" in state:
            out[f"opt.{names[id(param)]}.step"] = torch.as_tensor(state["step"], dtype=torch.float32).reshape(1)
    return out


def _restore_optimizer(optimizer: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter], tensors: dict) -> None:
    for name, param in named.items():
        if f"opt.{name}.exp_avg" in tensors:
            optimizer.state[param] = {
                "exp_avg": tensors[f"opt.{name}.exp_avg"].clone(),
                "exp_avg_sq": tensors[f"opt.{name}.exp_avg_sq"].clone(),
                "step": tensors[f"opt.{name}.step"].reshape(()).clone(),
            }


def _setup(config: TrainConfig) -> bool:
    """Apply the thread count; True when this run computes in bf16 autocast (CUDA, or a CPU with fast bf16)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.bf16 is not None:
        return config.bf16
    return torch.device(config.device).type == "cuda" or cpu_has_bf16()


def _batch_seed_and_size(step: int, config: TrainConfig) -> tuple[int, int, int]:
    seed = config.seed * 1_000_003 + step
    height, width = SIZES[random.Random(seed).randrange(len(SIZES))]
    return seed, height, width


def _batch(step: int, config: TrainConfig) -> tuple[torch.Tensor, list[str]]:
    """The images (B, 3, H, W) as uint8 pixels (a quarter of the bytes to pass between processes) and captions."""
    seed, height, width = _batch_seed_and_size(step, config)
    return make_batch(seed, config.batch_size, height, width, uint8=True, two_object_share=config.two_object_share)


def batch_scenes(step: int, config: TrainConfig) -> list[Scene]:
    """The scenes of step ``step`` (those :func:`_batch` renders with PIL)."""
    seed, height, width = _batch_seed_and_size(step, config)
    return sample_batch_scenes(seed, config.batch_size, height, width, two_object_share=config.two_object_share)


@dataclass
class TrainBatch:
    """One step's data on the training device: ``images (B, 3, H, W)`` in [−1, 1], captions, and with the torch
    renderer the scenes and each object's pixel coverage ``(B, 2, H, W)``."""

    images: torch.Tensor
    captions: list[str]
    scenes: list[Scene] | None = None
    coverage: torch.Tensor | None = None


def _scene_batch(step: int, config: TrainConfig) -> tuple[list[Scene], SceneTensors]:
    """The scenes of step ``step`` and their tensors (on the CPU), for the on-device rasteriser."""
    scenes = batch_scenes(step, config)
    return scenes, SceneTensors.from_scenes(scenes)


class _StepBatches(torch.utils.data.IterableDataset):
    """The batches of steps ``start, start + 1, …`` (endless): ``make`` of each step, :func:`_batch` (PIL pixels) by
    default; worker ``i`` of ``n`` makes steps ``≡ i (mod n)``, which the DataLoader's round-robin hands back in step
    order, so the data do not depend on the worker count."""

    def __init__(self, start: int, config: TrainConfig, make=None) -> None:
        self.start, self.config, self.make = start, config, make or _batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            torch.set_num_threads(1)
        step = self.start + worker
        while True:
            yield self.make(step, self.config)
            step += workers


def step_batches(start: int, config: TrainConfig, make=None):
    """Iterator over ``make(step, config)`` (default: the PIL-rendered batches) from step ``start``: made in
    ``config.data_workers`` processes (ahead of the model) when that is > 0, else inline."""
    dataset = _StepBatches(start, config, make)
    if config.data_workers <= 0:
        return iter(dataset)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=config.data_workers,
        prefetch_factor=4,
        pin_memory=torch.device(config.device).type == "cuda",
        persistent_workers=False,
    )
    return iter(loader)


def train_batches(start: int, config: TrainConfig) -> Iterator[TrainBatch]:
    """The training batches from step ``start`` on ``config.device``: scenes sampled (in ``config.data_workers``
    processes, or inline) and rasterised on the device (``renderer="torch"``), or PIL renders (``renderer="pil"``).
    Both give the same scenes and captions for a step."""
    device = torch.device(config.device)
    if config.renderer == "pil":
        for pixels, captions in step_batches(start, config):
            yield TrainBatch(uint8_to_unit(pixels.to(device, non_blocking=True)), captions)
    elif config.renderer == "torch":
        for scenes, tensors in step_batches(start, config, _scene_batch):
            images, coverage = rasterize(tensors.to(device, non_blocking=True))
            yield TrainBatch(uint8_to_unit(images), [scene.caption for scene in scenes], scenes, coverage)
    else:
        raise ValueError(f"renderer must be 'torch' or 'pil', got {config.renderer!r}")


# ----------------------------------------------------------------------------------------------------------- VAE


def _vae_batch(step: int, config: TrainConfig) -> torch.Tensor:
    """Whole 96×96 scenes (the smallest canvas: every crop-free image holds its objects)."""
    return make_batch(config.seed * 1_000_003 + step, config.batch_size, 96, 96, caption_style="any")[0]


def foreground_weight(images: torch.Tensor, weight: float) -> torch.Tensor:
    """Per-pixel loss weight ``(B, 1, H, W)``: ``1 + weight`` on object pixels (those differing from the
    top-left background pixel), 1 elsewhere, so that small objects are not drowned by the flat background."""
    background = images[:, :, :1, :1]
    mask = ((images - background).abs().sum(dim=1, keepdim=True) > 0.05).float()
    return 1.0 + weight * mask


def train_vae(run: Path, spec: ShapesWorldSpec, config: TrainConfig, progress: bool = True) -> AutoencoderKL:
    """Train the autoencoder (L1 + MSE reconstruction, tiny KL); resumes from ``run/vae.safetensors``."""
    bf16 = _setup(config)
    run.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    vae = AutoencoderKL(spec.vae_config())
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=0.0)
    named = dict(vae.named_parameters())
    names = {id(p): n for n, p in named.items()}
    start = 0
    weights, meta = _checkpoint_paths(run, "vae")
    if weights.is_file():
        tensors = load_file(str(weights))
        vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _restore_optimizer(optimizer, named, tensors)
        start = json.loads(meta.read_text())["step"]
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="vae", disable=not progress)
    log = (run / "vae_log.jsonl").open("a")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        images = _vae_batch(step, config)
        with _autocast(bf16):
            posterior = vae.encode(images)
            recon = vae.decode(posterior.sample()).float()
        weight = foreground_weight(images, config.foreground_weight)
        error = (recon - images).abs() + (recon - images).pow(2)
        loss_rec = (weight * error).mean() / weight.mean()
        loss = loss_rec + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), config.grad_clip)
        optimizer.step()
        bar.set_postfix(rec=f"{loss_rec.item():.4f}")
        log.write(json.dumps({"step": step, "rec": loss_rec.item(), "time": time.time()}) + "\n")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            tensors = {f"model.{k}": v for k, v in vae.state_dict().items()}
            tensors.update(_optimizer_tensors(optimizer, names))
            _save_checkpoint(run, "vae", tensors, {"step": step + 1, "config": asdict(config)})
            log.flush()
    log.close()
    calibrate_latent_scale(vae, config)
    return vae.eval()


@torch.no_grad()
def calibrate_latent_scale(vae: AutoencoderKL, config: TrainConfig, batches: int = 8) -> None:
    """Set ``shift_factor`` and ``scaling_factor`` so that scaled latents have zero mean and unit variance."""
    latents = []
    for i in range(batches):
        images, _ = make_batch(10_000_000 + i, 32, 128, 128, caption_style="any")
        latents.append(vae.encode(images).mode())
    stacked = torch.cat(latents)
    vae.config.shift_factor = float(stacked.mean())
    vae.config.scaling_factor = float(1.0 / (stacked - stacked.mean()).std())


def load_trained_vae(run: Path, spec: ShapesWorldSpec, config: TrainConfig) -> AutoencoderKL:
    """The trained VAE, with the fine-tuned decoder of ``run/decoder.safetensors`` when there is one."""
    weights, _ = _checkpoint_paths(run, "vae")
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: train the VAE first (python -m workbench.shapesworld train --stage vae)")
    vae = AutoencoderKL(spec.vae_config())
    vae.load_state_dict({k[6:]: v for k, v in load_file(str(weights)).items() if k.startswith("model.")})
    decoder, _ = _checkpoint_paths(run, "decoder")
    if decoder.is_file():
        decoder_state = {k[6:]: v for k, v in load_file(str(decoder)).items() if k.startswith("model.")}
        vae.load_state_dict(decoder_state, strict=False)
    calibrate_latent_scale(vae.eval(), config)
    return vae.eval().requires_grad_(False)


def finetune_decoder(run: Path, spec: ShapesWorldSpec, config: TrainConfig, progress: bool = True) -> None:
    """Train only the decoder (and post-quant conv) on the frozen encoder's latents. The latent space does not
    move, so a transformer trained on it stays valid while the images get sharper; resumes like the other stages."""
    bf16 = _setup(config)
    run.mkdir(parents=True, exist_ok=True)
    vae = AutoencoderKL(spec.vae_config())
    vae_weights, _ = _checkpoint_paths(run, "vae")
    vae.load_state_dict({k[6:]: v for k, v in load_file(str(vae_weights)).items() if k.startswith("model.")})
    vae.requires_grad_(False)
    trainable = {n: p for n, p in vae.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))}
    for p in trainable.values():
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable.values(), lr=config.lr, weight_decay=0.0)
    names = {id(p): n for n, p in trainable.items()}
    start = 0
    weights, meta = _checkpoint_paths(run, "decoder")
    if weights.is_file():
        tensors = load_file(str(weights))
        vae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, strict=False)
        _restore_optimizer(optimizer, trainable, tensors)
        start = json.loads(meta.read_text())["step"]
    log = (run / "decoder_log.jsonl").open("a")
    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="decoder", disable=not progress)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        images = make_batch(config.seed * 7_000_001 + step, config.batch_size, 128, 128, caption_style="any")[0]
        with torch.no_grad(), _autocast(bf16):
            latents = vae.encode(images).sample().float()
        with _autocast(bf16):
            recon = vae.decode(latents).float()
        weight = foreground_weight(images, config.foreground_weight)
        loss = (weight * ((recon - images).abs() + (recon - images).pow(2))).mean() / weight.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable.values(), config.grad_clip)
        optimizer.step()
        bar.set_postfix(rec=f"{loss.item():.4f}")
        log.write(json.dumps({"step": step, "rec": loss.item()}) + "\n")
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
            tensors = {f"model.{k}": v for k, v in vae.state_dict().items() if k.startswith(("decoder.", "post_quant"))}
            tensors.update(_optimizer_tensors(optimizer, names))
            _save_checkpoint(run, "decoder", tensors, {"step": step + 1, "config": asdict(config)})
            log.flush()
    log.close()


# --------------------------------------------------------------------------------------------------- transformer


def mask_words(caption: str, rng: random.Random, prob: float, unknown: str = "xq") -> str:
    """Replace each word by the unknown token with probability ``prob`` (robustness to unseen words)."""
    return " ".join(unknown if rng.random() < prob else w for w in caption.split())


@dataclass
class Condition:
    """The text conditioning of one step: embeds ``(B, L, D)`` and pooled ``(B, P)`` after caption dropout, word
    masking and per-encoder dropout; the captions actually encoded and which encoders were kept per sample."""

    embeds: torch.Tensor
    pooled: torch.Tensor
    captions: list[str]
    keep_clip: list[bool]
    keep_t5: list[bool]


def _encode_with_dropout(
    pipe: Pipeline, captions: list[str], keep_clip: list[bool], keep_t5: list[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, pooled = pipe.text_encoders.embed(captions, max_sequence_length=pipe.text_encoders.t5_sequence_length())
    clip_length = pipe.text_encoders.tokenizer_max_length
    keep = dict(dtype=embeds.dtype, device=embeds.device)
    clip = torch.tensor(keep_clip, **keep)
    t5 = torch.tensor(keep_t5, **keep)
    mask = torch.ones(embeds.shape[:2] + (1,), **keep)
    mask[:, :clip_length] = clip[:, None, None]
    mask[:, clip_length:] = t5[:, None, None]
    return embeds * mask, pooled * clip[:, None]


def _condition(pipe: Pipeline, captions: list[str], step: int, config: TrainConfig) -> Condition:
    rng = random.Random(step * 7 + 1)
    captions = [
        "" if rng.random() < config.caption_dropout else mask_words(c, rng, config.word_mask_prob) for c in captions
    ]
    keep_clip = [rng.random() >= config.encoder_dropout for _ in captions]
    keep_t5 = [rng.random() >= config.encoder_dropout for _ in captions]
    embeds, pooled = _encode_with_dropout(pipe, captions, keep_clip, keep_t5)
    return Condition(embeds, pooled, captions, keep_clip, keep_t5)


def hard_negatives(captions: list[str], rng: random.Random) -> list[tuple[int, str]]:
    """(index, edited caption) for every two-object canonical caption: colours swapped, shapes swapped or relation
    flipped, chosen at random among the edits that change the caption."""
    out = []
    for i, caption in enumerate(captions):
        try:
            edits = [edited_caption(caption, e) for e in ("colours swapped", "shapes swapped", "relation flipped")]
        except ValueError:
            continue  # not canonical, or a one-object caption
        edits = [e for e in edits if e is not None and e != caption]
        if edits:
            out.append((i, rng.choice(edits)))
    return out


def sample_timesteps(batch: int, tokens: int, generator: torch.Generator, shift: float = 1.0) -> torch.Tensor:
    """Logit-normal(0, 1) times, shifted for resolution with ``s = shift · sqrt(tokens / 64)`` (``shift`` > 1 puts
    more of them at high noise)."""
    t = torch.sigmoid(torch.randn(batch, generator=generator, device=generator.device))
    s = shift * math.sqrt(tokens / 64)
    return s * t / (1 + (s - 1) * t)


def flow_inputs(
    latents: torch.Tensor, patch_size: int, generator: torch.Generator, shift: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_t, t, target)`` for clean latents ``(B, C, H, W)``: logit-normal shifted t (:func:`sample_timesteps`),
    ``x_t = (1 − t)·x0 + t·ε``, ``target = ε − x0``."""
    tokens = latents.shape[-2] * latents.shape[-1] // patch_size**2
    t = sample_timesteps(latents.shape[0], tokens, generator, shift)
    noise = torch.randn(latents.shape, generator=generator, device=generator.device).to(latents.device)
    x_t = (1 - t[:, None, None, None]) * latents + t[:, None, None, None] * noise
    return x_t, t, noise - latents


def binding_token_loss(
    probe: AttentionProbe, condition: Condition, batch: TrainBatch, grid: tuple[int, int], clip_length: int
) -> torch.Tensor:
    """Mean of :func:`binding.token_loss` over the probed blocks, for the words of ``condition.captions``."""
    words = word_targets(
        condition.captions,
        batch.scenes,
        clip_length,
        condition.embeds.shape[1],
        condition.keep_clip,
        condition.keep_t5,
    ).to(condition.embeds.device)
    masks = token_masks(batch.coverage, grid)
    return torch.stack([token_loss(attention, words, masks) for attention in probe.maps()]).mean()


def negative_loss(
    pipe: Pipeline,
    forward,
    condition: Condition,
    x_t: torch.Tensor,
    t: torch.Tensor,
    target: torch.Tensor,
    per_sample: torch.Tensor,
    step: int,
    margin: float,
) -> torch.Tensor:
    """The hard-negative term ``mean relu(err(c) + margin − err(c′))`` over the batch's two-object canonical captions
    (0 when there are none); err(c) is held fixed so only the edited caption's prediction is pushed away."""
    negatives = hard_negatives(condition.captions, random.Random(step * 13 + 5))
    if not negatives:
        return per_sample.sum() * 0
    index = [i for i, _ in negatives]
    embeds, pooled = _encode_with_dropout(
        pipe,
        [c for _, c in negatives],
        [condition.keep_clip[i] for i in index],
        [condition.keep_t5[i] for i in index],
    )
    rows = torch.tensor(index, device=x_t.device)
    prediction = forward(x_t[rows], embeds, pooled, t[rows] * 1000).float()
    err_negative = (prediction - target[rows]).pow(2).flatten(1).mean(1)
    return torch.relu(per_sample.detach()[rows] + margin - err_negative).mean()


def train_transformer(
    run: Path, spec: ShapesWorldSpec, config: TrainConfig, vae: AutoencoderKL, progress: bool = True
) -> Pipeline:
    """Train text encoders and MMDiT jointly on frozen-VAE latents; resumes from ``run/transformer.safetensors``.

    Runs on ``config.device`` (CPU or CUDA). With ``config.time_budget`` (seconds) the step count is fitted to the
    budget once the speed is known, so that the cosine schedule still ends at its floor. Returns the pipeline (on
    the CPU) holding the EMA weights."""
    bf16 = _setup(config)
    device = torch.device(config.device)
    run.mkdir(parents=True, exist_ok=True)
    pipe = build_pipeline(spec, config.seed, vae=vae)
    modules = torch.nn.ModuleDict({"transformer": pipe.transformer, "text": pipe.text_encoders})
    modules.train()
    named = dict(modules.named_parameters())
    names = {id(p): n for n, p in named.items()}
    decay = [p for n, p in named.items() if p.dim() >= 2]
    no_decay = [p for n, p in named.items() if p.dim() < 2]
    start, bins = 0, {"sum": [0.0] * TIME_BINS, "count": [0] * TIME_BINS}
    weights, meta = _checkpoint_paths(run, "transformer")
    tensors = load_file(str(weights)) if weights.is_file() else {}
    if tensors:
        modules.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        start = json.loads(meta.read_text())["step"]
    for component in (pipe.transformer, pipe.text_encoders, vae):
        component.to(device)  # one by one: TextConditioner.to also moves the conditioning it returns
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.99),
        fused=True,
    )
    forward = torch.compile(pipe.transformer, dynamic=True) if config.compile else pipe.transformer
    if config.token_loss_weight > 0 and config.renderer != "torch":
        raise ValueError("token_loss_weight > 0 needs renderer='torch' (the object masks come from it)")
    probe = AttentionProbe(pipe.transformer, config.token_loss_blocks) if config.token_loss_weight > 0 else None
    patch = pipe.transformer.config.patch_size
    clip_length = pipe.text_encoders.tokenizer_max_length
    ema = EMA(modules, config.ema_decay)
    ema.shadow.update({k[4:]: v.float().to(device) for k, v in tensors.items() if k.startswith("ema.")})
    _restore_optimizer(optimizer, named, {k: v.to(device) for k, v in tensors.items() if k.startswith("opt.")})
    warm_from = 0 if optimizer.state else start
    del tensors
    generator = torch.Generator(device).manual_seed(config.seed + start)
    bar = tqdm(initial=start, total=config.steps, desc="mmdit", disable=not progress)
    log = (run / "transformer_log.jsonl").open("a")
    batches = train_batches(start, config)
    pending: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    run_clock, run_images = time.perf_counter(), 0
    running, clock, step = None, time.perf_counter(), start
    since, data_wait = clock, 0.0  # start of the pending steps, and their seconds spent waiting for batches

    def flush() -> None:
        """Write the pending steps' numbers (one wait for the device instead of one per step), then the seconds
        those steps took and how many of them went to waiting for rendered batches."""
        nonlocal running, since, data_wait
        if not pending:
            return
        columns = (torch.stack(column).float().cpu() for column in list(zip(*pending))[1:])
        per_sample, times, aux, grads, tokens, negatives = columns
        for (index, *_), losses, t_values, aux_value, grad, token_value, negative_value in zip(
            pending, per_sample, times, aux, grads, tokens, negatives
        ):
            for value, time_value in zip(losses.tolist(), t_values.tolist()):
                time_bin = min(TIME_BINS - 1, int(time_value * TIME_BINS))
                bins["sum"][time_bin] += value
                bins["count"][time_bin] += 1
            mean_loss = losses.mean().item()
            running = mean_loss if running is None else 0.98 * running + 0.02 * mean_loss
            record = {"step": index, "loss": mean_loss, "aux": aux_value.item(), "grad": grad.item()}
            if config.token_loss_weight > 0:
                record["token"] = token_value.item()
            if config.negative_loss_weight > 0:
                record["negative"] = negative_value.item()
            log.write(json.dumps(record) + "\n")
        now = time.perf_counter()
        images_per_s = len(pending) * config.batch_size / max(now - since, 1e-9)
        bar.set_postfix(loss=f"{running:.4f}", aux=f"{aux[-1].item():.3f}", img_s=f"{images_per_s:.0f}")
        timing = {"step": pending[-1][0], "steps": len(pending), "seconds": now - since, "data_wait": data_wait}
        log.write(json.dumps({**timing, "images_per_s": images_per_s}))
        log.write("\n")
        since, data_wait = now, 0.0
        pending.clear()

    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config, warm_from)
        waiting = time.perf_counter()
        batch = next(batches)
        data_wait += time.perf_counter() - waiting
        with torch.no_grad(), _autocast(bf16, device.type):
            latents = vae.scale_latents(vae.encode(batch.images).sample(generator).float())
        zero = torch.zeros((), device=device)
        token, negative = zero, zero
        with _autocast(bf16, device.type):
            condition = _condition(pipe, batch.captions, step, config)
            x_t, t, target = flow_inputs(latents, patch, generator)
            with probe if probe is not None else nullcontext():
                prediction = forward(x_t, condition.embeds, condition.pooled, t * 1000).float()
            if probe is not None:
                grid = (latents.shape[-2] // patch, latents.shape[-1] // patch)
                token = binding_token_loss(probe, condition, batch, grid, clip_length)
            per_sample = (prediction - target).pow(2).flatten(1).mean(1)
            aux = pipe.transformer.aux_loss()
            if config.negative_loss_weight > 0:
                negative = negative_loss(
                    pipe, forward, condition, x_t, t, target, per_sample, step, config.negative_margin
                )
        loss = (
            per_sample.mean()
            + config.aux_loss_weight * aux.float()
            + config.token_loss_weight * token
            + config.negative_loss_weight * negative
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(modules.parameters(), config.grad_clip)
        optimizer.step()
        ema.update(modules, step)
        run_images += len(batch.captions)
        pending.append(
            (step, per_sample.detach(), t.detach(), aux.detach(), grad_norm.detach(), token.detach(), negative.detach())
        )
        step += 1
        bar.update(1)
        if len(pending) >= LOG_EVERY:
            flush()
        if config.time_budget is not None and step - start in (30, 200):
            # At 30 steps with the start-up counted in (short), at 200 at the steady speed since step 30.
            flush()
            now = time.perf_counter()
            if step - start == 30:
                clock_30 = now
                config.steps = _fit_steps_to_budget(config, start, step, now - clock)
            else:
                config.steps = _fit_steps_to_budget(config, start, step, now - clock, (now - clock_30) / 170)
            bar.total = config.steps
        if step % config.checkpoint_every == 0 or step == config.steps:
            flush()
            per_bin = [s / c if c else None for s, c in zip(bins["sum"], bins["count"])]
            log.write(json.dumps({"step": step, "loss_per_time_bin": per_bin}) + "\n")
            bins = {"sum": [0.0] * TIME_BINS, "count": [0] * TIME_BINS}
            tensors = {f"model.{k}": v for k, v in modules.state_dict().items()}
            tensors.update({f"ema.{k}": v for k, v in ema.shadow.items()})
            tensors.update(_optimizer_tensors(optimizer, names))
            _save_checkpoint(run, "transformer", tensors, {"step": step, "config": asdict(config)})
            log.flush()
    flush()
    bar.close()
    seconds = time.perf_counter() - run_clock
    summary = {"images": run_images, "seconds": seconds, "images_per_s": run_images / max(seconds, 1e-9)}
    log.write(json.dumps({"run": summary}) + "\n")
    log.close()
    if progress:
        print(f"trained on {run_images} images in {seconds:.0f} s: {summary['images_per_s']:.1f} images/s")
    ema.copy_to(modules)
    modules.eval()
    for component in (pipe.transformer, pipe.text_encoders, vae):
        component.to("cpu")
    pipe.transformer.requires_grad_(False)
    pipe.text_encoders.requires_grad_(False)
    return pipe


def _fit_steps_to_budget(
    config: TrainConfig, start: int, step: int, elapsed: float, per_step: float | None = None
) -> int:
    """The last step that the remaining ``config.time_budget`` reaches at ``per_step`` seconds a step (default: the
    mean since ``start``, start-up included, so the estimate errs on the short side)."""
    per_step = elapsed / max(1, step - start) if per_step is None else per_step
    return step + max(1, int((config.time_budget - elapsed) / per_step))


def load_ema_pipeline(run: Path, spec: ShapesWorldSpec, config: TrainConfig) -> Pipeline:
    """The pipeline with the EMA weights of the latest transformer checkpoint and the trained VAE."""
    vae = load_trained_vae(run, spec, config)
    pipe = build_pipeline(spec, config.seed, vae=vae)
    modules = torch.nn.ModuleDict({"transformer": pipe.transformer, "text": pipe.text_encoders})
    weights, _ = _checkpoint_paths(run, "transformer")
    tensors = load_file(str(weights))
    state = modules.state_dict()
    state.update({k[4:]: v.to(state[k[4:]].dtype) for k, v in tensors.items() if k.startswith("ema.")})
    modules.load_state_dict(state)
    modules.eval().requires_grad_(False)
    return pipe


def seed_run_from_model(
    folder: Path,
    run: Path,
    step: int | None = None,
    spec: ShapesWorldSpec | None = None,
    depth: int | None = None,
) -> int:
    """Start a run folder from an exported model (the committed ``models/shapesworld-moe``) so that training resumes
    from its weights in a fresh checkout: VAE, transformer and text weights (as both model and EMA), no optimizer
    state, and the spec (``spec``'s sizes, with the folder's depth and MoE blocks) in ``run/spec.json``. With
    ``depth`` the transformer is first deepened to that many blocks, computing the same function
    (:func:`workbench.shapesworld.grow.deepen`). ``step`` is where the learning-rate schedule picks up (default:
    the folder's ``training_step``, else 0); returns it."""
    from workbench.loading import load_pipeline, read_json
    from workbench.shapesworld.grow import deepen

    if step is None:
        step = int(read_json(folder / "model_index.json").get("workbench", {}).get("training_step", 0))
    with warnings.catch_warnings():  # only the weights are read: a missing layout ControlNet does not matter here
        warnings.filterwarnings("ignore", message=".*layout ControlNet")
        pipe = load_pipeline(folder)
    config = pipe.transformer.config
    spec = replace(spec or ShapesWorldSpec(), depth=config.num_layers, moe_layers=tuple(config.moe_layers))
    if depth is not None and depth != spec.depth:
        spec, pipe.transformer = deepen(spec, pipe.transformer, depth)
    spec.save(run)
    vae_state = {f"model.{k}": v.float() for k, v in pipe.vae.state_dict().items()}
    _save_checkpoint(run, "vae", vae_state, {"step": step, "seeded_from": str(folder)})
    modules = torch.nn.ModuleDict({"transformer": pipe.transformer, "text": pipe.text_encoders})
    state = {k: v.float() if v.is_floating_point() else v for k, v in modules.state_dict().items()}
    tensors = {f"model.{k}": v for k, v in state.items()}
    tensors.update({f"ema.{k}": v for k, v in state.items() if v.is_floating_point()})
    _save_checkpoint(run, "transformer", tensors, {"step": step, "seeded_from": str(folder)})
    return step
