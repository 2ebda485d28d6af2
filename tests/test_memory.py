"""Quantization, streaming load, offload, attention chunking, VAE tiling and CPU kernels on tiny random models."""

import weakref

import numpy as np
import pytest
import torch
from torch import nn

from workbench import load_pipeline, memory
from workbench.loading import save_pipeline
from workbench.models.mmdit import MMDiT, MMDiTConfig

bnb = pytest.importorskip("bitsandbytes")

PROMPT = "a large red circle at the top left on a white background"
CALL = dict(height=64, width=64, num_inference_steps=2, guidance_scale=3.0, seed=5)


@pytest.fixture(scope="module")
def micro_folder(tmp_path_factory):
    """The micro ShapesWorld MoE pipeline with random (non-zero) weights, saved as a diffusers folder."""
    from tiny_sd3 import random_shapesworld

    pipe = random_shapesworld(seed=3)
    return save_pipeline(pipe, tmp_path_factory.mktemp("micro"))


@pytest.fixture(scope="module")
def reference(micro_folder):
    return load_pipeline(micro_folder)


def _inputs(pipe, batch: int = 2, size: int = 8):
    generator = torch.Generator().manual_seed(1)
    config = pipe.transformer.config
    latents = torch.randn(batch, 16, size, size, generator=generator)
    embeds = torch.randn(batch, 20, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(batch, config.pooled_projection_dim, generator=generator)
    return latents, embeds, pooled, torch.full((batch,), 600.0)


def _velocity(pipe, inputs=None) -> torch.Tensor:
    latents, embeds, pooled, timestep = inputs or _inputs(pipe)
    with torch.no_grad():
        dtype = pipe.dtype
        return pipe.transformer(latents.to(dtype), embeds.to(dtype), pooled.to(dtype), timestep).float()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("quantization", "backend", "bound"),
    [
        ("int8", "bitsandbytes", 0.02),
        ("int8", "weight_only", 0.02),
        ("int8", "dynamic", 0.05),
        ("nf4", "auto", 0.1),
        ("fp4", "auto", 0.15),
    ],
)
def test_quantized_transformer_is_close_to_full_precision(micro_folder, reference, quantization, backend, bound):
    pipe = load_pipeline(micro_folder, quantization=quantization, int8_backend=backend)
    error = _relative(_velocity(pipe), _velocity(reference))
    assert 0 < error < bound
    assert pipe.transformer.quantization == quantization
    image = pipe(PROMPT, **CALL).images[0]
    assert image.size == (64, 64)


def test_kept_modules_stay_in_full_precision(micro_folder):
    pipe = load_pipeline(micro_folder, quantization="nf4", quantize_modulation=False)
    quantized_types = (bnb.nn.Linear4bit,)
    kept, quantized = [], []
    for name, module in pipe.transformer.named_modules():
        if isinstance(module, quantized_types):
            quantized.append(name)
        elif type(module) is nn.Linear:
            kept.append(name)
    assert quantized and all(not memory.keeps_full_precision(n, quantize_modulation=False) for n in quantized)
    for pattern in (
        "norm1.linear",
        "norm1_context.linear",
        "norm_out.linear",
        "proj_out",
        "router",
        "context_embedder",
    ):
        assert any(pattern in n for n in kept), pattern
    assert any(n.startswith("time_text_embed.") for n in kept)
    assert not any(n.endswith(("to_q", "ff.net.2", "experts.0.net.2")) for n in kept)
    assert isinstance(pipe.transformer.pos_embed.proj, nn.Conv2d)
    assert all(pipe.transformer.get_submodule(n).weight.dtype == torch.float32 for n in kept)


def test_adaln_linears_are_quantized_by_default(micro_folder):
    pipe = load_pipeline(micro_folder, quantization="int8", int8_backend="weight_only")
    block = pipe.transformer.transformer_blocks[0]
    assert isinstance(block.norm1.linear, memory.Int8WeightOnlyLinear)
    assert isinstance(pipe.transformer.norm_out.linear, memory.Int8WeightOnlyLinear)
    assert type(pipe.transformer.proj_out) is nn.Linear


