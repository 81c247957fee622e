"""Time of the metrics stage's computation against its floor (issue 3).

    python tests/benchmarks/bench_metrics.py [--n 1000] [--batch-size 100] [--threads 2]
        [--repeats 3] [--device cpu] [--data-root ../shared/data]

``compute_metrics`` needs every logit's input gradient, so its floor is one forward pass plus
``n`` reverse passes on the same graph, batch by batch. The table gives the best of
``--repeats`` runs of: that floor, the same gradients from one batched reverse pass over
one-hot cotangents (the alternative ``compute_metrics`` does not use), ``compute_metrics``
and ``compute_saliency`` on the MNIST architecture (random weights: the cost does not depend on
them), and the ratio to the floor (target: at most 1.5). MNIST test images when the data root
has them, uniform noise otherwise.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from saliency_robustness.architectures import MnistCNN
from saliency_robustness.data import load_mnist
from saliency_robustness.runtime import resolve_device
from saliency_robustness.stages.metrics import compute_metrics
from saliency_robustness.stages.saliency import compute_saliency


def floor_loop(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """One forward pass and one reverse pass per logit, per batch."""
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].clone().requires_grad_(True)
        logits = model(x)
        for k in range(logits.shape[1]):
            torch.autograd.grad(logits[:, k].sum(), x, retain_graph=True)


def floor_batched(model: nn.Module, images: torch.Tensor, batch_size: int) -> None:
    """One forward pass and one batched reverse pass over the n one-hot cotangents, per batch."""
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].clone().requires_grad_(True)
        logits = model(x)
        n = logits.shape[1]
        one_hot = torch.eye(n, dtype=logits.dtype, device=logits.device)[:, None, :].expand(n, len(x), n)
        torch.autograd.grad(logits, x, one_hot, is_grads_batched=True)


def best_time(run: Callable[[], object], repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="number of images")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--data-root", default="../shared/data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    if (Path(args.data_root) / "MNIST" / "raw").is_dir():
        images, source = load_mnist(args.data_root, train=False).tensors[0][: args.n], "MNIST test images"
    else:
        images, source = torch.rand(args.n, 1, 28, 28), "uniform noise images"
    torch.manual_seed(0)
    model = MnistCNN(in_channels=1, num_classes=10, image_size=28).to(device).eval()
    images = images.to(device)

    runs: dict[str, Callable[[], object]] = {
        "floor: forward + n reverse passes": lambda: floor_loop(model, images, args.batch_size),
        "forward + batched reverse pass (is_grads_batched)": lambda: floor_batched(model, images, args.batch_size),
        "compute_metrics": lambda: compute_metrics(model, images, batch_size=args.batch_size, device=device),
        "compute_saliency": lambda: compute_saliency(model, images, batch_size=args.batch_size, device=device),
    }
    for run in runs.values():  # warm-up (allocator, cuDNN autotuning, lazy imports)
        run()
    times = {name: best_time(run, args.repeats, device) for name, run in runs.items()}
    floor = times["floor: forward + n reverse passes"]

    print(f"{len(images)} {source}, MnistCNN, batch {args.batch_size}, {device}, {args.threads} threads, best of {args.repeats}\n")
    print("| computation | seconds | images per second | ratio to floor |")
    print("| --- | --- | --- | --- |")
    for name, seconds in times.items():
        print(f"| {name} | {seconds:.2f} | {len(images) / seconds:.0f} | {seconds / floor:.2f} |")


if __name__ == "__main__":
    main()
