"""GPU benchmark: full-size SD3-Medium with random bfloat16 weights on one CUDA device.

Prints markdown tables: seconds and it/s per guided step at 1024² (batch 2 = [negative; positive], 333 text tokens)
for ours and diffusers' SD3Transformer2DModel sharing the same weights, with the fraction of the chip's peak bfloat16
throughput reached (SD3-Medium ≈ 17.8 TFLOP per guided step at 1024²); peak GPU memory of one step for bf16, int8
and nf4 transformers; and a whole pipeline call (random SD3 VAE, no text encoders: zero conditioning) without
offload, with model offload and with sequential offload, checking that the latents are identical.

Run through ``benchmarks/gpu.sh``; ``--device cpu --depth 1 --resolution 256`` is a smoke test without a GPU.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import TEXT_TOKENS, random_state, sd3_config, step_inputs, table  # noqa: E402  (benchmarks/bench.py)

from workbench import memory  # noqa: E402
from workbench.loading import _materialize  # noqa: E402
from workbench.models.mmdit import MMDiTConfig  # noqa: E402

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


def time_steps(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--depth", type=int, default=24)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sections", default="speed,quantized,offload")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device available", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    config = MMDiTConfig.from_dict(sd3_config(args.depth))
    flop = FLOP_PER_STEP_1024 * (args.depth / 24) * (args.resolution / 1024) ** 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# GPU benchmark on {name}: torch {torch.__version__}, SD3-Medium width, {args.depth} blocks\n")
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    runs = {
        "speed": lambda: speed_section(config, device, args.resolution, args.repeats, flop),
        "quantized": lambda: quantized_section(config, device, args.resolution, max(args.repeats // 2, 1)),
        "offload": lambda: offload_section(config, device, args.resolution),
    }
    for name, run in runs.items():
        if name in sections:
            try:
                print(run() + "\n", flush=True)
            except Exception:  # noqa: BLE001 - one failing section must not hide the others
                print(f"### {name}: failed\n\n```\n{traceback.format_exc()}```\n", flush=True)
            reset_peak(device)
    print(f"(total {time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