def test_quantized_weights_are_smaller():
    linear = nn.Linear(512, 1024).to(torch.bfloat16)
    full = memory.tensor_bytes(linear)["total"]
    nf4 = memory.tensor_bytes(memory.quantize_linear(linear, "nf4", torch.bfloat16))["total"]
    int8 = memory.tensor_bytes(memory.quantize_linear(linear, "int8", torch.bfloat16, int8_backend="weight_only"))
    bnb_int8 = memory.tensor_bytes(memory.quantize_linear(linear, "int8", torch.bfloat16, int8_backend="bitsandbytes"))
    assert nf4 <= 0.3 * full
    assert int8["total"] <= 0.55 * full and bnb_int8["total"] <= 0.55 * full


@pytest.mark.parametrize(
    "quantization, backend, bound",
    [("nf4", "auto", 0.15), ("fp4", "auto", 0.25), ("int8", "bitsandbytes", 0.03), ("int8", "dynamic", 0.03)],
)
def test_quantized_layers_pass_input_gradients_within_the_block(quantization, backend, bound):
    """Layers without a backward of their own (bitsandbytes', dynamic int8) pass the input gradient of the weight
    they compute with inside ``input_gradients``, with an unchanged forward; it is within the quantization error of
    the full-precision layer's gradient."""
    from workbench.quantization import effective_weight, input_gradients

    torch.manual_seed(0)
    linear = nn.Linear(64, 96)
    layer = memory.quantize_linear(linear, quantization, torch.float32, int8_backend=backend)
    x = torch.randn(2, 5, 64, requires_grad=True)
    weights = torch.randn(2, 5, 96)
    with input_gradients(nn.Sequential(layer)):
        out = layer(x)
    assert "forward" not in vars(layer)  # the layer is itself again after the block
    assert torch.equal(out.detach(), layer(x.detach()))
    (grad,) = torch.autograd.grad((out * weights).sum(), x)
    torch.testing.assert_close(grad, weights @ effective_weight(layer, 64, torch.float32, torch.device("cpu")))
    expected = weights @ linear.weight.detach()
    assert (grad - expected).norm() / expected.norm() < bound


def test_streaming_load_holds_one_full_precision_layer_at_a_time(micro_folder, monkeypatch):
    from workbench import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the quantizing loader must not read whole state dicts")

    alive: list[tuple[weakref.ref, int]] = []
    peak = {"bytes": 0}
    original = loading.iter_component_tensors
    with torch.device("meta"):
        targets = set(memory.quantization_targets(MMDiT(_config(micro_folder))))

    def counting(folder):
        for key, tensor in original(folder):
            if key.rpartition(".")[0] in targets:
                alive.append((weakref.ref(tensor), tensor.numel() * tensor.element_size()))
            peak["bytes"] = max(peak["bytes"], sum(size for ref, size in alive if ref() is not None))
            yield key, tensor
            del tensor

    monkeypatch.setattr(loading, "iter_component_tensors", counting)
    monkeypatch.setattr(loading, "read_safetensors", refuse, raising=True)
    monkeypatch.setattr(loading, "_component_weights", refuse, raising=True)
    transformer = loading.load_transformer(micro_folder / "transformer", torch.float32, "nf4")
    sizes = sorted(size for _, size in alive)
    assert len(sizes) > 10
    assert peak["bytes"] <= sizes[-1] + sizes[-2] < sum(sizes) / 4
    assert all(ref() is None for ref, _ in alive)
    assert transformer.quantization == "nf4"


def _config(folder) -> MMDiTConfig:
    import json

    return MMDiTConfig.from_dict(json.loads((folder / "transformer" / "config.json").read_text()))


