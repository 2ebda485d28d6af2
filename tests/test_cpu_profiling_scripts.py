"""benchmarks/cpu_attention.py: the attention variants it times compute the same attention as torch's kernel;
benchmarks/profile_step.py: it profiles a step and prints the operators' shares."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load("cpu_attention")


def test_variants_match_torch_attention(script):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 16, generator=generator) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(script.query_chunked(q, k, v, 8), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(script.per_head(q, k, v, float32_scores=False), expected, atol=1e-5, rtol=1e-5)
    halves = [t.bfloat16() for t in (q, k, v)]
    float32_scores = script.per_head(*halves, float32_scores=True).float()
    torch.testing.assert_close(float32_scores, expected, atol=3e-2, rtol=3e-2)


def test_the_script_prints_its_table(script, capsys):
    assert script.main(["--resolution", "64", "--repeats", "1", "--dtype", "float32"]) == 0
    table = capsys.readouterr().out
    assert "| torch flash (F.scaled_dot_product_attention) |" in table and "| per head, float32 scores |" in table


def test_the_step_profile_lists_linears_and_attention(capsys):
    assert load("profile_step").main(["--dtype", "float32", "--depth", "1", "--resolution", "64", "--rows", "20"]) == 0
    table = capsys.readouterr().out
    shares = [int(line.rsplit("|", 2)[1].strip().rstrip("%")) for line in table.splitlines() if line.endswith("% |")]
    assert "scaled_dot_product" in table and sum(shares) <= 101 and max(shares) > 10
