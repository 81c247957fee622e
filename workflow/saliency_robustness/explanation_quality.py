"""Per-image explanation-quality measures (issue 23, "Is alignment interpretability?"): is a map that
aligns with the image (docs/spec.md §2) also a *good* explanation by the measures people use?

- :func:`gini`: the sparsity of ``|a|``, the Gini index of Hurley & Rickard (2009, "Comparing measures of
  sparsity", IEEE Trans. Inf. Theory 55(10)), the measure of Chalasani et al. (2020, "Concise explanations of
  neural networks using adversarial training", ICML).
- :func:`road`: ROAD, Remove And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci 2022, "A consistent and
  efficient evaluation strategy for attribution methods", ICML): the predicted-class probability as the most
  (MoRF) or least (LeRF) relevant pixels are removed and filled by their noisy linear imputation.
- :func:`max_sensitivity` and :func:`infidelity`: Yeh, Hsieh, Suggala, Inouye & Ravikumar (2019, "On the (in)fidelity
  and sensitivity of explanations", NeurIPS), through Captum's ``captum.metrics`` (Kokhlikyan et al. 2020).

Every measure takes the model in eval mode (:func:`saliency_robustness.evaluation.evaluation_mode`; a module in
training mode is refused) and images ``x`` ``(N, C, H, W)`` in the model's input space (docs/spec.md §5): radii,
standard deviations and the imputation live in input units, and nothing is clipped to the pixel box. The predicted
class ``prediction`` ``(N,)`` is the class explained, frozen at ``x`` (the class of ``F(x)``, never re-evaluated at a
perturbed input). Attribution maps ``a`` are ``(N, C, H, W)`` and signed, as the saliency stage stores them. Each
measure works on the whole batch at once: one forward (and, for the sensitivity, reverse) pass over all perturbed
copies of all images; memory grows with ``N`` times the number of copies, so the caller sizes ``N``.

Every option is an argument without a default: the config schema owns the defaults. All randomness is seeded
(``seed``) and leaves the global random state as it was. The draws depend on the seed and on the batch's shape, so
an image's value depends on how the images are batched, like the saliency stage's SmoothGrad (seeded per batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import sparse
from scipy.sparse.linalg import splu
from torch import nn

from saliency_robustness.attributions import Explanation

#: ROAD's noisy linear imputation (Rong et al. 2022): a removed pixel is the weighted mean of its 8 neighbours,
#: ``((dy, dx), weight)``: 1/6 for the 4 direct neighbours, 1/12 for the 4 diagonal ones (they sum to 1)
NEIGHBOUR_WEIGHTS: tuple[tuple[tuple[int, int], float], ...] = (
    ((-1, 0), 1 / 6),
    ((1, 0), 1 / 6),
    ((0, -1), 1 / 6),
    ((0, 1), 1 / 6),
    ((-1, -1), 1 / 12),
    ((-1, 1), 1 / 12),
    ((1, -1), 1 / 12),
    ((1, 1), 1 / 12),
)
MORF = "morf"  # most relevant first: remove the pixels of largest relevance
LERF = "lerf"  # least relevant first: remove the pixels of smallest relevance
ORDERS = (MORF, LERF)
#: the most unknowns factorised at once (bounds the LU's memory; whole images at a time, at least one)
_SOLVE_UNKNOWNS = 1 << 18

#: every per-image measure the quality stage stores: name -> (long name, units); all but the ROAD curves are
#: ``(attribution, sample)``, the curves ``(attribution, sample, fraction)``
QUALITY_MEASURES: dict[str, tuple[str, str]] = {
    "gini": ("Gini index of |a| over channels and pixels (sparseness; higher: sparser)", "1"),
    "road_morf": ("ROAD: predicted-class probability after removing the most relevant pixels first (imputed)", "1"),
    "road_lerf": ("ROAD: predicted-class probability after removing the least relevant pixels first (imputed)", "1"),
    "road_area": ("ROAD: area between the LeRF and MoRF curves over the fractions (faithfulness; higher: more faithful)", "1"),
    "max_sensitivity": ("max-sensitivity: largest relative change of the map under L-inf perturbations (lower: more stable)", "1"),
    "infidelity": ("infidelity: mean squared error of <I, a> as a prediction of the logit's drop (lower: more faithful)", "logit^2"),
}
#: the per-image summaries (one number per image and map) the concordance ranks models by
QUALITY_SCORES = ("gini", "road_area", "max_sensitivity", "infidelity")



def _require_eval(model: nn.Module) -> None:
    training = [name or type(model).__name__ for name, module in model.named_modules() if module.training]
    if training:
        raise ValueError(f"the model must be in eval mode (modules in training mode: {', '.join(training[:5])})")


def _check_batch(x: torch.Tensor, prediction: torch.Tensor, a: torch.Tensor | None = None) -> None:
    if x.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if prediction.shape != (len(x),):
        raise ValueError(f"prediction must be (N,) = ({len(x)},), got shape {tuple(prediction.shape)}")
    if a is not None and a.shape != x.shape:
        raise ValueError(f"attribution maps must have the images' shape {tuple(x.shape)}, got {tuple(a.shape)}")


# --- sparsity ----------------------------------------------------------------------------------


def gini(a: torch.Tensor) -> torch.Tensor:
    """The Gini index of ``|a|`` per map, over all its ``n = C H W`` entries (channels included), in float64.

    With ``c_(1) <= ... <= c_(n)`` the sorted ``|a|``: ``G = 1 - 2 sum_k (c_(k) / ||c||_1) (n - k + 1/2) / n``
    (Hurley & Rickard 2009; Chalasani et al. 2020). 0 for a constant map, ``(n - 1) / n`` for a map with one
    nonzero entry, invariant to the map's scale and sign. The all-zero map has no distribution of mass: its index
    is NaN (``0 / 0``), as is that of a map with a non-finite entry.
    """
    if a.ndim < 2:
        raise ValueError(f"attribution maps must be (N, ...), got shape {tuple(a.shape)}")
    c = a.detach().abs().reshape(len(a), -1).double().sort(dim=1).values
    n = c.shape[1]
    k = torch.arange(1, n + 1, dtype=torch.float64, device=c.device)
    total = c.sum(dim=1)
    weighted = (c * ((n - k + 0.5) / n)).sum(dim=1)
    nan = torch.full_like(total, math.nan)
    return torch.where(total > 0, 1 - 2 * weighted / torch.where(total > 0, total, 1.0), nan)


# --- ROAD: removal and noisy linear imputation ---------------------------------------------------


def pixel_relevance(a: torch.Tensor) -> torch.Tensor:
    """The relevance of each pixel position, ``sum_c |a_c(y, x)|`` ``(N, H, W)``: ROAD removes whole pixels (all
    channels), ranked by the absolute attribution summed over the channels."""
    if a.ndim != 4:
        raise ValueError(f"attribution maps must be (N, C, H, W), got shape {tuple(a.shape)}")
    if not bool(torch.isfinite(a).all()):
        raise ValueError("attribution maps must be finite to rank pixels")
    return a.detach().abs().sum(dim=1)


def removal_counts(fractions: Sequence[float], n_pixels: int) -> list[int]:
    """The number of pixels each fraction removes, ``floor(f n_pixels + 1/2)``. The fractions must increase
    strictly from at least 0 and leave at least one pixel (the imputation needs one known pixel)."""
    values = [float(f) for f in fractions]
    if not values:
        raise ValueError("ROAD needs at least one fraction")
    if any(not 0.0 <= f <= 1.0 for f in values) or any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"fractions must increase strictly within [0, 1), got {values}")
    counts = [math.floor(f * n_pixels + 0.5) for f in values]
    if counts[-1] >= n_pixels:
        raise ValueError(f"fraction {values[-1]} removes all {n_pixels} pixels: nothing is left to impute from")
    return counts


def removal_masks(a: torch.Tensor, fractions: Sequence[float], order: str) -> torch.Tensor:
    """Which pixels each fraction removes, ``(N, F, H, W)`` bool: the ``floor(f H W + 1/2)`` pixels of largest
    (``morf``) or smallest (``lerf``) :func:`pixel_relevance`; ties go to the pixel first in row-major order
    (a stable sort). A larger fraction removes a superset of a smaller one's pixels."""
    if order not in ORDERS:
        raise ValueError(f"unknown removal order {order!r} (known: {', '.join(ORDERS)})")
    relevance = pixel_relevance(a).flatten(1)
    n, pixels = relevance.shape
    counts = torch.tensor(removal_counts(fractions, pixels), device=relevance.device)
    ranking = torch.argsort(-relevance if order == MORF else relevance, dim=1, stable=True)
    rank = torch.empty_like(ranking)
    rank.scatter_(1, ranking, torch.arange(pixels, device=relevance.device).expand(n, pixels))
    return (rank[:, None, :] < counts[None, :, None]).reshape(n, len(counts), *a.shape[2:])


