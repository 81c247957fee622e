"""The whole DAG on the smoke config with real Snakemake, and what a second run redoes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr
import yaml

from conftest import REPO, linearized_robustness_tolerance
from saliency_robustness.config import validate_config
from saliency_robustness.figure_list import figures_for
from saliency_robustness.grid import model_grid
from saliency_robustness.models import load_model
from saliency_robustness.runtime import machine
from saliency_robustness.stages.figures import FIGURES

pytestmark = pytest.mark.workflow
SMOKE = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
# the figures of config/smoke.yaml: gradient-norm models, explanation quality off
SMOKE_FIGURES = figures_for(["gradnorm"], quality=False)


def snakemake(
    workdir: Path, configfile: Path, *args: str, data_root: Path | None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Snakemake on ``configfile`` in ``workdir`` (``data_root=None``: the config's own)."""
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(configfile),
        *(["--config", f"data_root={data_root}"] if data_root is not None else []),
        "--cores", "2",
        *args,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)


def planned_jobs(result: subprocess.CompletedProcess[str]) -> dict[str, int]:
    """Rule -> job count from a dry run's job stats (empty when nothing is to be done)."""
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout + result.stderr
    if "Nothing to be done" in text:
        return {}
    stats = text.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    jobs = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", stats, flags=re.M))
    jobs.pop("total", None)
    jobs.pop("all", None)
    return {rule: int(n) for rule, n in jobs.items()}


def with_changes(tmp: Path, name: str, **sections: dict) -> Path:
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    for section, changes in sections.items():
        config[section] = {**config.get(section, {}), **changes}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_root):  # noqa: ANN001, ANN201
    workdir = tmp_path_factory.mktemp("smoke")
    configfile = REPO / "config" / "smoke.yaml"
    result = snakemake(workdir, configfile, data_root=data_root)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return workdir, configfile, data_root


def results(workdir: Path) -> Path:
    return workdir / "results" / SMOKE["experiment"]


def test_smoke_run_produces_every_store_figure_and_log(smoke_run) -> None:  # noqa: ANN001
    workdir, _, _ = smoke_run
    out = results(workdir)
    models = list(model_grid(validate_config(SMOKE)))
    images = torch.from_numpy(xr.open_zarr(out / "data" / "eval.zarr")["images"].values)
    for model in models:
        metrics = xr.open_zarr(out / "metrics" / f"{model}.zarr")
        for var in ("alignment", "linearized_robustness", "bound_rhs", "homogeneity", "correct", "robustness"):
            assert var in metrics and metrics[var].attrs.get("long_name")
        assert float(metrics["robustness"].notnull().mean()) >= 0.95
        # the bound holds for rho~ from g† (one reverse pass); rho~ is from two (g_i* - g_j*): apart by rounding
        bound = linearized_robustness_tolerance(metrics, load_model(out / "models" / model), images)
        assert (metrics["bound_rhs"].values >= metrics["linearized_robustness"].values - bound).all()
        saliency = xr.open_zarr(out / "saliency" / f"{model}.zarr")
        assert saliency["saliency"].dims == ("sample", "channel", "y", "x")
        assert (out / "logs" / "train" / f"{model}.log").stat().st_size > 0
    summary = xr.open_zarr(out / "summary.zarr")
    assert list(summary["model"].values) == models
    # what produced each model, and the set of machines in the summary
    trained_on = {model: json.loads((out / "models" / model / "machine.json").read_text()) for model in models}
    here = machine()
    for record in trained_on.values():
        assert {k: record[k] for k in ("cpu", "cpu_flags", "cpu_capability", "torch", "torch_git", "blas_info", "onednn")} == {
            k: here[k] for k in ("cpu", "cpu_flags", "cpu_capability", "torch", "torch_git", "blas_info", "onednn")
        }
        assert record["threads"] == 1 and record["device"] == "cpu"  # every rule asks for one thread
    assert list(summary["machine"].values) == [trained_on[m]["id"] for m in models]
    assert set(json.loads(summary.attrs["machines"])) == {r["id"] for r in trained_on.values()}
    attack = xr.open_zarr(next((out / "attacks" / models[0]).glob("*.zarr")))
    assert json.loads(attack.attrs["machine"])["torch"] == here["torch"]
    assert json.loads(xr.open_zarr(out / "metrics" / f"{models[0]}.zarr").attrs["machine"])["threads"] == 1
    header = (out / "summary.csv").read_text().splitlines()[0].split(",")
    for column in (
        "lambda", "seed", "subset", "degenerate", "test_accuracy", "alignment_median", "alignment_median_ci_low",
        "robustness_median_ci_high", "robustness_q75", "spearman_alignment_robustness", "attack_failures", "n_images", "machine",
    ):  # fmt: skip
        assert column in header
    for table in ("summary_grid.csv", "summary_trends.csv"):
        assert (out / table).stat().st_size > 0
    for png in (out / "figures").glob("*.png"):
        assert png.with_suffix(".pdf").exists()
    assert {png.stem for png in (out / "figures").glob("*.png")} == set(SMOKE_FIGURES)  # the Snakefile's list is the package's