def test_stream_transformer_rejects_unknown_and_missing_weights(reference):
    config = reference.transformer.config
    state = reference.transformer.state_dict()
    with pytest.raises(ValueError, match="unexpected weight 'bogus.weight'"):
        memory.stream_transformer(config, [("bogus.weight", torch.zeros(1))], quantization="nf4")
    partial = [(k, v) for k, v in state.items() if "proj_out" not in k]
    with pytest.raises(ValueError, match="missing weights"):
        memory.stream_transformer(config, partial, quantization="int8", int8_backend="weight_only")


def test_quantize_text_encoders(micro_folder, reference):
    pipe = load_pipeline(micro_folder, quantization="int8", int8_backend="weight_only", quantize_text_encoders=True)
    text = pipe.text_encoders
    clip_names = {n for n, m in text.clip_l.named_modules() if isinstance(m, memory.Int8WeightOnlyLinear)}
    assert any("q_proj" in n for n in clip_names) and not any("text_projection" in n for n in clip_names)
    t5_names = {n for n, m in text.t5.named_modules() if isinstance(m, memory.Int8WeightOnlyLinear)}
    assert any(n.endswith("SelfAttention.q") for n in t5_names) and not any(n.endswith(".wo") for n in t5_names)
    embeds, pooled = text.encode([PROMPT], max_sequence_length=16)
    ref_embeds, ref_pooled = reference.text_encoders.encode([PROMPT], max_sequence_length=16)
    assert 0 < _relative(embeds, ref_embeds) < 0.05 and _relative(pooled, ref_pooled) < 0.05


@pytest.mark.parametrize("offload", ["model", "sequential"])
def test_offload_gives_the_same_images(micro_folder, reference, offload):
    pipe = load_pipeline(micro_folder, offload=offload)
    init = reference(PROMPT, **CALL).images[0]
    for kwargs in ({}, {"image": init, "strength": 0.7}):
        expected = reference(PROMPT, **CALL, **kwargs)
        got = pipe(PROMPT, **CALL, **kwargs)
        assert torch.equal(got.latents, expected.latents)
        assert np.array_equal(np.asarray(got.images[0]), np.asarray(expected.images[0]))
    offloader = memory.offloader_of(pipe)
    assert offloader is not None and offloader.moves > len(offloader.units)


def _snapshot_during(module: nn.Module, offloader: memory.Offloader, log: list) -> None:
    module.register_forward_pre_hook(lambda m, args: log.append(dict(offloader.location)))


def test_model_offload_keeps_one_component_on_the_execution_device(micro_folder):
    pipe = load_pipeline(micro_folder, offload="model")
    offloader = memory.offloader_of(pipe)
    during_transformer, during_clip, during_decoder = [], [], []
    _snapshot_during(pipe.transformer, offloader, during_transformer)
    _snapshot_during(pipe.text_encoders.clip_l, offloader, during_clip)
    _snapshot_during(pipe.vae.decoder, offloader, during_decoder)
    pipe(PROMPT, **CALL)
    names = {"text_encoders.clip_l", "text_encoders.t5", "transformer", "vae"}
    assert set(offloader.location) == names
    for log, active in (
        (during_transformer, "transformer"),
        (during_clip, "text_encoders.clip_l"),
        (during_decoder, "vae"),
    ):
        assert log
        for snapshot in log:
            assert [n for n, where in snapshot.items() if where == "execution"] == [active]
    assert len(during_transformer) == 2


def test_sequential_offload_moves_block_by_block(micro_folder):
    pipe = load_pipeline(micro_folder, offload="sequential")
    offloader = memory.offloader_of(pipe)
    names = [u.name for u in offloader.units]
    assert "transformer.transformer_blocks.0" in names and "transformer.transformer_blocks.1" in names
    logs = []
    for index, block in enumerate(pipe.transformer.transformer_blocks):
        log: list = []
        _snapshot_during(block, offloader, log)
        logs.append((index, log))
    pipe(PROMPT, **CALL)
    for index, log in logs:
        assert log
        for snapshot in log:
            assert [n for n, where in snapshot.items() if where == "execution"] == [
                f"transformer.transformer_blocks.{index}"
            ]
    assert set(offloader.location.values()) == {"offload"}


