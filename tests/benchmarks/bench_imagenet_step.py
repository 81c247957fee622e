"""Cost of one ResNet50 fine-tuning step with and without double backprop, and of the
logit gradients that linearized robustness needs (issue 6; docs/imagenet.md).

    python tests/benchmarks/bench_imagenet_step.py [--architecture resnet50] [--batch-size 64]
        [--image-size 224] [--steps 10] [--classes 1000] [--class-chunk 100] [--threads 2]

Synthetic inputs on the device of the pipeline (SALIENCY_ROBUSTNESS_DEVICE, else the GPU when
there is one), full float32 as in training, batch norm frozen. Prints a markdown table:
seconds per step, images per second, the ratio to lambda = 0, peak GPU memory, and the
estimated hours per ImageNet epoch (1,281,167 images, data loading not included), the
memory autograd keeps per image (saved tensors, measured on any device), then the
seconds per image for the gradients of ``--classes`` logits.
"""

from __future__ import annotations

import argparse
import time

import torch

from saliency_robustness.models import ModelSpec, build_model
from saliency_robustness.optimization import freeze_batchnorm, make_optimizer
from saliency_robustness.regularizers import regularized_loss
from saliency_robustness.runtime import full_precision, resolve_device

#: the schema's training defaults (exact penalty of the squared cross-entropy gradient norm)
EXACT = {"sensitivity": "loss", "p": 2.0, "penalty_gradient": "exact", "finite_difference_step": 0.01}

IMAGENET_TRAIN_IMAGES = 1_281_167


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(model: torch.nn.Module, lam: float, x: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[float, float]:
    """Seconds per optimizer step (after one warm-up step) and peak GPU memory in GiB."""
    optimizer = make_optimizer(model, {"optimizer": "sgd", "learning_rate": 1e-6, "momentum": 0.9, "weight_decay": 0.0})
    model.train()
    freeze_batchnorm(model)
    device = x.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + 1):
        if i == 1:
            synchronize(device)
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        regularized_loss(model, x, y, lam=lam, **EXACT).loss.backward()
        optimizer.step()
    synchronize(device)
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def saved_mib_per_image(model: torch.nn.Module, lam: float, x: torch.Tensor, y: torch.Tensor) -> float:
    """MiB of tensors autograd saves for the backward pass, per image: the difference between
    batches of 2 and 1, so that the weights (saved once per batch) cancel out."""

    def saved(n: int) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            regularized_loss(model, x[:n], y[:n], lam=lam, **EXACT)
        return sum(storages.values())

    model.train()
    freeze_batchnorm(model)
    return (saved(2) - saved(1)) / 2**20


def time_class_gradients(model: torch.nn.Module, x: torch.Tensor, classes: int, chunk: int) -> float:
    """Seconds per image for the input gradients of ``classes`` logits, ``chunk`` at a time
    (one forward pass, batched reverse passes), as linearized robustness needs them."""
    model.eval()
    x = x[:1].detach().requires_grad_(True)
    synchronize(x.device)
    start = time.perf_counter()
    logits = model(x)
    done = 0
    while done < classes:
        n = min(chunk, classes - done)
        seeds = torch.zeros(n, *logits.shape, device=x.device)
        seeds[torch.arange(n), 0, torch.arange(done, done + n) % logits.shape[1]] = 1.0
        torch.autograd.grad(logits, x, seeds, retain_graph=True, is_grads_batched=True)
        done += n
    synchronize(x.device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--architecture", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.0, 1e-3])
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--class-chunk", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device()

    spec = ModelSpec(
        name="bench",
        architecture=args.architecture,
        method="gradnorm",
        strength=0.0,
        num_classes=1000,
        in_channels=3,
        image_size=args.image_size,
        sensitivity="loss",
        p=2.0,
        seed=0,
    )
    model = build_model(spec).to(device)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device) - 0.45
    y = torch.randint(0, 1000, (args.batch_size,), device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"{args.architecture}, batch {args.batch_size}, {args.image_size}x{args.image_size}, float32 without TF32, {name}\n")
    print(
        "| lambda | seconds per step | images per second | ratio to lambda = 0 | peak GPU memory (GiB) "
        "| saved tensors per image (MiB) | hours per ImageNet epoch |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    baseline = None
    with full_precision():
        for lam in args.lambdas:
            seconds, peak = time_steps(model, lam, x, y, args.steps)
            baseline = baseline or (seconds if lam == 0 else None)
            ratio = f"{seconds / baseline:.2f}" if baseline else "-"
            rate = args.batch_size / seconds
            hours = IMAGENET_TRAIN_IMAGES / rate / 3600
            saved = saved_mib_per_image(model, lam, x, y) if args.batch_size >= 2 else float("nan")
            print(f"| {lam:g} | {seconds:.3f} | {rate:.1f} | {ratio} | {peak:.1f} | {saved:.0f} | {hours:.2f} |")
        per_image = time_class_gradients(model, x, args.classes, args.class_chunk)
    print(f"\ngradients of {args.classes} logits ({args.class_chunk} at a time): {per_image:.2f} s per image")


if __name__ == "__main__":
    main()
