"""The embedded model's ControlNet: Canny edges of a ShapesWorld scene → the scene, trained on the frozen model.

Layout: an SD3 ControlNet (diffusers' ``SD3ControlNetModel`` keys, :mod:`workbench.models.controlnet`) with its own
``pos_embed`` and joint text blocks, zero pooled text (``force_zeros_for_pooled_projection``, as InstantX's SD3
ControlNets), ``layers`` blocks (2 by default; each residual then feeds three of the transformer's six blocks).
Initialisation: position, time/text embedders and the first ``layers`` blocks are copied from the transformer (an
MoE block's feed-forward from its expert 0) and the residual heads ``controlnet_blocks`` start at zero, so the
untrained ControlNet changes nothing. Unlike diffusers' ``SD3ControlNetModel``, ``pos_embed_input`` starts at
PyTorch's default (random) initialisation, not at zero: with both zero, the input projection gets no gradient until
the heads have grown, and on a CPU budget of a few hundred steps that wait is most of the run.

Training: rectified flow as the transformer's own (:func:`workbench.shapesworld.train.flow_inputs`) but with the
times shifted towards noise (``time_shift`` 3: where the layout is decided, which is what the edges give);
transformer, text encoders and VAE frozen. The control image is ``preprocess.canny`` (the preprocessor a user picks
in the app or CLI) of the rendered scene, or of an outline drawing of its objects (:func:`outline_drawing`),
encoded as the pipeline encodes it (:meth:`ControlNetSet.control_latents`: posterior mean × scaling factor, no
shift). Caption dropout keeps classifier-free guidance working with a ControlNet attached. Checkpoints (weights,
EMA, optimizer, step) go to ``run/controlnet.safetensors`` + ``.json`` so a run resumes.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from workbench.loading import load_pipeline
from workbench.memory import cpu_has_bf16
from workbench.models.controlnet import ControlNetConfig, SD3ControlNet
from workbench.models.mmdit import MMDiT
from workbench.pipeline import Pipeline
from workbench.preprocess import canny
from workbench.shapesworld.evaluate import GenerateFn
from workbench.shapesworld.train import (
    EMA,
    SIZES,
    _autocast,
    _checkpoint_paths,
    _lr_at,
    _optimizer_tensors,
    _restore_optimizer,
    _save_checkpoint,
    flow_inputs,
)
from workbench.shapesworld.world import (
    ShapeSpec,
    images_to_tensor,
    render,
    sample_batch_scenes,
    scene_from_caption,
    shape_polygon,
)

STAGE = "controlnet"
CANVASES = tuple(size for size in SIZES if max(size) <= 128)
"""The training canvases: the transformer's mix without the 160-pixel ones (half the cost of a step on the CPU)."""
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass
class ControlNetTrainConfig:
    """Hyper-parameters of a ControlNet run; stored beside its checkpoint."""

    steps: int = 3000
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    layers: int = 2
    time_shift: float = 3.0
    sketch_share: float = 0.3
    two_object_share: float | None = 0.5
    checkpoint_every: int = 50
    seed: int = 0
    threads: int | None = None
    device: str = "cpu"
    bf16: bool | None = None
    time_budget: float | None = None


def controlnet_config_for(transformer: MMDiT, layers: int) -> ControlNetConfig:
    """The ControlNet config matching ``transformer``'s width, patching, text and position table."""
    t = transformer.config
    if not 1 <= layers <= t.num_layers - 1:
        limit = t.num_layers - 1
        raise ValueError(f"layers must be in [1, {limit}] for a {t.num_layers}-block transformer, got {layers}")
    return ControlNetConfig.matching(t, layers)


