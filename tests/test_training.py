"""The ShapesWorld trainer on a micro config: losses fall, checkpoints resume, the result exports and loads."""

import json

import pytest
import torch

from workbench import load_pipeline
from workbench.loading import EMBEDDED_MODEL
from workbench.shapesworld.export import LAYOUT_DEFAULTS, export_run
from workbench.shapesworld.model import ShapesWorldSpec
from workbench.shapesworld.train import (
    TrainConfig,
    _fit_steps_to_budget,
    load_trained_vae,
    seed_run_from_model,
    step_batches,
    train_transformer,
    train_vae,
)


def _losses(path, key):
    return [json.loads(line)[key] for line in path.read_text().splitlines() if key in json.loads(line)]


def test_micro_training_learns_resumes_and_exports(tmp_path, monkeypatch):
    from workbench.shapesworld import train

    calibrate = train.calibrate_latent_scale  # the latent scale from 2 batches of 32 images instead of 8: enough here
    monkeypatch.setattr(train, "calibrate_latent_scale", lambda vae, config: calibrate(vae, config, batches=2))
    spec = ShapesWorldSpec.micro()
    run = tmp_path / "run"
    vae_config = TrainConfig(steps=20, batch_size=8, lr=3e-3, warmup=5, checkpoint_every=10, threads=1)
    train_vae(run, spec, vae_config, progress=False)
    rec = _losses(run / "vae_log.jsonl", "rec")
    assert sum(rec[-5:]) / 5 < 0.8 * sum(rec[:5]) / 5

    config = TrainConfig(steps=30, batch_size=8, lr=2e-3, warmup=5, checkpoint_every=15, threads=1)
    vae = load_trained_vae(run, spec, config)
    train_transformer(run, spec, TrainConfig(**{**config.__dict__, "steps": 15}), vae, progress=False)
    assert json.loads((run / "transformer.json").read_text())["step"] == 15
    train_transformer(run, spec, config, vae, progress=False)
    losses = _losses(run / "transformer_log.jsonl", "loss")
    assert len(losses) == 30, "the second call resumes at step 15 instead of starting again"
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    aux = _losses(run / "transformer_log.jsonl", "aux")
    assert all(a >= 0.99 for a in aux), "Switch loss E·Σ f·P is at least 1"
    lines = [json.loads(line) for line in (run / "transformer_log.jsonl").read_text().splitlines()]
    timing = [row for row in lines if "data_wait" in row]
    assert sum(row["steps"] for row in timing) == 30, "every step is timed once"
    assert all(0 <= row["data_wait"] <= row["seconds"] for row in timing)

    folder = export_run(run, tmp_path / "model", spec, num_inference_steps=3)
    recorded = json.loads((folder / "model_index.json").read_text())["workbench"]
    shipped = json.loads((EMBEDDED_MODEL / "model_index.json").read_text())["workbench"]
    assert {key: recorded[key] for key in LAYOUT_DEFAULTS} == {key: shipped[key] for key in LAYOUT_DEFAULTS}
    with pytest.warns(UserWarning, match="layout ControlNet '../shapesworld-controlnet-canny' is missing"):
        pipe = load_pipeline(folder)  # the shipped ControlNet sits beside models/shapesworld-moe, not beside tmp
    assert pipe.num_experts == spec.num_experts and pipe.defaults.num_inference_steps == 3
    out = pipe("a red circle at the center on a white background", seed=0, height=96, width=96)
    assert out.images[0].size == (96, 96)
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    # A run seeded from the exported folder resumes the schedule at the step the folder records.
    assert json.loads((folder / "model_index.json").read_text())["workbench"]["training_step"] == 30
    assert seed_run_from_model(folder, tmp_path / "seeded") == 30
    assert json.loads((tmp_path / "seeded" / "transformer.json").read_text())["step"] == 30


def test_batches_do_not_depend_on_the_number_of_rendering_workers():
    config = TrainConfig(batch_size=2, data_workers=0)
    inline = step_batches(7, config)
    expected = [next(inline) for _ in range(5)]
    rendered = step_batches(7, TrainConfig(batch_size=2, data_workers=2))
    for images, captions in expected:
        got_images, got_captions = next(rendered)
        assert got_captions == captions
        assert torch.equal(got_images, images)
    from workbench.shapesworld.train import train_batches

    inline = train_batches(7, TrainConfig(batch_size=3, renderer="torch"))
    sampled = train_batches(7, TrainConfig(batch_size=3, renderer="torch", data_workers=2))
    for _ in range(3):
        a, b = next(inline), next(sampled)
        assert a.captions == b.captions
        assert torch.equal(a.images, b.images) and torch.equal(a.coverage, b.coverage)


def test_time_budget_fits_the_schedule_to_the_measured_speed():
    config = TrainConfig(steps=10_000, time_budget=100.0)
    # 30 steps took 10 s → 3 s/step → 90 s left reach 270 more steps.
    assert _fit_steps_to_budget(config, start=0, step=30, elapsed=10.0) == 300
    assert _fit_steps_to_budget(config, start=0, step=30, elapsed=150.0) == 31


def test_binding_terms_train_and_are_logged(tmp_path):
    from workbench.models.vae import AutoencoderKL
    from workbench.shapesworld.train import batch_scenes, train_batches

    spec = ShapesWorldSpec.micro()
    torch.manual_seed(0)
    vae = AutoencoderKL(spec.vae_config()).eval().requires_grad_(False)
    config = TrainConfig(
        steps=20,
        batch_size=8,
        lr=3e-3,
        warmup=2,
        checkpoint_every=20,
        threads=1,
        two_object_share=1.0,
        token_loss_weight=5.0,
        negative_loss_weight=1.0,
    )
    train_transformer(tmp_path, spec, config, vae, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "transformer_log.jsonl").read_text().splitlines()]
    token = [row["token"] for row in lines if "token" in row]
    negative = [row["negative"] for row in lines if "negative" in row]
    assert len(token) == len(negative) == 20
    assert all(0 <= value <= 1 for value in token)
    assert sum(token[-5:]) / 5 < 0.9 * sum(token[:5]) / 5, "the attention moves onto each object's mask"
    assert any(value > 0 for value in negative)
    assert [row["run"]["images"] for row in lines if "run" in row] == [160]
    # The torch renderer draws the scenes (and captions) of the PIL batches of the same step.
    batch = next(train_batches(3, TrainConfig(batch_size=4)))
    assert batch.captions == [s.caption for s in batch_scenes(3, TrainConfig(batch_size=4))]
    assert batch.captions == next(step_batches(3, TrainConfig(batch_size=4)))[1]
    assert batch.coverage.shape[:2] == (4, 2)
