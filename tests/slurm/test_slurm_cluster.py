"""The smoke DAG through Snakemake's SLURM executor on a real single-node SLURM (issue 7).

`tests/slurm/run.sh` brings the cluster up, sets SALIENCY_ROBUSTNESS_SLURM_TEST=1 and runs
this file; the ordinary test run skips it. The first cluster run has one training job
cancelled with `scancel`; the next run must redo only what is missing, finish the DAG, and
give the same numbers as a local run of the same config.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml

from conftest import REPO
from saliency_robustness.config import validate_config
from saliency_robustness.figure_list import figures_for
from saliency_robustness.grid import model_grid, train_methods
from saliency_robustness.stores import open_store
from test_workflow import planned_jobs

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        os.environ.get("SALIENCY_ROBUSTNESS_SLURM_TEST") != "1",
        reason="needs the SLURM cluster of tests/slurm/run.sh",
    ),
]

# the tiny config of the tests; SLURM_TEST_CONFIG runs another one
SMOKE_CONFIG = Path(os.environ.get("SLURM_TEST_CONFIG") or REPO / "config" / "smoke.yaml")
SMOKE = yaml.safe_load(SMOKE_CONFIG.read_text())
MODELS = list(model_grid(validate_config(SMOKE)))
# the figures of the test config (those against lambda need gradnorm models; the quality figure, quality.enabled)
SMOKE_FIGURES = figures_for(train_methods(validate_config(SMOKE)["train"]), quality=validate_config(SMOKE)["quality"]["enabled"])
CANCELLED_MODEL = MODELS[-1]
TEST_PROFILE = ["--profile", str(REPO / "profiles" / "slurm-cpu-test")]
# the real profile, then the overlay for this CPU-only one-node cluster
CLUSTER = ["--profile", str(REPO / "profiles" / "slurm"), *TEST_PROFILE]
# the overlay alone gives every job the same threads as on the cluster, hence the same numbers
LOCAL = [*TEST_PROFILE, "--cores", "2"]
DRY_RUN = ("--dry-run",)
# seconds one snakemake run may take before `timeout` stops it (Snakemake then scancels its jobs)
RUN_TIMEOUT = int(os.environ.get("SLURM_TEST_RUN_TIMEOUT", "420"))


def snakemake_command(workdir: Path, executor: list[str], *args: str, data_root: Path) -> list[str]:
    """A snakemake call that `timeout` ends (SIGTERM, then SIGKILL 30 s later) if it hangs."""
    return [
        "timeout", "-k", "30", str(RUN_TIMEOUT),
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(SMOKE_CONFIG),
        "--config", f"data_root={data_root}",
        *executor,
        *args,
    ]  # fmt: skip


def run(workdir: Path, executor: list[str], *args: str, data_root: Path) -> subprocess.CompletedProcess[str]:
    cmd = snakemake_command(workdir, executor, *args, data_root=data_root)
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def start(workdir: Path, executor: list[str], *args: str, data_root: Path, nice: int = 0) -> subprocess.Popen[str]:
    cmd = ["nice", "-n", str(nice), *snakemake_command(workdir, executor, *args, data_root=data_root)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}:\n{(result.stdout + result.stderr)[-6000:]}"
    return result


def results(workdir: Path) -> Path:
    return workdir / "results" / SMOKE["experiment"]


def running_jobs(comment_suffix: str) -> list[str]:
    """Ids of the running SLURM jobs whose comment ends with ``comment_suffix``; the plugin
    comments each job with ``rule_<rule>_wildcards_<values>``."""
    out = subprocess.run(
        ["squeue", "-h", "--states=RUNNING", "-o", "%i|%k"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    jobs = (line.split("|", 1) for line in out.splitlines() if "|" in line)
    return [job for job, comment in jobs if comment.endswith(comment_suffix)]


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)


@pytest.fixture(scope="module")
def workdirs() -> dict[str, Path]:
    base = Path(os.environ.get("SLURM_TEST_WORKDIR") or "/tmp/slurm-test")
    dirs = {"local": base / "local", "cluster": base / "cluster"}
    for path in dirs.values():
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
    return dirs


@pytest.fixture(scope="module")
def local_run(workdirs, data_root) -> Iterator[subprocess.Popen[str]]:  # noqa: ANN001
    """The same config on this machine, up to the metrics: in the background and at the
    lowest priority, so that it fills the cores while the cluster runs wait, without
    slowing their jobs."""
    proc = start(workdirs["local"], LOCAL, "--until", "metrics", data_root=data_root, nice=19)
    yield proc
    stop(proc)


@pytest.fixture(scope="module")
def local_done(local_run) -> None:  # noqa: ANN001
    out, _ = local_run.communicate(timeout=2 * RUN_TIMEOUT)
    assert local_run.returncode == 0, out[-6000:]


def cancel_training(proc: subprocess.Popen[str], model: str, log: Path) -> str:
    """Wait until ``model``'s training job trains, then scancel it; return its job id."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"snakemake ended before {model} trained:\n{proc.communicate()[0][-6000:]}")
        if log.is_file() and "training " in log.read_text(errors="replace"):
            jobs = running_jobs(f"rule_train_wildcards_{model}")
            if jobs:
                subprocess.run(["scancel", *jobs], check=True, timeout=30)
                return jobs[0]
        time.sleep(0.2)
    raise AssertionError(f"the training job of {model} never started")


