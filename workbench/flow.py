"""Rectified flow: sigma schedules, samplers, guidance helpers and the trajectory record.

Time convention (SD3, diffusers, minRF): ``sigma = t ∈ [0, 1]``, 1 is pure noise;
``x_t = (1 − t)·x_data + t·noise``; the network predicts ``v = noise − x_data``; the predicted clean latent is
``x̂0 = x_t − t·v``. The network sees ``timestep = 1000·sigma``. Latents are ``(B, C, h, w)`` float tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

NUM_TRAIN_TIMESTEPS = 1000
SAMPLERS = ("euler", "heun", "dpmpp_2m")

VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]
StepCallback = Callable[[int, float, torch.Tensor], "bool | None"]
LatentConstraint = Callable[[int, float, torch.Tensor], torch.Tensor]
"""``constraint(step, σ_next, x) → x``: rewrites the latents ``x`` (B, C, h, w) that step ``step`` reached at
``σ_next`` (inpainting puts the known region back, noised to ``σ_next``); the sampler continues from its result."""


class GenerationCancelled(RuntimeError):
    """Raised when a step callback returns ``False``."""


def shift_sigma(sigma: torch.Tensor | float, shift: float) -> torch.Tensor | float:
    """SD3 timestep shift ``s·t / (1 + (s − 1)·t)``."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_schedule(num_steps: int, shift: float = 3.0) -> torch.Tensor:
    """Sigmas ``(num_steps + 1,)`` from 1 down to 0, as diffusers' FlowMatchEulerDiscreteScheduler(shift) makes them.

    The unshifted grid runs linearly from 1 to the scheduler's smallest training sigma (itself already shifted),
    then the shift is applied and a final 0 appended.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_steps!r}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    train = torch.linspace(1, NUM_TRAIN_TIMESTEPS, NUM_TRAIN_TIMESTEPS, dtype=torch.float32) / NUM_TRAIN_TIMESTEPS
    sigma_min = float(shift_sigma(train[0], shift))
    grid = torch.linspace(NUM_TRAIN_TIMESTEPS, sigma_min * NUM_TRAIN_TIMESTEPS, num_steps, dtype=torch.float64)
    sigmas = shift_sigma(grid.numpy() / NUM_TRAIN_TIMESTEPS, shift)
    return torch.cat([torch.from_numpy(sigmas).float(), torch.zeros(1)])


def img2img_start(num_steps: int, strength: float) -> int:
    """Index of the first sigma used by image→image with diffusers' strength semantics."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    start = int(max(num_steps - min(num_steps * strength, num_steps), 0))
    if start >= num_steps:
        raise ValueError(f"strength={strength} with num_inference_steps={num_steps} leaves no step to run")
    return start


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``x_σ = (1 − σ)·clean + σ·noise``."""
    return sigma * noise + (1.0 - sigma) * clean


def threshold_x0(x0: torch.Tensor, ratio: float) -> torch.Tensor:
    """Dynamic thresholding: clamp each sample's predicted clean latent to its ``ratio`` quantile of ``|x̂0|``."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"dynamic_thresholding_ratio must be in (0, 1], got {ratio}")
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    limit = torch.quantile(flat, ratio, dim=1).clamp_min(1e-6).to(x0.dtype).view(-1, *[1] * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, limit), -limit)


