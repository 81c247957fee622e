"""The package's layering (docs/architecture.md): stages import the base modules, never
each other, and no base module imports a stage. Read from the source, like the stage
fingerprints, so that a new import that breaks the layering fails here."""

from __future__ import annotations

import pytest

from saliency_robustness.fingerprints import PACKAGE_DIR, imported_modules

STAGES = sorted(f"stages.{path.stem}" for path in (PACKAGE_DIR / "stages").glob("*.py") if path.stem != "__init__")
BASE = sorted(path.stem for path in PACKAGE_DIR.glob("*.py") if path.stem != "__init__")


def test_the_stages_are_the_pipelines_steps() -> None:
    steps = ("training", "external", "saliency", "attacks", "metrics", "quality", "summary", "concordance", "figures")
    assert STAGES == [f"stages.{s}" for s in sorted(steps)]
    assert "evaluation" in BASE and "ensemble" in BASE and "robustness" in BASE


@pytest.mark.parametrize("stage", STAGES)
def test_no_stage_imports_another_stage(stage: str) -> None:
    others = {m for m in imported_modules(stage) if m.startswith("stages.")} - {stage}
    assert not others, f"{stage} imports {sorted(others)}: move what they share into a base module"


@pytest.mark.parametrize("module", BASE)
def test_no_base_module_imports_a_stage(module: str) -> None:
    stages = {m for m in imported_modules(module) if m == "stages" or m.startswith("stages.")}
    assert not stages, f"{module} imports {sorted(stages)}"


def test_the_rule_would_catch_a_stage_importing_a_stage(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from saliency_robustness import fingerprints as config_module

    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "__init__.py").write_text("")
    (tmp_path / "stages" / "metrics.py").write_text("def f():\n    from saliency_robustness.stages.attacks import x\n")
    (tmp_path / "stages" / "attacks.py").write_text("x = 1\n")
    monkeypatch.setattr(config_module, "PACKAGE_DIR", tmp_path)
    assert "stages.attacks" in imported_modules("stages.metrics")
