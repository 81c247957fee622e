"""The code and the workflow stay lint-clean: ruff (settings in pyproject.toml) and
``snakemake --lint``, so that CI enforces both."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from conftest import REPO


def test_ruff_finds_nothing() -> None:
    if importlib.util.find_spec("ruff") is None:
        pytest.fail("ruff is not installed (it is in the test extra)")
    cmd = [sys.executable, "-m", "ruff", "check", "workflow", "tests"]  # this environment's ruff, activated or not
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]


def test_snakemake_lint_is_clean(tmp_path) -> None:  # noqa: ANN001
    cmd = [sys.executable, "-m", "snakemake", "--lint", "--snakefile", str(REPO / "Snakefile"), "--directory", str(REPO)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "Congratulations" in output, output[-5000:]
