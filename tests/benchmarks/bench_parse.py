"""What the project adds to every snakemake invocation (and every cluster job): the wall time and
peak memory of ``snakemake -n`` on this repository's Snakefile against a one-rule Snakefile, in
the same environment. Target: at most 2 s over the one-rule Snakefile.

    python tests/benchmarks/bench_parse.py [--config data_root=../shared/data] [--repeats 3] [--repo DIR]

The first dry run in a fresh working directory also builds every attack of the ensemble once
(the start-up check, cached in ``.snakemake/saliency_robustness/`` per settings, code and
package versions); it is reported on its own line. Run it with nothing else running.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ONE_RULE = 'rule all:\n    output:\n        "x",\n    shell:\n        "touch {output}"\n'

# runs one command and prints its wall time and the peak resident memory of its process tree's largest process
TIMED = """
import resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, code)
"""


def dry_run(cwd: Path, *args: str) -> tuple[float, float]:
    """Seconds and peak MB of ``snakemake -n`` in ``cwd``."""
    command = [sys.executable, "-c", TIMED, sys.executable, "-m", "snakemake", "-n", "--cores", "1", *args]
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=True)
    seconds, mb, code = out.stdout.split()
    if int(code) != 0:
        raise SystemExit(f"error: snakemake -n failed in {cwd} (exit {code})")
    return float(seconds), float(mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[2])
    parser.add_argument("--config", nargs="*", default=["data_root=../shared/data"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    config = ["--config", *args.config] if args.config else []
    with tempfile.TemporaryDirectory() as scratch:
        one_rule = Path(scratch)
        (one_rule / "Snakefile").write_text(ONE_RULE)
        shutil.rmtree(args.repo / ".snakemake" / "saliency_robustness", ignore_errors=True)
        first = dry_run(args.repo, *config)
        ours, baseline = [], []
        for _ in range(args.repeats):
            baseline.append(dry_run(one_rule))
            ours.append(dry_run(args.repo, *config))
    print(f"| Snakefile | seconds (median of {args.repeats}) | peak MB |")
    print("| --- | --- | --- |")
    print(f"| one rule | {statistics.median(s for s, _ in baseline):.2f} | {max(m for _, m in baseline):.0f} |")
    print(f"| this repository | {statistics.median(s for s, _ in ours):.2f} | {max(m for _, m in ours):.0f} |")
    print(f"| this repository, first run (builds the attacks once) | {first[0]:.2f} | {first[1]:.0f} |")
    print(f"\nover the one-rule Snakefile: {statistics.median(s for s, _ in ours) - statistics.median(s for s, _ in baseline):+.2f} s")


if __name__ == "__main__":
    main()