def test_second_run_has_nothing_to_do(smoke_run) -> None:  # noqa: ANN001
    workdir, configfile, data_root = smoke_run
    assert planned_jobs(snakemake(workdir, configfile, "-n", data_root=data_root)) == {}


def test_adding_a_seed_trains_only_the_new_replicates(smoke_run, tmp_path) -> None:  # noqa: ANN001
    workdir, _, data_root = smoke_run
    config = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())
    config["train"]["seeds"] = [config["train"].pop("seed"), 7]
    changed = tmp_path / "seeds.yaml"
    changed.write_text(yaml.safe_dump(config))
    result = snakemake(workdir, changed, "-n", data_root=data_root)
    jobs = planned_jobs(result)
    n_lambdas = len(SMOKE["train"]["lambdas"])
    assert jobs["train"] == n_lambdas and jobs["saliency"] == n_lambdas  # the seed-7 replicates only
    assert "gradnorm-lambda0-seed7" in result.stdout + result.stderr


def test_where_the_data_lives_is_not_part_of_any_model(smoke_run, tmp_path) -> None:  # noqa: ANN001
    workdir, configfile, data_root = smoke_run
    copy = tmp_path / "elsewhere"
    shutil.copytree(data_root / "MNIST", copy / "MNIST")
    assert planned_jobs(snakemake(workdir, configfile, "-n", data_root=copy)) == {}
    # forgotten: the config's own data root (absent here) plans nothing either
    assert planned_jobs(snakemake(workdir, configfile, "-n", data_root=None)) == {}


def test_a_mistyped_data_root_fails_in_one_line_and_loses_nothing(smoke_run, tmp_path) -> None:  # noqa: ANN001
    workdir, _, _ = smoke_run
    models = sorted((results(workdir) / "models").iterdir())
    mistyped = tmp_path / "shraed" / "data"
    changed = with_changes(tmp_path, "new-lambda", train={"lambdas": [*SMOKE["train"]["lambdas"], 0.5]})
    result = snakemake(workdir, changed, data_root=mistyped)
    assert result.returncode != 0
    assert f"error: data root '{mistyped}' does not exist" in result.stderr
    assert not mistyped.parent.exists()  # nothing created where it points
    assert sorted((results(workdir) / "models").iterdir()) == models  # nothing deleted


