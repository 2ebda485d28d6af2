"""Shared test setup: one intra-op thread (small convolutions are far slower with two on a 2-core machine),
the tests folder on sys.path for the tiny-model builders (tests/tiny_sd3.py: diffusers-format SD3 folders and
random ShapesWorld pipelines, one builder each), shared fixtures, and no network."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Each test process its own Gradio cache: the apps under test prune theirs, and must not delete another worker's files.
os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="gradio-tests-")
atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], True)
sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory):
    """A random tiny SD3 pipeline saved by diffusers (with T5); returns (folder, diffusers pipeline)."""
    from tiny_sd3 import save_tiny_sd3_pipeline

    folder = tmp_path_factory.mktemp("tiny_sd3")
    pipe = save_tiny_sd3_pipeline(folder, seed=0, variant="sd3")
    return folder, pipe


@pytest.fixture(scope="session")
def embedded_pipeline():
    """The embedded ShapesWorld model (``load_pipeline()``), loaded once for the session. Shared: tests use it as
    loaded (no LoRAs, offload or other preparation left on it); a test that changes it loads its own."""
    from workbench import load_pipeline

    return load_pipeline()


BROWSER_ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "browser"


def pytest_sessionstart(session: pytest.Session) -> None:
    """Empty the browser tests' screenshot folder once per run: in the controller, not in each parallel worker
    (``workerinput`` marks an xdist worker), so no worker deletes another's screenshots."""
    if not hasattr(session.config, "workerinput"):
        shutil.rmtree(BROWSER_ARTIFACTS, ignore_errors=True)


CI_REQUIRED_SKIPS = ("could not import", "chromium")
"""Skip reasons that mean a missing dev dependency or browser: failures under CI=true (``.ci/run`` installs them)."""


def _required_skip(report: pytest.CollectReport | pytest.TestReport) -> str | None:
    """The skip reason of ``report`` when it is a missing dependency under CI=true, else None."""
    if os.environ.get("CI", "").lower() != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return None
    reason = str(report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr)
    return reason if any(word in reason.lower() for word in CI_REQUIRED_SKIPS) else None


def _fail_required_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    reason = _required_skip(report)
    if reason is not None:
        report.outcome = "failed"
        report.longrepr = f"CI=true: a missing dev dependency is a failure, not a skip ({reason})"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_required_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_required_skip(outcome.get_result())
