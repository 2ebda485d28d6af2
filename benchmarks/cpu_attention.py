"""CPU attention kernels at SD3-Medium's joint-attention shape: torch's flash kernel against the alternatives one
can build from torch ops, one thread, seconds and GFLOP/s, and each one's error against float32.

python benchmarks/cpu_attention.py                      # bfloat16, 512² (1024 image + 333 text tokens)
python benchmarks/cpu_attention.py --dtype float32 --repeats 5
python benchmarks/cpu_attention.py --flex               # also flex_attention compiled by inductor (~10 s compile)

Shape: batch 2 (a guided step), 24 heads of 64, L = (resolution/16)² + 333 keys and queries. GFLOP: 4·B·H·L²·d.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HEADS, HEAD_DIM, TEXT_TOKENS = 24, 64, 333


def query_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: int) -> torch.Tensor:
    """softmax(q·kᵀ/√d)·v over all heads at once, ``chunk`` queries at a time; scores in the inputs' dtype, softmax
    in float32."""
    out, kt = torch.empty_like(q), k.transpose(-1, -2)
    q = q * q.shape[-1] ** -0.5
    for start in range(0, q.shape[2], chunk):
        scores = torch.matmul(q[:, :, start : start + chunk], kt)
        out[:, :, start : start + chunk] = torch.matmul(torch.softmax(scores, -1, dtype=torch.float32).to(q), v)
    return out


def per_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, float32_scores: bool) -> torch.Tensor:
    """One (batch, head) at a time, all queries: the scores stay in cache; ``float32_scores`` computes them from
    float32 copies of q and k."""
    out = torch.empty_like(q)
    flat_out = out.flatten(0, 1)
    scale = q.shape[-1] ** -0.5
    qs = (q.float() if float32_scores else q).flatten(0, 1) * scale
    kt = (k.float() if float32_scores else k).flatten(0, 1).transpose(-1, -2)
    vs = v.flatten(0, 1)
    for head in range(qs.shape[0]):
        probabilities = torch.softmax(torch.matmul(qs[head], kt[head]), -1, dtype=torch.float32).to(v.dtype)
        torch.matmul(probabilities, vs[head], out=flat_out[head])
    return out


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> tuple[float, torch.Tensor]:
    """(fastest of ``repeats`` calls after a warm-up, in s; the output)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flex", action="store_true", help="also time flex_attention compiled by inductor")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    length = (args.resolution // 16) ** 2 + TEXT_TOKENS
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, HEADS, length, HEAD_DIM, generator=generator).to(dtype) for _ in range(3))
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flop = 4 * 2 * HEADS * length**2 * HEAD_DIM
    kernels: dict[str, Callable[[], torch.Tensor]] = {
        "torch flash (F.scaled_dot_product_attention)": lambda: F.scaled_dot_product_attention(q, k, v),
        "query-chunked, 32 queries": lambda: query_chunked(q, k, v, 32),
        "query-chunked, 128 queries": lambda: query_chunked(q, k, v, 128),
        "per head": lambda: per_head(q, k, v, float32_scores=False),
        "per head, float32 scores": lambda: per_head(q, k, v, float32_scores=True),
    }
    if args.flex:
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        start = time.perf_counter()
        compiled(q, k, v)
        print(f"flex_attention compile: {time.perf_counter() - start:.1f} s")
        kernels["flex_attention, inductor"] = lambda: compiled(q, k, v)
    print(f"{args.dtype}, B 2, {HEADS} heads × {HEAD_DIM}, L {length}, {flop / 1e9:.1f} GFLOP, one thread\n")
    print("| kernel | ms | GFLOP/s | rel. error vs float32 |\n|---|---|---|---|")
    with torch.no_grad():
        for name, fn in kernels.items():
            seconds, out = timed(fn, args.repeats)
            error = float((out.float() - reference).norm() / reference.norm())
            print(f"| {name} | {seconds * 1e3:.1f} | {flop / seconds / 1e9:.0f} | {error:.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
