"""The GPU path: seconds per training epoch on one device, exact and finite-difference penalty,
the grid's gradnorm models as one vectorised ensemble (train.ensemble), and the projected
training time of config/paper-mnist.yaml both ways.

    python tests/benchmarks/bench_gpu.py [--config config/paper-mnist.yaml] [--data-root ../shared/data]
        [--device cuda] [--epochs 1] [--lambda 1e-3]

Trains the config's architecture on its training set (its batch size, optimizer and
n_train) for ``--epochs`` per variant, with the training set on the device (the pipeline's
path for in-memory datasets), and prints a markdown table. ``--device cpu`` runs it without a
GPU (for checking the script, or for the CPU's side of the ensemble question).
"""

from __future__ import annotations

import argparse
import time

import torch

from saliency_robustness.config import load_config
from saliency_robustness.data import open_split, seeded_subset
from saliency_robustness.grid import model_grid
from saliency_robustness.models import build_model
from saliency_robustness.stages.training import fit, model_spec
from saliency_robustness.vectorized import fit_vectorized


def seconds_per_epoch(config: dict, train_set: object, lam: float, method: str, device: torch.device, epochs: int) -> float:
    settings = {**config["train"], "epochs": epochs, "penalty_gradient": method}
    model = build_model(model_spec(name="bench", method="gradnorm", strength=lam, dataset=config["dataset"], model=config["model"], train=settings))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fit(model, train_set, settings, lam, device=device)  # type: ignore[arg-type]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / epochs


def vectorized_seconds_per_epoch(config: dict, train_set: object, lams: list[float], device: torch.device, epochs: int) -> float:
    settings = {**config["train"], "epochs": epochs, "penalty_gradient": "exact"}
    models = [
        build_model(model_spec(name="bench", method="gradnorm", strength=lam, dataset=config["dataset"], model=config["model"], train=settings))
        for lam in lams
    ]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fit_vectorized(models, [train_set] * len(lams), settings, lams, list(range(len(lams))), device=device)  # type: ignore[list-item]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/paper-mnist.yaml")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lambda", dest="lam", type=float, default=None, help="default: the config's largest lambda")
    parser.add_argument(
        "--stack-size", type=int, default=None, help="models trained as one vectorised stack (default: every gradnorm model of the grid)"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible; pass --device cpu to check the script")

    config = load_config(args.config, {"data_root": args.data_root})
    split, _ = open_split(config["dataset"], args.data_root, "train")
    train_set, _ = seeded_subset(split, config["train"]["n_train"], config["train"]["seed"])
    grid = model_grid(config)
    lam = args.lam if args.lam is not None else max(point.strength for point in grid.values() if point.method == "gradnorm")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}: {len(train_set)} training images, batch {config['train']['batch_size']}, {args.epochs} epoch(s) per variant\n")
    print("| variant | seconds per epoch | ratio to plain |")
    print("| --- | --- | --- |")
    times = {"plain": seconds_per_epoch(config, train_set, 0.0, "exact", device, args.epochs)}
    for method in ("exact", "finite_difference"):
        times[method] = seconds_per_epoch(config, train_set, lam, method, device, args.epochs)
    lams = [point.strength for point in grid.values() if point.method == "gradnorm"][: args.stack_size]
    times["vectorized"] = vectorized_seconds_per_epoch(config, train_set, lams, device, args.epochs)
    for variant, seconds in times.items():
        label = {"plain": "plain (lambda 0)", "vectorized": f"vectorised stack of {len(lams)} (exact)"}.get(variant, f"lambda {lam:g}, {variant}")
        print(f"| {label} | {seconds:.2f} | {seconds / times['plain']:.2f} |")
    epochs = config["train"]["epochs"]
    regularized = sum(point.method != "gradnorm" or point.strength > 0 for point in grid.values())
    plain = len(grid) - regularized
    print(f"\nprojected training of {args.config} ({len(grid)} models x {epochs} epochs on this device):")
    for method in ("exact", "finite_difference"):
        seconds = epochs * (plain * times["plain"] + regularized * times[method])
        print(f"- one model at a time, {method}: {seconds / 3600:.2f} h ({seconds / 60:.0f} min)")
    gradnorm = sum(point.method == "gradnorm" for point in grid.values())
    seconds = epochs * times["vectorized"] * gradnorm / len(lams)  # stacks of the measured size, one after another
    print(f"- vectorised stacks of {len(lams)}: {seconds / 3600:.2f} h ({seconds / 60:.0f} min)")


if __name__ == "__main__":
    main()
