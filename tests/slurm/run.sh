#!/usr/bin/env bash
# The pipeline through Snakemake's SLURM executor on a real single-node SLURM (issue 7).
#
#   bash tests/slurm/run.sh [DATA_ROOT]      # as root; this is CI's SLURM step
#
# Installs Debian's SLURM and munge if missing, starts munged, slurmctld and slurmd for this
# machine alone, runs tests/slurm/test_slurm_cluster.py (the smoke config through
# `--executor slurm` and locally, same numbers; scancel and restart), and always stops the
# daemons it started, by PID. Every snakemake call runs under `timeout`, as does the whole test.
# DATA_ROOT: MNIST in torchvision's layout (default: $SALIENCY_ROBUSTNESS_DATA_ROOT, else
# ../shared/data beside the checkout). SLURM_TEST_KEEP=1 keeps the work directory.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
export GIT_PYTHON_REFRESH=quiet PIP_DISABLE_PIP_VERSION_CHECK=1

PLUGIN_VERSION=2.8.0  # the plugin's status handling changes between releases: test this one
TEST_TIMEOUT=${SLURM_TEST_TIMEOUT:-570}  # CI allows this step 10 minutes in all

data_root=${1:-${SALIENCY_ROBUSTNESS_DATA_ROOT:-../shared/data}}
if [[ ! -f $data_root/MNIST/raw/t10k-images-idx3-ubyte ]]; then
  echo "tests/slurm/run.sh: no MNIST under $data_root (give DATA_ROOT)" >&2
  exit 2
fi
export SALIENCY_ROBUSTNESS_DATA_ROOT
SALIENCY_ROBUSTNESS_DATA_ROOT=$(realpath "$data_root")

installed=$(python -c 'import importlib.metadata as m; print(m.version("snakemake-executor-plugin-slurm"))' 2>/dev/null || true)
if [[ $installed != "$PLUGIN_VERSION" ]]; then
  echo "installing snakemake-executor-plugin-slurm==$PLUGIN_VERSION (found: ${installed:-none})" >&2
  pip install -q "snakemake-executor-plugin-slurm==$PLUGIN_VERSION"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/slurm-test.XXXXXX")
chmod 755 "$work"  # the slurm user keeps its state in here
# shellcheck source=tests/slurm/cluster.sh
source tests/slurm/cluster.sh
finish() {
  local status=$?
  # tear down whatever happens, also when a reader of our output went away (| head)
  set +e
  trap '' PIPE
  slurm_down
  if [[ $status -eq 0 && ${SLURM_TEST_KEEP:-0} != 1 ]]; then
    rm -rf "$work"
  else
    echo "tests/slurm/run.sh: exit $status; runs, SLURM logs and daemon logs are in $work" >&2
  fi
  exit "$status"
}
trap finish EXIT
trap 'exit 130' INT TERM

started=$SECONDS
slurm_up "$work/cluster"
SALIENCY_ROBUSTNESS_SLURM_TEST=1 SLURM_TEST_WORKDIR=$work/runs \
  timeout -k 60 "$TEST_TIMEOUT" python -m pytest -p no:cacheprovider -m slurm -v -rA tests/slurm
echo "tests/slurm/run.sh: passed in $((SECONDS - started)) s (after installing)" >&2
