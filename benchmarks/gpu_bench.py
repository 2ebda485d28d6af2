"""GPU benchmark: full-size SD3-Medium with random bfloat16 weights on one CUDA device.

Prints (and with ``--out DIR`` or ``$OUT`` writes to ``DIR/gpu_bench.md``) markdown tables:

* ``accel``: one guided step at 1024² (batch 2 = [negative; positive], 333 text tokens) for ours eager, compiled
  (``torch.compile`` of the blocks, as ``workbench.acceleration`` does), fp8 (torchao float8 rowwise, compiled) and
  step caching (threshold 0.2 on the compiled model, an Euler path of ``--steps`` steps), against diffusers'
  ``SD3Transformer2DModel`` eager and compiled with ``torch.compile``, on the same weights: seconds per guided step,
  the share of the card's peak bf16 throughput (SD3-Medium ≈ 17.8 TFLOP per guided step at 1024²), peak memory,
  compile time and the velocity's relative error against our bf16 eager step; then, if time is left, ours compiled
  with ``max-autotune-no-cudagraphs``.
* ``speed``, ``quantized``, ``offload``: the older tables (ours vs diffusers eager; bf16 / int8 / nf4 transformers;
  a pipeline call with and without offload).

An internal time budget (``--budget``, default 420 s; ``benchmarks/gpu.sh`` stops the process at 470 s) skips the
rows and sections that no longer fit, saying so. Run through ``benchmarks/gpu.sh``; ``--tiny --device cpu`` is a
smoke test of the whole run on a small random model without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import TEXT_TOKENS, random_state, sd3_config, step_inputs, table  # noqa: E402  (benchmarks/bench.py)

from workbench import acceleration, memory  # noqa: E402
from workbench.loading import _materialize  # noqa: E402
from workbench.models.mmdit import MMDiTConfig  # noqa: E402
from workbench.step_cache import StepCache  # noqa: E402

TINY = {**sd3_config(2), "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": 64,
        "caption_projection_dim": 64, "pooled_projection_dim": 64, "sample_size": 32,
        "pos_embed_max_size": 32}  # fmt: skip
"""``--tiny``: the SD3 layout at width 64, depth 2, for the smoke test on a CPU."""

FLOP_PER_STEP_1024 = 17.8e12
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def timed_calls(fn, device: torch.device, repeats: int) -> list[float]:
    """Wall seconds of each of ``repeats`` calls of ``fn()``, the device synchronised around each."""
    samples = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return samples


def time_steps(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    samples = timed_calls(fn, device, repeats)
    return sorted(samples)[len(samples) // 2]


def build(config: MMDiTConfig, device: torch.device, quantization: str | None, source_device: torch.device):
    """Our transformer with the benchmark's random weights (made tensor by tensor on ``source_device``)."""
    tensors = ((k, v.to(device)) for k, v in random_state(config, 0, source_device, torch.bfloat16))
    model = memory.stream_transformer(config, tensors, torch.bfloat16, quantization, device)
    _materialize(model)
    return model.to(device)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def speed_section(config: MMDiTConfig, device: torch.device, resolution: int, repeats: int, flop: float) -> str:
    reset_peak(device)
    ours = build(config, device, None, device)
    inputs = tuple(t.to(device) for t in step_inputs(resolution, torch.bfloat16))
    rows = []
    with torch.no_grad():
        seconds = time_steps(lambda: ours(*inputs), device, repeats)
        rows.append(["ours", seconds, peak_gib(device)])
        try:
            from diffusers import SD3Transformer2DModel

            with torch.device("meta"):
                theirs = SD3Transformer2DModel(**sd3_config(config.num_layers))
            theirs.load_state_dict(ours.state_dict(), assign=True)
            theirs = theirs.to(device, torch.bfloat16).eval()
            latents, embeds, pooled, timestep = inputs
            call = lambda: theirs(latents, embeds, pooled, timestep, return_dict=False)[0]
            difference = float((call().float() - ours(*inputs).float()).norm() / call().float().norm())
            rows.append(["diffusers", time_steps(call, device, repeats), None])
        except ImportError:
            difference = None
            rows.append(["diffusers (not installed)", None, None])
    peak = peak_flops(device)
    out = []
    for name, seconds, memory_gib in rows:
        utilisation = None if seconds is None or peak is None else flop / seconds / peak
        out.append(
            [
                name,
                "–" if seconds is None else f"{seconds:.3f}",
                "–" if seconds is None else f"{1 / seconds:.2f}",
                "–" if utilisation is None else f"{100 * utilisation:.1f}%",
                "–" if memory_gib is None else f"{memory_gib:.2f}",
            ]
        )
    title = (
        f"### Guided step at {resolution}² (batch 2, {TEXT_TOKENS} text tokens), bfloat16, "
        f"{config.num_layers} blocks, median of {repeats}\n\n"
        f"{flop / 1e12:.1f} TFLOP per step; peak bf16 {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOPS'}"
        f"; relative difference ours vs diffusers: {'–' if difference is None else f'{difference:.1e}'}\n\n"
    )
    return title + table(["model", "s/step", "it/s", "of peak bf16", "peak GiB"], out)