def imputation_system(removed: np.ndarray) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
    """The linear system of ROAD's imputation for removed pixels ``removed`` ``(B, H, W)`` bool of ``B`` images.

    Unknowns are the ``m`` removed pixels (row-major over image, row, column). Each one's equation says it is the
    weighted mean of its neighbours inside the image (:data:`NEIGHBOUR_WEIGHTS`; at the border the weights of the
    neighbours that exist, renormalised, as in Rong et al.'s code): ``A u = K v`` with ``A = D - W_removed``
    ``(m, m)`` (``D`` the weights of the neighbours that exist) and ``K`` ``(m, B H W)`` the weights of the known
    neighbours, ``v`` the image values one row per pixel. ``A`` is block diagonal over the images and symmetric;
    every connected set of removed pixels borders a known one while any pixel of its image is known, so ``A`` is
    irreducibly diagonally dominant, hence positive definite.
    """
    removed = np.asarray(removed, dtype=bool)
    if removed.ndim != 3:
        raise ValueError(f"removed pixels must be (B, H, W), got shape {removed.shape}")
    b, h, w = removed.shape
    flat = removed.reshape(-1)
    m = int(flat.sum())
    index = np.full(flat.size, -1, dtype=np.int64)
    index[flat] = np.arange(m)
    image, y, x = np.nonzero(removed)  # row-major: the order of the unknowns
    diagonal = np.zeros(m)
    a_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    k_parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for (dy, dx), weight in NEIGHBOUR_WEIGHTS:
        ny, nx = y + dy, x + dx
        var = np.flatnonzero((ny >= 0) & (ny < h) & (nx >= 0) & (nx < w))
        neighbour = (image[var] * h + ny[var]) * w + nx[var]
        diagonal[var] += weight
        unknown = flat[neighbour]
        a_parts.append((var[unknown], index[neighbour[unknown]], np.full(int(unknown.sum()), -weight)))
        k_parts.append((var[~unknown], neighbour[~unknown], np.full(int((~unknown).sum()), weight)))
    a_parts.append((np.arange(m), np.arange(m), diagonal))

    def assemble(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], columns: int) -> sparse.csr_matrix:
        rows, cols, vals = (np.concatenate([p[i] for p in parts]) for i in range(3))
        return sparse.csr_matrix((vals, (rows, cols)), shape=(m, columns))

    return assemble(a_parts, m), assemble(k_parts, flat.size)


