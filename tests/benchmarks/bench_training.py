"""Training time per epoch with and without the gradient-norm regularizer, its penalty
differentiated exactly (double backprop) or by finite differences, on every step or lazily
(every k-th step, ``train.penalty_interval``), on every example or on a sub-batch
(``train.penalty_fraction``).

    python tests/benchmarks/bench_training.py [--config config/config.yaml] [--data-root ../shared/data]
        [--lambdas 0 1] [--penalty-gradients exact finite_difference] [--penalty-intervals 1 4]
        [--penalty-fractions 1 0.25]
        [--epochs 1] [--threads 1] [--model-options JSON] [--train-options JSON] [--n-train N]

Trains the configured architecture for the configured batch size and optimizer on the
configured training subset, and prints a markdown table of seconds per epoch and the
ratio to lambda = 0 (the cost of the regularizer).

With ``--loading`` (image folders), it times only the training batches instead: two epochs
of the configured subset with ``dataset.decode`` per_epoch and once, one thread, no model.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from saliency_robustness.config import load_config
from saliency_robustness.data import open_split, seeded_subset
from saliency_robustness.models import build_model
from saliency_robustness.stages.training import fit, model_spec
from saliency_robustness.training_data import training_batches


def time_loading(config: dict, data_root: str, epochs: int = 2) -> None:
    """Seconds per epoch of reading the training batches alone, per ``dataset.decode``."""
    print(f"| decode | {' | '.join(f'epoch {e + 1} (s)' for e in range(epochs))} |")
    print("| --- " * (epochs + 1) + "|")
    for decode in ("per_epoch", "once"):
        split, _ = open_split({**config["dataset"], "decode": decode}, data_root, "train")
        train_set, _ = seeded_subset(split, config["train"]["n_train"], config["train"]["seed"])
        batches_of = training_batches(train_set, config["train"], torch.device("cpu"))
        seconds = []
        for epoch in range(epochs):
            start = time.perf_counter()
            for _ in batches_of(epoch):
                pass
            seconds.append(time.perf_counter() - start)
        print(f"| {decode} | {' | '.join(f'{s:.1f}' for s in seconds)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="config/config.yaml")
    parser.add_argument("--data-root", default="../shared/data")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--penalty-gradients", nargs="+", default=["exact", "finite_difference"])
    parser.add_argument("--penalty-intervals", type=int, nargs="+", default=[1], help="train.penalty_interval values (lambda > 0)")
    parser.add_argument("--penalty-fractions", type=float, nargs="+", default=[1.0], help="train.penalty_fraction values (lambda > 0)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-options", type=json.loads, default=None, help='JSON merged over model.options, e.g. {"widths": [32, 64, 128]}')
    parser.add_argument("--n-train", type=int, default=None, help="override train.n_train")
    parser.add_argument("--train-options", type=json.loads, default=None, help='JSON merged over train, e.g. {"channels_last": true}')
    parser.add_argument("--loading", action="store_true", help="time reading the training batches per dataset.decode (image folders)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.config, {"data_root": args.data_root})
    if args.model_options:
        config["model"]["options"] = {**config["model"]["options"], **args.model_options}
    if args.n_train:
        config["train"]["n_train"] = args.n_train
    if args.train_options:
        config["train"] = {**config["train"], **args.train_options}
    if args.loading:
        time_loading(config, args.data_root)
        return
    train = {**config["train"], "epochs": args.epochs}
    split, _ = open_split(config["dataset"], args.data_root, "train")
    train_set, _ = seeded_subset(split, train["n_train"], train["seed"])
    device = torch.device("cpu")

    print(f"{len(train_set)} training images, batch {train['batch_size']}, {args.threads} threads, {args.epochs} epoch(s)")
    print(f"{config['model']['architecture']} {json.dumps(config['model']['options'])}\n")
    print("| lambda | penalty gradient | penalty interval | penalty fraction | seconds per epoch | images per second | ratio to lambda = 0 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    baseline = None
    runs = [
        (lam, method, interval, fraction)
        for lam in args.lambdas
        for method in (["-"] if lam == 0 else args.penalty_gradients)
        for interval in ([1] if lam == 0 else args.penalty_intervals)
        for fraction in ([1.0] if lam == 0 else args.penalty_fractions)
    ]
    for lam, method, interval, fraction in runs:
        penalty = {"penalty_gradient": "exact" if method == "-" else method, "penalty_interval": interval, "penalty_fraction": fraction}
        settings = {**train, **penalty}
        spec = model_spec(name="bench", method="gradnorm", strength=lam, dataset=config["dataset"], model=config["model"], train=settings)
        model = build_model(spec)
        start = time.perf_counter()
        fit(model, train_set, settings, lam, device=device)
        per_epoch = (time.perf_counter() - start) / args.epochs
        baseline = baseline or (per_epoch if lam == 0 else None)
        ratio = f"{per_epoch / baseline:.2f}" if baseline else "-"
        shown = (f"{interval}", f"{fraction:g}") if lam else ("-", "-")
        print(f"| {lam:g} | {method} | {shown[0]} | {shown[1]} | {per_epoch:.1f} | {len(train_set) / per_epoch:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
