"""Speed and tightness of the attack ensemble (issue 4).

    python tests/benchmarks/bench_attacks.py [--config config/config.yaml] [--models DIR ...]
        [--eval-store STORE] [--images 100] [--factor 10] [--threads 2] [--batch-size N]
        [--train LAMBDA ...] [--data-root ../shared/data] [--outside-steps 1000]
        [--outside-cache DIR] [--outside-only]

Models: ``--models`` directories, else ``results/<experiment>/models/*`` of the config, else
(``--train``) models of the config's training settings trained into a temporary directory.
Images: the first ``--images`` of ``--eval-store`` (default ``results/<experiment>/data/eval.zarr``,
else built from the config's dataset).

Prints two markdown tables:
1. per model and attack: images per second, gradient evaluations per image (counted on the
   model, so comparable across machines), claimed and verified successes, median verified
   norm, and how often the attack gave the ensemble's rho;
2. per model: the ensemble's median rho against the same ensemble with ``--factor`` times
   the steps of every attack (target: ratio <= 1.005);
3. per model (``--outside-steps``, default 1000; 0 skips it): the ensemble's median rho
   against an outside reference, minimum-norm L2 attacks of another maintained library
   (adv-lib: ALMA, DDN and FMN, ``--outside-steps`` steps each, run on the model seen from
   pixel space), every adversarial they return verified by the project's own
   ``verify_adversarials`` (target: ratio <= 1.01). adv-lib is not a dependency of the
   pipeline: ``pip install --no-deps adv-lib==0.2.8 tqdm`` (its visdom import is stubbed here).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
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

from saliency_robustness.config import load_config  # noqa: E402
from saliency_robustness.data import InputSpace, build_eval_dataset, eval_tensors  # noqa: E402
from saliency_robustness.ensemble import PixelModel, predict, run_ensemble, verify_adversarials  # noqa: E402
from saliency_robustness.grid import model_grid  # noqa: E402
from saliency_robustness.models import load_model  # noqa: E402
from saliency_robustness.robustness import combine_attacks, smallest_verified  # noqa: E402
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


# the outside reference: adv-lib's minimum-norm L2 attacks (Rony et al.), as its authors
# configure them for L2 (ALMA: penalty P2, initial step 0.1 of the distance; DDN without
# quantization, as the project's attacks do not quantize)
OUTSIDE_ATTACKS = ("ALMA", "DDN", "FMN")


#: adv-lib's pinned release, installed without its dependencies (visdom, which it imports for
#: its plotting callbacks only, no longer builds with current setuptools)
ADV_LIB = "adv-lib==0.2.8"


def stub_visdom() -> None:
    """An empty ``visdom`` module, so that adv-lib imports without it: adv-lib only uses visdom
    in callbacks that this benchmark never passes. For this benchmark only, never the pipeline."""
    import importlib.util
    import sys
    import types

    if importlib.util.find_spec("visdom") is None:
        stub = types.ModuleType("visdom")
        stub.Visdom = None  # type: ignore[attr-defined]
        sys.modules["visdom"] = stub


def require_adv_lib() -> None:
    """Stop in one line, before any attack runs, when adv-lib cannot be imported."""
    stub_visdom()
    try:
        import adv_lib.attacks  # noqa: F401
    except ImportError as exc:
        raise SystemExit(
            f"the outside check needs adv-lib ({exc}): pip install --no-deps {ADV_LIB} tqdm, or pass --outside-steps 0"
        ) from None


def outside_attack(name: str, steps: int) -> Any:
    from adv_lib.attacks import alma, ddn, fmn

    if name == "ALMA":
        return lambda model, x, y: alma(model, x, y, distance="l2", num_steps=steps, init_lr_distance=0.1)
    if name == "DDN":
        return lambda model, x, y: ddn(model, x, y, steps=steps, levels=None)
    if name == "FMN":
        return lambda model, x, y: fmn(model, x, y, norm=2, steps=steps)
    raise SystemExit(f"unknown outside attack {name!r} (known: {', '.join(OUTSIDE_ATTACKS)})")


def outside_reference(
    model: torch.nn.Module, images: torch.Tensor, space: InputSpace, steps: int, batch_size: int, names: tuple[str, ...] = OUTSIDE_ATTACKS
) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """Per image, the smallest norm among the outside attacks' adversarials that the project's
    ``verify_adversarials`` confirms (NaN where none), each attack's verified norms, and the
    seconds taken. The attacks see pixels in [0, 1] (``PixelModel``); their adversarials are
    mapped back to the input space and verified there against the clean prediction."""
    pixel_model = PixelModel(model, space).eval()
    bounds = space.input_bounds()
    norms = {name: np.full(len(images), np.nan) for name in names}
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        clean = predict(model, x)
        for name in names:
            adversarial = outside_attack(name, steps)(pixel_model, space.to_pixels(x), clean).detach()
            _, verified, _ = verify_adversarials(model, x, space.from_pixels(adversarial), clean, bounds)
            norms[name][start : start + len(x)] = verified.numpy()
    _, best = smallest_verified(np.stack([norms[name] for name in names], axis=1), axis=1)
    return best, norms, time.perf_counter() - started


def cached_outside_reference(
    directory: Path, model: torch.nn.Module, images: torch.Tensor, space: InputSpace, steps: int, batch_size: int, cache: Path | None
) -> tuple[np.ndarray, dict[str, np.ndarray], float]:
    """:func:`outside_reference`, kept in ``cache`` (when given) under the model file's checksum,
    the images' and the steps: the reference costs far more than the ensemble it judges, and
    does not change when the ensemble does."""
    if cache is None:
        return outside_reference(model, images, space, steps, batch_size)
    key = hashlib.blake2b(digest_size=8)
    key.update((directory / "model.pt").read_bytes())
    key.update(images.numpy().tobytes())
    path = cache / f"{directory.name}-{key.hexdigest()}-{len(images)}images-{steps}steps.npz"
    if path.exists():
        try:
            with np.load(path) as stored:
                if stored["best"].shape == (len(images),):
                    return stored["best"], {name: stored[name] for name in OUTSIDE_ATTACKS}, float(stored["seconds"])
        except (OSError, ValueError, KeyError) as exc:
            print(f"{path}: not a usable outside reference ({exc}); recomputing it")
        else:
            print(f"{path}: not this run's {len(images)} images; recomputing it")
    best, norms, seconds = outside_reference(model, images, space, steps, batch_size)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.npz")
    np.savez(partial, best=best, seconds=seconds, **norms)
    partial.replace(path)
    return best, norms, seconds


def tightness_row(name: str, rho: np.ndarray, reference: np.ndarray, seconds: float, reference_seconds: float) -> str:
    """One row of a tightness table: medians over the images both found rho for, their ratio,
    the median and 90th percentile of the per-image ratio, and the share of images more than
    5 % above the reference."""
    both = np.isfinite(rho) & np.isfinite(reference)
    ratio = rho[both] / reference[both]
    return (
        f"| {name} | {int(both.sum())} | {np.median(rho[both]):.4f} | {np.median(reference[both]):.4f} | "
        f"{np.median(rho[both]) / np.median(reference[both]):.4f} | {np.median(ratio):.4f} | {np.percentile(ratio, 90):.4f} | "
        f"{(ratio > 1.05).mean():.0%} | {seconds:.1f} | {reference_seconds:.1f} |"
    )


def model_dirs(args: argparse.Namespace, config: Mapping[str, Any], scratch: Path) -> list[Path]:
    if args.models:
        return [Path(m) for m in args.models]
    if args.train:
        dirs = []
        for lam in args.train:
            name = f"bench-lambda{lam:g}"
            spec = model_spec(name=name, method="gradnorm", strength=lam, dataset=config["dataset"], model=config["model"], train=config["train"])
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
    parser.add_argument("--factor", type=int, default=10, help="budget multiple of the self-check (0: none)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--outside-steps", type=int, default=1000, help="steps of each outside attack (0: no outside check)")
    parser.add_argument("--outside-cache", type=Path, default=None, help="keep the outside reference here, per model and images")
    parser.add_argument("--outside-only", action="store_true", help="compute the outside reference only (to fill --outside-cache)")
    parser.add_argument("--train", type=float, nargs="*", default=None, help="train models with these lambdas first")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.outside_steps:
        require_adv_lib()

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
        speed_rows: list[str] = []
        tightness_rows: list[str] = []
        outside_rows: list[str] = []
        for directory in dirs:
            model = load_model(directory, "cpu")
            if args.outside_only:
                best, _, seconds = cached_outside_reference(directory, model, images, space, args.outside_steps, batch_size, args.outside_cache)
                print(f"{directory.name}: outside reference median {np.nanmedian(best):.4f} over {np.isfinite(best).sum()} images, {seconds:.0f} s")
                continue
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
            rho = combined["robustness"].values
            if args.factor:
                longer, longer_costs = timed_ensemble(model, images, space, longer_budget(ensemble, args.factor), batch_size)
                reference = combine_attacks(longer)["robustness"].values
                tightness_rows.append(tightness_row(directory.name, rho, reference, total, sum(c["seconds"] for c in longer_costs.values())))
            if args.outside_steps:
                best, per_attack, seconds = cached_outside_reference(
                    directory, model, images, space, args.outside_steps, batch_size, args.outside_cache
                )
                row = tightness_row(directory.name, rho, best, total, seconds)
                winners = {name: int(np.sum(np.isfinite(norms) & (norms == best))) for name, norms in per_attack.items()}
                outside_rows.append(f"{row} {', '.join(f'{k} {v}' for k, v in winners.items())} |")

    if args.outside_only:
        return
    print("| model | attack | images/s | gradients/image | claimed | verified | median norm | gave rho |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(speed_rows))
    header = (
        "| model | images | median rho | median rho ({}) | ratio of medians | median ratio | 90th pct ratio | > 5 % above | seconds | seconds ({}) |"
    )
    if tightness_rows:
        print(f"\nEnsemble against {args.factor}x the steps of every attack (target: ratio of medians <= 1.005)\n")
        print(header.format(f"{args.factor}x", f"{args.factor}x"))
        print("| --- " * 10 + "|")
        print("\n".join(tightness_rows))
    if outside_rows:
        attacks = ", ".join(OUTSIDE_ATTACKS)
        target = "ratio of medians <= 1.01; images > 5 % above <= 2 %"
        print(f"\nEnsemble against adv-lib's {attacks} at {args.outside_steps} steps each, verified here (target: {target})\n")
        print(header.format("outside", "outside") + " gave the reference |")
        print("| --- " * 11 + "|")
        print("\n".join(outside_rows))


if __name__ == "__main__":
    main()
