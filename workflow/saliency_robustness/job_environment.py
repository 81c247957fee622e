"""The environment Snakemake's jobs run in: they import this checkout's package, also inside a
conda env or on a cluster node where it was never installed, and Foolbox's git probe is quiet."""

from __future__ import annotations

import os
from pathlib import Path

#: the folder holding this package (``workflow/`` of the checkout)
PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def export_package_path() -> None:
    """Put this checkout's ``workflow/`` first on ``PYTHONPATH`` (once) and quiet Foolbox's git probe."""
    paths = [str(PACKAGE_PARENT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