def test_offload_hooks_are_removed_on_prepare(micro_folder):
    pipe = load_pipeline(micro_folder, offload="sequential")
    before = memory.offloader_of(pipe)
    memory.prepare(pipe, "cpu")
    assert memory.offloader_of(pipe) is None
    moves = before.moves
    pipe(PROMPT, **CALL)
    assert before.moves == moves


def test_sequential_units_cover_every_tensor_once(reference):
    units = memory.sequential_units(reference.transformer, max_bytes=1)
    covered = [id(t) for _, module in units for t in (*module.parameters(), *module.buffers())]
    everything = [id(t) for t in (*reference.transformer.parameters(), *reference.transformer.buffers())]
    assert sorted(covered) == sorted(everything)
    whole_blocks = memory.sequential_units(reference.transformer)
    assert [n for n, _ in whole_blocks if n.startswith("transformer_blocks.")] == [
        "transformer_blocks.0",
        "transformer_blocks.1",
    ]


def test_attention_chunking_gives_identical_results(micro_folder, reference):
    pipe = load_pipeline(micro_folder, attention_chunk_size=7)
    assert all(m.chunk_size == 7 for m in pipe.transformer.modules() if type(m).__name__ == "Attention")
    inputs = _inputs(reference, size=12)
    chunked, whole = _velocity(pipe, inputs), _velocity(reference, inputs)
    # The same result up to float32 rounding: SDPA kernels round a query row differently depending on how many
    # rows share the call, so bit-equality is not guaranteed (differences are ~1e-7 here).
    torch.testing.assert_close(chunked, whole, atol=2e-6, rtol=0)
    assert not torch.equal(whole, torch.zeros_like(whole))
    memory.prepare(pipe, attention_chunk_size=None)
    assert all(m.chunk_size is None for m in pipe.transformer.modules() if type(m).__name__ == "Attention")


def test_vae_tiles_above_the_threshold(micro_folder):
    pipe = load_pipeline(micro_folder, vae_tile_threshold=8)
    pipe.vae.tile_sample_size = 64
    calls = []
    pipe.vae.decoder.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[-1]))
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        auto = pipe.vae.decode(latents)
        assert len(calls) > 1 and max(calls) == 8
        calls.clear()
        small = pipe.vae.decode(latents[..., :8, :8])
        assert calls == [8] and small.shape[-1] == 64
        assert torch.equal(auto, pipe.vae.decode(latents, tiled=True))
        assert not torch.equal(auto, pipe.vae.decode(latents, tiled=False))
    assert load_pipeline(micro_folder).vae.tile_threshold == pipe.vae.config.tile_threshold != 8


def test_cpu_kernels_pack_linears_without_changing_the_state_dict(micro_folder):
    plain = load_pipeline(micro_folder, dtype=torch.bfloat16, cpu_kernels=False)
    packed = load_pipeline(micro_folder, dtype=torch.bfloat16)
    if not memory.packed_kernels_available():
        pytest.skip("oneDNN linear kernels not available")
    kinds = {type(m).__name__ for m in packed.transformer.modules()}
    assert "PackedLinear" in kinds and "PackedLinear" not in {type(m).__name__ for m in plain.transformer.modules()}
    assert type(packed.transformer.transformer_blocks[0].norm1.linear) is nn.Linear
    state, expected = packed.transformer.state_dict(), plain.transformer.state_dict()
    assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    assert _relative(_velocity(packed), _velocity(plain)) < 0.02
    assert memory.unpack_linears(packed.transformer) > 0
    assert "PackedLinear" not in {type(m).__name__ for m in packed.transformer.modules()}
    assert torch.equal(_velocity(packed), _velocity(plain))


