"""Memory and speed benchmark of the workbench against diffusers; prints markdown tables.

``python benchmarks/bench.py [--quick]`` (or ``python -m workbench bench`` from a checkout). It lives outside the
package because it imports diffusers, which the workbench itself never does at run time. Sections:

1. An SD3-Medium-width transformer (hidden 1536, 24 heads, patch 2, random weights) of reduced depth at 512²:
   seconds per guided step (one transformer call on the batch [negative; positive] of 2) for ours and diffusers'
   ``SD3Transformer2DModel`` with the same weights, in float32 and bfloat16. Per precision (fp32, bf16, int8, nf4,
   fp4, each loaded by the streaming loader in its own process): weight bytes (also extrapolated to the full 24
   blocks), peak RSS, seconds per step and the velocity's relative error against float32. Attention chunking and
   the tiled VAE (SD3-sized, random weights) at 1024², peak RSS with and without.
2. The full-depth SD3-Medium transformer (2B parameters, random weights generated tensor by tensor and quantized as
   they arrive, never a full-precision copy) in nf4: build time, one guided step at 512², peak RSS.
3. The shipped ShapesWorld model: seconds per 128² image at its default steps with guidance, and the evaluation
   table at full precision, int8 and nf4 (diffusers cannot run its Mixture-of-Experts transformer).

Times are CPU seconds of the process with one thread (the machine is shared; wall time is noisier): the minimum over
repeats, interleaved between the contenders. Peak RSS (``VmHWM``) includes the ~0.4 GB of the imported libraries;
the baseline column gives the RSS just before the model is built.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the workbench of this checkout

from workbench.viz import markdown_rows as table  # noqa: E402

SD3_MEDIUM = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 192,
}
TEXT_TOKENS = 77 + 256
PRECISIONS = {
    "fp32": {"dtype": "float32", "quantization": None},
    "bf16": {"dtype": "bfloat16", "quantization": None},
    "int8": {"dtype": "bfloat16", "quantization": "int8"},
    "int8 (fp32 compute)": {"dtype": "float32", "quantization": "int8", "int8_backend": "dynamic"},
    "int8 bitsandbytes": {"dtype": "bfloat16", "quantization": "int8", "int8_backend": "bitsandbytes"},
    "nf4": {"dtype": "bfloat16", "quantization": "nf4"},
    "fp4": {"dtype": "bfloat16", "quantization": "fp4"},
    "int8, modulation kept": {"dtype": "bfloat16", "quantization": "int8", "quantize_modulation": False},
    "nf4, modulation kept": {"dtype": "bfloat16", "quantization": "nf4", "quantize_modulation": False},
}
QUICK_PRECISIONS = ("fp32", "bf16", "int8", "nf4")
SHAPESWORLD_PRECISIONS = ("fp32", "bf16", "int8", "int8 weight-only", "nf4", "nf4, modulation kept")


# ---------------------------------------------------------------------------------------------------------- helpers


def sd3_config(depth: int) -> dict:
    """diffusers ``SD3Transformer2DModel`` keyword arguments of SD3-Medium with ``depth`` blocks."""
    return {**SD3_MEDIUM, "num_layers": depth}


def step_inputs(resolution: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One guided step's transformer inputs: latents (2, 16, r/8, r/8), text (2, 333, 4096), pooled (2, 2048),
    timestep (2,)."""
    generator = torch.Generator().manual_seed(seed)
    side = resolution // 8
    latents = torch.randn(2, 16, side, side, generator=generator).to(dtype)
    embeds = torch.randn(2, TEXT_TOKENS, SD3_MEDIUM["joint_attention_dim"], generator=generator).to(dtype)
    pooled = torch.randn(2, SD3_MEDIUM["pooled_projection_dim"], generator=generator).to(dtype)
    return latents, embeds, pooled, torch.full((2,), 700.0)


