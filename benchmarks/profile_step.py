"""Where one guided step of our transformer spends its CPU time: ``torch.profiler`` by operator, on the shapes and
weights of ``bench.py``'s table 1a (SD3-Medium width, random weights), as ``prepare`` runs it on the CPU.

python benchmarks/profile_step.py                        # bfloat16, depth 2, 512², one thread
python benchmarks/profile_step.py --dtype float32 --rows 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import random_state, sd3_config, step_inputs  # noqa: E402

from workbench import memory  # noqa: E402
from workbench.loading import build_transformer  # noqa: E402
from workbench.models.mmdit import MMDiTConfig  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rows", type=int, default=6, help="operators listed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    config = MMDiTConfig.from_dict(sd3_config(args.depth))
    model = build_transformer(config, dict(random_state(config, dtype=dtype)), dtype, "profile")
    packed = memory.packing_pays(dtype, config.inner_dim) and memory.packed_kernels_available()
    if packed:
        memory.pack_linears(model)
    inputs = step_inputs(args.resolution, dtype)
    with torch.no_grad():
        for _ in range(2):
            model(*inputs)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            model(*inputs)
    events = sorted(profile.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    linears = "packed" if packed else "plain"
    print(f"{args.dtype}, depth {args.depth}, {args.resolution}², {linears} linears, one thread")
    print(f"one guided step: {total / 1e6:.3f} s CPU\n\n| operator | calls | s | share |\n|---|---|---|---|")
    for event in events[: args.rows]:
        seconds = event.self_cpu_time_total / 1e6
        print(f"| {event.key} | {event.count} | {seconds:.3f} | {event.self_cpu_time_total / total:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