def test_float32_is_packed_where_it_pays():
    assert memory.packing_pays(torch.bfloat16, 192) and memory.packing_pays(torch.float32, 1536)
    assert not memory.packing_pays(torch.float32, 192) and not memory.packing_pays(torch.float16, 1536)


def test_float32_packed_linears_give_the_plain_velocity(micro_folder):
    if not memory.packed_kernels_available():
        pytest.skip("oneDNN linear kernels not available")
    plain = load_pipeline(micro_folder)  # narrower than FP32_PACKING_MIN_WIDTH: left plain
    packed = load_pipeline(micro_folder, cpu_kernels=True)
    assert "PackedLinear" not in {type(m).__name__ for m in plain.transformer.modules()}
    assert "PackedLinear" in {type(m).__name__ for m in packed.transformer.modules()}
    assert _relative(_velocity(packed), _velocity(plain)) < 1e-5


def test_packed_linear_unpacks_when_moved():
    if not memory.packed_kernels_available():
        pytest.skip("oneDNN linear kernels not available")
    linear = nn.Linear(32, 64).to(torch.bfloat16)
    packed = memory.PackedLinear(linear, gelu=True)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = torch.nn.functional.gelu(linear(x.bfloat16()).float(), approximate="tanh")
        torch.testing.assert_close(packed(x.bfloat16()).float(), expected, rtol=0.02, atol=0.02)
        packed.to(torch.float32)
        assert packed.packed is None and packed.weight.dtype == torch.float32
        torch.testing.assert_close(packed(x), torch.nn.functional.gelu(linear.float()(x), approximate="tanh"))
    assert set(packed.state_dict()) == {"proj.weight", "proj.bias"}


@pytest.mark.parametrize("rows", [1, 63, 64, 130])
def test_packed_linear_pads_routed_rows_and_returns_exactly_them(rows):
    if not memory.packed_kernels_available():
        pytest.skip("oneDNN linear kernels not available")
    linear = nn.Linear(32, 48).to(torch.bfloat16)
    packed = memory.PackedLinear(linear)
    x = torch.randn(rows, 32).bfloat16()
    with torch.no_grad():
        got = packed(x)
        torch.testing.assert_close(got.float(), linear(x).float(), rtol=0.02, atol=0.02)
        each = torch.cat([packed(x[i : i + 1]) for i in range(rows)])
    assert got.shape == (rows, 48)
    torch.testing.assert_close(got, each)  # a row's output does not depend on the padding around it