def noisy_linear_imputation(x: torch.Tensor, removed: torch.Tensor, *, noise_std: float, seed: int) -> torch.Tensor:
    """ROAD's noisy linear imputation (Rong et al. 2022) of the pixels ``removed`` ``(B, H, W)`` of images ``x``
    ``(B, C, H, W)``: per channel, the removed pixels of each image are solved jointly so that each is the weighted
    mean of its 8 neighbours (:func:`imputation_system`; one exact sparse LU solve in float64, all images and
    channels at once), then Gaussian noise of standard deviation ``noise_std`` (input units) is added to the imputed
    pixels only, drawn from ``numpy.random.default_rng(seed)`` in the order of the unknowns. Every other pixel is
    returned bit-identical; the result has ``x``'s dtype and device. The weights sum to 1, so the imputation
    commutes with a translation of the input space (docs/spec.md §5); it is exact for an image affine in ``y`` and
    ``x`` around every removed pixel whose 8 neighbours all lie inside the image.
    """
    if x.ndim != 4 or removed.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"need images (B, C, H, W) and removed pixels (B, H, W), got {tuple(x.shape)} and {tuple(removed.shape)}")
    if noise_std < 0:
        raise ValueError(f"noise_std must be non-negative, got {noise_std}")
    mask = removed.detach().cpu().numpy().astype(bool)
    per_image = mask.reshape(len(mask), -1)
    if (per_image.all(axis=1) & (per_image.shape[1] > 0)).any():
        raise ValueError("an image has every pixel removed: nothing is left to impute from")
    out = x.detach().clone()
    if not mask.any():
        return out
    channels = x.shape[1]
    system, known = imputation_system(mask)
    values = x.detach().permute(0, 2, 3, 1).reshape(-1, channels).cpu().double().numpy()
    rhs = np.ascontiguousarray(known @ values)
    solution = np.empty_like(rhs)
    system = system.tocsc()
    starts = np.concatenate([[0], np.cumsum(per_image.sum(axis=1))])  # each image's first unknown
    first = 0
    while first < len(mask):  # the images' systems are independent: LU of consecutive images, a bounded size at a time
        last = max(first + 1, int(np.searchsorted(starts, starts[first] + _SOLVE_UNKNOWNS, side="right")) - 1)
        lo, hi = starts[first], starts[last]
        if hi > lo:
            solution[lo:hi] = splu(system[lo:hi, lo:hi]).solve(rhs[lo:hi])
        first = last
    solution += noise_std * np.random.default_rng(seed).standard_normal(solution.shape)
    pixels = out.permute(0, 2, 3, 1)  # a view: writes land in ``out``
    pixels[removed.to(torch.bool).to(x.device)] = torch.from_numpy(solution).to(dtype=x.dtype, device=x.device)
    return out