def random_state(
    config, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Random weights for an :class:`MMDiT` of ``config``, one tensor at a time (made on ``device`` in ``dtype``),
    with torch's default initialisation (uniform in ±1/√fan_in for weights and biases); ``pos_embed.pos_embed`` is
    left out. Each tensor has its own seed, so the same (seed, device) gives the same weights in any process."""
    from workbench.models.mmdit import MMDiT

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in MMDiT(config).state_dict().items()}
    for index, (key, shape) in enumerate(shapes.items()):
        if key == "pos_embed.pos_embed":
            continue
        weight_shape = shapes.get(key.rsplit(".", 1)[0] + ".weight", shape)
        fan_in = math.prod(weight_shape[1:]) if len(weight_shape) > 1 else weight_shape[0]
        generator = torch.Generator(device).manual_seed(seed * 100_003 + index)
        tensor = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
        yield key, ((tensor * 2 - 1) * fan_in**-0.5).to(dtype)


def peak_rss_mb() -> float:
    """Peak resident memory of this process since it started (``VmHWM``; unlike ``ru_maxrss`` it does not carry
    the parent's size over a fork)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start the peak RSS afresh from the current RSS (Linux ``clear_refs``; ignored where not allowed)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call."""
    cpu, wall = time.process_time(), time.perf_counter()
    fn()
    return time.process_time() - cpu, time.perf_counter() - wall


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """FLOP per CPU second of this process multiplying two ``size``² matrices of ``dtype`` (best of ``repeats``):
    the practical peak the transformer's linear layers can approach."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    return 2 * size**3 / min(timed(lambda: a @ b)[0] for _ in range(repeats))


def step_flop(fn: Callable[[], object]) -> float:
    """FLOP of one call of ``fn`` as ``torch.utils.flop_counter`` counts them (matrix products and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, float]]:
    """Minimum (CPU, wall) seconds of each function over ``repeats`` rounds, the functions taking turns."""
    for fn in fns.values():
        fn()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(timed(fn))
    return {name: (min(s[0] for s in values), min(s[1] for s in values)) for name, values in samples.items()}


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the weights (everything but the position table) of the whole model and of blocks 0 and -1."""
    from workbench import memory

    table = model.pos_embed.pos_embed
    blocks = model.transformer_blocks
    return {
        "total": memory.tensor_bytes(model)["total"] - table.numel() * table.element_size(),
        "first_block": memory.tensor_bytes(blocks[0])["total"],
        "last_block": memory.tensor_bytes(blocks[-1])["total"],
    }


def extrapolate(bytes_: dict[str, int], depth: int, full_depth: int = 24) -> int:
    """Weight bytes of the same model with ``full_depth`` blocks, from a model with ``depth`` ≥ 2 blocks."""
    outside = bytes_["total"] - bytes_["first_block"] * (depth - 1) - bytes_["last_block"]
    return outside + bytes_["first_block"] * (full_depth - 1) + bytes_["last_block"]


def run_child(spec: dict, timeout: float = 3600) -> dict:
    """Run one measurement in a fresh process (clean peak RSS); returns its JSON result or {"error": …}."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 1))}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------------- child processes


def _child_precision(spec: dict) -> dict:
    from safetensors.torch import save_file

    from workbench import loading, memory

    dtype = getattr(torch, spec["dtype"])
    baseline = current_rss_mb()
    options = {k: spec[k] for k in ("int8_backend", "quantize_modulation") if k in spec}
    start = time.perf_counter()
    model = loading.load_transformer(Path(spec["folder"]), dtype, spec["quantization"], **options)
    if spec["quantization"] is None and dtype == torch.bfloat16 and memory.packed_kernels_available():
        memory.pack_linears(model)
    load_s = time.perf_counter() - start
    inputs = step_inputs(spec["resolution"], dtype)
    with torch.no_grad():
        out = model(*inputs)
        cpu, wall = timed(lambda: model(*inputs))
    save_file({"velocity": out.float().contiguous()}, spec["output"])
    return {
        "baseline_mb": baseline,
        "peak_mb": peak_rss_mb(),
        "load_s": load_s,
        "step_cpu_s": cpu,
        "step_wall_s": wall,
        "weights": weight_bytes(model),
    }


def _child_sd3_2b(spec: dict) -> dict:
    from workbench import memory
    from workbench.models.mmdit import MMDiTConfig, sincos_2d_table

    dtype = getattr(torch, spec["dtype"])
    config = MMDiTConfig.from_dict(sd3_config(spec.get("depth", 24)))
    grid = config.sample_size // config.patch_size
    position_table = sincos_2d_table(config.inner_dim, config.pos_embed_max_size, grid).unsqueeze(0)
    reset_peak_rss()
    baseline = current_rss_mb()
    start = time.perf_counter()
    tensors = itertools.chain([("pos_embed.pos_embed", position_table)], random_state(config))
    options = {"quantize_modulation": bool(spec.get("quantize_modulation", True))}
    model = memory.stream_transformer(config, tensors, dtype, spec["quantization"], **options)
    del tensors, position_table
    build_s = time.perf_counter() - start
    build_peak = peak_rss_mb()
    inputs = step_inputs(spec["resolution"], dtype)
    with torch.no_grad():
        cpu, wall = timed(lambda: model(*inputs)) if spec.get("step", True) else (None, None)
    return {
        "baseline_mb": baseline,
        "build_peak_mb": build_peak,
        "peak_mb": peak_rss_mb(),
        "build_s": build_s,
        "step_cpu_s": cpu,
        "step_wall_s": wall,
        "weights": weight_bytes(model)["total"],
    }


def _child_attention(spec: dict) -> dict:
    from safetensors.torch import save_file
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from workbench import loading

    model = loading.load_transformer(Path(spec["folder"]), torch.float32)
    model.set_attention_chunk_size(spec["chunk"])
    inputs = step_inputs(spec["resolution"], torch.float32)
    baseline = current_rss_mb()
    kernel = sdpa_kernel([SDPBackend.MATH]) if spec["backend"] == "math" else contextlib.nullcontext()
    with torch.no_grad(), kernel:
        cpu, wall = timed(lambda: save_file({"velocity": model(*inputs).contiguous()}, spec["output"]))
    return {"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "cpu_s": cpu, "wall_s": wall}


def _child_vae(spec: dict) -> dict:
    from workbench.models.vae import AutoencoderKL, VAEConfig

    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig()).eval().requires_grad_(False)
    side = spec["resolution"]
    generator = torch.Generator().manual_seed(0)
    if spec["op"] == "decode":
        data = torch.randn(1, 16, side // 8, side // 8, generator=generator)
        run = lambda: vae.decode(data, tiled=spec["tiled"])
    else:
        data = torch.rand(1, 3, side, side, generator=generator) * 2 - 1
        run = lambda: vae.encode(data, tiled=spec["tiled"]).mode()
    baseline = current_rss_mb()
    with torch.no_grad():
        cpu, wall = timed(run)
    return {"baseline_mb": baseline, "peak_mb": peak_rss_mb(), "cpu_s": cpu, "wall_s": wall}


CHILDREN = {
    "precision": _child_precision,
    "sd3_2b": _child_sd3_2b,
    "attention": _child_attention,
    "vae": _child_vae,
}


def child_main(spec: dict) -> None:
    torch.set_num_threads(int(spec.get("threads", 1)))
    print(json.dumps(CHILDREN[spec["kind"]](spec)))


# ---------------------------------------------------------------------------------------------------------- sections


def section_speed(depth: int, resolution: int, repeats: int) -> tuple[str, dict]:
    """Ours vs diffusers, seconds per guided step in float32 and bfloat16; returns (markdown, numbers)."""
    from diffusers import SD3Transformer2DModel

    from workbench import memory
    from workbench.loading import build_transformer
    from workbench.models.mmdit import MMDiTConfig

    torch.manual_seed(0)
    reference = SD3Transformer2DModel(**sd3_config(depth)).eval().requires_grad_(False)
    config = MMDiTConfig.from_dict(sd3_config(depth))
    rows, numbers = [], {}
    for dtype in (torch.float32, torch.bfloat16):
        theirs = reference.to(dtype)
        state = {k: v.to(dtype) for k, v in theirs.state_dict().items()}
        ours = build_transformer(config, state, dtype, "benchmark")
        fast = None
        if memory.packing_pays(dtype, config.inner_dim) and memory.packed_kernels_available():
            fast = build_transformer(config, {k: v.clone() for k, v in state.items()}, dtype, "benchmark")
            memory.pack_linears(fast)
        fns = _contenders(theirs, ours, fast, step_inputs(resolution, dtype))
        with torch.no_grad():
            difference = relative_error(fns["ours eager"](), fns["diffusers"]())
            times = interleaved(fns, repeats)
        best = times.get("ours", times["ours eager"])
        name = "fp32" if dtype == torch.float32 else "bf16"
        numbers[name] = {k: v[0] for k, v in times.items()}
        flop = step_flop(fns["diffusers"])
        rate = matmul_rate(dtype)
        share = {"diffusers": flop / times["diffusers"][0] / rate, "ours": flop / best[0] / rate}
        rows.append(
            [
                name,
                _fmt(times["diffusers"][0]),
                _fmt(times["ours eager"][0]),
                _fmt(best[0]),
                _fmt(best[0] / times["diffusers"][0]),
                _fmt(times["diffusers"][1]) + " / " + _fmt(best[1]),
                f"{difference:.1e}",
                f"{flop / 1e9:.0f}",
                f"{rate / 1e9:.0f}",
                f"{share['diffusers']:.0%} / {share['ours']:.0%}",
                f"{share['diffusers'] / 0.8:.0%}",
            ]
        )
        del ours, fast, theirs, state
    header = [
        "dtype",
        "diffusers CPU s/step",
        "ours eager CPU s/step",
        "ours CPU s/step",
        "ours / diffusers",
        "wall s diffusers / ours",
        "eager vs diffusers rel. diff.",
        "GFLOP per step",
        "matmul GFLOP/s",
        "share of matmul rate diffusers / ours",
        "share needed for 0.8×",
    ]
    title = (
        f"### 1a. Seconds per guided step: SD3-Medium width, depth {depth}, {resolution}², batch 2, "
        f"{TEXT_TOKENS} text tokens (min of {repeats}, one thread)\n\n"
        "`ours eager` is the plain module; `ours` is what `prepare` gives on the CPU (oneDNN pre-packed linears with "
        "the feed-forward GELU fused; in float32 from width 1024 up, `memory.packing_pays`). GFLOP per step: "
        "matrix products and attention as `torch.utils.flop_counter` counts them; matmul GFLOP/s: torch multiplying "
        "two 2048² matrices of the dtype on one thread (`torch.mm`, a plain library GEMM); share: the step's FLOP "
        "per second as a fraction of that rate. Packed oneDNN linears can pass 100 %; attention (about an eighth "
        "of the FLOP) runs well below it.\n\n"
    )
    return title + table(header, rows), numbers


def section_cpu_paths(
    depth: int, resolution: int, repeats: int, compile: bool = True, fp8: bool = False
) -> tuple[str, dict]:
    """The float paths of this CPU, ours only, same random weights: float32 eager, float32 compiled (inductor with
    weight freezing, blocks compiled as ``workbench.acceleration`` does), bfloat16 as ``prepare`` gives it (oneDNN
    pre-packed where the CPU multiplies bfloat16 natively) and bfloat16 compiled; seconds per guided step (CPU
    seconds, min and median of ``repeats``, interleaved), compile time, relative error against float32 eager; then
    the fastest path and what "auto" (``acceleration.cpu_compile_pays``, ``memory.recommended_dtype``) picks.
    ``compile=False`` leaves out the compiled rows (minutes of compiling); ``fp8`` adds the fp8 row, or the reason
    it cannot run here."""
    from workbench import acceleration, memory
    from workbench.loading import build_transformer
    from workbench.models.mmdit import MMDiTConfig

    config = MMDiTConfig.from_dict(sd3_config(depth))
    state = dict(random_state(config, 0))
    paths: dict[str, Callable[[], torch.Tensor]] = {}
    compile_seconds: dict[str, float] = {}
    variants = [("fp32 eager", torch.float32, False), ("fp32 packed", torch.float32, False)]
    variants += [("fp32 compiled", torch.float32, True)]
    variants += [("bf16", torch.bfloat16, False), ("bf16 compiled", torch.bfloat16, True)]
    variants = [v for v in variants if compile or not v[2]]
    can_fp8, fp8_reason = acceleration.fp8_support(torch.device("cpu"))
    if fp8 and can_fp8:  # not on a CPU today; kept so that the row appears where torchao gains CPU float8
        variants.append(("fp8", torch.bfloat16, False))
    for name, dtype, compiled in variants:
        model = build_transformer(config, {k: v.to(dtype) for k, v in state.items()}, dtype, "benchmark")
        packed = name == "fp32 packed" or (dtype == torch.bfloat16 and memory.cpu_has_bf16())
        if packed and memory.packed_kernels_available() and not compiled:
            memory.pack_linears(model)
        if compiled:
            acceleration.compile_transformer(model, torch.device("cpu"), None)
        if name == "fp8":
            acceleration.apply_fp8(model)
        inputs = step_inputs(resolution, dtype)
        paths[name] = lambda m=model, i=inputs: m(*i)
        if compiled:
            with torch.no_grad():
                first = timed(paths[name])[1]
                compile_seconds[name] = max(first - timed(paths[name])[1], 0.0)
    samples: dict[str, list[float]] = {name: [] for name in paths}
    with torch.no_grad():
        reference = paths["fp32 eager"]().float()
        errors = {name: relative_error(fn().float(), reference) for name, fn in paths.items()}
        for _ in range(repeats):
            for name, fn in paths.items():
                samples[name].append(timed(fn)[0])
    medians = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    fastest = min(medians, key=medians.get)
    pays, why = acceleration.cpu_compile_pays(memory.recommended_dtype("cpu"))
    if memory.recommended_dtype("cpu") == torch.bfloat16:
        auto = "bf16 compiled" if pays else "bf16"
    else:
        auto = "fp32 compiled" if pays else "fp32 packed"  # this width packs (memory.packing_pays)
    rows = [
        [
            name,
            _fmt(min(samples[name])),
            _fmt(medians[name]),
            _fmt(medians[name] / medians["fp32 eager"]),
            _fmt(compile_seconds.get(name), 1) if name in compile_seconds else "–",
            f"{errors[name]:.1e}",
        ]
        for name in paths
    ]
    title = (
        f"### 1b. CPU paths: SD3-Medium width, depth {depth}, {resolution}², batch 2, {TEXT_TOKENS} text tokens "
        f"({torch.get_num_threads()} thread(s), CPU seconds per guided step, min / median of {repeats})\n\n"
        f"CPU: {cpu_name()}; native bfloat16: {memory.cpu_has_bf16()}. Fastest here: **{fastest}**; "
        f'"auto" picks **{auto}** ({why}).\n\n' + ("" if not fp8 or can_fp8 else f"fp8: not run ({fp8_reason}).\n\n")
    )
    header = ["path", "min s/step", "median s/step", "vs fp32 eager", "compile s", "rel. error vs fp32"]
    return title + table(header, rows), {"medians": medians, "compile": compile_seconds, "fastest": fastest}


def cpu_name() -> str:
    """The CPU's model name (``lscpu``'s "Model name"), or the platform's processor string."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    import platform

    return platform.processor() or "unknown"


def _contenders(theirs, ours, fast, inputs: tuple[torch.Tensor, ...]) -> dict[str, Callable[[], torch.Tensor]]:
    latents, embeds, pooled, timestep = inputs
    fns = {
        "diffusers": lambda: theirs(
            hidden_states=latents,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            timestep=timestep,
            return_dict=False,
        )[0],
        "ours eager": lambda: ours(*inputs),
    }
    if fast is not None:
        fns["ours"] = lambda: fast(*inputs)
    return fns


def write_folder(folder: Path, depth: int) -> Path:
    """A diffusers ``transformer/`` folder of the depth-``depth`` SD3-width model (float32, the same weights as
    :func:`section_speed`: diffusers' random initialisation with seed 0)."""
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = SD3Transformer2DModel(**sd3_config(depth))
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel", **sd3_config(depth)}))
    return folder


def section_precisions(folder: Path, depth: int, resolution: int, names: tuple[str, ...], work: Path) -> str:
    from safetensors.torch import load_file

    results = {}
    for name in names:
        spec = {
            "kind": "precision",
            "folder": str(folder),
            "resolution": resolution,
            "output": results_path(work, name),
            **PRECISIONS[name],
        }
        results[name] = run_child(spec)
    reference = load_file(str(work / "velocity-fp32.safetensors"))["velocity"] if "fp32" in results else None
    bf16 = results.get("bf16", {}).get("weights")
    bf16_full = extrapolate(bf16, depth) if bf16 and depth >= 2 else None
    rows = []
    for name, result in results.items():
        if "error" in result:
            rows.append([name, *["–"] * 6, result["error"]])
            continue
        error = (
            None if reference is None else relative_error(load_file(results_path(work, name))["velocity"], reference)
        )
        weights = result["weights"]
        full = extrapolate(weights, depth) if depth >= 2 else None
        rows.append(
            [
                name,
                _fmt(weights["total"] / 2**20, 0),
                _fmt(full / 2**30 if full else None),
                _fmt(full / bf16_full if full and bf16_full else None),
                _fmt(result["peak_mb"], 0),
                _fmt(result["peak_mb"] - result["baseline_mb"], 0),
                _fmt(result["step_cpu_s"]),
                "–" if error is None else f"{error:.4f}",
            ]
        )
    header = [
        "precision",
        f"weights MB (depth {depth})",
        "weights GB (24 blocks)",
        "× bf16 (24 blocks)",
        "peak RSS MB",
        "peak − baseline MB",
        "CPU s/step",
        "velocity rel. error vs fp32",
    ]
    title = (
        f"### 1b. Precisions: SD3-Medium width, depth {depth}, {resolution}², each loaded by the streaming loader in "
        "its own process\n\nWeights = parameters + quantization storage, without the 226 MB float32 position "
        "table; the 24-block column extrapolates blocks 0 and −1. `int8` on the CPU in bfloat16 is the "
        "weight-only path, `int8 (fp32 compute)` torch's dynamic int8; `int8` and `nf4` quantize the adaLN "
        "linears too (a third of SD3's parameters; the default), `modulation kept` leaves them in bfloat16.\n\n"
    )
    return title + table(header, rows)


def results_path(work: Path, name: str) -> str:
    return str(work / f"velocity-{name.replace(' ', '_')}.safetensors")


def section_attention(folder: Path, resolution: int, chunk: int, work: Path) -> str:
    from safetensors.torch import load_file

    rows = []
    for backend in ("default", "math"):
        outputs = {}
        for size in (None, chunk):
            output = work / f"attention-{backend}-{size}.safetensors"
            spec = {
                "kind": "attention",
                "folder": str(folder),
                "resolution": resolution,
                "chunk": size,
                "backend": backend,
                "output": str(output),
            }
            result = run_child(spec)
            if "error" in result:
                rows.append([backend, size or "none", "–", "–", "–", result["error"]])
                continue
            outputs[size] = load_file(str(output))["velocity"]
            same = (
                "–"
                if size is None or None not in outputs
                else f"{float((outputs[size] - outputs[None]).abs().max()):.1e}"
            )
            rows.append(
                [
                    backend,
                    size or "none",
                    _fmt(result["peak_mb"], 0),
                    _fmt(result["peak_mb"] - result["baseline_mb"], 0),
                    _fmt(result["cpu_s"]),
                    same,
                ]
            )
    tokens = (resolution // 16) ** 2 + TEXT_TOKENS
    title = (
        f"### 1c. Attention chunking: one float32 step at {resolution}² ({tokens} tokens, batch 2), SD3 width, "
        "depth 1\n\n`default` lets PyTorch pick (on the CPU its flash kernel, which never holds the score "
        "matrix); `math` is the kernel used where no fused one exists (and the one chunking is for).\n\n"
    )
    header = ["SDPA kernel", "chunk", "peak RSS MB", "peak − baseline MB", "CPU s", "max abs diff to unchunked"]
    return title + table(header, rows)


def section_vae(resolution: int, ops: tuple[str, ...]) -> str:
    rows = []
    for op in ops:
        for tiled in (False, None):
            result = run_child({"kind": "vae", "op": op, "tiled": tiled, "resolution": resolution})
            label = "off" if tiled is False else "auto (tiles above 768 px)"
            if "error" in result:
                rows.append([op, label, "–", "–", "–", result["error"]])
                continue
            rows.append(
                [
                    op,
                    label,
                    _fmt(result["peak_mb"], 0),
                    _fmt(result["peak_mb"] - result["baseline_mb"], 0),
                    _fmt(result["cpu_s"]),
                    "",
                ]
            )
    title = f"### 1d. VAE at {resolution}²: SD3-sized autoencoder (random weights), float32, one image\n\n"
    return title + table(["op", "tiling", "peak RSS MB", "peak − baseline MB", "CPU s", "note"], rows)


def section_2b(resolution: int, timeout: float, variants: tuple[str, ...] = ("nf4", "nf4, modulation kept")) -> str:
    from workbench.models.mmdit import MMDiT, MMDiTConfig

    with torch.device("meta"):
        model = MMDiT(MMDiTConfig.from_dict(sd3_config(24)))
    parameters = sum(p.numel() for p in model.parameters())
    bf16_bytes = parameters * 2
    rows = []
    for name in variants:
        spec = {
            "kind": "sd3_2b",
            "quantization": "nf4",
            "dtype": "bfloat16",
            "resolution": resolution,
            "quantize_modulation": not name.endswith("modulation kept"),
        }
        result = run_child(spec, timeout=timeout)
        if "error" in result:
            rows.append([name, *["–"] * 7, result["error"]])
            continue
        rows.append(
            [
                name,
                _fmt(result["build_s"], 0),
                _fmt(result["baseline_mb"], 0),
                _fmt(result["build_peak_mb"], 0),
                _fmt(result["step_cpu_s"], 1),
                _fmt(result["step_wall_s"], 1),
                _fmt(result["peak_mb"], 0),
                _fmt(result["weights"] / 2**30),
                _fmt(result["weights"] / bf16_bytes),
            ]
        )
    title = (
        f"### 2. Full SD3-Medium transformer ({parameters / 1e9:.2f} B parameters, {bf16_bytes / 2**30:.2f} GiB in "
        "bf16; random weights made and quantized tensor by tensor), bfloat16 compute, one guided step at "
        f"{resolution}²\n\nBaseline = RSS before the weights (libraries and the 226 MB position table).\n\n"
    )
    header = [
        "precision",
        "build s",
        "baseline MB",
        "peak RSS after build MB",
        "CPU s/step",
        "wall s/step",
        "peak RSS MB",
        "weights GiB",
        "× bf16",
    ]
    return title + table(header, rows)


def _judgements(result: dict) -> list[bool]:
    return [v for r in result["records"] for k, v in sorted(r["scores"].items()) if k != "all"]


SHAPESWORLD_ROWS = (
    "fp32",
    "bf16",
    "int8",
    "int8 weight-only",
    "nf4",
    "nf4, modulation kept",
    "fp32, guidance for σ ≥ 0.3",
    "fp32, model alone (no planned layout)",
)


def section_shapesworld(n: int, precisions: tuple[str, ...], steps: int | None, work: Path) -> str:
    import shutil

    import numpy as np

    from workbench import load_pipeline
    from workbench.loading import EMBEDDED_CONTROLNET, EMBEDDED_MODEL
    from workbench.shapesworld.evaluate import evaluate

    if not (EMBEDDED_MODEL / "model_index.json").is_file():
        return f"### 3. ShapesWorld\n\nskipped: no model at {EMBEDDED_MODEL}"
    snapshot = shutil.copytree(EMBEDDED_MODEL, work / "shapesworld-snapshot")
    if EMBEDDED_CONTROLNET.is_dir():  # its layout ControlNet, where the model folder names it (../)
        shutil.copytree(EMBEDDED_CONTROLNET, work / EMBEDDED_CONTROLNET.name)
    exported = time.strftime("%H:%M UTC", time.gmtime((EMBEDDED_MODEL / "transformer").stat().st_mtime))
    settings = {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "int8": {"quantization": "int8"}}
    settings.update({"nf4": {"quantization": "nf4"}, "nf4, modulation kept": {"quantization": "nf4"}})
    settings["nf4, modulation kept"]["quantize_modulation"] = False
    settings["int8 weight-only"] = {"quantization": "int8", "int8_backend": "weight_only"}
    settings["fp32, guidance for σ ≥ 0.3"] = {"call": {"guidance_interval": (0.3, 1.0)}}
    settings["fp32, model alone (no planned layout)"] = {"call": {"layout_guidance": 0.0, "layout_control": 0.0}}
    rows, reference, reference_images = [], None, None
    for name in precisions:
        pipe = load_pipeline(snapshot, **{k: v for k, v in settings[name].items() if k != "call"})
        defaults = pipe.defaults
        call = {"num_inference_steps": steps or defaults.num_inference_steps, **settings[name].get("call", {})}
        images: list = []

        def generate(captions, seeds, pipe=pipe, call=call, images=images):
            out = pipe(captions, seed=seeds, **call).images
            images.extend(out)
            return out

        one_image = lambda pipe=pipe, call=call, prompt=defaults.prompt: pipe(prompt, seed=0, **call)  # noqa: E731
        cpu, wall = interleaved({name: one_image}, repeats=5)[name]  # warm-up call, then the fastest of five
        if n == 0:  # timing only
            rows.append([name, _fmt(cpu), _fmt(wall)] + ["–"] * 6)
            continue
        result = evaluate(generate, n=n, seed=0, height=defaults.height, width=defaults.width)
        judgements = _judgements(result)
        if reference is None:
            reference, reference_images = result, images
        same = np.mean([a == b for a, b in zip(judgements, _judgements(reference))])
        pixels = np.mean(
            [np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).mean() for a, b in zip(images, reference_images)]
        )
        rows.append(
            [
                name,
                _fmt(cpu),
                _fmt(wall),
                _fmt(100 * result["all"], 1),
                _fmt(100 * np.mean(judgements), 1),
                _fmt(100 * (result["all"] - reference["all"]), 1),
                _fmt(100 * (np.mean(judgements) - np.mean(_judgements(reference))), 1),
                _fmt(100 * same, 1),
                _fmt(pixels, 2),
            ]
        )
    title = (
        f"### 3. ShapesWorld model ({EMBEDDED_MODEL.name} exported {exported}, copied before the run): one "
        f"{defaults.height}x{defaults.width} image, {call['num_inference_steps']} steps, guidance "
        f"{defaults.guidance_scale}, end to end (text, sampling, VAE); evaluation on n={n} captions (seed 0) against "
        f"the first row\n\ndiffusers has no counterpart: it cannot run this Mixture-of-Experts transformer. "
        "`attributes` = all single judgements (background, colour, shape, …); `same judgements` = fraction of them "
        "equal to the reference's on the same caption and seed.\n\n"
    )
    header = [
        "precision",
        "CPU s/image",
        "wall s/image",
        "all correct %",
        "attributes %",
        "Δ all (points)",
        "Δ attributes (points)",
        "same judgements %",
        "mean abs Δpixel (0–255)",
    ]
    return title + table(header, rows)


# -------------------------------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small subset: depth 1, 256², no 2B step")
    parser.add_argument("--depth", type=int, default=None, help="blocks of the reduced SD3-width model (default 2)")
    parser.add_argument("--resolution", type=int, default=None, help="image side for section 1 (default 512)")
    parser.add_argument("--repeats", type=int, default=None, help="timing repeats (default 3)")
    parser.add_argument(
        "--sections",
        default="1,2,3",
        help="comma-separated sections to run (1, 2, 3; speed, cpu: table 1a or 1b alone)",
    )
    parser.add_argument(
        "--eval-n", type=int, default=None, help="ShapesWorld captions per precision (default 32; 0: timing only)"
    )
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "on", "off"],
        help="compiled rows of the CPU paths table (auto/on: measured, minutes of compiling; off: left out)",
    )
    parser.add_argument(
        "--fp8", default="off", choices=["auto", "on", "off"], help="fp8 row of the CPU paths table, where it runs"
    )
    parser.add_argument("--timeout-2b", type=float, default=1800.0, help="seconds allowed for the 2B nf4 step")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    if args.child:
        child_main(json.loads(args.child))
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    quick = args.quick
    depth = args.depth or (1 if quick else 2)
    resolution = args.resolution or (256 if quick else 512)
    repeats = args.repeats or (1 if quick else 3)
    sections = {s.strip() for s in args.sections.split(",")}
    eval_n = args.eval_n if args.eval_n is not None else (4 if quick else 32)
    compile, fp8 = args.compile != "off", args.fp8 != "off"
    if eval_n < 0:
        raise ValueError(f"--eval-n must be ≥ 0 (0: timing only), got {eval_n}")
    started = time.perf_counter()
    print(f"# Workbench memory and speed benchmark\n\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    with tempfile.TemporaryDirectory(prefix="wb-bench-") as tmp:
        work = Path(tmp)
        if "1" in sections:
            text, _ = section_speed(depth, resolution, repeats)
            print("\n" + text, flush=True)
            print("\n" + section_cpu_paths(depth, resolution, repeats, compile, fp8)[0], flush=True)
            folder = write_folder(work / f"transformer-{depth}", depth)
            names = QUICK_PRECISIONS if quick else tuple(PRECISIONS)
            print("\n" + section_precisions(folder, depth, resolution, names, work), flush=True)
            attention_folder = folder if depth == 1 else write_folder(work / "transformer-1", 1)
            attention_resolution = 512 if quick else 1024
            print("\n" + section_attention(attention_folder, attention_resolution, 1024, work), flush=True)
            print(
                "\n" + section_vae(512 if quick else 1024, ("decode",) if quick else ("decode", "encode")), flush=True
            )
        if "speed" in sections and "1" not in sections:
            print("\n" + section_speed(depth, resolution, repeats)[0], flush=True)
        if "cpu" in sections and "1" not in sections:
            print("\n" + section_cpu_paths(depth, resolution, repeats, compile, fp8)[0], flush=True)
        if "2" in sections and not quick:
            print("\n" + section_2b(512, args.timeout_2b), flush=True)
        if "3" in sections:
            precisions = ("fp32", "nf4") if quick else SHAPESWORLD_ROWS
            print("\n" + section_shapesworld(eval_n, precisions, 4 if quick else None, work), flush=True)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
