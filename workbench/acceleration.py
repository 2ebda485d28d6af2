"""Acceleration: make a loaded pipeline's transformer (and VAE decoder) faster, behind one switch.

``accelerate_pipeline(pipe, compile="auto", fp8="auto")`` (or ``load_pipeline(…, compile=…, fp8=…)``) applies, in
this order:

* **fp8** (CUDA cards with compute capability ≥ 8.9: Ada, Hopper and newer): torchao's float8 with dynamic
  activations and rowwise e4m3 scales (``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``) on the
  linears of the transformer blocks whose sides are multiples of 16; the adaLN modulation linears, the embedders and
  the output projection stay in the model's dtype. torchao is optional and imported only here; without it, on the
  CPU or on an older card the step falls back to the model's dtype and the report says why.
* **SDPA backend** (CUDA): the fastest of cuDNN, Flash and memory-efficient attention, timed once on the model's
  attention shape, made the preferred backend around every transformer call.
* **torch.compile** (inductor, ``dynamic=False``) of each transformer block ("regional" compilation: identical
  blocks share one compiled graph, so compile time does not grow with depth) and of the VAE decoder. Everything
  outside the blocks (the step cache's decision, routing records, ControlNet residuals) stays eager, so those
  features keep working. Block inputs are tensors of fixed shape (the timestep enters as the conditioning tensor),
  so a generation compiles once per (batch, size) and never between steps. CUDA uses ``mode`` (default
  "max-autotune-no-cudagraphs"; "reduce-overhead" adds CUDA graphs; the VAE decoder, run once per image, uses the
  default mode); the CPU uses inductor's weight freezing
  (constant folding and oneDNN weight prepacking; inference under ``torch.no_grad``).

"auto" means: compile on CUDA; on the CPU only where :func:`cpu_compile_pays` says so (the rule measured by
``benchmarks/bench.py --sections cpu``); fp8 wherever it can run. Compilation is lazy: the first call of a new shape
compiles (:func:`warmup` runs it and measures the compile time). Inductor keeps compiled kernels in its FX graph
cache (``TORCHINDUCTOR_CACHE_DIR``, default ``/tmp/torchinductor_$USER``), so a second process compiles much faster.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from workbench.offload import offloader_of
from workbench.quantization import is_quantized

if TYPE_CHECKING:
    from workbench.pipeline import Pipeline

__all__ = [
    "AccelerationReport",
    "accelerate_pipeline",
    "check_switch",
    "cpu_compile_pays",
    "fp8_support",
    "warmup",
]

SWITCH_WORDS = {"auto": "auto", "on": True, "true": True, "1": True, "off": False, "false": False, "0": False}
CUDA_COMPILE_MODE = "max-autotune-no-cudagraphs"
COMPILE_MODES = (None, "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead")
FP8_MIN_CAPABILITY = (8, 9)


@dataclass
class AccelerationReport:
    """What :func:`accelerate_pipeline` did and why. ``compiled``: the parts compiled ("transformer blocks",
    "vae decoder"); ``fp8_layers``: linears converted to float8; ``sdpa_backend``: the preferred attention kernel
    (None: torch's default order); ``compile_seconds``: first-call time minus a warm call, per part, once
    :func:`warmup` has run."""

    device: str
    compiled: list[str] = field(default_factory=list)
    compile_mode: str | None = None
    compile_reason: str = ""
    fp8: bool = False
    fp8_layers: int = 0
    fp8_reason: str = ""
    sdpa_backend: str | None = None
    sdpa_reason: str = ""
    compile_seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        """One line per technique, e.g. for the command line."""
        lines = [
            f"compile: {', '.join(self.compiled) or 'off'}"
            + (f" (mode {self.compile_mode})" if self.compile_mode else "")
            + f" — {self.compile_reason}",
            f"fp8: {f'{self.fp8_layers} linears' if self.fp8 else 'off'} — {self.fp8_reason}",
            f"attention: {self.sdpa_backend or 'torch default'} — {self.sdpa_reason}",
        ]
        if self.compile_seconds:
            lines.append("compile time: " + ", ".join(f"{k} {v:.1f} s" for k, v in self.compile_seconds.items()))
        return "\n".join(lines)


def check_switch(value: object, name: str) -> bool | str:
    """``value`` as True, False or "auto" (also "on"/"off"/"true"/"false"/"1"/"0"); ValueError naming ``name``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in SWITCH_WORDS:
        return SWITCH_WORDS[value.strip().lower()]
    raise ValueError(f"{name} must be True, False or 'auto' (or on/off), got {value!r}")


# -------------------------------------------------------------------------------------------------------- decisions


def cpu_compile_pays(dtype: torch.dtype) -> tuple[bool, str]:
    """Whether "auto" compiles on this CPU for ``dtype``, and why. Measured with ``benchmarks/bench.py --sections
    cpu`` (SD3 width, depth 2, 512², guided step; README "Compile and fp8"): on a 2-core AMD EPYC with AVX512-BF16
    and without AMX, inductor with freezing made a float32 step 4 % faster after about 30 s of compiling (some 225
    steps to break even) and made the bfloat16 step (oneDNN-packed linears, the fastest path there) slower. So the
    CPU rule is: never compile by default; ``compile=True`` still does."""
    return False, (
        "auto: not on the CPU (measured: the compiled step is at most a few % faster than the eager float32 or "
        "packed bfloat16 step, not worth the compile time; ask with compile=True)"
    )


def fp8_support(device: torch.device) -> tuple[bool, str]:
    """Whether torchao float8 can run on ``device``, and why not."""
    if device.type != "cuda":
        return False, f"fp8 matmuls need a CUDA card with compute capability ≥ 8.9 (Ada, Hopper); this is {device.type}"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return False, f"{name} has compute capability {capability[0]}.{capability[1]}; fp8 matmuls need ≥ 8.9"
    try:
        importlib.import_module("torchao.quantization")
    except ImportError:
        return False, "torchao is not installed (pip install torchao); fp8 needs its float8 kernels"
    return True, f"torchao float8, rowwise e4m3 weights and dynamic activations (compute capability {capability})"


# -------------------------------------------------------------------------------------------------------------- fp8


def fp8_filter(module: nn.Module, name: str) -> bool:
    """The linears that go to float8: inside a transformer block, not an adaLN modulation (``norm…``), both sides
    multiples of 16 (the fp8 GEMM's alignment)."""
    return (
        isinstance(module, nn.Linear)
        and name.startswith("transformer_blocks.")
        and ".norm" not in name
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def apply_fp8(transformer: nn.Module) -> int:
    """Convert the :func:`fp8_filter` linears of ``transformer`` to torchao float8 (rowwise, dynamic activations);
    returns how many. ImportError without torchao."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    count = sum(1 for name, module in transformer.named_modules() if fp8_filter(module, name))
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), filter_fn=fp8_filter)
    return count


# ----------------------------------------------------------------------------------------------------------- SDPA


def _backends() -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    return {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }


def fastest_sdpa_backend(
    device: torch.device, dtype: torch.dtype, batch_heads: tuple[int, int], tokens: int, head_dim: int
) -> tuple[str | None, str]:
    """The fastest SDPA backend for ``(batch, heads, tokens, head_dim)`` attention on this CUDA card, timed (three
    calls each after a warm-up); None where none runs or on the CPU."""
    if device.type != "cuda":
        return None, "CPU: torch's own choice"
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(*batch_heads, tokens, head_dim, device=device, dtype=dtype)
    timings = {}
    for name, backend in _backends().items():
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q)
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                for _ in range(3):
                    torch.nn.functional.scaled_dot_product_attention(q, q, q)
                torch.cuda.synchronize(device)
            timings[name] = (time.perf_counter() - start) / 3
        except Exception:  # noqa: BLE001 - a backend this card or shape does not support
            continue
    if not timings:
        return None, "no fused SDPA backend ran on this shape; torch's default order"
    best = min(timings, key=timings.get)
    times = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in sorted(timings.items(), key=lambda kv: kv[1]))
    return best, f"timed at {tokens} tokens × {head_dim}: {times}"


def prefer_sdpa_backend(module: nn.Module, backend: str) -> None:
    """Make ``backend`` torch's first SDPA choice during every call of ``module`` (hooks entering
    ``sdpa_kernel(…, set_priority=True)``); the other backends stay allowed behind it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [_backends()[backend]] + [b for b in _backends().values() if b != _backends()[backend]] + [SDPBackend.MATH]
    contexts: list = []

    def enter(*_args) -> None:
        try:
            context = sdpa_kernel(order, set_priority=True)
        except TypeError:  # torch < 2.6: no priorities; the order then only lists the allowed backends
            context = sdpa_kernel(order)
        context.__enter__()
        contexts.append(context)

    def leave(*_args) -> None:
        if contexts:
            contexts.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


# -------------------------------------------------------------------------------------------------------- compile


def compile_module(module: nn.Module, device: torch.device, mode: str | None) -> None:
    """``torch.compile`` ``module`` in place (its state dict keeps its names): static shapes; on CUDA with
    ``mode``, on the CPU with inductor's weight freezing."""
    if device.type == "cuda":
        module.compile(dynamic=False, mode=mode)
    else:
        module.compile(dynamic=False, options={"freezing": True})


def compile_transformer(transformer: nn.Module, device: torch.device, mode: str | None) -> int:
    """Compile each transformer block (regional compilation); returns how many. Identical blocks share a graph;
    each kind of block (joint, dual-attention, the last one), batch and size gets its own, so dynamo's recompile
    limit (8 per function) is raised to 64 for SD3.5's three kinds × CFG / positive-only × a few sizes."""
    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if limit is not None and limit < 64:
        torch._dynamo.config.recompile_limit = 64
    blocks = list(getattr(transformer, "transformer_blocks", ()))
    for block in blocks:
        compile_module(block, device, mode)
    return len(blocks)


# --------------------------------------------------------------------------------------------------------- switch


def accelerate_pipeline(
    pipe: Pipeline,
    compile: bool | str = "auto",
    fp8: bool | str = "auto",
    mode: str | None = None,
    compile_vae: bool | None = None,
) -> AccelerationReport:
    """Make ``pipe``'s transformer (and VAE decoder) faster on its device (see the module docstring); returns what
    was done and why, also kept as ``pipe.acceleration``. ``compile`` / ``fp8``: True, False or "auto"; True where
    the technique cannot run is a ValueError naming the reason, "auto" falls back silently (the report says why).
    ``mode``: the CUDA compile mode (default "max-autotune-no-cudagraphs"). ``compile_vae`` (None: with the
    transformer) also compiles the VAE decoder. Call it once, after placing the pipeline on its device."""
    compile, fp8 = check_switch(compile, "compile"), check_switch(fp8, "fp8")
    if mode not in COMPILE_MODES:
        raise ValueError(f"mode must be one of {COMPILE_MODES}, got {mode!r}")
    device = torch.device(pipe.device)
    report = AccelerationReport(device=str(device))
    transformer = pipe.transformer
    if getattr(pipe, "acceleration", None) is not None:
        raise ValueError("this pipeline is already accelerated; load it again to change compile/fp8")

    offloaded = offloader_of(pipe) is not None
    if compile is True and offloaded:
        raise ValueError("compile=True: offload moves the weights during each call; load without offload to compile")
    can_fp8, reason = fp8_support(device)
    if can_fp8 and offloaded:
        can_fp8, reason = False, "offload moves the weights during each call; fp8 needs them on the card"
    if fp8 is True and not can_fp8:
        raise ValueError(f"fp8=True: {reason}")
    if fp8 and can_fp8 and pipe.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        can_fp8, reason = False, f"fp8 needs a float transformer, this one is {pipe.dtype}"
    if fp8 and can_fp8 and getattr(transformer, "quantization", None) is not None:
        can_fp8, reason = False, f"the transformer is already quantized ({transformer.quantization})"
    if fp8 and can_fp8:
        report.fp8_layers = apply_fp8(transformer)
        report.fp8 = True
    report.fp8_reason = reason if fp8 else "off (fp8=False)"

    if device.type == "cuda":
        config = transformer.config
        tokens = (1024 // 16) ** 2 + 333
        try:
            backend, why = fastest_sdpa_backend(
                device, pipe.dtype, (2, config.num_attention_heads), tokens, config.attention_head_dim
            )
        except Exception as err:  # noqa: BLE001 - timing failure keeps torch's default order
            backend, why = None, f"timing failed ({type(err).__name__}); torch's default order"
        if backend is not None:
            prefer_sdpa_backend(transformer, backend)
        report.sdpa_backend, report.sdpa_reason = backend, why
    else:
        report.sdpa_reason = "CPU: torch's own choice"

    if compile == "auto":
        if offloaded:
            compile, report.compile_reason = False, "auto: not with offload (it moves the weights during each call)"
        elif is_quantized(transformer) and not report.fp8:
            compile, report.compile_reason = False, "auto: not with int8/nf4/fp4 layers (ask with compile=True)"
        elif device.type == "cuda":
            compile, report.compile_reason = True, "auto: CUDA"
        else:
            compile, report.compile_reason = cpu_compile_pays(pipe.dtype)
    else:
        report.compile_reason = "asked" if compile else "off (compile=False)"
    if compile:
        report.compile_mode = (mode or CUDA_COMPILE_MODE) if device.type == "cuda" else "freezing"
        cuda_mode = report.compile_mode if device.type == "cuda" else None
        if compile_transformer(transformer, device, cuda_mode):
            report.compiled.append("transformer blocks")
        if compile_vae if compile_vae is not None else True:
            compile_module(pipe.vae.decoder, device, None)  # once per image: inductor's default mode compiles faster
            report.compiled.append("vae decoder")
    pipe.acceleration = report
    return report


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def warmup(
    pipe: Pipeline,
    height: int,
    width: int,
    guidance: bool = True,
    decode: bool = True,
    max_sequence_length: int = 256,
) -> dict[str, float]:
    """Compile for one generation size now: run the transformer (batch 2 with ``guidance``, else 1; the text of an
    empty prompt, so the sequence length is a generation's) and the VAE decoder twice each; the first call minus the
    second is the compile time, recorded in ``pipe.acceleration.compile_seconds`` and returned."""
    device = torch.device(pipe.device)
    config = pipe.transformer.config
    embeds, pooled = pipe.encode_prompts([""], [""] if guidance else None, max_sequence_length)
    embeds, pooled = embeds.to(device, pipe.dtype), pooled.to(device, pipe.dtype)
    batch = embeds.shape[0]
    latents = torch.zeros(batch, config.in_channels, height // 8, width // 8, device=device, dtype=pipe.dtype)
    timestep = torch.full((batch,), 500.0, device=device)
    seconds = {}
    with torch.no_grad():
        step = lambda: pipe.transformer(latents, embeds, pooled, timestep)  # noqa: E731
        seconds["transformer"] = max(_timed(step, device) - _timed(step, device), 0.0)
        if decode:
            z = torch.zeros(1, config.out_channels, height // 8, width // 8, device=device)
            run = lambda: pipe.decode_latents(z)  # noqa: E731
            seconds["vae decoder"] = max(_timed(run, device) - _timed(run, device), 0.0)
    report = getattr(pipe, "acceleration", None)
    if report is not None:
        report.compile_seconds.update(seconds)
    return seconds
