"""Speed and tightness of the attack ensemble (issue 4).

    python tests/benchmarks/bench_attacks.py [--config config/config.yaml] [--models DIR ...]
        [--eval-store STORE] [--images 100] [--factor 10] [--threads 2] [--batch-size N]
        [--train LAMBDA ...] [--data-root ../shared/data]

Models: ``--models`` directories, else ``results/<experiment>/models/*`` of the config, else
(``--train``) models of the config's training settings trained into a temporary directory.
Images: the first ``--images`` of ``--eval-store`` (default ``results/<experiment>/data/eval.zarr``,
else built from the config's dataset).

Prints two markdown tables:
1. per model and attack: images per second, gradient evaluations per image (counted on the
   model, so comparable across machines), claimed and verified successes, median verified
   norm, and how often the attack gave the ensemble's rho;
2. per model: the ensemble's median rho against the same ensemble with ``--factor`` times
   the steps of every attack (target: ratio <= 1.02).
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr

os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # foolbox imports git

from saliency_robustness.config import load_config, model_grid  # noqa: E402
from saliency_robustness.data import InputSpace, build_eval_dataset, eval_tensors  # noqa: E402
from saliency_robustness.ensemble import run_ensemble  # noqa: E402
from saliency_robustness.models import load_model  # noqa: E402
from saliency_robustness.robustness import combine_attacks  # noqa: E402
from saliency_robustness.stages.training import model_spec, train_stage  # noqa: E402
from saliency_robustness.stores import open_store  # noqa: E402


def longer_budget(ensemble: Mapping[str, Mapping[str, Any]], factor: int) -> dict[str, dict[str, Any]]:
    """The ensemble with ``factor`` times the iterations (``steps``) of every attack."""
    longer = copy.deepcopy(dict(ensemble))
    for spec in longer.values():
        kwargs = spec.setdefault("kwargs", {})
        kwargs["steps"] = factor * kwargs.get("steps", DEFAULT_STEPS.get(spec["attack"], 100))
    return longer


# Foolbox's defaults, for attacks whose config leaves ``steps`` out
DEFAULT_STEPS = {"L2DeepFoolAttack": 50, "L2CarliniWagnerAttack": 10000, "L2FMNAttack": 100, "DDNAttack": 100, "L2BrendelBethgeAttack": 1000}


class GradientCounter:
    """Counts the images the model sees with and without input gradients."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.gradient = self.forward = 0
        model.register_forward_hook(self)

    def __call__(self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and inputs[0].requires_grad:
            self.gradient += len(inputs[0])
        else:
            self.forward += len(inputs[0])


def timed_ensemble(
    model: torch.nn.Module, images: torch.Tensor, space: InputSpace, ensemble: Mapping[str, Any], batch_size: int
) -> tuple[dict[str, xr.Dataset], dict[str, dict[str, float]]]:
    """:func:`run_ensemble` one attack at a time, recording wall time and model evaluations."""
    counter = GradientCounter(model)
    results: dict[str, xr.Dataset] = {}
    costs: dict[str, dict[str, float]] = {}
    for name, spec in sorted(ensemble.items(), key=lambda item: bool(item[1].get("refine"))):
        starts = {k: results[k] for k in results if not ensemble[k].get("refine")} if spec.get("refine") else {}
        counter.gradient = counter.forward = 0
        started = time.perf_counter()
        results.update(run_ensemble(model, images, space, {name: spec}, batch_size=batch_size, device="cpu", starts_from=starts))
        seconds = time.perf_counter() - started
        costs[name] = {"seconds": seconds, "gradients": counter.gradient / len(images), "forwards": counter.forward / len(images)}
    return results, costs


def model_dirs(args: argparse.Namespace, config: Mapping[str, Any], scratch: Path) -> list[Path]:
    if args.models:
        return [Path(m) for m in args.models]
    if args.train:
        dirs = []
        for lam in args.train:
            name = f"bench-lambda{lam:g}"
            spec = model_spec(name, lam, config["dataset"], config["model"], config["train"])
            train_stage(spec=spec, dataset=config["dataset"], train=config["train"], data_root=args.data_root, output=scratch / name)
            dirs.append(scratch / name)
        return dirs
    root = Path("results") / config["experiment"] / "models"
    dirs = [root / name for name in model_grid(config) if (root / name / "model.pt").exists()]
    if not dirs:
        raise SystemExit(f"no trained models under {root}: run the workflow first, or pass --models DIR ... or --train LAMBDA ...")
    return dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--models", nargs="*", default=None, help="model directories (models/<model>/)")
    parser.add_argument("--eval-store", default=None)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--factor", type=int, default=10, help="budget multiple of the reference ensemble")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--train", type=float, nargs="*", default=None, help="train models with these lambdas first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.config, {"data_root": args.data_root})
    ensemble = config["attacks"]["ensemble"]
    batch_size = args.batch_size or config["attacks"]["batch_size"]
    eval_path = Path(args.eval_store or Path("results") / config["experiment"] / "data" / "eval.zarr")
    eval_ds = open_store(eval_path) if eval_path.exists() else build_eval_dataset(config["dataset"], args.data_root)
    images = eval_tensors(eval_ds)[0][: args.images]
    space = InputSpace.from_attrs(eval_ds.attrs)

    with tempfile.TemporaryDirectory() as scratch:
        dirs = model_dirs(args, config, Path(scratch))
        print(f"{len(images)} images, batch {batch_size}, {args.threads} threads, device cpu, config {args.config}\n")
        speed_rows, tightness_rows = [], []
        for directory in dirs:
            model = load_model(directory, "cpu")
            results, costs = timed_ensemble(model, images, space, ensemble, batch_size)
            combined = combine_attacks(results)
            for name, ds in results.items():
                norms = ds["perturbation_norm"].values
                cost = costs[name]
                speed_rows.append(
                    f"| {directory.name} | {name} | {len(images) / cost['seconds']:.1f} | {cost['gradients']:.0f} | "
                    f"{ds.attrs['claimed_successes']} | {ds.attrs['verified_successes']} | "
                    f"{np.nanmedian(norms) if np.isfinite(norms).any() else float('nan'):.4f} | "
                    f"{int((combined['robustness_attack'].values == name).sum())} |"
                )
            total = sum(c["seconds"] for c in costs.values())
            speed_rows.append(
                f"| {directory.name} | **ensemble** | {len(images) / total:.1f} | {sum(c['gradients'] for c in costs.values()):.0f} | - | "
                f"{len(images) - combined.attrs['attack_failures']} | {np.nanmedian(combined['robustness'].values):.4f} | - |"
            )
            longer, longer_costs = timed_ensemble(model, images, space, longer_budget(ensemble, args.factor), batch_size)
            reference = combine_attacks(longer)["robustness"].values
            rho = combined["robustness"].values
            tightness_rows.append(
                f"| {directory.name} | {np.nanmedian(rho):.4f} | {np.nanmedian(reference):.4f} | "
                f"{np.nanmedian(rho) / np.nanmedian(reference):.4f} | {np.nanmedian(rho / reference):.4f} | "
                f"{np.nanpercentile(rho / reference, 90):.4f} | {total:.1f} | {sum(c['seconds'] for c in longer_costs.values()):.1f} |"
            )

    print("| model | attack | images/s | gradients/image | claimed | verified | median norm | gave rho |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(speed_rows))
    print(f"\nEnsemble against {args.factor}x the steps of every attack (target: ratio of medians <= 1.02)\n")
    print(
        f"| model | median rho | median rho ({args.factor}x) | ratio of medians | median ratio | 90th pct ratio "
        f"| seconds | seconds ({args.factor}x) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(tightness_rows))


if __name__ == "__main__":
    main()