def controlnet_from_transformer(transformer: MMDiT, layers: int = 2, seed: int = 0) -> SD3ControlNet:
    """A ControlNet initialised from ``transformer`` (see the module docstring; ``seed`` draws the random
    ``pos_embed_input``); its output is zero until trained."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SD3ControlNet(controlnet_config_for(transformer, layers))
    source = transformer.state_dict()
    state = model.state_dict()
    for key in state:
        if key == "pos_embed.pos_embed":
            continue  # the exact sincos table, as the loader rebuilds it (the shipped transformer's is float16)
        origin = key
        if key.startswith("transformer_blocks.") and ".ff.net." in key and key not in source:
            origin = key.replace(".ff.net.", ".ff.experts.0.net.")  # an MoE block: its first expert
        if origin in source and source[origin].shape == state[key].shape:
            state[key] = source[origin].clone()
    for key in state:
        if key.startswith("controlnet_blocks."):
            state[key] = torch.zeros_like(state[key])
    model.load_state_dict(state)
    return model


def edge_images(pixels: torch.Tensor) -> torch.Tensor:
    """Canny edges of uint8 images ``(B, 3, H, W)`` → control images ``(B, 3, H, W)`` in [−1, 1] (edges +1)."""
    return images_to_tensor([canny(Image.fromarray(image.permute(1, 2, 0).numpy())) for image in pixels])


def outline_drawing(objects: Sequence[ShapeSpec], height: int, width: int, stroke: int = 3) -> Image.Image:
    """The objects' outlines in black strokes of ``stroke`` px on white, as a user draws them with the app's brush
    (its Canny edges are two parallel contours, where a rendered scene's are one)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    for spec in objects:
        r = spec.r * min(height, width)
        x, y = spec.cx * width, spec.cy * height
        if spec.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), outline="black", width=stroke)
        else:
            points = shape_polygon(spec.shape, x, y, r)
            draw.line(points + points[:1], fill="black", width=stroke, joint="curve")
    return image