@dataclass(frozen=True)
class RoadCurves:
    """ROAD's curves of a batch: the predicted-class probability after removing each fraction of the pixels,
    most relevant first (``morf``) and least relevant first (``lerf``), ``(N, F)`` in the model's dtype, and
    ``area_between`` ``(N,)`` float64, the trapezoid integral of ``lerf - morf`` over the fractions."""

    fractions: tuple[float, ...]
    morf: torch.Tensor
    lerf: torch.Tensor
    area_between: torch.Tensor


def road(
    model: nn.Module, x: torch.Tensor, prediction: torch.Tensor, a: torch.Tensor, *, fractions: Sequence[float], noise_std: float, seed: int
) -> RoadCurves:
    """ROAD (Rong et al. 2022) of maps ``a`` for the predicted class.

    For each fraction ``f`` the ``floor(f H W + 1/2)`` most (MoRF) or least (LeRF) relevant pixels
    (:func:`removal_masks`: ``sum_c |a_c|`` per pixel position) are removed and filled by
    :func:`noisy_linear_imputation` (noise std ``noise_std``, seed ``seed``; MoRF and LeRF of every image and
    fraction in one solve and one draw), and the softmax probability of ``prediction`` is read off the imputed
    image: one forward pass over all ``2 N F`` imputed images. A faithful map makes MoRF fall fast and LeRF stay
    high; the summary is the area between the curves, ``trapezoid(lerf - morf)`` over the given fractions (not
    divided by their range; larger is better). The fractions increase strictly in ``[0, 1)``; fraction 0 removes
    nothing and reads the probability at ``x`` itself.
    """
    _require_eval(model)
    _check_batch(x, prediction, a)
    counts = removal_counts(fractions, x.shape[2] * x.shape[3])
    n, f = len(x), len(counts)
    removed = torch.stack([removal_masks(a, fractions, order) for order in ORDERS])  # (2, N, F, H, W)
    copies = x.detach()[None, :, None].expand(len(ORDERS), n, f, *x.shape[1:]).reshape(-1, *x.shape[1:])
    imputed = noisy_linear_imputation(copies, removed.reshape(-1, *x.shape[2:]), noise_std=noise_std, seed=seed)
    target = prediction.to(x.device)[None, :, None].expand(len(ORDERS), n, f).reshape(-1, 1)
    with torch.no_grad():
        probability = torch.softmax(model(imputed), dim=1).gather(1, target).reshape(len(ORDERS), n, f)
    grid = torch.tensor([float(v) for v in fractions], dtype=torch.float64, device=probability.device)
    between = (probability[1] - probability[0]).double()
    area = torch.trapezoid(between, grid, dim=1) if f > 1 else torch.zeros_like(between[:, 0])  # one fraction: no width
    return RoadCurves(tuple(float(v) for v in fractions), probability[0], probability[1], area)


# --- sensitivity and infidelity (Captum) --------------------------------------------------------


