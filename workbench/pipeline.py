"""Text→image, image→image and inpainting on one loaded model: seeds, guidance, callbacks, cancel, metadata.

Images are PIL RGB; latents ``(B, 16, H/8, W/8)``. Seeds reproduce diffusers: the noise of an image with seed s is
``torch.randn((1, C, H/8, W/8), generator=torch.Generator("cpu").manual_seed(s))``; image→image first draws the
VAE's latent sample from the same generator, then the noise (diffusers' order). Inpainting masks are white (1) where
the image is repainted and black (0) where it is kept, as in diffusers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image, ImageFilter

from workbench import flow
from workbench.layout_guidance import Layout, LayoutSource, layout_constraint
from workbench.lora import LoRASet
from workbench.metadata import format_parameters
from workbench.models.mmdit import MMDiT
from workbench.models.moe import RoutingRecord
from workbench.models.text import TextConditioner
from workbench.models.vae import AutoencoderKL
from workbench.settings import BY_NAME, MAX_SEED, GenerationDefaults, GenerationSettings, parse_block_list
from workbench.step_cache import StepCache

__all__ = ["GenerationDefaults", "GenerationOutput", "Inputs", "MAX_SEED", "Pipeline", "parse_block_list"]


@dataclass(frozen=True)
class Inputs:
    """The non-setting inputs of a call: the start ``image`` (image→image), the inpainting ``mask_image``
    (white = repaint), ``initial_latents`` (B, C, h, w) replacing the seeded noise, and ``prompt_embeds`` =
    (embeds, pooled) replacing the text encoders' output for the positive prompts."""

    image: Image.Image | np.ndarray | torch.Tensor | None = None
    mask_image: Image.Image | np.ndarray | torch.Tensor | None = None
    initial_latents: torch.Tensor | None = None
    prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None
    control_image: object = None
    layouts: Sequence[Layout | None] | None = None
    """Set by the pipeline for the conditioning hooks: each image's layout (``layout_control``), else None."""


@dataclass
class Conditioning:
    """What a conditioning hook adds to one generation (``pipe.conditioning_hooks``; e.g. ControlNets,
    :mod:`workbench.controlnet`): ``kwargs(x, embeds, pooled, timestep)`` gives extra keyword arguments of each
    transformer evaluation (the arguments that evaluation gets: ``x (B, C, h, w)``, ``embeds (B, L, D)``, ``pooled
    (B, P)``, ``timestep (B,)``), and ``parameters`` entries for the images' PNG metadata."""

    kwargs: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], dict[str, Any]]
    parameters: dict[str, object] = field(default_factory=dict)


ConditioningHook = Callable[["GenerationSettings", Inputs, torch.Tensor], "Conditioning | None"]
"""``hook(settings, inputs, sigmas)`` → a :class:`Conditioning` for this generation, or None (nothing to add)."""


@dataclass
class GenerationOutput:
    """``images`` (PIL, each with ``info["parameters"]``), final ``latents`` (B, C, h, w) scaled, the ``seeds`` used,
    per-image ``parameters`` dicts, and the optional ``trajectory`` and ``routing`` records. ``skipped_steps``: the
    sampler evaluations (velocity calls) at which step caching reused the residual (``cache_threshold``);
    ``transformer_evaluations``: the transformer forwards that ran the block stack, for the whole batch."""

    images: list[Image.Image]
    latents: torch.Tensor
    seeds: list[int]
    parameters: list[dict] = field(default_factory=list)
    trajectory: flow.Trajectory | None = None
    routing: RoutingRecord | None = None
    skipped_steps: list[int] = field(default_factory=list)
    transformer_evaluations: int = 0


def _as_list(value: str | Sequence[str] | None, name: str) -> list[str]:
    if value is None:
        return [""]
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value) and len(value) > 0:
        return list(value)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {value!r}")


def image_to_tensor(image: Image.Image | np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """PIL / uint8 array / tensor in [-1, 1] → ``(1, 3, height, width)`` float32 in [-1, 1] (Lanczos resize)."""
    if isinstance(image, torch.Tensor):
        tensor = image.float()
        if tensor.dim() == 3:
            tensor = tensor[None]
        if tensor.shape[-2:] != (height, width):
            tensor = torch.nn.functional.interpolate(tensor, size=(height, width), mode="bicubic", antialias=True)
        return tensor
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL image, a uint8 array or a tensor, got {type(image).__name__}")
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.LANCZOS)
    array = np.array(image).astype(np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None] * 2.0 - 1.0


