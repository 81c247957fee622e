"""Cost of the explanation-quality measures per image (issue 23).

    python tests/benchmarks/bench_quality.py [--n 100] [--threads 1] [--repeats 3] [--device cpu]
        [--fractions 0.1,0.2,...,0.9] [--noise-std 0.01] [--sensitivity-samples 5] [--radius 0.02]
        [--infidelity-perturbations 16] [--infidelity-std 0.1]

The measures' options default to the config schema's (``quality`` section). Max-sensitivity is also timed
with SmoothGrad and Integrated Gradients as the explanation (the ``saliency`` section's defaults: 25 samples,
32 steps), which recomputes that map at every perturbed copy.

Times each measure of :mod:`saliency_robustness.explanation_quality` on the default MNIST network
(``MnistCNN(in_channels=1, num_classes=10, image_size=28)``, random initialization: the cost does not depend
on the weights) over ``--n`` uniform random 28x28 images in one batch, best of ``--repeats`` runs after a
warm-up, and prints a Markdown table: seconds for the batch, milliseconds per image and the ratio to the
saliency map itself (one forward and one reverse pass). ROAD is also split into its noisy linear imputation
(the sparse solve on the CPU) and the rest (ranking and the forward pass over the ``2 N F`` imputed images).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from bench_metrics import best_time  # the script's folder is on sys.path when it runs

from saliency_robustness.architectures import MnistCNN
from saliency_robustness.attributions import AttributionOptions, explanation, logit_gradient
from saliency_robustness.config import validate_config
from saliency_robustness.data import MNIST_INPUT_SPACE
from saliency_robustness.explanation_quality import (
    ORDERS,
    gini,
    infidelity,
    max_sensitivity,
    noisy_linear_imputation,
    removal_masks,
    road,
)
from saliency_robustness.runtime import resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100, help="number of images (one batch)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    defaults = validate_config({"experiment": "bench"})
    quality = defaults["quality"]
    parser.add_argument("--fractions", default=",".join(map(str, quality["road"]["fractions"])), help="ROAD's fractions")
    parser.add_argument("--noise-std", type=float, default=quality["road"]["noise_std"], help="ROAD's imputation noise")
    parser.add_argument("--sensitivity-samples", type=int, default=quality["max_sensitivity"]["n_samples"])
    parser.add_argument("--radius", type=float, default=quality["max_sensitivity"]["radius"], help="max-sensitivity's L-inf radius")
    parser.add_argument("--infidelity-perturbations", type=int, default=quality["infidelity"]["n_perturbations"])
    parser.add_argument("--infidelity-std", type=float, default=quality["infidelity"]["std"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    fractions = [float(f) for f in args.fractions.split(",")]

    saliency = defaults["saliency"]
    attributions = AttributionOptions(("smoothgrad", "integrated_gradients"), saliency["smoothgrad"], saliency["integrated_gradients"])

    torch.manual_seed(0)
    model = MnistCNN(in_channels=1, num_classes=10, image_size=28).to(device).eval()
    x = torch.rand(args.n, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        prediction = model(x).argmax(dim=1)
    a = logit_gradient(model, x, prediction)
    removed = torch.stack([removal_masks(a, fractions, order) for order in ORDERS]).reshape(-1, 28, 28)
    copies = x[None, :, None].expand(len(ORDERS), args.n, len(fractions), 1, 28, 28).reshape(-1, 1, 28, 28)

    f, k, m = len(fractions), args.sensitivity_samples, args.infidelity_perturbations
    runs: dict[str, tuple[str, Callable[[], object]]] = {
        "saliency map (gradient)": ("forward + reverse pass", lambda: logit_gradient(model, x, prediction)),
        "gini": ("", lambda: gini(a)),
        "ROAD": (
            f"{f} fractions x MoRF/LeRF, noise {args.noise_std}",
            lambda: road(model, x, prediction, a, fractions=fractions, noise_std=args.noise_std, seed=0),
        ),
        "ROAD: imputation only": (
            f"{2 * f} sparse systems per image",
            lambda: noisy_linear_imputation(copies, removed, noise_std=args.noise_std, seed=0),
        ),
        "max-sensitivity": (
            f"{k} samples, L-inf radius {args.radius}",
            lambda: max_sensitivity(model, x, prediction, explanation=logit_gradient, radius=args.radius, n_samples=k, seed=0),
        ),
        **{
            f"max-sensitivity of {method}": (
                f"{k} samples, each map recomputed ({options})",
                lambda method=method: max_sensitivity(
                    model, x, prediction, explanation=explanation(method, attributions, MNIST_INPUT_SPACE, 0), radius=args.radius, n_samples=k, seed=0
                ),
            )
            for method, options in (
                ("smoothgrad", f"{attributions.smoothgrad['n']} noisy gradients"),
                ("integrated_gradients", f"{attributions.integrated_gradients['steps']} steps"),
            )
        },
        "infidelity": (
            f"{m} Gaussian perturbations, std {args.infidelity_std}",
            lambda: infidelity(model, x, prediction, a, n_perturbations=m, std=args.infidelity_std, seed=0, normalize=True),
        ),
    }
    for _, run in runs.values():  # warm-up (allocator, lazy imports)
        run()
    times = {name: best_time(run, args.repeats, device) for name, (_, run) in runs.items()}
    reference = times["saliency map (gradient)"]

    print(f"{args.n} uniform noise images 28x28, MnistCNN (random init), {device}, {args.threads} threads, best of {args.repeats}\n")
    print("| measure | settings | seconds (batch) | ms per image | ratio to the saliency map |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds in times.items():
        print(f"| {name} | {runs[name][0]} | {seconds:.3f} | {1000 * seconds / args.n:.2f} | {seconds / reference:.1f} |")


if __name__ == "__main__":
    main()