@dataclass
class Trajectory:
    """Per-step record of a sampling run (CPU float32): ``latents`` x_t entering the step, the guided
    ``velocities`` v, the predicted clean latents ``x0`` = x_t − σ·v, and the ``sigmas`` of each step.
    ``final`` holds the sampler's output latent."""

    sigmas: list[float] = field(default_factory=list)
    latents: list[torch.Tensor] = field(default_factory=list)
    velocities: list[torch.Tensor] = field(default_factory=list)
    x0: list[torch.Tensor] = field(default_factory=list)
    final: torch.Tensor | None = None

    def add(self, sigma: float, x: torch.Tensor, v: torch.Tensor, x0: torch.Tensor) -> None:
        self.sigmas.append(float(sigma))
        for store, value in ((self.latents, x), (self.velocities, v), (self.x0, x0)):
            store.append(value.detach().float().cpu())

    def straightness(self) -> torch.Tensor:
        """Per-sample ``S = Σ_i Δσ_i · ‖(x̂_noise − x̂0_final) − v_i‖² / dim``, the discrete form of
        ``E∫‖(x1 − x0) − v(x_t, t)‖² dt`` with x1 the initial noise and x0 the final latent. 0 for a straight path."""
        if self.final is None or not self.latents:
            raise ValueError("straightness needs a finished trajectory")
        start, end = self.latents[0], self.final.float().cpu()
        sigma0 = self.sigmas[0]
        chord = (start - end) / sigma0
        sigmas = self.sigmas + [0.0]
        total = torch.zeros(start.shape[0])
        for i, v in enumerate(self.velocities):
            total += (sigmas[i] - sigmas[i + 1]) * (chord - v).pow(2).flatten(1).mean(1)
        return total