@pytest.fixture(scope="module")
def cancelled_run(workdirs, data_root, local_run) -> tuple[str, int, str]:  # noqa: ANN001
    """The first cluster run, with one model's training job cancelled while it trains:
    (the job's id, snakemake's exit status, its output)."""
    proc = start(workdirs["cluster"], CLUSTER, data_root=data_root)
    log = results(workdirs["cluster"]) / "logs" / "train" / f"{CANCELLED_MODEL}.log"
    try:
        job = cancel_training(proc, CANCELLED_MODEL, log)
        out, _ = proc.communicate(timeout=RUN_TIMEOUT)
    finally:
        stop(proc)
    return job, proc.returncode, out


@pytest.fixture(scope="module")
def cluster_run(workdirs, data_root, cancelled_run) -> subprocess.CompletedProcess[str]:  # noqa: ANN001
    """The next cluster run, which completes the whole smoke DAG."""
    started = time.monotonic()
    result = ok(run(workdirs["cluster"], CLUSTER, data_root=data_root))
    print(f"cluster run after the cancelled one: {time.monotonic() - started:.0f} s", file=sys.stderr)
    return result


def assert_same_variables(cluster: xr.Dataset, local: xr.Dataset, where: str) -> None:
    """Every data variable and coordinate equal, NaN where NaN: same code, threads and
    seeds on the same CPU give the same numbers bit for bit."""
    assert sorted(cluster.variables) == sorted(local.variables), where
    for name in cluster.variables:
        a, b = cluster[name].values, local[name].values
        assert a.shape == b.shape, f"{where}: {name}"
        np.testing.assert_array_equal(a, b, err_msg=f"{where}: {name}")


def assert_same_stores(cluster_root: Path, local_root: Path, pattern: str) -> int:
    stores = sorted(p.relative_to(local_root) for p in local_root.glob(pattern))
    for rel in stores:
        assert (cluster_root / rel).is_dir(), f"the cluster run wrote no {rel}"
        with open_store(cluster_root / rel) as a, open_store(local_root / rel) as b:
            assert_same_variables(a, b, str(rel))
    return len(stores)


def assert_same_checkpoints(cluster_root: Path, local_root: Path) -> None:
    for model in MODELS:
        a = torch.load(cluster_root / "models" / model / "model.pt", weights_only=True)
        b = torch.load(local_root / "models" / model / "model.pt", weights_only=True)
        assert a.keys() == b.keys(), model
        for key in a:
            assert torch.equal(a[key], b[key]), f"{model}: {key} differs"


def assert_no_half_written_store(root: Path) -> None:
    """Every store in place opens and reads completely (partial writes live under hidden
    ``.<name>.partial-*`` names until they are renamed into place)."""
    for store in root.rglob("*.zarr"):
        if not any(part.startswith(".") for part in store.relative_to(root).parts):
            open_store(store).load()


def test_cancelled_job_fails_the_run_and_leaves_no_half_written_output(cancelled_run, workdirs, data_root) -> None:  # noqa: ANN001
    job, returncode, out = cancelled_run
    assert returncode != 0, out[-6000:]
    assert f"SLURM-job '{job}' failed, SLURM status is: 'CANCELLED'" in out, out[-6000:]
    root = results(workdirs["cluster"])
    assert not (root / "models" / CANCELLED_MODEL).exists(), "the cancelled training left its model directory"
    assert_no_half_written_store(root)
    # what finished stays done: the next run trains only the cancelled model
    planned = planned_jobs(run(workdirs["cluster"], CLUSTER, *DRY_RUN, data_root=data_root))
    print(f"planned after scancel of job {job}: {planned}", file=sys.stderr)
    assert planned.get("train") == 1 and "data" not in planned, planned


def test_cluster_run_gives_the_local_numbers(cluster_run, local_done, workdirs) -> None:  # noqa: ANN001
    cluster_root, local_root = results(workdirs["cluster"]), results(workdirs["local"])
    assert (cluster_root / "summary.csv").is_file()
    assert len(list((cluster_root / "figures").glob("*.pdf"))) == len(SMOKE_FIGURES)
    # every job went through sbatch: the plugin keeps each job's SLURM log (test profile),
    # and the cancelled model was trained twice
    slurm_logs = workdirs["cluster"] / ".snakemake" / "slurm_logs"
    assert len(list((slurm_logs / "rule_train").rglob("*.log"))) == len(MODELS) + 1
    assert_same_checkpoints(cluster_root, local_root)
    assert assert_same_stores(cluster_root, local_root, "metrics/*.zarr") == len(MODELS)
    # and the stores the metrics come from
    assert assert_same_stores(cluster_root, local_root, "data/eval.zarr") == 1
    assert assert_same_stores(cluster_root, local_root, "saliency/*.zarr") == len(MODELS)
    assert_same_stores(cluster_root, local_root, "attacks/*/*.zarr")


def test_losing_a_checkpoint_plans_only_that_model(cluster_run, workdirs, data_root) -> None:  # noqa: ANN001
    cluster_dir = workdirs["cluster"]
    assert planned_jobs(run(cluster_dir, CLUSTER, *DRY_RUN, data_root=data_root)) == {}
    shutil.rmtree(results(cluster_dir) / "models" / MODELS[0])
    planned = planned_jobs(run(cluster_dir, CLUSTER, *DRY_RUN, data_root=data_root))
    print(f"planned after deleting models/{MODELS[0]}: {planned}", file=sys.stderr)
    n_attacks = len(SMOKE.get("attacks", {}).get("ensemble", {}))
    per_model = {"train": 1, "saliency": 1, "metrics": 1, **({"attack": n_attacks} if n_attacks else {})}
    assert planned == {**per_model, "summary": 1, "figure": len(SMOKE_FIGURES)}, planned