def max_sensitivity(
    model: nn.Module, x: torch.Tensor, prediction: torch.Tensor, *, explanation: Explanation, radius: float, n_samples: int, seed: int
) -> torch.Tensor:
    """The max-sensitivity of ``explanation`` for the predicted class (Yeh et al. 2019), per image ``(N,)``:
    ``captum.metrics.sensitivity_max``, i.e. ``max_k ||e(x + d_k) - e(x)||_F / ||e(x)||_F`` over ``n_samples``
    perturbations ``d_k`` uniform in the L-inf ball of radius ``radius`` (input units; Captum's default
    perturbation, not clipped to the pixel box), ``e = explanation(model, ., prediction)`` with the class frozen at
    ``x``. Captum normalises by the explanation's norm at ``x`` (by 1 where that is 0). The draws come from the CPU
    generator seeded with ``seed``, whose state is restored afterwards."""
    from captum.metrics import sensitivity_max

    _require_eval(model)
    _check_batch(x, prediction)
    if radius < 0 or n_samples < 1:
        raise ValueError(f"need radius >= 0 and n_samples >= 1, got {radius} and {n_samples}")

    def explain(inputs: torch.Tensor | tuple[torch.Tensor], target: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor]:
        # Captum passes a tuple at x and iterates over what comes back (a tuple, then), a tensor at the perturbed copies
        if isinstance(inputs, tuple):
            return (explanation(model, inputs[0], target),)
        return explanation(model, inputs, target)

    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # Captum draws its perturbations from the CPU generator
        return sensitivity_max(explain, x.detach(), perturb_radius=radius, n_perturb_samples=n_samples, target=prediction.to(x.device))


def gaussian_perturbations(x: torch.Tensor, *, n_perturbations: int, std: float, seed: int) -> torch.Tensor:
    """``n_perturbations`` Gaussian perturbations ``I ~ N(0, std^2 Id)`` per image, ``(N, n_perturbations, C, H, W)``
    in ``x``'s dtype and on its device, drawn on the CPU from ``torch.Generator().manual_seed(seed)``."""
    if n_perturbations < 1 or std < 0:
        raise ValueError(f"need n_perturbations >= 1 and std >= 0, got {n_perturbations} and {std}")
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(x), n_perturbations, *x.shape[1:]), generator=generator, dtype=x.dtype)
    return (std * noise).to(x.device)


def infidelity_of_perturbations(
    model: nn.Module, x: torch.Tensor, prediction: torch.Tensor, a: torch.Tensor, perturbations: torch.Tensor, *, normalize: bool
) -> torch.Tensor:
    """The infidelity of maps ``a`` (Yeh et al. 2019) for the given perturbations ``I`` ``(N, K, C, H, W)``, per image
    ``(N,)``: ``captum.metrics.infidelity`` with ``f = Psi^{prediction}`` (the logit the maps explain):
    ``mean_k (<I_k, a> - (f(x) - f(x - I_k)))^2``. The perturbation is ``I`` itself for every map (Captum's
    ``multiply_by_inputs`` does not apply). ``normalize=False`` is Captum's default (the value scales with the
    square of the map's scale); ``normalize=True`` first rescales ``<I, a>`` by Captum's
    ``beta = mean_k <I_k, a> (f(x) - f(x - I_k)) / mean_k <I_k, a>^2`` (the official implementation's; 0 where the
    denominator is 0), which makes it invariant to the map's scale."""
    from captum.metrics import infidelity as captum_infidelity

    _require_eval(model)
    _check_batch(x, prediction, a)
    if perturbations.ndim != 5 or perturbations.shape[0] != len(x) or perturbations.shape[2:] != x.shape[1:]:
        raise ValueError(f"perturbations must be (N, K, C, H, W) for images {tuple(x.shape)}, got {tuple(perturbations.shape)}")
    k = perturbations.shape[1]
    flat = perturbations.detach().to(device=x.device, dtype=x.dtype).reshape(-1, *x.shape[1:])  # row n K + j: image n's j-th

    def perturb(inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if inputs.shape != flat.shape:  # Captum repeats each image K times (repeat_interleave) in one call
            raise RuntimeError(f"Captum asked for perturbations of {tuple(inputs.shape)}, expected {tuple(flat.shape)}")
        return flat, inputs - flat

    return captum_infidelity(
        model, perturb, x.detach(), a.detach(), target=prediction.to(x.device), n_perturb_samples=k, max_examples_per_batch=None, normalize=normalize
    )


def infidelity(
    model: nn.Module,
    x: torch.Tensor,
    prediction: torch.Tensor,
    a: torch.Tensor,
    *,
    n_perturbations: int,
    std: float,
    seed: int,
    normalize: bool,
) -> torch.Tensor:
    """:func:`infidelity_of_perturbations` under :func:`gaussian_perturbations` ``I ~ N(0, std^2 Id)`` (Yeh et al.
    2019's noisy-baseline perturbation; ``std`` in input units), ``n_perturbations`` per image, seeded with ``seed``."""
    perturbations = gaussian_perturbations(x, n_perturbations=n_perturbations, std=std, seed=seed)
    return infidelity_of_perturbations(model, x, prediction, a, perturbations, normalize=normalize)