def _predict(
    velocity_fn: VelocityFn, x: torch.Tensor, sigma: float, ratio: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity and predicted clean latent at ``(x, σ)``; dynamic thresholding rewrites both consistently."""
    v = velocity_fn(x, sigma)
    x0 = x - sigma * v
    if ratio is not None and sigma > 0:
        x0 = threshold_x0(x0, ratio)
        v = (x - x0) / sigma
    return v, x0


def sample(
    velocity_fn: VelocityFn,
    latents: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str = "euler",
    dynamic_thresholding_ratio: float | None = None,
    callback: StepCallback | None = None,
    trajectory: Trajectory | None = None,
    constraint: LatentConstraint | None = None,
) -> torch.Tensor:
    """Integrate the flow from ``sigmas[0]`` to ``sigmas[-1]`` (normally 0).

    ``velocity_fn(x, σ)`` returns the (guided) velocity. ``euler`` takes one model evaluation per step; ``heun``
    two (the last step is Euler, as σ = 0 needs no correction); ``dpmpp_2m`` one, second-order multistep in
    log-SNR. ``constraint(step, σ_next, x)`` (see :data:`LatentConstraint`) rewrites the latents after each whole
    step, before the callback and the trajectory see them. ``callback(step, σ, x)`` runs after each step; returning
    ``False`` raises :class:`GenerationCancelled`. Computation is in float32 whatever the model dtype.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    x = latents.float()
    sig = [float(s) for s in sigmas]
    previous_x0: torch.Tensor | None = None
    previous_h: float | None = None
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        v, x0 = _predict(velocity_fn, x, s, dynamic_thresholding_ratio)
        v, x0 = v.float(), x0.float()
        if trajectory is not None:
            trajectory.add(s, x, v, x0)
        if sampler == "heun" and s_next > 0:
            x_euler = x + (s_next - s) * v
            v2, _ = _predict(velocity_fn, x_euler, s_next, dynamic_thresholding_ratio)
            x = x + (s_next - s) * 0.5 * (v + v2.float())
        elif sampler == "dpmpp_2m" and s_next > 0:
            h = _log_snr(s_next) - _log_snr(s)
            x0_used = x0
            if previous_x0 is not None and previous_h is not None and math.isfinite(previous_h):
                r = previous_h / h
                x0_used = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
            x = (s_next / s) * x + ((1 - s_next) - s_next * (1 - s) / s) * x0_used
            previous_x0, previous_h = x0, h
        else:
            x = x + (s_next - s) * v
        if constraint is not None:
            x = constraint(i, s_next, x).float()
        if callback is not None and callback(i, s, x) is False:
            raise GenerationCancelled(f"generation cancelled at step {i + 1} of {len(sig) - 1}")
    if trajectory is not None:
        trajectory.final = x.detach().cpu()
    return x


def _log_snr(sigma: float) -> float:
    """``λ = log((1 − σ)/σ)``; −inf at σ = 1."""
    return math.log(1 - sigma) - math.log(sigma) if sigma < 1 else -math.inf


ModelFn = Callable[..., torch.Tensor]
"""``model_fn(x_batch, timestep_batch, positive_only=False, skip_layers=())``: the network's velocity. The batch
holds [negative; positive] images (diffusers' order) or, with ``positive_only``, the positive ones alone;
``skip_layers`` names transformer blocks to bypass (skip-layer guidance)."""


@dataclass(frozen=True)
class Guidance:
    """How the predictions are combined into the velocity the sampler follows.

    ``scale``: classifier-free guidance ``v_neg + scale·(v_pos − v_neg)``; ≤ 1 means the positive prediction alone.
    ``interval`` (σ_low, σ_high): guidance only for σ in that closed range; elsewhere the positive prediction alone
    (one network call on half the batch). Kynkäänniemi et al. 2024, "Applying guidance in a limited interval".
    ``skip_layers``, ``skip_layer_scale``, ``skip_layer_sigmas``: skip-layer guidance (SD3.5): at the listed σ values
    the guided velocity gains ``skip_layer_scale·(v_pos − v_skip)``, ``v_skip`` the positive prediction with those
    blocks bypassed — diffusers' ``skip_guidance_layers`` (which applies only together with classifier-free guidance).
    """

    scale: float
    interval: tuple[float, float] = (0.0, 1.0)
    skip_layers: tuple[int, ...] = ()
    skip_layer_scale: float = 0.0
    skip_layer_sigmas: frozenset[float] = field(default_factory=frozenset)

    @property
    def uses_cfg(self) -> bool:
        return self.scale > 1.0

    def cfg_at(self, sigma: float) -> bool:
        return self.uses_cfg and self.interval[0] <= sigma <= self.interval[1]

    def skip_layers_at(self, sigma: float) -> bool:
        active = bool(self.skip_layers) and self.skip_layer_scale != 0
        return self.uses_cfg and active and sigma in self.skip_layer_sigmas


def skip_layer_sigmas(sigmas: torch.Tensor, num_steps: int, start: float, stop: float) -> frozenset[float]:
    """The σ values of ``sigmas`` (one per sampler step, last one 0 excluded) at which diffusers applies skip-layer
    guidance: step i with ``start·num_steps < i < stop·num_steps``, i counted along ``sigmas``."""
    steps = [float(s) for s in sigmas[:-1]]
    return frozenset(s for i, s in enumerate(steps) if start * num_steps < i < stop * num_steps)


def cfg_velocity(model_fn: ModelFn, guidance: Guidance | float) -> VelocityFn:
    """Wrap ``model_fn`` (see :data:`ModelFn`) into ``velocity_fn(x, σ)`` following ``guidance`` (a
    :class:`Guidance` or a plain classifier-free guidance scale)."""
    if not isinstance(guidance, Guidance):
        guidance = Guidance(float(guidance))

    def call(batch: torch.Tensor, sigma: float, **kwargs) -> torch.Tensor:
        timestep = (torch.tensor(sigma, dtype=torch.float32) * NUM_TRAIN_TIMESTEPS).expand(batch.shape[0])
        return model_fn(batch, timestep, **kwargs)

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        if not guidance.cfg_at(sigma):
            return call(x, sigma, positive_only=guidance.uses_cfg)
        negative, positive = call(torch.cat([x, x]), sigma).chunk(2)
        guided = negative + guidance.scale * (positive - negative)
        if guidance.skip_layers_at(sigma):
            skipped = call(x, sigma, positive_only=True, skip_layers=guidance.skip_layers)
            guided = guided + guidance.skip_layer_scale * (positive - skipped)
        return guided

    return velocity
