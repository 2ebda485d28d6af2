"""Turning a training run into the shipped model folder (diffusers layout, float16 weights, measured defaults)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from workbench.loading import EMBEDDED_MODEL, read_json, save_pipeline
from workbench.models.vae import fit_latent_rgb_factors
from workbench.pipeline import Pipeline
from workbench.shapesworld.model import ShapesWorldSpec
from workbench.shapesworld.train import TrainConfig, load_ema_pipeline
from workbench.shapesworld.world import make_batch


@torch.no_grad()
def fit_preview(pipe: Pipeline, batches: int = 4) -> None:
    """Fit the linear latent→RGB preview of this VAE and store it in the pipeline's defaults."""
    latents, images = [], []
    for i in range(batches):
        batch, _ = make_batch(20_000_000 + i, 16, 128, 128, caption_style="any")
        latents.append(pipe.vae.scale_latents(pipe.vae.encode(batch).mode()))
        images.append(batch)
    matrix, bias = fit_latent_rgb_factors(torch.cat(latents), torch.cat(images), ridge=1e-3)
    pipe.defaults.latent_rgb_factors = matrix.tolist()
    pipe.defaults.latent_rgb_bias = bias.tolist()


LAYOUT_DEFAULTS = ("layout_guidance", "layout_control", "layout_controlnet")
"""The generation defaults of planned layouts, which a new export keeps from an existing model folder."""


def export_run(
    run: Path,
    out: Path = EMBEDDED_MODEL,
    spec: ShapesWorldSpec | None = None,
    layouts_from: Path | None = EMBEDDED_MODEL,
    **defaults: object,
) -> Path:
    """Write the EMA weights of ``run`` (at the sizes of ``spec``, default: those the run records) as a model folder
    at ``out`` (replacing it); ``defaults`` override the generation defaults (steps, guidance, shift …) recorded in
    ``model_index.json``, beside the transformer's training step (``training_step``, where ``train --init-from``
    resumes the schedule). The planned-layout defaults (:data:`LAYOUT_DEFAULTS`) are those of the model folder
    ``layouts_from`` (the shipped model's: a new export keeps its planned layouts; the ControlNet path is relative to
    the model folder, so it resolves once the export replaces the shipped one); None leaves them off."""
    spec = spec or ShapesWorldSpec.for_run(run)
    inherited = {}
    if layouts_from is not None:
        recorded = read_json(layouts_from / "model_index.json").get("workbench", {})
        inherited = {key: recorded[key] for key in LAYOUT_DEFAULTS if key in recorded}
    pipe = load_ema_pipeline(run, spec, TrainConfig())
    for key, value in {**inherited, **defaults}.items():
        if value is not None:
            setattr(pipe.defaults, key, value)
    fit_preview(pipe)
    staging = out.with_name(out.name + ".tmp")
    if staging.exists():
        shutil.rmtree(staging)
    step = json.loads((run / "transformer.json").read_text())["step"]
    save_pipeline(pipe, staging, extra={"name": pipe.name, "training_step": step}, weight_dtype=torch.float16)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def folder_size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
