"""Do the summary's intervals cover a rerun? Held-out seeds against intervals from other seeds.

    python tests/benchmarks/seed_coverage.py --results results/mnist results/mnist-heldout \
        --seed-sets 0,1,2 3,4,5 6,7,8 [--quantities robustness alignment] [--csv coverage.csv]

The models of every ``--results`` folder (``results/<experiment>``, same grid, other seeds)
are stacked, then split into disjoint seed sets. From each set A, the grid-point means, the
gains over the smallest strength and the across-model trends are computed with their
intervals, twice: with the summary's method (Student-t over seeds plus the image variance;
the rerun interval for trends) and with the former one (a percentile bootstrap resampling
the seeds within grid points and the images). For every other set B, the script counts how
often B's estimate falls inside A's interval. A rerun of the same seeds on another machine is
such a B: it trains other models (docs/statistics.md). It prints the per-set estimates and the
coverage of both methods.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from saliency_robustness.stacking import grid_points, healthy_models, load_stacked
from saliency_robustness.stages.summary import (
    _masked,
    grid_statistics,
    quantities,
    subset_mask,
    trend_statistics,
    trends,
)
from saliency_robustness.statistics import BootstrapOptions, hierarchical_bootstrap
from saliency_robustness.vocabulary import SUBSETS


def former_statistics(stacked: xr.Dataset, options: BootstrapOptions) -> tuple[xr.Dataset, xr.Dataset]:
    """Grid-point means, gains and trends with the former intervals: a percentile bootstrap over
    seeds within grid points and images (the estimates equal the summary's)."""
    grid, trend = grid_statistics(stacked, options), trend_statistics(stacked, options)
    points = grid_points(stacked, healthy_models(stacked))
    found = trends(stacked)
    summarised = quantities(stacked)
    names = list(points)
    baseline = points[names[0]]
    mean = lambda medians, picked: medians[picked[0]].mean(axis=0)  # noqa: E731
    gain = lambda medians, picked: medians[picked[1]].mean(axis=0) - medians[picked[0]].mean(axis=0)  # noqa: E731
    models = [m for point in names for m in points[point]]
    bounds = list(itertools.accumulate([len(points[p]) for p in names], initial=0))
    groups = [range(a, b) for a, b in itertools.pairwise(bounds)]
    strength = stacked["strength"].sel(model=models).values.astype(float)

    def statistic(medians: np.ndarray, picked: list[list[int]]) -> np.ndarray:
        chosen = np.array([m for seeds in picked for m in seeds])
        column = {q: medians[chosen, summarised.index(q)] for q in summarised} | {"strength": strength[chosen]}
        return np.array([pd.Series(column[t.x]).corr(pd.Series(column[t.y]), method="spearman") for t in found])

    for j, subset in enumerate(SUBSETS):
        mask = subset_mask(stacked, subset)
        for i, point in enumerate(names):
            seeds = points[point]
            _, low, high = hierarchical_bootstrap(_masked(stacked, mask, seeds), [range(len(seeds))], mean, options)
            grid["grid_mean_median_ci_low"][i, j], grid["grid_mean_median_ci_high"][i, j] = low, high
            if i:
                pair = _masked(stacked, mask, [*baseline, *seeds])
                paired = [range(len(baseline)), range(len(baseline), len(baseline) + len(seeds))]
                _, low, high = hierarchical_bootstrap(pair, paired, gain, options)
                grid["grid_gain_ci_low"][i, j], grid["grid_gain_ci_high"][i, j] = low, high
        _, low, high = hierarchical_bootstrap(_masked(stacked, mask, models), groups, statistic, options)
        trend["trend_spearman_ci_low"][j], trend["trend_spearman_ci_high"][j] = low, high
    return grid, trend


def coverage(estimates: dict[str, xr.Dataset], intervals: dict[str, xr.Dataset], variable: str, keep: dict) -> tuple[int, int]:
    """How many of the other sets' estimates of ``variable`` fall inside each set's interval."""
    inside = total = 0
    for a, b in itertools.permutations(estimates, 2):
        value = estimates[b][variable].sel(keep)
        low, high = (intervals[a][f"{variable}_ci_low"].sel(keep), intervals[a][f"{variable}_ci_high"].sel(keep))
        ok = np.isfinite(value) & np.isfinite(low)
        inside += int(((low <= value) & (value <= high) & ok).sum())
        total += int(ok.sum())
    return inside, total


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", nargs="+", type=Path, required=True, help="results/<experiment> folders")
    parser.add_argument("--seed-sets", nargs="+", required=True, help="disjoint seed sets, e.g. 0,1,2 3,4,5")
    parser.add_argument("--quantities", nargs="+", default=["robustness", "alignment"])
    parser.add_argument("--n-resamples", type=int, default=2000)
    parser.add_argument("--confidence-level", type=float, default=0.95)
    parser.add_argument("--csv", type=Path, help="write every estimate and interval here")
    args = parser.parse_args(argv)
    metrics = sorted(p for root in args.results for p in (root / "metrics").glob("*.zarr"))
    models = [p.stem for p in metrics]
    model_dirs = [p.parent.parent / "models" / p.stem for p in metrics]
    stacked = load_stacked(models, metrics, model_dirs)
    options = BootstrapOptions(n_resamples=args.n_resamples, confidence_level=args.confidence_level, seed=0)
    machines = sorted(set(stacked["machine"].values))
    print(f"{len(models)} models from {', '.join(map(str, args.results))}; machines: {', '.join(machines)}")

    methods: dict[str, dict[str, xr.Dataset]] = {"summary (t / rerun)": {}, "former (bootstrap)": {}}
    for seeds in args.seed_sets:
        chosen = [int(s) for s in seeds.split(",")]
        part = stacked.sel(model=[m for m, s in zip(stacked["model"].values, stacked["seed"].values) if int(s) in chosen])
        methods["summary (t / rerun)"][seeds] = xr.merge([grid_statistics(part, options), trend_statistics(part, options)])
        methods["former (bootstrap)"][seeds] = xr.merge(former_statistics(part, options))

    current, former = methods["summary (t / rerun)"], methods["former (bootstrap)"]
    rows = []
    for seeds, ds in current.items():
        points = ds["grid_point"].values
        picks = [("grid_mean_median", {"grid_point": p, "quantity": q}, f"{q} {p}") for q in args.quantities for p in points]
        picks += [("trend_spearman", {"trend": t}, str(t)) for t in ds["trend"].values]
        for (variable, at, what), subset in itertools.product(picks, SUBSETS):
            at = {**at, "subset": subset}
            row = {"seeds": seeds, "subset": subset, "what": what, "estimate": float(ds[variable].sel(at))}
            for name, intervals in (("t", current), ("bootstrap", former)):
                row |= {f"{name}_{end}": float(intervals[seeds][f"{variable}_ci_{end}"].sel(at)) for end in ("low", "high")}
            rows.append(row)
    table = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.float_format", "{:.3f}".format):
        print(table.to_string(index=False))
    if args.csv:
        table.to_csv(args.csv, index=False)

    print("\ncoverage: estimates of one seed set inside another set's interval (all ordered pairs of sets)")
    print("| method | grid means (" + ", ".join(args.quantities) + ") | gains (same) | grid means (every quantity) | trends |")
    print("| --- | --- | --- | --- | --- |")
    for name, intervals in methods.items():
        cells = []
        for variable, keep in (
            ("grid_mean_median", {"quantity": args.quantities}),
            ("grid_gain", {"quantity": args.quantities}),
            ("grid_mean_median", {}),
            ("trend_spearman", {}),
        ):
            inside, total = coverage(current, intervals, variable, keep)
            cells.append(f"{inside}/{total} ({inside / max(total, 1):.0%})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