def test_an_attack_store_copied_from_another_model_is_refused(smoke_run, tmp_path) -> None:  # noqa: ANN001
    """It used to be read as the other model's: rho came from the wrong model's norms."""
    workdir, configfile, data_root = smoke_run
    copy = tmp_path / "copy"
    shutil.copytree(workdir / "results", copy / "results")
    first, second = list(model_grid(validate_config(SMOKE)))[:2]
    attacks = copy / "results" / SMOKE["experiment"] / "attacks"
    shutil.rmtree(attacks / second / "DDN.zarr")
    shutil.copytree(attacks / first / "DDN.zarr", attacks / second / "DDN.zarr", copy_function=shutil.copy)  # as cp -r: new times
    result = snakemake(copy, configfile, data_root=data_root)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{second}/DDN.zarr was computed from model '{first}', not '{second}'" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def test_a_misspelled_attack_stops_the_run_before_any_job(smoke_run, tmp_path) -> None:  # noqa: ANN001
    workdir, _, data_root = smoke_run
    ensemble = {**SMOKE["attacks"]["ensemble"], "DDN": {"attack": "DDNAttak"}}
    changed = with_changes(tmp_path, "typo", attacks={"ensemble": ensemble})
    result = snakemake(workdir, changed, "-n", data_root=data_root)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: config key 'attacks.ensemble.DDN': unknown attack class 'DDNAttak' (known: " + errors[0].split("(known: ")[1]]
    assert "Traceback" not in result.stderr


def test_the_snakefile_runs_its_own_checkouts_package(smoke_run, tmp_path) -> None:  # noqa: ANN001
    """Another copy of the package first on the path (a second clone, a non-editable install)
    is not what the workflow imports, runs or fingerprints."""
    workdir, configfile, data_root = smoke_run
    other = tmp_path / "other-copy" / "saliency_robustness"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text("raise ImportError('the wrong copy of saliency_robustness')\n")
    env = {**os.environ, "PYTHONPATH": str(other.parent)}
    assert planned_jobs(snakemake(workdir, configfile, "-n", data_root=data_root, env=env)) == {}


def test_editing_a_module_reruns_only_the_stages_that_import_it(smoke_run, tmp_path) -> None:  # noqa: ANN001
    """A copy of the checkout plans nothing until one of its modules is edited; then exactly
    the stages that import it (and what follows them) are planned."""
    workdir, configfile, data_root = smoke_run
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    shutil.copy(REPO / "Snakefile", checkout / "Snakefile")
    for folder in ("workflow", "envs"):
        shutil.copytree(REPO / folder, checkout / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    package = checkout / "workflow" / "saliency_robustness"

    def plan() -> dict[str, int]:
        cmd = [sys.executable, "-m", "snakemake", "-n", "--snakefile", str(checkout / "Snakefile"), "--directory", str(workdir),
               "--configfile", str(configfile), "--config", f"data_root={data_root}", "--cores", "1"]  # fmt: skip
        return planned_jobs(subprocess.run(cmd, capture_output=True, text=True, timeout=600))

    def plan_after_editing(module: str) -> dict[str, int]:
        path = package / module
        source = path.read_text()
        path.write_text(source + "\n# an edit\n")
        try:
            return plan()
        finally:
            path.write_text(source)

    n_models = len(SMOKE["train"]["lambdas"])
    assert plan() == {}  # the same code elsewhere is the same code
    saliency = plan_after_editing("stages/saliency.py")
    assert saliency.get("attack", 0) == 0 and saliency.get("train", 0) == 0 and saliency["saliency"] == n_models
    fixes = plan_after_editing("foolbox_fixes.py")
    assert fixes.get("train", 0) == 0 and fixes.get("saliency", 0) == 0 and fixes["attack"] == n_models * len(SMOKE["attacks"]["ensemble"])


def test_changing_one_lambda_trains_only_that_model(smoke_run, tmp_path) -> None:  # noqa: ANN001
    workdir, _, data_root = smoke_run
    lambdas = list(SMOKE["train"]["lambdas"])
    lambdas[-1] = lambdas[-1] * 2
    changed = with_changes(tmp_path, "lambda", train={"lambdas": lambdas})
    jobs = planned_jobs(snakemake(workdir, changed, "-n", data_root=data_root))
    assert jobs["train"] == 1
    assert jobs.get("data", 0) == 0
    assert jobs["saliency"] == 1 and jobs["metrics"] == 1  # only the new model's stores


def test_changing_a_figure_option_reruns_only_figures(smoke_run, tmp_path) -> None:  # noqa: ANN001
    workdir, _, data_root = smoke_run
    changed = with_changes(tmp_path, "figure", figures={"dpi": 90})
    assert set(planned_jobs(snakemake(workdir, changed, "-n", data_root=data_root))) == {"figure"}


def test_changing_one_attack_reruns_it_and_what_follows_but_no_training(smoke_run, tmp_path) -> None:  # noqa: ANN001
    workdir, _, data_root = smoke_run
    ensemble = dict(SMOKE["attacks"]["ensemble"])
    refiners = [n for n, a in ensemble.items() if a.get("refine")]
    name = next(n for n in ensemble if n not in refiners)  # a base attack: the refiners start from it
    ensemble[name] = {**ensemble[name], "kwargs": {**ensemble[name].get("kwargs", {}), "steps": 7}}
    changed = with_changes(tmp_path, "attack", attacks={"ensemble": ensemble})
    jobs = planned_jobs(snakemake(workdir, changed, "-n", data_root=data_root))
    n_models = len(SMOKE["train"]["lambdas"])
    assert jobs.get("train", 0) == 0 and jobs.get("data", 0) == 0 and jobs.get("saliency", 0) == 0
    assert jobs["attack"] == n_models * (1 + len(refiners))  # that attack and the refiners, per model
    assert jobs["metrics"] == n_models and jobs["summary"] == 1 and jobs["figure"] == len(SMOKE_FIGURES)


def test_report_holds_every_figure_with_its_own_caption(smoke_run, tmp_path) -> None:  # noqa: ANN001
    captions = (REPO / "workflow" / "report" / "figures.rst").read_text()
    branches = re.findall(r'snakemake\.wildcards\.figure == "(\w+)"', captions)
    assert sorted(branches) == sorted(FIGURES)
    workdir, configfile, data_root = smoke_run
    report = tmp_path / "report.html"
    result = snakemake(workdir, configfile, "--report", str(report), data_root=data_root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ERROR/" not in result.stderr, result.stderr[-3000:]  # docutils: the captions are valid reST
    html = report.read_text()
    for name in SMOKE_FIGURES:
        assert f"{name}.png" in html
    # the first words of each drawn figure's own caption, not the fallback
    for figure, first_words in re.findall(r'figure == "(\w+)" %\}\n([\w-]+ [\w-]+)', captions.split("{% else %}")[0]):
        if figure in SMOKE_FIGURES:
            assert first_words in html, first_words


def test_beyond_the_paper_trains_both_routes_and_measures_every_attribution_map(tmp_path, data_root) -> None:  # noqa: ANN001
    """config/smoke-beyond.yaml, a small copy of config/beyond-mnist.yaml: a gradnorm and a PGD
    model, three attribution maps through Captum, every store and figure."""
    configfile = REPO / "config" / "smoke-beyond.yaml"
    result = snakemake(tmp_path, configfile, data_root=data_root)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    out = tmp_path / "results" / "smoke-beyond"
    summary = xr.open_zarr(out / "summary.zarr")
    assert list(summary["model"].values) == ["gradnorm-lambda0-seed0", "gradnorm-lambda1-seed0", "pgd-eps1-seed0"]
    assert list(summary["method"].values) == ["gradnorm", "gradnorm", "adversarial"] and list(summary["strength"].values) == [0.0, 1.0, 1.0]
    assert {"alignment_smoothgrad", "alignment_integrated_gradients"} <= set(summary["quantity"].values)
    metrics = xr.open_zarr(out / "metrics" / "pgd-eps1-seed0.zarr")
    assert list(metrics["attribution"].values) == ["gradient", "smoothgrad", "integrated_gradients"]
    assert np.isfinite(metrics["ig_completeness_error"].values).all()
    spec = json.loads((out / "models" / "pgd-eps1-seed0" / "spec.json").read_text())
    assert (spec["method"], spec["strength"]) == ("adversarial", 1.0) and "lam" not in spec and "epsilon" not in spec
    assert {png.stem for png in (out / "figures").glob("*.png")} == set(FIGURES)
    assert "(adversarial, epsilon 1)" in (out / "logs" / "train" / "pgd-eps1-seed0.log").read_text()
    # explanation quality (quality.enabled): every measure of every map, and the concordance of the rankings
    quality = xr.open_zarr(out / "quality" / "pgd-eps1-seed0.zarr")
    assert list(quality["attribution"].values) == ["gradient", "smoothgrad", "integrated_gradients"]
    assert quality["road_morf"].dims == ("attribution", "sample", "fraction") and list(quality["fraction"].values) == [0.2, 0.5, 0.8]
    for name in ("gini", "road_area", "max_sensitivity", "infidelity"):
        assert np.isfinite(quality[name].values).all() and quality[name].attrs["units"], name
    assert json.loads(quality.attrs["quality_seconds_per_measure"]).keys() == {"gini", "road", "max_sensitivity", "infidelity"}
    concordance = xr.open_zarr(out / "concordance.zarr")
    assert int(concordance["concordance_n_models"]) == 3
    table = pd.read_csv(out / "summary_concordance.csv")
    assert len(table) == 2 * 3 * 15 and set(table["interval"]) == {"images only"}  # no replicate seeds
    assert table["kendall_tau"].between(-1, 1).all() and (table["ci_low"] <= table["kendall_tau"] + 1e-12).all()
    assert set(pd.read_csv(out / "summary_quality.csv")["model"]) == set(summary["model"].values)


def test_a_vectorized_grid_trains_in_one_job_and_feeds_the_same_stages(tmp_path, data_root) -> None:  # noqa: ANN001
    configfile = with_changes(tmp_path, "vectorized", train={"vectorized": True, "n_train": 500})
    plan = planned_jobs(snakemake(tmp_path, configfile, "--dry-run", data_root=data_root))
    assert plan["train_vectorized"] == 1 and "train" not in plan, plan
    models = [f"results/{SMOKE['experiment']}/models/{m}" for m in model_grid(validate_config(SMOKE))]
    result = snakemake(tmp_path, configfile, *models, data_root=data_root)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    for model in models:
        assert {p.name for p in (tmp_path / model).iterdir()} >= {"model.pt", "spec.json", "training_log.csv", "test_accuracy.json"}
    plan = planned_jobs(snakemake(tmp_path, configfile, "--dry-run", data_root=data_root))
    assert "train_vectorized" not in plan and plan["saliency"] == len(models), plan
