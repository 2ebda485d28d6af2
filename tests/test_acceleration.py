"""Acceleration (workbench.acceleration): the one switch's decisions and fallbacks on the CPU, compiled vs eager
outputs on tiny models, the fp8 code path (with a stand-in torchao where the real one cannot run on the CPU), and
step caching skipping the ControlNets of a skipped evaluation."""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from tiny_sd3 import random_shapesworld

from workbench import acceleration
from workbench.acceleration import accelerate_pipeline, check_switch, fp8_filter, fp8_support
from workbench.controlnet import LazyControls
from workbench.models.controlnet import ControlNetConfig, SD3ControlNet
from workbench.models.mmdit import MMDiT, MMDiTConfig

SIZE, STEPS = 64, 8
TINY = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8, num_attention_heads=4,
            joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=64, out_channels=16,
            pos_embed_max_size=16)  # fmt: skip


def _noisy(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return module.eval().requires_grad_(False)


def _run(pipe, **kwargs):
    return pipe("a red circle", seed=3, num_inference_steps=STEPS, height=SIZE, width=SIZE, **kwargs)


# ------------------------------------------------------------------------------------------------ switch and rules


def test_switch_values():
    assert check_switch("auto", "compile") == "auto"
    assert check_switch(True, "compile") is True
    assert check_switch("off", "fp8") is False and check_switch("ON", "fp8") is True
    with pytest.raises(ValueError, match=r"fp8 must be True, False or 'auto'.*'maybe'"):
        check_switch("maybe", "fp8")
    with pytest.raises(ValueError, match="compile must be"):
        check_switch(1.5, "compile")


def test_auto_on_the_cpu_compiles_nothing_and_says_why():
    pipe = random_shapesworld()
    report = accelerate_pipeline(pipe)
    assert report.compiled == [] and not report.fp8 and report.fp8_layers == 0
    assert report.compile_reason == acceleration.cpu_compile_pays(pipe.dtype)[1]
    assert "auto: not on the CPU" in report.compile_reason
    assert "compute capability ≥ 8.9" in report.fp8_reason and "cpu" in report.fp8_reason
    assert pipe.acceleration is report
    assert "compile: off" in report.summary() and "fp8: off" in report.summary()
    with pytest.raises(ValueError, match="already accelerated"):
        accelerate_pipeline(pipe)
    # nothing changed: the transformer is still the plain module
    assert not any(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl for block in
                   pipe.transformer.transformer_blocks)  # fmt: skip


def test_asking_for_what_cannot_run_is_an_error_naming_the_reason():
    pipe = random_shapesworld()
    with pytest.raises(ValueError, match=r"fp8=True: fp8 matmuls need a CUDA card with compute capability ≥ 8\.9"):
        accelerate_pipeline(pipe, compile=False, fp8=True)
    with pytest.raises(ValueError, match="mode must be one of"):
        accelerate_pipeline(pipe, compile=True, mode="fastest")
    assert getattr(pipe, "acceleration", None) is None  # a refused call leaves the pipeline as it was


def test_fp8_fallback_reasons(monkeypatch):
    assert fp8_support(torch.device("cpu")) == (
        False,
        "fp8 matmuls need a CUDA card with compute capability ≥ 8.9 (Ada, Hopper); this is cpu",
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert fp8_support(torch.device("cuda")) == (
        False,
        "NVIDIA A100 has compute capability 8.0; fp8 matmuls need ≥ 8.9",
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)  # an import of torchao now fails
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    ok, reason = fp8_support(torch.device("cuda"))
    assert not ok and reason.startswith("torchao is not installed")


def test_load_pipeline_passes_the_switch_through():
    from workbench import load_pipeline

    pipe = load_pipeline(compile="auto", fp8="auto")
    assert pipe.acceleration.compiled == [] and not pipe.acceleration.fp8
    report = load_pipeline(compile=False).acceleration  # the default fp8 is off: it changes the numbers
    assert report.compile_reason == "off (compile=False)" and report.fp8_reason == "off (fp8=False)"
    with pytest.raises(ValueError, match="compile must be"):
        load_pipeline(compile="sometimes")


# -------------------------------------------------------------------------------------------------------------- fp8


def test_fp8_filter_keeps_modulation_and_embedders():
    model = MMDiT(MMDiTConfig.from_dict(TINY))
    chosen = [name for name, module in model.named_modules() if fp8_filter(module, name)]
    assert chosen and all(name.startswith("transformer_blocks.") for name in chosen)
    assert not any(".norm" in name for name in chosen)
    assert "transformer_blocks.0.attn.to_q" in chosen and "transformer_blocks.0.ff.net.2" in chosen or chosen


def test_fp8_code_path_with_a_stand_in_torchao(monkeypatch):
    """The real torchao refuses float8 on the CPU (it asserts compute capability ≥ 8.9), so the path is run with a
    stand-in that records what it was asked to quantize."""
    calls = []

    def quantize_(model, config, filter_fn=None):
        calls.append((config, [n for n, m in model.named_modules() if filter_fn is None or filter_fn(m, n)]))

    fake = types.ModuleType("torchao.quantization")
    fake.quantize_ = quantize_
    fake.PerRow = lambda: "per-row"
    fake.Float8DynamicActivationFloat8WeightConfig = lambda granularity: ("float8-dynamic", granularity)
    monkeypatch.setitem(sys.modules, "torchao", types.ModuleType("torchao"))
    monkeypatch.setitem(sys.modules, "torchao.quantization", fake)
    model = MMDiT(MMDiTConfig.from_dict(TINY))
    count = acceleration.apply_fp8(model)
    assert calls[0][0] == ("float8-dynamic", "per-row")
    assert count == len(calls[0][1]) > 0
    monkeypatch.setattr(acceleration, "fp8_support", lambda device: (True, "stand-in"))
    pipe = random_shapesworld()
    report = accelerate_pipeline(pipe, compile=False, fp8=True)
    assert report.fp8 and report.fp8_layers == len(calls[1][1]) > 0 and report.fp8_reason == "stand-in"


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed (optional)")
def test_real_torchao_on_the_cpu_falls_back_or_runs():
    pipe = random_shapesworld()
    report = accelerate_pipeline(pipe, compile=False, fp8="auto")
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: the GPU benchmark covers fp8")
    assert not report.fp8 and "compute capability" in report.fp8_reason


# ---------------------------------------------------------------------------------------------------------- compile


@pytest.mark.slow
def test_compiled_blocks_equal_eager_blocks(monkeypatch):
    """Regional compilation with inductor and freezing on the CPU (the real path, C++ kernels and all) of blocks 0
    and 1 (``compile_transformer`` compiles every block the same way): they share a compiled graph, yet each keeps
    its own weights; the outputs agree with eager within float32 rounding, and a new step (another timestep, same
    shapes) does not recompile."""
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no worker pool to start on a 2-core machine
    torch._dynamo.reset()
    model = _noisy(MMDiT(MMDiTConfig.from_dict(TINY)), 1)
    generator = torch.Generator().manual_seed(0)
    x, text = torch.randn(2, 16, 8, 8, generator=generator), torch.randn(2, 5, 32, generator=generator)
    pooled = torch.randn(2, 64, generator=generator)
    with torch.no_grad():
        expected = [model(x, text, pooled, torch.full((2,), t)) for t in (900.0, 400.0)]
        for block in model.transformer_blocks[:2]:  # the third (the last, text-dropping) kind would be one more graph
            acceleration.compile_module(block, torch.device("cpu"), None)
        from torch._dynamo.utils import counters

        counters.clear()
        got = [model(x, text, pooled, torch.full((2,), t)) for t in (900.0, 400.0)]
        frames = counters["stats"]["unique_graphs"]
        got.append(model(x, text, pooled, torch.full((2,), 100.0)))
        assert counters["stats"]["unique_graphs"] == frames  # the third step reused the compiled graphs
    scale = expected[0].abs().max()
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-4 * scale
    assert not torch.equal(got[0], got[1])


def test_compiled_pipeline_equals_eager_and_reports_compile_time(monkeypatch):
    """The pipeline-level wiring: the switch compiles the blocks and the VAE decoder, ``warmup`` times them, the
    images match eager and the weights keep their names. Dynamo captures the graphs as on any device, but they run
    through ``aot_eager`` here (inductor's C++ kernels are proven by the test above; compiling them again for the
    VAE would cost the suite minutes on 2 cores)."""
    monkeypatch.setattr(
        acceleration, "compile_module", lambda module, device, mode: module.compile(dynamic=False, backend="aot_eager")
    )
    eager = random_shapesworld(experts=False)
    compiled = random_shapesworld(experts=False)
    torch._dynamo.reset()
    report = accelerate_pipeline(compiled, compile=True, fp8=False)
    assert report.compiled == ["transformer blocks", "vae decoder"] and report.compile_mode == "freezing"
    seconds = acceleration.warmup(compiled, SIZE, SIZE)
    assert set(seconds) == {"transformer", "vae decoder"} and report.compile_seconds == seconds
    assert "compile time: transformer" in report.summary()
    a, b = _run(eager, guidance_scale=4.0), _run(compiled, guidance_scale=4.0)
    assert (a.latents - b.latents).abs().max() <= 1e-4 * a.latents.abs().max()
    pixels = lambda out: torch.tensor([list(img.getdata()) for img in out.images], dtype=torch.float32)  # noqa: E731
    assert (pixels(a) - pixels(b)).abs().max() <= 2  # within 2/255
    assert list(compiled.transformer.state_dict()) == list(eager.transformer.state_dict())  # names unchanged


# ------------------------------------------------------------------------------------- step caching and ControlNets


def _counting_controlnet(pipe) -> list[int]:
    """Attach a random ControlNet of the transformer's width; returns a list whose length counts its forwards."""
    t = pipe.transformer.config
    config = ControlNetConfig.matching(t, num_layers=1)
    torch.manual_seed(4)
    model = _noisy(SD3ControlNet(config), 5, scale=0.1)
    calls: list[int] = []
    model.register_forward_hook(lambda module, args, out: calls.append(1))
    pipe.controlnets.attach(model, "counting", 0.8)
    return calls


def test_step_caching_skips_the_controlnets_of_skipped_steps():
    pipe = random_shapesworld()
    calls = _counting_controlnet(pipe)
    control = torch.linspace(0, 1, SIZE * SIZE * 3).reshape(SIZE, SIZE, 3).mul(255).to(torch.uint8).numpy()
    from PIL import Image

    control = Image.fromarray(control)
    plain = _run(pipe, guidance_scale=4.0, control_image=control)
    full = len(calls)
    assert full == STEPS and plain.transformer_evaluations == STEPS
    calls.clear()
    zero = _run(pipe, guidance_scale=4.0, control_image=control, cache_threshold=0.0)
    assert torch.equal(zero.latents, plain.latents) and len(calls) == full  # threshold 0: bit-identical
    calls.clear()
    cached = _run(pipe, guidance_scale=4.0, control_image=control, cache_threshold=0.5)
    assert cached.skipped_steps, "the threshold should skip some evaluations on this model"
    assert len(calls) == cached.transformer_evaluations == STEPS - len(cached.skipped_steps)
    assert not torch.equal(cached.latents, plain.latents)


def test_lazy_controls_compute_once_and_only_when_read():
    runs = []

    def compute():
        runs.append(1)
        return [torch.ones(1), torch.zeros(1)]

    lazy = LazyControls(compute)
    assert not runs and not lazy.computed
    assert len(lazy) == 2 and bool(lazy) and torch.equal(lazy[0], torch.ones(1)) and len(list(lazy)) == 2
    assert runs == [1] and lazy.computed
