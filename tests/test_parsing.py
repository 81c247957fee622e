"""Parsing the Snakefile stays light: every snakemake invocation, and every cluster job, parses
it. What the rules import at parse time pulls in no torch, Foolbox or plotting library, and the
start-up check of the attack ensemble (which builds the attacks: torch and Foolbox) runs once
per setting, not on every invocation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from saliency_robustness.fingerprints import checked_once

HEAVY = ("torch", "foolbox", "matplotlib", "seaborn", "pandas", "captum")


def parse_time_imports() -> list[str]:
    """The package import statements at the top level of workflow/rules/*.smk, verbatim."""
    statements = []
    for path in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        lines = iter(path.read_text().splitlines())
        for line in lines:
            if line.startswith(("from saliency_robustness", "import saliency_robustness")):
                statement = [line]
                while statement[-1].rstrip().endswith("(") or (statement[0].rstrip().endswith("(") and ")" not in statement[-1]):
                    statement.append(next(lines))
                statements.append("\n".join(statement))
    return statements


def test_the_rules_import_no_heavy_library_at_parse_time() -> None:
    statements = parse_time_imports()
    assert any("figure_list" in s for s in statements) and any("validate_config" in s for s in statements), statements
    code = "import sys\n" + "\n".join(statements) + f"\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]", f"parsing the Snakefile imports {result.stdout.strip()}"


def test_the_check_would_see_a_heavy_import() -> None:
    code = "import sys\nfrom saliency_robustness.stages import figures\n" + f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert "matplotlib" in result.stdout


def test_a_check_runs_once_per_identity_and_a_failure_records_nothing(tmp_path: Path) -> None:
    calls: list[str] = []
    assert checked_once(tmp_path, "attacks", {"a": 1}, lambda: calls.append("a"))
    assert not checked_once(tmp_path, "attacks", {"a": 1}, lambda: calls.append("again"))
    assert checked_once(tmp_path, "attacks", {"a": 2}, lambda: calls.append("b"))  # another setting: checked
    assert calls == ["a", "b"]

    def fails() -> None:
        raise ValueError("bad setting")

    for _ in range(2):  # a failed check is repeated until the setting is fixed
        with pytest.raises(ValueError, match="bad setting"):
            checked_once(tmp_path, "attacks", {"a": 3}, fails)