def _batch(step: int, config: ControlNetTrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Step ``step``'s scenes (canonical captions, a random canvas size): images and control images in [−1, 1]
    (the Canny edges of the render, or with probability ``config.sketch_share`` of an outline drawing of the same
    objects, strokes 2–4 px), captions."""
    seed = config.seed * 1_000_003 + step + 77_000_000
    rng = random.Random(seed)
    height, width = CANVASES[rng.randrange(len(CANVASES))]
    scenes = sample_batch_scenes(seed, config.batch_size, height, width, "canonical", config.two_object_share)
    renders = [render(scene) for scene in scenes]
    controls = [
        outline_drawing(scene.objects, height, width, rng.randint(2, 4)) if rng.random() < config.sketch_share else r
        for scene, r in zip(scenes, renders)
    ]
    edges = images_to_tensor([canny(control) for control in controls])
    return images_to_tensor(renders), edges, [scene.caption for scene in scenes]


def _checkpoint(run: Path) -> tuple[dict[str, torch.Tensor], int]:
    weights, meta = _checkpoint_paths(run, STAGE)
    if not weights.is_file():
        return {}, 0
    return load_file(str(weights)), json.loads(meta.read_text())["step"]


def train_controlnet(
    model_dir: Path, run: Path, config: ControlNetTrainConfig, progress: bool = True
) -> tuple[Pipeline, SD3ControlNet]:
    """Train a ControlNet for the model at ``model_dir`` (frozen) in ``run``, resuming from its checkpoint; returns
    the pipeline and the ControlNet holding the EMA weights (on the CPU, eval mode)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = torch.device(config.device)
    bf16 = config.bf16 if config.bf16 is not None else device.type == "cuda" or cpu_has_bf16()
    pipe = load_pipeline(model_dir, dtype=torch.float32)
    pipe.transformer.requires_grad_(False).eval()
    pipe.text_encoders.requires_grad_(False).eval()
    pipe.vae.requires_grad_(False).eval()
    model = controlnet_from_transformer(pipe.transformer, config.layers, config.seed)
    tensors, start = _checkpoint(run)
    if tensors:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for component in (pipe.transformer, pipe.text_encoders, pipe.vae, model):
        component.to(device)
    model.train()
    named = dict(model.named_parameters())
    names = {id(p): n for n, p in named.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    _restore_optimizer(optimizer, named, {k: v.to(device) for k, v in tensors.items() if k.startswith("opt.")})
    warm_from = 0 if optimizer.state else start
    ema = EMA(model, config.ema_decay)
    ema.shadow.update({k[4:]: v.float().to(device) for k, v in tensors.items() if k.startswith("ema.")})
    del tensors
    vae = pipe.vae
    scaling = vae.config.scaling_factor
    generator = torch.Generator(device).manual_seed(config.seed + start)
    patch = pipe.transformer.config.patch_size
    run.mkdir(parents=True, exist_ok=True)
    log = (run / f"{STAGE}_log.jsonl").open("a")
    bar = tqdm(initial=start, total=config.steps, desc="controlnet", disable=not progress)
    clock, images, running, step = time.perf_counter(), 0, None, start
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config, warm_from)  # type: ignore[arg-type]
        pixels, edges, captions = _batch(step, config)
        rng = random.Random(step * 7 + 3)
        captions = ["" if rng.random() < config.caption_dropout else c for c in captions]
        with torch.no_grad(), _autocast(bf16, device.type):
            latents = vae.scale_latents(vae.encode(pixels.to(device)).sample(generator).float())
            control = vae.encode(edges.to(device)).mode().float() * scaling
            embeds, pooled = pipe.text_encoders.embed(captions, pipe.text_encoders.t5_sequence_length())
        with _autocast(bf16, device.type):
            x_t, t, target = flow_inputs(latents, patch, generator, config.time_shift)
            timestep = t * 1000
            controls = model(x_t, control, embeds, torch.zeros_like(pooled), timestep)
            prediction = pipe.transformer(x_t, embeds, pooled, timestep, block_controls=controls).float()
            loss = (prediction - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        ema.update(model, step)
        step += 1
        images += len(captions)
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        log.write(json.dumps({"step": step, "loss": value, "grad": grad_norm.item()}) + "\n")
        bar.update(1)
        bar.set_postfix(loss=f"{running:.4f}")
        elapsed = time.perf_counter() - clock
        if config.time_budget is not None and elapsed > config.time_budget:
            config.steps = step
        if step % config.checkpoint_every == 0 or step == config.steps:
            saved = {f"model.{k}": v for k, v in model.state_dict().items()}
            saved.update({f"ema.{k}": v for k, v in ema.shadow.items()})
            saved.update(_optimizer_tensors(optimizer, names))
            _save_checkpoint(run, STAGE, saved, {"step": step, "config": asdict(config), "model": str(model_dir)})
            log.flush()
    bar.close()
    seconds = time.perf_counter() - clock
    log.write(json.dumps({"run": {"images": images, "seconds": seconds}}) + "\n")
    log.close()
    if progress:
        print(f"trained on {images} images in {seconds:.0f} s: {images / max(seconds, 1e-9):.1f} images/s")
    ema.copy_to(model)
    for component in (pipe.transformer, pipe.text_encoders, pipe.vae, model):
        component.to("cpu")
    return pipe, model.eval().requires_grad_(False)


def load_run_controlnet(model_dir: Path, run: Path) -> tuple[Pipeline, SD3ControlNet]:
    """The pipeline of ``model_dir`` and the run's ControlNet with its EMA weights."""
    weights, meta_path = _checkpoint_paths(run, STAGE)
    meta = json.loads(meta_path.read_text())
    pipe = load_pipeline(model_dir, dtype=torch.float32)
    model = controlnet_from_transformer(pipe.transformer, meta["config"]["layers"], meta["config"]["seed"])
    tensors = load_file(str(weights))
    model.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    return pipe, model.eval().requires_grad_(False)


def save_controlnet(model: SD3ControlNet, folder: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``model`` as a diffusers ControlNet folder (``config.json`` + ``diffusion_pytorch_model.safetensors``,
    without the position table, which the loader rebuilds)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().to(dtype).contiguous()
        for k, v in model.state_dict().items()
        if k != "pos_embed.pos_embed" and v.is_floating_point()
    }
    save_file(state, str(folder / WEIGHTS_NAME))
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1) + "\n")
    return folder


def scene_edges(caption: str, seed: int, height: int = 128, width: int = 128) -> Image.Image:
    """The control image of an evaluation caption: Canny edges of ``scene_from_caption(caption, Random(seed))``."""
    return canny(render(scene_from_caption(caption, random.Random(seed), height, width)))


def controlled_generate_fn(
    pipe: Pipeline, name: str | None, height: int = 128, width: int = 128, **call: object
) -> GenerateFn:
    """An evaluator ``generate_fn`` (:func:`workbench.shapesworld.evaluate.evaluate`): each caption drawn with the
    edges of its own ground-truth scene as control image through the attached ControlNet ``name`` (None: no
    control, the baseline). ``call``: further pipeline arguments (steps, guidance …)."""

    def generate(captions: list[str], seeds: list[int]) -> list[Image.Image]:
        images = []
        for caption, seed in zip(captions, seeds):
            control = {"control_image": scene_edges(caption, seed, height, width)} if name else {}
            result = pipe(caption, seed=seed, height=height, width=width, **control, **call)
            images.extend(result.images)
        return images

    return generate