def quantized_section(config: MMDiTConfig, device: torch.device, resolution: int, repeats: int) -> str:
    rows = []
    inputs = tuple(t.to(device) for t in step_inputs(resolution, torch.bfloat16))
    for quantization in (None, "int8", "nf4"):
        reset_peak(device)
        try:
            model = build(config, device, quantization, device)
            weights = memory.tensor_bytes(model)
            with torch.no_grad():
                seconds = time_steps(lambda m=model: m(*inputs), device, repeats, warmup=1)
            rows.append(
                [
                    quantization or "bf16",
                    f"{(weights['parameters'] + weights['quantized']) / 2**30:.2f}",
                    "–" if peak_gib(device) is None else f"{peak_gib(device):.2f}",
                    f"{seconds:.3f}",
                ]
            )
            del model
        except Exception as err:  # noqa: BLE001 - a missing bitsandbytes build is reported in the table
            rows.append([quantization, "–", "–", f"failed: {type(err).__name__}: {str(err)[:80]}"])
    title = f"### Transformer precision: one guided step at {resolution}² (peak = weights + activations)\n\n"
    return title + table(["precision", "weights GiB", "peak GiB", "s/step"], rows)


def offload_section(config: MMDiTConfig, device: torch.device, resolution: int) -> str:
    from workbench.models.text import TextConditioner
    from workbench.models.vae import AutoencoderKL, VAEConfig
    from workbench.pipeline import Pipeline

    transformer = build(config, torch.device("cpu"), None, device)
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig()).to(torch.bfloat16).eval().requires_grad_(False)
    text = TextConditioner(None, None, None, joint_attention_dim=4096, pooled_projection_dim=2048)
    pipe = Pipeline(transformer, vae, text, "sd3-medium-random", None, "cpu", torch.bfloat16)
    call = dict(height=resolution, width=resolution, num_inference_steps=2, guidance_scale=5.0, seed=0)
    rows, reference = [], None
    for offload in (None, "model", "sequential"):
        memory.prepare(pipe, device, offload=offload, cpu_kernels=False)
        reset_peak(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = pipe("a photo", **call)
        synchronize(device)
        seconds = time.perf_counter() - start
        reference = out.latents if reference is None else reference
        rows.append(
            [
                offload or "none",
                "–" if peak_gib(device) is None else f"{peak_gib(device):.2f}",
                f"{seconds:.2f}",
                str(torch.equal(out.latents, reference)),
            ]
        )
    memory.prepare(pipe, "cpu", cpu_kernels=False)
    title = (
        f"### Pipeline call at {resolution}², 2 steps with guidance, bf16 transformer and VAE (tiled above 768 px), "
        "zero text conditioning\n\n"
    )
    return title + table(["offload", "peak GiB", "s/image (incl. transfers)", "latents identical"], rows)


class Budget:
    """Seconds left of the run's time budget; :meth:`fits` says whether a part estimated at ``seconds`` fits."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def fits(self, seconds: float) -> bool:
        return self.left() >= seconds


def model_inputs(config: MMDiTConfig, resolution: int, device: torch.device, text_tokens: int = TEXT_TOKENS):
    """One guided step's inputs for ``config``: latents (2, C, r/8, r/8), text, pooled, timestep (2,), bf16."""
    generator = torch.Generator().manual_seed(0)
    side = resolution // 8
    latents = torch.randn(2, config.in_channels, side, side, generator=generator)
    embeds = torch.randn(2, text_tokens, config.joint_attention_dim, generator=generator)
    pooled = torch.randn(2, config.pooled_projection_dim, generator=generator)
    tensors = (latents, embeds, pooled)
    return (*(t.to(device, torch.bfloat16) for t in tensors), torch.full((2,), 700.0, device=device))


def diffusers_kwargs(config: MMDiTConfig) -> dict:
    names = ("sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim", "num_attention_heads",
             "joint_attention_dim", "caption_projection_dim", "pooled_projection_dim", "out_channels",
             "pos_embed_max_size")  # fmt: skip
    return {name: getattr(config, name) for name in names}


def first_and_steady(fn, device: torch.device, repeats: int) -> tuple[float, list[float]]:
    """Wall seconds of the first call (compiles) and of ``repeats`` calls after one more warm-up."""
    (first,) = timed_calls(fn, device, 1)
    fn()
    return first, timed_calls(fn, device, repeats)


def euler_path(model, inputs, steps: int, cache: StepCache | None, guidance: float = 5.0) -> torch.Tensor:
    """The final latents of a guided Euler path of ``steps`` steps from ``inputs``' latents (σ 1 → 0, shift 3),
    with ``cache`` attached to ``model`` (None: no step caching)."""
    from workbench import flow

    latents, embeds, pooled, _ = inputs
    x = latents[:1].float()
    sigmas = [float(v) for v in flow.sigma_schedule(steps, 3.0)]

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        both = model(
            torch.cat([x, x]).to(latents.dtype), embeds, pooled, torch.full((2,), sigma * 1000, device=x.device)
        )
        negative, positive = both.float().chunk(2)
        return negative + guidance * (positive - negative)

    if cache is not None:
        velocity = cache.velocity(velocity)
    model.step_cache = cache
    try:
        for sigma, following in zip(sigmas[:-1], sigmas[1:]):
            x = x + (following - sigma) * velocity(x, sigma)
    finally:
        model.step_cache = None
    return x


def accel_section(args, config: MMDiTConfig, device: torch.device, flop: float | None, budget: Budget) -> str:
    """Ours eager / compiled / fp8 / step caching vs diffusers eager / compiled, one guided step (see the module
    docstring)."""
    resolution, repeats, mode = args.resolution, args.repeats, args.mode
    inputs = model_inputs(config, resolution, device)
    peak = peak_flops(device)
    rows: list[list[str]] = []
    notes: list[str] = []
    reference: dict[str, torch.Tensor] = {}

    def row(name, seconds=None, memory_gib=None, compile_s=None, error=None, note=""):
        utilisation = None if seconds is None or peak is None or flop is None else flop / seconds / peak
        rows.append([
            name,
            "–" if seconds is None else f"{seconds:.4f}",
            "–" if seconds is None else f"{1 / seconds:.2f}",
            "–" if utilisation is None else f"{100 * utilisation:.1f}%",
            "–" if memory_gib is None else f"{memory_gib:.2f}",
            "–" if compile_s is None else f"{compile_s:.1f}",
            "–" if error is None else f"{error:.1e}",
            note,
        ])  # fmt: skip

    def error_of(out: torch.Tensor) -> float:
        ref = reference["v"]
        return float((out.float() - ref).norm() / ref.norm())

    def measure(name: str, make, estimate: float, compiled: bool) -> None:
        """Build with ``make()`` (returns the step function), time it, record a row; skip when over budget."""
        if not budget.fits(estimate):
            row(name, note=f"skipped: {budget.left():.0f} s of the time budget left, ~{estimate:.0f} s needed")
            return
        reset_peak(device)
        baseline = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
        try:
            with torch.no_grad():
                fn = make()
                first, samples = first_and_steady(fn, device, repeats)
                out = fn()
        except KeyboardInterrupt:  # benchmarks/gpu.sh's time limit (SIGINT): keep the table, skip the rest
            row(name, note="interrupted by the time limit")
            budget.end = time.perf_counter()
            return
        except Exception as err:  # noqa: BLE001 - one failing row must not hide the others
            row(name, note=f"failed: {type(err).__name__}: {str(err)[:100]}")
            traceback.print_exc()
            return
        seconds = statistics.median(samples)
        if "v" not in reference:
            reference["v"] = out.float()
        compile_s = max(first - seconds, 0.0) if compiled else None
        used = None if baseline is None else peak_gib(device) - baseline
        row(name, seconds, used, compile_s, error_of(out))
        print(f"  {name}: {seconds:.4f} s/step (compile {compile_s or 0:.1f} s)", flush=True)

    # SDPA backend for our compiled rows, chosen once for this card
    try:
        backend, why = acceleration.fastest_sdpa_backend(
            device,
            torch.bfloat16,
            (2, config.num_attention_heads),
            (resolution // 16) ** 2 + TEXT_TOKENS,
            config.attention_head_dim,
        )
    except Exception as err:  # noqa: BLE001
        backend, why = None, f"timing failed: {type(err).__name__}: {err}"
    notes.append(f"SDPA backend for our accelerated rows: {backend or 'torch default'} ({why}).")
    can_fp8, fp8_reason = acceleration.fp8_support(device)
    compile_estimate = 30.0 if args.tiny else 120.0

    def ours(compiled: bool, fp8: bool = False, compile_mode: str | None = mode):
        def make():
            model = build(config, device, None, device)
            if fp8:
                acceleration.apply_fp8(model)
            if (compiled or fp8) and backend is not None:
                acceleration.prefer_sdpa_backend(model, backend)
            if compiled:
                acceleration.compile_transformer(model, device, compile_mode)
            models.append(model)
            return lambda: model(*inputs)

        return make

    models: list = []
    measure("ours bf16 eager", ours(False), 20.0, compiled=False)
    reference_model = models[-1] if models else None
    try:
        from diffusers import SD3Transformer2DModel
    except ImportError:
        SD3Transformer2DModel = None

    def theirs(compiled: bool):
        def make():
            with torch.device("meta"):
                model = SD3Transformer2DModel(**diffusers_kwargs(config))
            source = reference_model if reference_model is not None else build(config, device, None, device)
            model.load_state_dict({k: v.clone() for k, v in source.state_dict().items()}, assign=True)
            model = model.to(device, torch.bfloat16).eval()
            if compiled:
                options = {"mode": mode} if device.type == "cuda" else {"options": {"freezing": True}}
                model = torch.compile(model, dynamic=False, **options)
            latents, embeds, pooled, timestep = inputs
            return lambda: model(latents, embeds, pooled, timestep, return_dict=False)[0]

        return make

    if SD3Transformer2DModel is not None:
        measure("diffusers bf16 eager", theirs(False), 20.0, compiled=False)
    else:
        row("diffusers (not installed)")
    measure(f"ours compiled ({mode or 'default'})", ours(True), compile_estimate, compiled=True)
    if can_fp8:
        measure(f"ours fp8 compiled ({mode or 'default'})", ours(True, fp8=True), compile_estimate, compiled=True)
    else:
        row("ours fp8", note=f"skipped: {fp8_reason}")
    # step caching on our fastest compiled model: the whole Euler path, per step
    name = f"ours compiled + step caching {args.cache_threshold}"
    steps = args.steps
    if len(models) >= 2 and budget.fits(steps * 0.2 + 10):
        model = models[-1] if not can_fp8 else models[-2]
        try:
            with torch.no_grad():
                reset_peak(device)
                baseline = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None
                plain_path = euler_path(model, inputs, steps, None)
                synchronize(device)
                start = time.perf_counter()
                plain_path = euler_path(model, inputs, steps, None)
                synchronize(device)
                plain = (time.perf_counter() - start) / steps
                cache = StepCache(args.cache_threshold, always=())
                start = time.perf_counter()
                cached_path = euler_path(model, inputs, steps, cache)
                synchronize(device)
                cached = (time.perf_counter() - start) / steps
            path_error = float((cached_path - plain_path).norm() / plain_path.norm())
            used = None if baseline is None else peak_gib(device) - baseline
            row(f"ours compiled, {steps}-step Euler path", plain, used)
            note = f"{cache.skipped} of {steps} evaluations reused; error: final latents vs the uncached path"
            row(name, cached, used, None, path_error, note)
        except KeyboardInterrupt:
            row(name, note="interrupted by the time limit")
            budget.end = time.perf_counter()
        except Exception as err:  # noqa: BLE001
            row(name, note=f"failed: {type(err).__name__}: {str(err)[:100]}")
            traceback.print_exc()
    else:
        row(name, note="skipped: no compiled model or no time left")
    if SD3Transformer2DModel is not None:
        measure(f"diffusers torch.compile ({mode or 'default'})", theirs(True), compile_estimate * 1.5, compiled=True)
    if mode != "max-autotune-no-cudagraphs" and device.type == "cuda":
        extra = "max-autotune-no-cudagraphs"
        measure(f"ours compiled ({extra})", ours(True, compile_mode=extra), 240.0, compiled=True)
    del models[:]
    title = (
        f"### Acceleration: one guided step at {resolution}² (batch 2, {TEXT_TOKENS} text tokens), bf16 weights, "
        f"{config.num_layers} blocks, width {config.inner_dim}, median of {repeats}\n\n"
        + ("" if flop is None else f"{flop / 1e12:.1f} TFLOP per step; ")
        + f"peak bf16 {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOPS'}. "
        "Compile time: first call minus a warm call (inductor's FX graph cache: "
        f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR') or 'its default folder'}; a warm cache compiles faster). "
        "Peak GiB: the most allocated during the row above what was allocated before it (its own weights "
        "included; the step-caching rows: activations only). "
        "Error: ‖v − v_ref‖ / ‖v_ref‖ against our bf16 eager step. Random weights: the step-caching row "
        "measures the mechanism's cost and speed, not its image quality.\n\n" + "\n".join(notes) + "\n\n"
    )
    header = ["variant", "s/step", "it/s", "of peak bf16", "peak GiB", "compile s", "rel. error", "note"]
    return title + table(header, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--depth", type=int, default=None, help="blocks (default 24; --tiny: 2)")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default 1024; --tiny: 128)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (default 10; --tiny: 2)")
    parser.add_argument("--sections", default="accel,quantized,offload", help="accel, speed, quantized, offload")
    parser.add_argument("--tiny", action="store_true", help="a width-64 SD3-layout model: the CPU smoke test")
    parser.add_argument("--mode", default="default", help="torch.compile mode of the compiled rows (CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="Euler steps of the step-caching rows (default 28)")
    parser.add_argument("--cache-threshold", type=float, default=0.2)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run; later parts skip")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_bench.md (default: $OUT)")
    args = parser.parse_args(argv)
    budget = Budget(args.budget)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device available", file=sys.stderr)
        return 1
    args.mode = None if args.mode == "default" else args.mode
    if args.mode not in acceleration.COMPILE_MODES:
        parser.error(f"--mode must be one of {acceleration.COMPILE_MODES[1:]}")
    args.depth = args.depth or (2 if args.tiny else 24)
    args.resolution = args.resolution or (128 if args.tiny else 1024)
    args.repeats = args.repeats or (2 if args.tiny else 10)
    args.steps = args.steps or (6 if args.tiny else 28)
    torch.backends.cuda.matmul.allow_tf32 = True
    config = MMDiTConfig.from_dict({**TINY, "num_layers": args.depth} if args.tiny else sd3_config(args.depth))
    sd3_width = not args.tiny
    flop = FLOP_PER_STEP_1024 * (args.depth / 24) * (args.resolution / 1024) ** 2 if sd3_width else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (
        f"# GPU benchmark on {name}: torch {torch.__version__}, "
        f"{'tiny SD3 layout (width 64)' if args.tiny else 'SD3-Medium width'}, {args.depth} blocks\n"
    )
    print(header, flush=True)
    report = [header]
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    runs = {
        "accel": (lambda: accel_section(args, config, device, flop, budget), 60.0),
        "speed": (lambda: speed_section(config, device, args.resolution, args.repeats, flop or 0.0), 60.0),
        "quantized": (lambda: quantized_section(config, device, args.resolution, max(args.repeats // 2, 1)), 60.0),
        "offload": (lambda: offload_section(config, device, args.resolution), 60.0),
    }
    for name, (run, estimate) in runs.items():
        if name not in sections:
            continue
        if sd3_width is False and name in ("speed", "quantized", "offload"):
            text = f"### {name}: skipped with --tiny (SD3-Medium-sized inputs)\n"
        elif not budget.fits(estimate):
            text = f"### {name}: skipped, {budget.left():.0f} s of the {args.budget:.0f} s time budget left\n"
        else:
            try:
                text = run() + "\n"
            except KeyboardInterrupt:  # the time limit of benchmarks/gpu.sh: write what there is
                text = f"### {name}: interrupted by the time limit\n"
                budget.end = time.perf_counter()
            except Exception:  # noqa: BLE001 - one failing section must not hide the others
                text = f"### {name}: failed\n\n```\n{traceback.format_exc()}```\n"
        print(text, flush=True)
        report.append(text)
        write_report(args.out, report)
        reset_peak(device)
    footer = f"(total {time.perf_counter() - started:.0f} s)"
    print(footer)
    report.append(footer + "\n")
    path = write_report(args.out, report)
    if path is not None:
        print(f"report: {path}")
    return 0


def write_report(folder: str | None, parts: list[str]) -> Path | None:
    """Write ``parts`` to ``folder/gpu_bench.md`` (after every section, so a run cut short keeps what it measured)."""
    if not folder:
        return None
    path = Path(folder) / "gpu_bench.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path


if __name__ == "__main__":
    sys.exit(main())