def _image_size(image: object, name: str) -> tuple[int, int]:
    """``(width, height)`` of a PIL image, an array ``(H, W[, C])`` or a tensor ``(…, H, W)``."""
    if isinstance(image, Image.Image):
        return image.size
    if isinstance(image, np.ndarray) and image.ndim in (2, 3):
        return image.shape[1], image.shape[0]
    if isinstance(image, torch.Tensor) and image.dim() >= 2:
        return image.shape[-1], image.shape[-2]
    raise ValueError(f"{name} must be a PIL image, an array or a tensor, got {type(image).__name__}")


def mask_to_tensor(mask: Image.Image | np.ndarray | torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inpainting mask → ``(1, 1, height, width)`` float32 of 1 (repaint, white) and 0 (keep, black), as diffusers'
    SD3 inpainting mask processor makes it: PIL images (any mode) and uint8 arrays are resized with Lanczos, turned
    grayscale and scaled to [0, 1]; float or bool arrays ``(H, W[, 1])`` and tensors ``(H, W)``, ``(1, H, W)`` or
    ``(1, 1, H, W)`` with values in [0, 1] are resized by nearest neighbour; then values ≥ 0.5 become 1, the rest 0.
    Raises ValueError naming ``mask_image`` for any other input."""
    if isinstance(mask, np.ndarray):
        if mask.dtype == np.uint8:
            mask = Image.fromarray(mask[..., 0] if mask.ndim == 3 and mask.shape[-1] == 1 else mask)
        elif mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.floating):
            if mask.ndim == 3 and mask.shape[-1] == 1:
                mask = mask[..., 0]
            if mask.ndim != 2:
                raise ValueError(f"mask_image arrays must be (H, W) or (H, W, 1), got shape {mask.shape}")
            mask = torch.from_numpy(mask.astype(np.float32))
        else:
            raise ValueError(f"mask_image arrays must be uint8 (0–255), bool or float in [0, 1], got {mask.dtype}")
    if isinstance(mask, Image.Image):
        if mask.size != (width, height):
            mask = mask.resize((width, height), resample=Image.LANCZOS)
        tensor = torch.from_numpy(np.array(mask.convert("L")).astype(np.float32) / 255.0)[None, None]
    elif isinstance(mask, torch.Tensor):
        tensor = mask.detach().float().cpu()
        while tensor.dim() < 4 and (tensor.dim() == 2 or tensor.shape[0] == 1):
            tensor = tensor[None]
        if tensor.dim() != 4 or tensor.shape[:2] != (1, 1):
            raise ValueError(f"mask_image tensors must be (H, W), (1, H, W) or (1, 1, H, W), got {tuple(mask.shape)}")
        low, high = (float(tensor.min()), float(tensor.max())) if tensor.numel() else (0.0, 0.0)
        if not (low >= 0.0 and high <= 1.0):
            raise ValueError(f"mask_image values must be in [0, 1] (1 = repaint), got values in [{low:g}, {high:g}]")
        if tensor.shape[-2:] != (height, width):
            tensor = torch.nn.functional.interpolate(tensor, size=(height, width))
    else:
        raise ValueError(f"mask_image must be a PIL image, an array or a tensor, got {type(mask).__name__}")
    return (tensor >= 0.5).float()


def inpaint_constraint(mask: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor) -> flow.LatentConstraint:
    """diffusers' SD3 inpainting blend (16-channel transformer) as a :data:`flow.LatentConstraint`: after each step,
    ``x = (1 − mask)·known + mask·x`` where ``known`` is the image latent noised to the step's target σ with the start
    noise (the clean latent after the last step, σ = 0). ``mask`` ``(1, 1, h, w)`` is 1 where the image is repainted;
    ``clean`` and ``noise`` are ``(B, C, h, w)``, on the device of the latents."""
    keep = 1.0 - mask

    def constrain(step: int, sigma: float, x: torch.Tensor) -> torch.Tensor:
        known = clean if sigma == 0 else flow.add_noise(clean, noise, sigma)
        return keep * known + mask * x

    return constrain


def chain_constraints(*constraints: flow.LatentConstraint | None) -> flow.LatentConstraint | None:
    """The given constraints applied in order after each step (None ones skipped; None when none is left)."""
    active = [c for c in constraints if c is not None]
    if len(active) <= 1:
        return active[0] if active else None

    def chained(step: int, sigma: float, x: torch.Tensor) -> torch.Tensor:
        for constraint in active:
            x = constraint(step, sigma, x)
        return x

    return chained


def paste_back(
    images: list[Image.Image], image: Image.Image | np.ndarray | torch.Tensor, mask: torch.Tensor, blur: float
) -> list[Image.Image]:
    """Composite each generated image over the start image: ``start·(1 − a) + generated·a`` with ``a`` the pixel
    mask ``(1, 1, H, W)`` (1 = repainted) feathered by a Gaussian blur of radius ``blur`` px (0: a hard edge), so
    the kept pixels are exactly the start image's away from the mask (A1111's inpainting composite)."""
    height, width = mask.shape[-2:]
    start = ((image_to_tensor(image, height, width)[0] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
    alpha = Image.fromarray((mask[0, 0].numpy() * 255).astype(np.uint8))
    if blur > 0:
        alpha = alpha.filter(ImageFilter.GaussianBlur(blur))
    a = (np.asarray(alpha, dtype=np.float32) / 255.0)[..., None]
    out = []
    for generated in images:
        mixed = start * (1 - a) + np.asarray(generated, dtype=np.float32) / 255.0 * a
        out.append(Image.fromarray((mixed * 255).round().clip(0, 255).astype(np.uint8)))
    return out


def tensor_to_images(decoded: torch.Tensor) -> list[Image.Image]:
    """Decoded VAE output ``(B, 3, H, W)`` in [-1, 1] → PIL images (diffusers' rounding)."""
    array = (decoded.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype("uint8")]


class Pipeline:
    """One loaded model: ``transformer`` (MMDiT), ``vae`` (AutoencoderKL), ``text_encoders`` (TextConditioner).

    Call it with a prompt to get images; see :meth:`__call__`. ``device`` and ``dtype`` are where the transformer
    computes; the sampler itself integrates in float32.

    Extensions attach without the pipeline importing them: a module registers a factory in :attr:`extensions`
    (``pipe.<name>`` is then built on first use, e.g. ``pipe.controlnets``) and may append hooks to
    ``conditioning_hooks`` (see :data:`ConditioningHook`).
    """

    extensions: ClassVar[dict[str, Callable[[Pipeline], object]]] = {}

    def __init__(
        self,
        transformer: MMDiT,
        vae: AutoencoderKL,
        text_encoders: TextConditioner,
        name: str = "model",
        defaults: GenerationDefaults | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.transformer = transformer
        self.vae = vae
        self.text_encoders = text_encoders
        self.name = name
        self.defaults = defaults or GenerationDefaults()
        self.device = torch.device(device)
        self.dtype = dtype
        self.loras = LoRASet(self)
        self.conditioning_hooks: list[ConditioningHook] = []
        self.layout_source: LayoutSource | None = None
        """Where ``layout_guidance`` gets each image's layout (:mod:`workbench.layout_guidance`); None: no layouts."""

    def __getattr__(self, name: str) -> object:
        """A registered extension (:attr:`extensions`), built on first access and kept."""
        factory = type(self).extensions.get(name)
        if factory is None or name.startswith("__"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = factory(self)
        setattr(self, name, value)
        return value

    @property
    def num_experts(self) -> int:
        return self.transformer.config.moe_num_experts if self.transformer.config.has_experts else 0

    @property
    def max_image_side(self) -> int:
        config = self.transformer.config
        return config.pos_embed_max_size * config.patch_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_size(self, height: int, width: int) -> None:
        """Raise ValueError unless both sides are positive multiples of 16 that fit the position table."""
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, int) or value <= 0 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {value!r}")
            if value > self.max_image_side:
                raise ValueError(
                    f"{name}={value} exceeds this model's position table (pos_embed_max_size="
                    f"{self.transformer.config.pos_embed_max_size}): at most {self.max_image_side} px"
                )

    def encode_prompts(
        self, prompts: list[str], negatives: list[str] | None, max_sequence_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text conditioning ``(embeds, pooled)``; with ``negatives`` the batch is [negatives; prompts]."""
        texts = (negatives or []) + prompts
        with torch.no_grad():
            embeds, pooled = self.text_encoders.encode(texts, max_sequence_length=max_sequence_length)
        return embeds.to(self.device, self.dtype), pooled.to(self.device, self.dtype)

    def encode_image(self, pixels: torch.Tensor):
        """Pixels ``(1, 3, H, W)`` in [-1, 1] → the VAE posterior; sample it per seed with :meth:`sample_latents`."""
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            return self.vae.encode(pixels.to(self.device, vae_dtype))

    def sample_latents(self, posterior, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents drawn from ``posterior`` with ``generator`` (diffusers' draw order: before the noise)."""
        return self.vae.scale_latents(posterior.sample(generator)).float()

    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        vae_dtype = next(self.vae.parameters()).dtype
        with torch.no_grad():
            decoded = self.vae.decode(self.vae.unscale_latents(latents).to(self.device, vae_dtype))
        return tensor_to_images(decoded)

    def preview(self, latents: torch.Tensor) -> list[Image.Image]:
        """Cheap live preview of scaled latents ``(B, C, h, w)`` through a linear latent→RGB map (the model's
        fitted factors when it has them, else SD3's), at latent resolution."""
        from workbench.models.vae import latent_to_rgb_preview

        d = self.defaults
        factors = torch.tensor(d.latent_rgb_factors) if d.latent_rgb_factors else None
        bias = torch.tensor(d.latent_rgb_bias) if d.latent_rgb_bias else None
        return latent_to_rgb_preview(latents.float().cpu(), factors, bias, as_pil=True)

    def initial_noise(self, seed: int, height: int, width: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = (
            1,
            self.transformer.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = "",
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | Sequence[int] | None = None,
        max_sequence_length: int = 256,
        image: Image.Image | torch.Tensor | None = None,
        strength: float = 0.6,
        mask_image: Image.Image | np.ndarray | torch.Tensor | None = None,
        mask_blur: float | None = None,
        sampler: str | None = None,
        expert_weights: Sequence[float] | dict[int, Sequence[float]] | None = None,
        router_temperature: float = 1.0,
        flow_temperature: float = 1.0,
        dynamic_thresholding_ratio: float | None = None,
        callback: flow.StepCallback | None = None,
        record_trajectory: bool = False,
        record_routing: bool = False,
        shift: float | None = None,
        num_images: int = 1,
        initial_latents: torch.Tensor | None = None,
        prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
        guidance_interval: Sequence[float] | None = None,
        skip_guidance_layers: Sequence[int] | None = None,
        skip_layer_guidance_scale: float = 2.8,
        skip_layer_guidance_start: float = 0.01,
        skip_layer_guidance_stop: float = 0.2,
        cache_threshold: float = 0.0,
        layout_guidance: float | None = None,
        layout_control: float | None = None,
        control_image: object = None,
        controlnet_conditioning_scale: float = 1.0,
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
    ) -> GenerationOutput:
        """Generate images.

        ``prompt`` may be a list (one image each, ``num_images`` per prompt); image i uses ``seed + i`` (a list of
        seeds is used as given; ``None`` draws a random seed, reported in the output). ``image`` switches to
        image→image with diffusers' ``strength`` semantics; ``mask_image`` (the size of ``image``; white = repaint,
        black = keep; see :func:`mask_to_tensor`) makes it inpainting with the semantics of diffusers'
        StableDiffusion3InpaintPipeline: after every step the kept latents are reset to the image's, noised to the
        step's σ (:func:`inpaint_constraint`); the decoded kept pixels are close to, not equal to, the input's,
        unless ``mask_blur`` (px, ≥ 0) pastes the start image back outside the mask, feathered by that radius
        (:func:`paste_back`; A1111's composite, whose default blur is 4).
        ``guidance_scale`` ≤ 1 disables classifier-free guidance. ``initial_latents`` (B, C, h, w) replaces the
        seeded noise (also in the inpainting blend) and ``prompt_embeds`` = (positive embeds, pooled) replaces the
        text encoders' output for the positive prompts (used by frame sequences).
        ``guidance_interval`` (σ_low, σ_high) applies classifier-free guidance only for σ in that range (the model's
        default, else everywhere); the other steps evaluate the positive prompt alone, at half the cost.
        ``skip_guidance_layers`` turns on skip-layer guidance (SD3.5 Medium: [7, 8, 9]) with diffusers' meaning of
        the ``skip_layer_guidance_*`` arguments (scale; start and stop as fractions of the steps); it needs guidance.
        Raises ValueError naming the parameter for any invalid input and :class:`flow.GenerationCancelled` when
        the callback returns ``False``.
        ``control_image`` (one image, or a list with one per ControlNet; resized to the generation size whatever its
        own, as diffusers does) conditions the ControlNets attached with ``pipe.controlnets.load(path)``
        (:mod:`workbench.controlnet`), also in image→image and inpainting: scaled by ``controlnet_conditioning_scale``
        and active for the steps between ``control_guidance_start`` and ``control_guidance_end`` (fractions of the
        steps; diffusers' semantics).
        ``layout_guidance`` (> 0) moves the latents after the first step so that each object's words attend to where
        the prompt's layout puts it (:mod:`workbench.layout_guidance`); it needs ``pipe.layout_source`` (the embedded
        model's reads canonical ShapesWorld captions: :func:`workbench.shapesworld.layout.attach_caption_layouts`).
        ``layout_control`` (> 0) also draws each image's layout as the control image of the layout ControlNet
        (``pipe.controlnets.load_layout(path)``; the embedded model's: ``shapesworld-controlnet-canny``) at that
        scale, for every step; images without a layout get no control.
        """
        given = {name: value for name, value in locals().items() if name in BY_NAME}  # the settings' arguments
        if image is not None and (height is None or width is None):
            given["height"], given["width"] = self._size_of(image, height, width)
        given["negative_prompt"] = _as_list(negative_prompt, "negative_prompt")
        settings = GenerationSettings.resolve(self.defaults, **given)
        prompts = [p for p in _as_list(prompt, "prompt") for _ in range(settings.num_images)]
        inputs = Inputs(image, mask_image, initial_latents, prompt_embeds, control_image)
        return self.generate(prompts, settings, inputs, callback, record_trajectory, record_routing)

    def generate(
        self,
        prompts: list[str],
        settings: GenerationSettings,
        inputs: Inputs | None = None,
        callback: flow.StepCallback | None = None,
        record_trajectory: bool = False,
        record_routing: bool = False,
    ) -> GenerationOutput:
        """:meth:`__call__` on resolved settings: ``prompts`` holds one prompt per image (each prompt repeated
        ``num_images`` times) and ``settings.negative_prompt`` one negative, or one per prompt before repetition."""
        s, inputs = settings, inputs or Inputs()
        negatives = self._negatives(s.negative_prompt, len(prompts), s.num_images)
        self.check_size(s.height, s.width)
        mask = self._check_mask(inputs.image, inputs.mask_image, s.height, s.width)
        if s.mask_blur is not None and mask is None:
            raise ValueError(f"mask_blur must be {BY_NAME['mask_blur'].rule}, got {s.mask_blur:g}")
        self._check_skip_layers(s.skip_guidance_layers)
        seeds = self._seeds(s.seed, len(prompts))
        sigmas = flow.sigma_schedule(s.num_inference_steps, s.shift)
        if inputs.image is not None:
            sigmas = sigmas[flow.img2img_start(s.num_inference_steps, s.strength) :]
        guidance_rule = flow.Guidance(
            s.guidance_scale,
            s.guidance_interval,
            s.skip_guidance_layers,
            s.skip_layer_guidance_scale,
            flow.skip_layer_sigmas(
                sigmas, s.num_inference_steps, s.skip_layer_guidance_start, s.skip_layer_guidance_stop
            ),
        )
        if self.num_experts:
            self.transformer.set_routing(s.expert_weights, s.router_temperature)
        elif s.expert_weights is not None:
            raise ValueError("expert_weights was given but this model has no Mixture-of-Experts layers")
        routing = RoutingRecord() if record_routing and self.num_experts else None
        self.transformer.record_routing(routing)
        trajectory = flow.Trajectory() if record_trajectory else None
        cache = StepCache(s.cache_threshold, always=(float(sigmas[0]), float(sigmas[-2])))
        self.transformer.step_cache = cache
        try:
            latents, clean, noise = self._start_latents(
                seeds, s.height, s.width, inputs.image, sigmas, s.flow_temperature, inputs.initial_latents
            )
            embeds, pooled = self._conditioning(
                prompts, negatives, s.guidance_scale, s.max_sequence_length, inputs.prompt_embeds
            )
            layouts = self._layouts(s, prompts, seeds, embeds.shape[1])
            guide = self._layout_constraint(s.layout_guidance, layouts, embeds, pooled)
            if guide is None and s.layout_guidance:  # no image has a layout: not in the metadata
                s = replace(s, layout_guidance=0.0)
            constraint = chain_constraints(
                guide, inpaint_constraint(mask.to(self.device), clean, noise) if mask is not None else None
            )
            inputs = replace(inputs, layouts=layouts)
            conditionings = self._conditionings(s, inputs, sigmas)
            model_fn = self._model_fn(embeds, pooled, routing, conditionings)
            velocity = cache.velocity(flow.cfg_velocity(model_fn, guidance_rule))
            with torch.no_grad():
                latents = flow.sample(
                    velocity, latents, sigmas, s.sampler, s.dynamic_thresholding_ratio, callback, trajectory,
                    constraint=constraint,
                )  # fmt: skip
            images = self.decode_latents(latents)
            if s.mask_blur is not None:
                pixel_mask = mask_to_tensor(inputs.mask_image, s.height, s.width)
                images = paste_back(images, inputs.image, pixel_mask, s.mask_blur)
        finally:
            self.transformer.step_cache = None
            self.transformer.record_routing(None)
            if self.num_experts:
                self.transformer.set_routing(None, 1.0)
        parameters, loras = [], self.loras.metadata()
        for i, img in enumerate(images):
            params = image_parameters(s, prompts[i], negatives[i], seeds[i], self.name, inputs, mask, loras)
            for conditioning in conditionings:
                params.update(conditioning.parameters)
            img.info["parameters"] = format_parameters(params)
            parameters.append(params)
        return GenerationOutput(
            images, latents, seeds, parameters, trajectory, routing, cache.skipped_steps, cache.computed
        )

    def conditional_velocity(
        self, prompts: list[str], settings: GenerationSettings, seeds: Sequence[int]
    ) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """The velocity a sampler gets for ``prompts`` (one per image, with their ``seeds``) before classifier-free
        guidance: ``v(x (B, C, h, w), σ) → (B, C, h, w)`` float32 on the CPU, the transformer with every
        conditioning ``settings`` switch on (the layout ControlNet on each prompt's layout with ``layout_control``).
        Layout guidance, which moves latents rather than velocities, is not part of it."""
        s = replace(settings, guidance_scale=1.0)
        embeds, pooled = self.encode_prompts(prompts, None, s.max_sequence_length)
        layouts = self._layouts(replace(s, layout_guidance=0.0), prompts, list(seeds), embeds.shape[1])
        sigmas = flow.sigma_schedule(s.num_inference_steps, s.shift)
        model_fn = self._model_fn(embeds, pooled, None, self._conditionings(s, Inputs(layouts=layouts), sigmas))

        @torch.no_grad()
        def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
            timestep = torch.full((x.shape[0],), sigma * flow.NUM_TRAIN_TIMESTEPS, device=self.device)
            return model_fn(x, timestep).float().cpu()

        return velocity

    def _size_of(self, image: object, height: int | None, width: int | None) -> tuple[int, int]:
        """``(height, width)``: the given ones, the missing ones from ``image``'s size rounded down to a multiple
        of 16."""
        w, h = _image_size(image, "image")
        multiple = self.vae_scale_factor * self.transformer.config.patch_size
        return height or h // multiple * multiple, width or w // multiple * multiple

    @staticmethod
    def _negatives(negatives: str | list[str], count: int, num_images: int) -> list[str]:
        """One negative prompt per image: a single one repeated, or one per prompt repeated ``num_images`` times."""
        negatives = [negatives] if isinstance(negatives, str) else negatives
        if len(negatives) == 1:
            return negatives * count
        if len(negatives) * num_images == count:
            return [n for n in negatives for _ in range(num_images)]
        raise ValueError(f"negative_prompt has {len(negatives)} entries but prompt has {count // num_images}")

    def _check_mask(
        self,
        image: Image.Image | np.ndarray | torch.Tensor | None,
        mask_image: Image.Image | np.ndarray | torch.Tensor | None,
        height: int,
        width: int,
    ) -> torch.Tensor | None:
        """The latent-size inpainting mask ``(1, 1, height/8, width/8)`` (1 = repaint; diffusers' nearest-neighbour
        downsampling of :func:`mask_to_tensor`), or None without ``mask_image``. ValueError unless ``image`` is
        given and has the mask's size."""
        if mask_image is None:
            return None
        if image is None:
            raise ValueError("mask_image needs image: inpainting repaints the white part of mask_image in image")
        mask_size, image_size = _image_size(mask_image, "mask_image"), _image_size(image, "image")
        if mask_size != image_size:
            raise ValueError(
                "mask_image must have the size of image: mask_image is {}x{}, image is {}x{}".format(
                    *mask_size, *image_size
                )
            )
        factor = self.vae_scale_factor
        mask = mask_to_tensor(mask_image, height, width)
        return torch.nn.functional.interpolate(mask, size=(height // factor, width // factor))

    def _check_skip_layers(self, layers: Sequence[int]) -> None:
        """ValueError unless every skip-layer index names a block of this transformer."""
        depth = len(self.transformer.transformer_blocks)
        if any(not 0 <= i < depth for i in layers):
            raise ValueError(
                f"skip_guidance_layers must be a non-empty list of block indices in [0, {depth - 1}], "
                f"got {list(layers)!r}"
            )

    @staticmethod
    def _seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
        if seed is None or (isinstance(seed, int) and seed < 0):
            seed = random.randint(0, MAX_SEED)
        if isinstance(seed, int):
            if seed + count - 1 > MAX_SEED:
                raise ValueError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
            return [seed + i for i in range(count)]
        seeds = [int(s) for s in seed]
        if len(seeds) != count:
            raise ValueError(f"seed lists {len(seeds)} seeds for {count} images")
        if any(not 0 <= s <= MAX_SEED for s in seeds):
            raise ValueError(f"every seed must be between 0 and {MAX_SEED}, got {seeds}")
        return seeds

    def _start_latents(
        self,
        seeds: list[int],
        height: int,
        width: int,
        image: Image.Image | torch.Tensor | None,
        sigmas: torch.Tensor,
        flow_temperature: float,
        initial_latents: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Starting latents, clean image latents (None without ``image``) and noise, each ``(count, C, h, w)`` on the
        pipeline's device: per image, its seed's generator draws the VAE posterior sample (image→image) and then the
        noise, which is scaled by ``flow_temperature`` and mixed with the clean latent at ``sigmas[0]``."""
        factor, count = self.vae_scale_factor, len(seeds)
        shape = (1, self.transformer.config.in_channels, height // factor, width // factor)
        if initial_latents is not None and tuple(initial_latents.shape) != (count, *shape[1:]):
            raise ValueError(
                f"initial_latents must have shape {(count, *shape[1:])}, got {tuple(initial_latents.shape)}"
            )
        posterior = self.encode_image(image_to_tensor(image, height, width)) if image is not None else None
        start, cleans, noises = [], [], []
        for i, seed in enumerate(seeds):
            generator = torch.Generator("cpu").manual_seed(seed)
            clean = self.sample_latents(posterior, generator).cpu() if posterior is not None else None
            if initial_latents is not None:
                noise = initial_latents[i : i + 1].float().cpu()
            else:
                noise = torch.randn(shape, generator=generator, dtype=torch.float32)
            noise = noise * flow_temperature
            start.append(noise if clean is None else flow.add_noise(clean, noise, float(sigmas[0])))
            cleans.append(clean)
            noises.append(noise)
        clean_latents = torch.cat(cleans).to(self.device) if posterior is not None else None
        return torch.cat(start).to(self.device), clean_latents, torch.cat(noises).to(self.device)

    def _conditioning(
        self,
        prompts: list[str],
        negatives: list[str],
        guidance: float,
        max_sequence_length: int,
        prompt_embeds: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        use_cfg = guidance > 1.0
        if prompt_embeds is None:
            return self.encode_prompts(prompts, negatives if use_cfg else None, max_sequence_length)
        embeds, pooled = (t.to(self.device, self.dtype) for t in prompt_embeds)
        if not use_cfg:
            return embeds, pooled
        neg_embeds, neg_pooled = self.encode_prompts(negatives, None, max_sequence_length)
        return torch.cat([neg_embeds, embeds]), torch.cat([neg_pooled, pooled])

    def _layouts(
        self, s: GenerationSettings, prompts: list[str], seeds: list[int], sequence_length: int
    ) -> list[Layout | None] | None:
        """Each image's layout from the layout source when layout guidance or layout control is on (else None);
        ValueError when they are asked for without a layout source."""
        if not (s.layout_guidance or s.layout_control):
            return None
        if self.layout_source is None:
            asked = "layout_guidance" if s.layout_guidance else "layout_control"
            raise ValueError(
                f"{asked}={getattr(s, asked):g} needs a layout source for the prompts (pipe.layout_source); this "
                "model has none (the embedded model's: workbench.shapesworld.layout.attach_caption_layouts(pipe)); "
                "use 0"
            )
        return self.layout_source(prompts, seeds, s.height, s.width, sequence_length)

    def _layout_constraint(
        self,
        strength: float,
        layouts: list[Layout | None] | None,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
    ) -> flow.LatentConstraint | None:
        """Layout guidance's constraint for this batch (None when off)."""
        if strength == 0 or layouts is None:
            return None
        positive = slice(embeds.shape[0] - len(layouts), None)
        return layout_constraint(self.transformer, layouts, embeds[positive], pooled[positive], strength)

    def _conditionings(self, settings: GenerationSettings, inputs: Inputs, sigmas: torch.Tensor) -> list[Conditioning]:
        """The conditioning hooks' contributions to this generation; ValueError for a ``control_image`` that none
        of them takes."""
        conditionings = [c for hook in self.conditioning_hooks if (c := hook(settings, inputs, sigmas)) is not None]
        if inputs.control_image is not None and not conditionings:
            raise ValueError("control_image needs a ControlNet: attach one with pipe.controlnets.load(path)")
        if settings.layout_control and not any("layout_controlnet" in c.parameters for c in conditionings):
            raise ValueError(
                f"layout_control={settings.layout_control:g} needs a layout ControlNet: attach one with "
                "pipe.controlnets.load_layout(path) (the embedded model's: attach_caption_layouts(pipe)); use 0"
            )
        return conditionings

    def _model_fn(
        self,
        embeds: torch.Tensor,
        pooled: torch.Tensor,
        routing: RoutingRecord | None,
        conditionings: Sequence[Conditioning] = (),
    ):
        """The transformer as :data:`flow.ModelFn`. The routing record's step is the model-evaluation index (the
        sampler step for euler and dpmpp_2m; two evaluations per step for heun); skip-layer passes are not recorded,
        and a positive-only pass (outside the guidance interval) runs the whole [negative; positive] batch while
        routing is recorded, so that every recorded step has the same batch."""
        step = {"n": 0}

        def transformer(x: torch.Tensor, e: torch.Tensor, p: torch.Tensor, t: torch.Tensor, **kwargs) -> torch.Tensor:
            for conditioning in conditionings:
                kwargs.update(conditioning.kwargs(x, e, p, t))
            return self.transformer(x, e, p, t, **kwargs)

        def model_fn(
            x: torch.Tensor, timestep: torch.Tensor, positive_only: bool = False, skip_layers: Sequence[int] = ()
        ) -> torch.Tensor:
            x, timestep = x.to(self.device, self.dtype), timestep.to(self.device)
            if skip_layers:
                self.transformer.record_routing(None)
                try:
                    first = embeds.shape[0] - x.shape[0]
                    out = transformer(x, embeds[first:], pooled[first:], timestep, skip_layers=skip_layers)
                    return out.float()
                finally:
                    self.transformer.record_routing(routing)
            if routing is not None:
                routing.step = step["n"]
                step["n"] += 1
            first = embeds.shape[0] - x.shape[0] if positive_only else 0  # the positive rows come last
            if first and routing is not None:
                both = transformer(torch.cat([x, x]), embeds, pooled, timestep.repeat(2)).float()
                return both[first:]
            return transformer(x, embeds[first:], pooled[first:], timestep).float()

        return model_fn


def image_parameters(
    settings: GenerationSettings,
    prompt: str,
    negative_prompt: str,
    seed: int,
    model: str,
    inputs: Inputs,
    mask: torch.Tensor | None,
    loras: str | None = None,
) -> dict[str, object]:
    """One image's ``parameters`` (the keys of :func:`workbench.metadata.format_parameters`): the settings that
    made it, with the ones at their neutral value (no effect) left out as ``None``."""
    s = settings
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": s.num_inference_steps,
        "sampler": s.sampler,
        "guidance_scale": s.guidance_scale,
        "seed": seed,
        "height": s.height,
        "width": s.width,
        "model": model,
        "shift": s.shift,
        "strength": s.strength if inputs.image is not None else None,
        "mask_size": "{}x{}".format(*_image_size(inputs.mask_image, "mask_image")) if mask is not None else None,
        "mask_coverage": round(float(mask.mean()), 4) if mask is not None else None,
        "mask_blur": s.mask_blur,
        "flow_temperature": s.flow_temperature if s.flow_temperature != 1.0 else None,
        "dynamic_thresholding_ratio": s.dynamic_thresholding_ratio,
        "expert_weights": _jsonable(s.expert_weights),
        "router_temperature": s.router_temperature if s.router_temperature != 1.0 else None,
        "max_sequence_length": s.max_sequence_length if s.max_sequence_length != 256 else None,
        "guidance_interval": list(s.guidance_interval) if s.guidance_interval != (0.0, 1.0) else None,
        "loras": loras,
        "cache_threshold": s.cache_threshold or None,
        "layout_guidance": s.layout_guidance or None,
        "layout_control": s.layout_control or None,
        **_skip_layer_parameters(
            s.skip_guidance_layers, s.skip_layer_guidance_scale, s.skip_layer_guidance_start, s.skip_layer_guidance_stop
        ),
    }


def _skip_layer_parameters(layers: tuple[int, ...], scale: float, start: float, stop: float) -> dict[str, object]:
    """The metadata entries of skip-layer guidance (none when it is off)."""
    if not layers:
        return {}
    return {
        "skip_guidance_layers": list(layers),
        "skip_layer_guidance_scale": scale,
        "skip_layer_guidance_start": start,
        "skip_layer_guidance_stop": stop,
    }


def _jsonable(weights: object) -> object:
    if weights is None:
        return None
    if isinstance(weights, dict):
        return {str(k): [float(x) for x in v] for k, v in weights.items()}
    return [float(x) for x in weights]
