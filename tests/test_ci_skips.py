"""Under CI=true a missing dev dependency or browser fails the run; elsewhere it is a skip."""

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

PROBE = """
import pytest

missing = pytest.importorskip("no_such_module_for_the_ci_probe")


def test_needs_it():
    pass
"""
BROWSER_PROBE = """
import pytest


@pytest.mark.skipif(True, reason="needs Debian's chromium at /usr/bin/chromium")
def test_needs_a_browser():
    pass


@pytest.mark.skipif(True, reason="oneDNN linear kernels not available")
def test_needs_hardware():
    pass
"""


@pytest.mark.parametrize("ci", ["true", ""])
def test_missing_dependency_fails_only_under_ci(pytester, monkeypatch, ci):
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_probe=PROBE, test_browser_probe=BROWSER_PROBE)
    monkeypatch.setenv("CI", ci)
    result = pytester.runpytest("-p", "no:cacheprovider", "--continue-on-collection-errors")
    if ci:
        result.assert_outcomes(errors=2, skipped=1)  # both missing: errors; the hardware skip stays a skip
    else:
        result.assert_outcomes(skipped=3)