def test_int8_backend_choice():
    assert memory.resolve_int8_backend("auto", "cpu", torch.float32) == "weight_only"
    assert memory.resolve_int8_backend("dynamic", "cpu", torch.float32) == "dynamic"
    assert memory.resolve_int8_backend("auto", "cpu", torch.bfloat16) == "weight_only"
    assert memory.resolve_int8_backend("auto", "cuda", torch.float16) == "bitsandbytes"
    with pytest.raises(ValueError, match="int8_backend='dynamic' runs on the CPU in float32 only"):
        memory.resolve_int8_backend("dynamic", "cpu", torch.bfloat16)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantization": "int4"}, r"quantization must be one of \(None, 'int8', 'nf4', 'fp4'\), got 'int4'"),
        ({"offload": "gpu"}, r"offload must be one of \(None, 'model', 'sequential'\), got 'gpu'"),
        ({"attention_chunk_size": 0}, "attention_chunk_size must be None or a positive integer, got 0"),
        ({"vae_tile_threshold": -3}, "vae_tile_threshold must be None or a positive integer, got -3"),
        ({"quantization": "int8", "int8_backend": "fast"}, "int8_backend must be one of"),
    ],
)
def test_bad_options_are_refused_before_loading(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_pipeline(tmp_path / "does-not-exist", **kwargs)


def test_requantizing_differently_is_refused(micro_folder):
    pipe = load_pipeline(micro_folder, quantization="nf4")
    with pytest.raises(ValueError, match="already quantized as 'nf4'"):
        memory.prepare(pipe, quantization="int8")
    assert memory.prepare(pipe, quantization="nf4") is pipe


def test_benchmark_weight_extrapolation_and_random_weights():
    from workbench.cli.bench import load_script

    bench = load_script()  # benchmarks/bench.py

    def config(depth: int) -> MMDiTConfig:
        return MMDiTConfig(
            num_layers=depth,
            num_attention_heads=2,
            joint_attention_dim=32,
            caption_projection_dim=128,
            pooled_projection_dim=16,
            pos_embed_max_size=8,
            sample_size=8,
        )

    def build(depth: int) -> MMDiT:
        model = memory.stream_transformer(config(depth), bench.random_state(config(depth)), torch.float32, "nf4")
        model.pos_embed.pos_embed = torch.zeros(1, 64, 128)
        return model

    assert bench.extrapolate(bench.weight_bytes(build(2)), 2, full_depth=4) == bench.weight_bytes(build(4))["total"]
    first = dict(bench.random_state(config(2), seed=1))
    again = dict(bench.random_state(config(2), seed=1))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    weight = first["transformer_blocks.0.ff.net.2.weight"]
    assert weight.abs().max() <= weight.shape[1] ** -0.5 and weight.std() > 0.5 * weight.shape[1] ** -0.5 / 3**0.5


# ------------------------------------------------------------- accelerate's hook-based model offload, compared
# docs/design.md, "Offload": why model offload stays ours rather than accelerate.cpu_offload_with_hook.


def _accelerate_model_offload(pipe, device) -> dict:
    """diffusers' ``enable_model_cpu_offload``, by hand: ``cpu_offload_with_hook`` on each component in the order of a
    text→image call (text encoders, transformer, VAE), each hook offloading the one before. The VAE runs through
    ``encode``/``decode``, not ``forward``, so, as diffusers' ``apply_forward_hook`` does, those methods call its hook
    when ``wrap_vae`` is set. Returns name → accelerate's hook."""
    from accelerate import cpu_offload_with_hook

    hooks, previous = {}, None
    components = [
        (f"text_encoders.{slot}", getattr(pipe.text_encoders, slot, None)) for slot in ("clip_l", "clip_g", "t5")
    ]
    for name, module in [*components, ("transformer", pipe.transformer), ("vae", pipe.vae)]:
        if module is not None:
            _, previous = cpu_offload_with_hook(module, device, prev_module_hook=previous)
            hooks[name] = previous
    return hooks


def _wrap_vae_methods(pipe, hook) -> None:
    for method in ("encode", "decode"):
        original = getattr(pipe.vae, method)

        def triggered(*args, _original=original, **kwargs):
            hook.hook.pre_forward(pipe.vae)
            return _original(*args, **kwargs)

        setattr(pipe.vae, method, triggered)


def test_accelerate_model_offload_hooks_only_forward_so_the_vae_is_never_moved(micro_folder, reference):
    """On the CPU accelerate's hooks can run (execution device = the CPU: no transfer) and show where they fire:
    on each component's ``forward``. The pipeline calls the VAE through ``encode``/``decode``, so its hook never
    fires: accelerate alone would leave the VAE on the CPU (ours triggers the VAE unit from its encoder, decoder and
    quant convs). Images are unchanged under the hooks."""
    from accelerate.hooks import CpuOffload

    pipe = load_pipeline(micro_folder)
    hooks = _accelerate_model_offload(pipe, torch.device("cpu"))
    fired: list[str] = []
    names = {id(hook.model): name for name, hook in hooks.items()}
    original = CpuOffload.pre_forward

    def spy(self, module, *args, **kwargs):
        fired.append(names[id(module)])
        return original(self, module, *args, **kwargs)

    CpuOffload.pre_forward = spy
    try:
        init = reference(PROMPT, **CALL).images[0]
        for kwargs in ({}, {"image": init, "strength": 0.7}):
            fired.clear()
            got, expected = pipe(PROMPT, **CALL, **kwargs), reference(PROMPT, **CALL, **kwargs)
            assert torch.equal(got.latents, expected.latents)
            assert "vae" not in fired and {"transformer", "text_encoders.clip_l"} <= set(fired)
        _wrap_vae_methods(pipe, hooks["vae"])
        fired.clear()
        pipe(PROMPT, **CALL, image=init, strength=0.7)
        assert fired[0] == "vae" and fired[-1] == "vae"  # image→image: the VAE encodes first, decodes last
    finally:
        CpuOffload.pre_forward = original
        for hook in hooks.values():
            hook.remove()


def _resident(pipe, device: torch.device) -> set[str]:
    parts = {"transformer": pipe.transformer, "vae": pipe.vae}
    parts.update({slot: getattr(pipe.text_encoders, slot) for slot in ("clip_l", "clip_g", "t5")})
    return {name for name, m in parts.items() if m is not None and next(m.parameters()).device.type == device.type}


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="accelerate's model offload moves weights between the CPU and an accelerator; with one device (the CPU) "
    "there is nothing to measure — see test_accelerate_model_offload_hooks_only_forward_so_the_vae_is_never_moved",
)
def test_accelerate_model_offload_against_ours_on_cuda(micro_folder):
    """Same images, and never fewer components on the GPU while the transformer runs: ours keeps exactly one; with
    accelerate's chain the VAE, which encodes first in image→image, stays on the GPU through the sampling loop."""
    device = torch.device("cuda")
    plain = load_pipeline(micro_folder, device="cuda")
    ours = load_pipeline(micro_folder, device="cuda", offload="model")
    theirs = load_pipeline(micro_folder, device="cuda")
    hooks = _accelerate_model_offload(theirs, device)
    _wrap_vae_methods(theirs, hooks["vae"])
    init = plain(PROMPT, **CALL).images[0]
    report = {}
    for label, kwargs in (("text→image", {}), ("image→image", {"image": init, "strength": 0.7})):
        expected = plain(PROMPT, **CALL, **kwargs)
        for name, pipe in (("ours", ours), ("accelerate", theirs)):
            during: list[set[str]] = []
            handle = pipe.transformer.register_forward_pre_hook(
                lambda m, a, p=pipe, log=during: log.append(_resident(p, device))
            )
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            try:
                got = pipe(PROMPT, **CALL, **kwargs)
            finally:
                handle.remove()
            if name == "accelerate":
                hooks["vae"].offload()  # diffusers' maybe_free_model_hooks: the last component back after a call
            assert torch.equal(got.latents, expected.latents), (label, name)
            assert np.array_equal(np.asarray(got.images[0]), np.asarray(expected.images[0])), (label, name)
            report[label, name] = (set().union(*during), torch.cuda.max_memory_allocated())
        assert report[label, "ours"][0] == {"transformer"}, report
        assert report[label, "ours"][0] <= report[label, "accelerate"][0], report
    print(report)  # (components on the GPU while the transformer runs, peak bytes allocated) per call and offload


def test_a_onednn_isa_cap_below_bf16_means_float32_on_the_cpu(monkeypatch):
    """ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI (an AMX machine made to behave like one without bfloat16 dot products):
    no native bfloat16, so the CPU's recommended dtype is float32; a cap that keeps bfloat16 changes nothing."""
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    native = memory.cpu_has_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_vnni")
    assert not memory.cpu_has_bf16() and memory.recommended_dtype("cpu") == torch.float32
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_BF16")
    assert memory.cpu_has_bf16() == native
