"""Shared test setup: one intra-op thread (small convolutions are far slower with two on a 2-core machine),
the tests folder on sys.path for the tiny-model builders, and no network."""

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory):
    """A random tiny SD3 pipeline saved by diffusers (with T5); returns (folder, diffusers pipeline)."""
    from tiny_sd3 import save_tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("tiny_sd3")
    pipe = save_tiny_sd3_pipeline(folder, seed=0, variant="sd3")
    return folder, pipe
