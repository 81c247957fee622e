"""Natural images (issue 6): ImageNet-layout folders, the centered input space, ResNets with
initial weights, resuming a killed fine-tuning run, and the whole DAG on a synthetic folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from PIL import Image
from torch import nn

from conftest import (
    DATA_ROOT,
    REPO,
    assert_within,
    decomposition_tolerance,
    float_tolerance,
    linearized_robustness_tolerance,
    logit_operands,
    reduction_terms,
)
from saliency_robustness.architectures import IMAGENET_STD, fit_whitening, whitening_layer
from saliency_robustness.config import validate_config
from saliency_robustness.data import InputSpace, build_eval_dataset, open_split
from saliency_robustness.errors import ConfigError, DataError, StoreError
from saliency_robustness.figure_list import figures_for
from saliency_robustness.grid import model_grid, pretrain_settings
from saliency_robustness.models import (
    CHECKPOINT,
    ModelSpec,
    build_model,
    load_initial_weights,
    load_model,
    torchvision_weights,
)
from saliency_robustness.stages import training
from saliency_robustness.stages.training import model_spec, pretrain_stage, train_stage
from saliency_robustness.vocabulary import BASE, BASE_MODEL
from test_workflow import planned_jobs, snakemake

TEST_CONFIG = REPO / "config" / "imagefolder-test.yaml"
CLASSES = ["class_a", "class_b", "class_c"]
MEAN = (0.485, 0.456, 0.406)
TRAIN_SIZE = (64, 80)  # height, width: not square, so "shorter side" matters
VAL_SIZE = (40, 48)  # shorter side already resize_size = 40: evaluation is a pure center crop


def write_image_folder(root: Path, train_per_class: int = 20, val_per_class: int = 4, seed: int = 0) -> Path:
    """An ImageNet-layout folder ``root/{train,val}/<class>/*.png``; each class has its own
    dominant colour, so a small network can learn something in one epoch."""
    rng = np.random.default_rng(seed)
    for split, count, (h, w) in (("train", train_per_class, TRAIN_SIZE), ("val", val_per_class, VAL_SIZE)):
        for k, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 120, size=(h, w, 3))
                pixels[..., k] += 120
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:  # noqa: ANN001
    """A data_root holding the synthetic folder under the test config's ``dataset.path``."""
    data_root = tmp_path_factory.mktemp("data")
    write_image_folder(data_root / "imagefolder-test")
    return data_root


def imagefolder_config() -> dict:
    """The validated test config (every default filled in)."""
    return validate_config(yaml.safe_load(TEST_CONFIG.read_text()))


# --- data -------------------------------------------------------------------------------


def test_eval_images_are_center_crops_minus_the_mean(folder_root: Path) -> None:
    dataset = imagefolder_config()["dataset"]
    ds = build_eval_dataset(dataset, folder_root)
    assert ds["images"].shape == (12, 3, 32, 32)
    assert ds.attrs["class_names"] == CLASSES
    assert ds.attrs["pixel_offset"] == list(MEAN)  # the configured numbers, passed through
    assert ds.attrs["pixel_bounds"] == [0.0, 1.0]
    # labels follow the sorted class folders, dataset_index the sorted files of val/
    files = sorted((folder_root / "imagefolder-test" / "val").glob("*/*.png"))
    for s in (0, 5, 11):
        path = files[int(ds["dataset_index"][s])]
        assert CLASSES[int(ds["label"][s])] == path.parent.name
        # known answer: a 40x48 image is not resized, and the 32x32 center crop starts at (4, 8)
        pixels = np.asarray(Image.open(path), dtype=np.float32)[4:36, 8:40] / 255.0
        expected = pixels.transpose(2, 0, 1) - np.asarray(MEAN, dtype=np.float32)[:, None, None]
        # both: a float32 division by 255 and a subtraction of the mean (one rounding each, maybe in another order)
        assert_within(ds["images"][s].values, expected, float_tolerance(np.float32, pixels.transpose(2, 0, 1), max(MEAN), terms=2))
    pixels = InputSpace.from_attrs(ds.attrs).to_pixels(torch.from_numpy(ds["images"].values))
    assert float(pixels.min()) >= 0.0 and float(pixels.max()) <= 1.0


def test_training_images_are_random_crops_and_flips_of_the_resized_image(folder_root: Path) -> None:
    from torchvision.transforms import functional as TF

    train, _ = open_split(imagefolder_config()["dataset"], folder_root, "train")
    path, _ = train.samples[0]
    resized = TF.to_tensor(TF.resize(Image.open(path).convert("RGB"), 40))  # shorter side 64 -> 40
    assert resized.shape == (3, 40, 50)
    windows = resized.unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 19, 32, 32): every 32x32 crop
    seen = set()
    torch.manual_seed(0)
    for _ in range(12):
        x, _ = train[0]
        pixels = x + torch.tensor(MEAN).view(3, 1, 1)
        for flipped in (False, True):
            target = pixels.flip(-1) if flipped else pixels
            diff = (windows - target[:, None, None]).abs().amax(dim=(0, 3, 4))
            if float(diff.min()) <= float_tolerance(torch.float32, 1.0, max(MEAN), terms=3):  # pixel / 255 - mean + mean
                top, left = np.unravel_index(int(diff.argmin()), diff.shape)
                seen.add((flipped, int(top), int(left)))
                break
        else:
            pytest.fail("a training image is no crop of the resized image, flipped or not")
    assert {flipped for flipped, _, _ in seen} == {False, True}
    assert len({(top, left) for _, top, left in seen}) > 1


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ({"path": "nowhere"}, "nowhere/val not found"),
        ({"path": None}, "dataset.path must name"),
        ({"mean": [0.5, 0.5]}, "dataset.mean has 2 entries"),
    ],
)
def test_bad_folder_settings_give_one_line_errors(folder_root: Path, dataset: dict, message: str) -> None:
    config = {**imagefolder_config()["dataset"], **dataset}
    with pytest.raises(DataError) as info:
        open_split(config, folder_root, "test")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_relative_path_is_taken_from_data_root_and_absolute_path_as_is(folder_root: Path) -> None:
    dataset = imagefolder_config()["dataset"]
    relative, space = open_split(dataset, folder_root, "train")
    absolute, _ = open_split({**dataset, "path": str(folder_root / "imagefolder-test")}, "/nonexistent", "train")
    assert len(relative) == len(absolute) == 60  # type: ignore[arg-type]
    assert space.pixel_offset == MEAN  # the configured numbers, passed through


def test_train_and_val_with_different_classes_are_rejected(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "f", train_per_class=1, val_per_class=1)
    (tmp_path / "f" / "val" / "class_c").rename(tmp_path / "f" / "val" / "class_d")
    with pytest.raises(DataError, match="different class folders"):
        open_split({**imagefolder_config()["dataset"], "path": "f"}, tmp_path, "test")


def test_decoding_once_gives_the_evaluation_images_of_decoding_per_epoch(folder_root: Path) -> None:
    dataset = imagefolder_config()["dataset"]
    per_epoch = build_eval_dataset(dataset, folder_root)
    once = build_eval_dataset({**dataset, "decode": "once"}, folder_root)
    # the same files, the same center crop (of a 40x48 image: at (4, 8), through the 40x40 square at (0, 4)), the
    # same float32 division and subtraction
    xr.testing.assert_identical(per_epoch, once)


def test_decoding_once_reads_each_file_once_and_only_the_files_used(folder_root: Path, monkeypatch) -> None:  # noqa: ANN001
    from saliency_robustness import imagefolder as data_module

    reads: list[str] = []
    load = data_module._load_image
    monkeypatch.setattr(data_module, "_load_image", lambda path, mode: (reads.append(path), load(path, mode))[1])
    train, _ = open_split({**imagefolder_config()["dataset"], "decode": "once"}, folder_root, "train")
    assert reads == []  # nothing is decoded before it is used
    subset = torch.utils.data.Subset(train, [3, 7, 11])
    for _ in range(3):  # three epochs
        list(torch.utils.data.DataLoader(subset, batch_size=2, shuffle=True))
    assert sorted(reads) == sorted(train.samples[i][0] for i in (3, 7, 11))


def test_decoded_training_images_are_padded_random_crops_and_flips(tmp_path: Path) -> None:
    """CIFAR-style augmentation: a 32x32 crop of the 32x32 image zero-padded by 4 (in pixels,
    before centering), flipped half the time."""
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        for name in CLASSES:
            (tmp_path / "f" / split / name).mkdir(parents=True)
            Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(tmp_path / "f" / split / name / "0.png")
    dataset = {**imagefolder_config()["dataset"], "path": "f", "resize_size": 32, "image_size": 32, "crop_padding": 4, "decode": "once"}
    train, _ = open_split(dataset, tmp_path, "train")
    path, _ = train.samples[0]
    pixels = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32).transpose(2, 0, 1) / 255.0)
    windows = torch.nn.functional.pad(pixels, [4] * 4).unfold(1, 32, 1).unfold(2, 32, 1)  # (3, 9, 9, 32, 32)
    seen = set()
    torch.manual_seed(0)
    for _ in range(40):
        x, label = train[0]
        assert label == 0 and x.shape == (3, 32, 32)
        image = x + torch.tensor(MEAN).view(3, 1, 1)
        matches = [
            (flipped, *np.unravel_index(int(d.argmin()), d.shape))
            for flipped in (False, True)
            for d in [(windows - (image.flip(-1) if flipped else image)[:, None, None]).abs().amax(dim=(0, 3, 4))]
            if float(d.min()) <= float_tolerance(torch.float32, 1.0, max(MEAN), terms=3)  # pixel / 255 - mean + mean
        ]
        assert matches, "a training image is no crop of the padded image, flipped or not"
        seen.add(matches[0])
    assert {flipped for flipped, _, _ in seen} == {False, True}
    assert len({(top, left) for _, top, left in seen}) > 10  # of the 81 offsets
    assert any(top in (0, 8) or left in (0, 8) for _, top, left in seen)  # the padding is used
    evaluation, _ = open_split(dataset, tmp_path, "test")  # no padding, no crop, no flip
    assert_within(
        evaluation[0][0] + torch.tensor(MEAN).view(3, 1, 1),
        torch.from_numpy(np.asarray(Image.open(evaluation.samples[0][0]), dtype=np.float32).transpose(2, 0, 1) / 255.0),
        float_tolerance(torch.float32, 1.0, max(MEAN), terms=3),  # pixel / 255 - mean + mean
    )


CIFAR10_JPEG = DATA_ROOT / "cifar10-jpeg"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_real_cifar10_jpeg_files_read_as_the_cifar10_config_reads_them() -> None:
    if not (CIFAR10_JPEG / "val" / "airplane").is_dir():
        pytest.skip(f"no CIFAR-10 JPEG folder under {DATA_ROOT} (cifar10-jpeg/val/<class>/; set SALIENCY_ROBUSTNESS_DATA_ROOT)")
    from saliency_robustness.config import load_config

    config = load_config(REPO / "config" / "cifar10.yaml", {"data_root": str(DATA_ROOT)})
    test, space = open_split(config["dataset"], DATA_ROOT, "test")
    assert test.classes == CIFAR10_CLASSES  # torchvision's CIFAR-10 indices, airplane = 0 ... truck = 9
    assert len(test) == 10_000
    mean = torch.tensor(config["dataset"]["mean"]).view(3, 1, 1)
    for index in (0, 4321, 9999):  # a few real files, against PIL's own decoding
        path, label = test.samples[index]
        image, read_label = test[index]
        assert read_label == label == CIFAR10_CLASSES.index(Path(path).parent.name)
        expected = torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0)
        assert expected.shape == (3, 32, 32)
        assert_within(image + mean, expected, float_tolerance(torch.float32, 1.0, mean.max().item(), terms=3))  # pixel / 255 - mean + mean
    assert space.pixel_offset == tuple(config["dataset"]["mean"])
    # the configured mean is the set's (README of the data: about 0.488, 0.481, 0.446), to a few thousandths
    sample = torch.stack([test[i][0] for i in range(0, 10_000, 50)]) + mean
    torch.testing.assert_close(sample.mean(dim=(0, 2, 3)), mean.flatten(), rtol=0, atol=0.02)


# --- models -----------------------------------------------------------------------------


def resnet_spec(architecture: str = "resnet_small", weights: str | None = None, num_classes: int = 3, seed: int = 0) -> ModelSpec:
    return ModelSpec(name="m", architecture=architecture, method="gradnorm", strength=0.0,
            seed=seed, num_classes=num_classes, in_channels=3, image_size=32,
            weights=weights, sensitivity="loss", p=2.0)


@pytest.mark.parametrize("architecture", ["resnet_small", "resnet50"])
def test_resnet_on_centered_input_is_torchvision_resnet_on_normalized_pixels(architecture: str) -> None:
    model = build_model(resnet_spec(architecture)).eval()
    pixels = torch.rand(2, 3, 32, 32)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        centered, normalized = model(pixels - mean), model.backbone((pixels - mean) / std)
    # x * (1 / std) against x / std: two float32 roundings of each input (inside the operands' <x, g> terms), then the
    # network's own rounding
    tolerance = float_tolerance(torch.float32, logit_operands(model.backbone, (pixels - mean) / std), terms=reduction_terms(model) + 2)
    assert_within(centered, normalized, tolerance)
    # the std division is a bias-free linear first layer: no bias-like parameter or buffer
    assert [name for name, _ in model.input_scale.named_parameters()] == []
    assert [name for name, _ in model.input_scale.named_buffers()] == ["scale"]


@pytest.mark.parametrize("architecture", ["resnet_small", "preact_resnet", "whitened_cnn"])
def test_resnet_logits_split_exactly_into_homogeneous_part_and_bias_sum(architecture: str) -> None:
    """The std layer adds no bias: docs/spec.md §2's decomposition holds for the whole model, with
    batch-norm statistics that are not the identity (eval-mode batch norm is affine: its shift
    beta - gamma mu / sigma is one of the biases)."""
    from saliency_robustness.stages.metrics import compute_metrics

    model = build_model(resnet_spec(architecture)).eval()
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for tensor, low, high in ((module.running_mean, -0.2, 0.2), (module.running_var, 0.5, 2.0), (module.bias, -0.2, 0.2)):
                tensor.data.copy_(torch.empty_like(tensor).uniform_(low, high, generator=generator))
    x = torch.rand(6, 3, 32, 32, generator=generator) - torch.tensor(MEAN).view(1, 3, 1, 1)
    ds = compute_metrics(model, x, batch_size=6, class_chunk=3, device="cpu")
    assert "decomposition_unverified_modules" not in ds.attrs
    tolerance = decomposition_tolerance(ds, model, x)  # the float32 rounding of the decomposition's operands
    assert_within(ds["bias_sum"].values, ds["bias_part"].values, tolerance)
    scale = np.abs(ds["homogeneous_part"].values) + np.abs(ds["bias_part"].values)  # what the relative error is relative to
    assert ds.attrs["max_relative_decomposition_error"] <= (tolerance / scale).max()
    assert float(np.abs(ds["bias_part"]).min()) > 1e-3  # a real bias part, not a trivially zero one


def test_whitening_makes_the_stems_patch_covariance_the_identity_up_to_eps() -> None:
    """W C W^T = diag(lambda / (lambda + eps)) for the stem's 2x2 patches (C: their second
    moment, lambda its eigenvalues), and each filter's negative is the filter after it."""
    model = build_model(resnet_spec("whitened_cnn"))
    generator = torch.Generator().manual_seed(0)
    # correlated channels and neighbouring pixels, as in natural images
    base = torch.rand(64, 1, 17, 17, generator=generator).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)[..., :32, :32]
    x = base + 0.1 * torch.rand(64, 3, 32, 32, generator=generator) - 0.5
    assert fit_whitening(model, x)
    net = whitening_layer(model)
    seen = x * model.input_scale.scale  # what the stem sees: the std division before it
    patches = seen.double().unfold(2, 2, 1).unfold(3, 2, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    moment = patches.T @ patches / len(patches)
    eigenvalues = torch.linalg.eigvalsh(moment)
    filters = net.stem.weight.double().reshape(24, 12)
    torch.testing.assert_close(filters[12:], -filters[:12], rtol=0, atol=0)
    whitened = filters[:12] @ moment @ filters[:12].T
    expected = torch.diag(eigenvalues / (eigenvalues + net.whitening_eps))
    # the filters are stored in float32: each entry off by <= eps |w|, so W C W^T by <= 2 eps ||W||_F^2 ||C||_2 (+ eps^2)
    bound = 3 * torch.finfo(torch.float32).eps * torch.linalg.matrix_norm(filters[:12]) ** 2 * eigenvalues.max()
    assert (whitened - expected).abs().max() <= bound
    assert not net.stem.weight.requires_grad  # frozen: training leaves it as fitted


def test_preact_resnet_keeps_a_32x32_image_at_full_resolution_in_its_first_stage() -> None:
    """A 3x3 stride-1 stem, no max-pool: torchvision's ResNet stem would leave 8x8 of 32x32."""
    model = build_model(resnet_spec("preact_resnet", num_classes=10))
    sizes: list[tuple[int, ...]] = []
    model.backbone.stages[0].register_forward_hook(lambda module, inputs, output: sizes.append(tuple(output.shape)))
    model.backbone.stem.register_forward_hook(lambda module, inputs, output: sizes.append(tuple(output.shape)))
    with torch.no_grad():
        logits = model(torch.rand(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert sizes == [(2, 16, 32, 32), (2, 16, 32, 32)]
    assert model.backbone.stem.kernel_size == (3, 3) and model.backbone.stem.stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    # the std division is the bias-free first layer, as for the ImageNet ResNets
    assert [name for name, _ in model.input_scale.named_parameters()] == []


def test_preact_resnet_saliency_is_the_gradient_of_the_predicted_logit() -> None:
    """Central differences in float64 at a few coordinates: the network is piecewise linear, so
    a step of 1e-6 crosses no kink at random inputs and the differences are exact up to rounding."""
    from saliency_robustness.stages.saliency import compute_saliency

    torch.manual_seed(2)
    model = build_model(resnet_spec("preact_resnet", num_classes=10)).double().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # statistics other than the identity
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64) - 0.5
    ds = compute_saliency(model, x, batch_size=2, device="cpu")
    predicted = torch.from_numpy(ds["prediction"].values)
    rng = np.random.default_rng(0)
    for k in range(len(x)):
        for c, i, j in zip(rng.integers(0, 3, 6), rng.integers(0, 32, 6), rng.integers(0, 32, 6), strict=True):
            up, down = x[k : k + 1].clone(), x[k : k + 1].clone()
            up[0, c, i, j] += 1e-6
            down[0, c, i, j] -= 1e-6
            with torch.no_grad():
                difference = (model(up)[0, predicted[k]] - model(down)[0, predicted[k]]).item() / 2e-6
            # rounding only (no truncation error on a linear piece): each logit's float64 rounding, twice, over the step
            logit_rounding = float_tolerance(torch.float64, logit_operands(model, up)[0, predicted[k]], terms=reduction_terms(model))
            assert abs(ds["saliency"].values[k, c, i, j] - difference) <= 2 * logit_rounding / 2e-6


@pytest.mark.parametrize("layout", ["backbone", "full"])
def test_local_state_dict_initializes_the_model(tmp_path: Path, layout: str) -> None:
    source = build_model(resnet_spec(seed=7))
    state = source.backbone.state_dict() if layout == "backbone" else source.state_dict()
    torch.save(state, tmp_path / "init.pt")
    model = build_model(resnet_spec(weights="init.pt"))  # seed 0: different random weights
    assert not torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)
    load_initial_weights(model, resnet_spec(weights="init.pt"), data_root=tmp_path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_bad_weights_give_one_line_errors(tmp_path: Path) -> None:
    model = build_model(resnet_spec())
    with pytest.raises(DataError, match="neither a torchvision weight name of resnet_small nor a file") as info:
        load_initial_weights(model, resnet_spec(weights="missing.pt"), data_root=tmp_path)
    assert str(tmp_path / "missing.pt") in str(info.value)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="cannot read weights file"):
        load_initial_weights(model, resnet_spec(weights="garbage.pt"), data_root=tmp_path)
    torch.save(build_model(resnet_spec(num_classes=5)).state_dict(), tmp_path / "five.pt")
    with pytest.raises(ConfigError, match="do not fit resnet_small with num_classes=3") as info:
        load_initial_weights(model, resnet_spec(weights="five.pt"), data_root=tmp_path)
    assert "\n" not in str(info.value)


def test_torchvision_weight_names_are_downloaded_into_the_backbone(monkeypatch) -> None:  # noqa: ANN001
    from torchvision.models._api import WeightsEnum

    assert torchvision_weights("resnet50", "IMAGENET1K_V1") is not None
    assert torchvision_weights("resnet_small", "IMAGENET1K_V1") is None
    torch.manual_seed(3)
    from torchvision.models import resnet50

    published = resnet50().state_dict()
    calls = []

    def download(self, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append((self.url, kwargs))
        return published

    monkeypatch.setattr(WeightsEnum, "get_state_dict", download)
    spec = resnet_spec("resnet50", weights="IMAGENET1K_V2", num_classes=1000)
    model = build_model(spec)
    load_initial_weights(model, spec)
    assert calls[0][0].endswith(".pth") and calls[0][1]["weights_only"] is True
    for key, value in published.items():
        assert torch.equal(model.backbone.state_dict()[key], value), key

    def offline(self, **kwargs):  # noqa: ANN001, ANN003, ANN202
        raise OSError("<urlopen error [Errno -2] Name or service not known>")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(DataError, match="cannot get torchvision weights resnet50 IMAGENET1K_V2") as info:
        load_initial_weights(model, spec)
    assert "\n" not in str(info.value)


# --- training ---------------------------------------------------------------------------


def stage_settings(**train: object) -> dict:
    config = imagefolder_config()
    config["train"].update(train)
    return {"dataset": config["dataset"], "model": config["model"], "train": {k: v for k, v in config["train"].items() if k != "lambdas"}}


def test_train_stage_starts_from_the_configured_weights(folder_root: Path, tmp_path: Path) -> None:
    initial = build_model(resnet_spec(seed=5))
    torch.save(initial.backbone.state_dict(), tmp_path / "init.pt")
    s = stage_settings(optimizer="sgd", learning_rate=1e-9, momentum=0.0, weight_decay=0.0)
    model = {**s["model"], "weights": str(tmp_path / "init.pt")}
    spec = model_spec(name="gradnorm-lambda0.01", method="gradnorm", strength=0.01, dataset=s["dataset"], model=model, train=s["train"])
    train_stage(spec=spec, dataset=s["dataset"], train=s["train"], data_root=folder_root, output=tmp_path / "out")
    trained = load_model(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "spec.json").read_text())["weights"] == str(tmp_path / "init.pt")
    # not a rounding tolerance: a learning rate of 1e-9 barely moves them (by about steps x lr |g|, far below 1e-6)
    for key, value in initial.state_dict().items():
        torch.testing.assert_close(trained.state_dict()[key], value, rtol=0, atol=1e-6)


def test_a_fine_tune_starts_from_the_base_models_exact_weights(folder_root: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """train.init base: the base model (rule pretrain) is what every fine-tune's first step
    sees, bit for bit; a base of other settings is refused, never used."""
    config = imagefolder_config()
    recipe = pretrain_settings(config)
    base = {"name": BASE_MODEL, "method": BASE, "strength": 0.0, "dataset": config["dataset"], "model": config["model"], "train": recipe}
    pretrain_stage(spec=model_spec(**base), dataset=config["dataset"], train=recipe, data_root=folder_root, output=tmp_path / "base")
    assert json.loads((tmp_path / "base" / "test_accuracy.json").read_text())["test_images"] == 12
    starts: list[dict[str, torch.Tensor]] = []
    real_fit = training.fit

    def spy(model: nn.Module, *args: object, **kwargs: object) -> list:
        starts.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real_fit(model, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(training, "fit", spy)
    s = stage_settings()
    spec = model_spec(
        name="gradnorm-lambda0.01", method="gradnorm", strength=0.01, dataset=s["dataset"], model=s["model"], train=s["train"], base=base
    )
    train_stage(spec=spec, dataset=s["dataset"], train=s["train"], data_root=folder_root, output=tmp_path / "tuned",
                base_dir=tmp_path / "base", base_spec=model_spec(**base))  # fmt: skip
    weights = torch.load(tmp_path / "base" / CHECKPOINT, weights_only=True)
    assert starts[0].keys() == weights.keys()
    for key, value in weights.items():
        assert torch.equal(starts[0][key], value), key
    tuned = torch.load(tmp_path / "tuned" / CHECKPOINT, weights_only=True)
    assert any(not torch.equal(tuned[k], weights[k]) for k in weights)  # and then it trained
    assert json.loads((tmp_path / "tuned" / "spec.json").read_text())["training"]["base"]  # the base's fingerprint

    other = model_spec(**{**base, "train": {**recipe, "learning_rate": 0.01}})
    with pytest.raises(StoreError, match="base model of other settings") as info:
        train_stage(spec=spec, dataset=s["dataset"], train=s["train"], data_root=folder_root, output=tmp_path / "refused",
                    base_dir=tmp_path / "base", base_spec=other)  # fmt: skip
    assert "\n" not in str(info.value) and not (tmp_path / "refused").exists()


def test_a_base_of_zero_epochs_is_the_initial_weights_as_they_are(folder_root: Path, tmp_path: Path) -> None:
    """config/imagenet.yaml's contract (pretrain.epochs 0): models/base/ holds model.weights
    bit for bit, measured on the test split like every model, with an empty training log."""
    source = build_model(resnet_spec(seed=7))
    torch.save(source.backbone.state_dict(), tmp_path / "init.pt")
    config = imagefolder_config()
    config["model"]["weights"] = str(tmp_path / "init.pt")
    config["pretrain"]["epochs"] = 0
    recipe = pretrain_settings(config)
    base = {"name": BASE_MODEL, "method": BASE, "strength": 0.0, "dataset": config["dataset"], "model": config["model"], "train": recipe}
    pretrain_stage(spec=model_spec(**base), dataset=config["dataset"], train=recipe, data_root=folder_root, output=tmp_path / "base")
    weights = torch.load(tmp_path / "base" / CHECKPOINT, weights_only=True)
    for key, value in source.state_dict().items():
        assert torch.equal(weights[key], value), key
    assert json.loads((tmp_path / "base" / "test_accuracy.json").read_text())["test_images"] == 12
    assert (tmp_path / "base" / "training_log.csv").read_text().count("\n") == 1  # the header only


def test_folder_with_other_class_count_than_the_model_is_rejected(folder_root: Path, tmp_path: Path) -> None:
    s = stage_settings()
    spec = model_spec(
        name="gradnorm-lambda0", method="gradnorm", strength=0.0, dataset=s["dataset"], model={**s["model"], "num_classes": 10}, train=s["train"]
    )
    with pytest.raises(ConfigError, match="model.num_classes is 10 but the dataset has 3 class folders"):
        train_stage(spec=spec, dataset=s["dataset"], train=s["train"], data_root=folder_root, output=tmp_path / "out")


TRAIN_IN_SUBPROCESS = """
import json, sys, torch
from saliency_robustness.runtime import configure_logging
from saliency_robustness.stages import training
from saliency_robustness.stages.training import model_spec, pretrain_stage, train_stage
from saliency_robustness.vocabulary import BASE, BASE_MODEL
torch.set_num_threads(1)
configure_logging()
s = json.loads(sys.argv[1])
train_stage(spec=model_spec(name="gradnorm-lambda0.01", method="gradnorm", strength=0.01, dataset=s["dataset"], model=s["model"],
                             train=s["train"]), dataset=s["dataset"],
            train=s["train"], data_root=s["data_root"], output=s["output"], resume_file=s["resume_file"], resume_key="k")
"""


def train_process(settings: dict, output: Path, resume_file: Path) -> subprocess.Popen[str]:
    arguments = json.dumps({**settings, "output": str(output), "resume_file": str(resume_file)})
    env = {**os.environ, "SALIENCY_ROBUSTNESS_DEVICE": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-c", TRAIN_IN_SUBPROCESS, arguments],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )  # fmt: skip


def test_killed_fine_tuning_resumes_to_the_weights_of_an_uninterrupted_run(folder_root: Path, tmp_path: Path) -> None:
    epochs = 4
    settings = {**stage_settings(epochs=epochs, num_workers=1, optimizer="sgd", learning_rate=0.01), "data_root": str(folder_root)}

    reference = train_process(settings, tmp_path / "uninterrupted", tmp_path / "uninterrupted.pt")
    out, _ = reference.communicate(timeout=600)
    assert reference.returncode == 0, out[-3000:]

    resume_file, output = tmp_path / "resume" / "state.pt", tmp_path / "resumed"
    first = train_process(settings, output, resume_file)
    deadline = time.monotonic() + 600
    while not resume_file.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert first.poll() is None, "training ended before it could be killed"
    os.killpg(first.pid, signal.SIGKILL)  # the process group: the trainer and its loader worker
    first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert not output.exists()
    completed = torch.load(resume_file, weights_only=True)["epoch"] + 1
    assert 1 <= completed < epochs

    second = train_process(settings, output, resume_file)
    out, _ = second.communicate(timeout=600)
    assert second.returncode == 0, out[-3000:]
    assert f"resuming after epoch {completed}" in out
    assert not any(f"epoch {k}:" in out for k in range(1, completed + 1))  # not trained again
    assert not resume_file.exists()

    expected = torch.load(tmp_path / "uninterrupted" / CHECKPOINT, weights_only=True)
    resumed = torch.load(output / CHECKPOINT, weights_only=True)
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert torch.equal(expected[key], resumed[key]), key
    assert (output / "training_log.csv").read_text() == (tmp_path / "uninterrupted" / "training_log.csv").read_text()


# --- the whole DAG ----------------------------------------------------------------------


@pytest.mark.workflow
def test_whole_workflow_runs_on_a_synthetic_folder(folder_root: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Every stage, unchanged, on RGB images in the centered input space (issue 6)."""
    # targets of a partial run, e.g. "results/imagefolder-test/data/eval.zarr" (for debugging)
    targets = os.environ.get("IMAGEFOLDER_E2E_TARGETS", "").split()
    monkeypatch.setenv("SALIENCY_ROBUSTNESS_DEVICE", "cpu")
    # one thread per job, two jobs at a time: two-thread jobs on two shared cores oversubscribe
    # them (a double-backprop step measured 5-10 times slower than with one thread)
    one_thread = ["--set-threads", *(f"{rule}=1" for rule in ("train", "saliency", "attack", "metrics"))]
    result = snakemake(tmp_path, TEST_CONFIG, *one_thread, *targets, data_root=folder_root)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]

    out = tmp_path / "results" / "imagefolder-test"
    eval_store = xr.open_zarr(out / "data" / "eval.zarr")
    assert eval_store["images"].shape == (12, 3, 32, 32) and eval_store.attrs["class_names"] == CLASSES
    models = list(model_grid(validate_config(imagefolder_config())))
    for model in models:
        if targets and not (out / "metrics" / f"{model}.zarr").exists():
            continue  # a partial run
        spec = json.loads((out / "models" / model / "spec.json").read_text())
        assert spec["architecture"] == "resnet_small" and spec["num_classes"] == 3
        saliency = xr.open_zarr(out / "saliency" / f"{model}.zarr")
        assert saliency["saliency"].shape == (12, 3, 32, 32)
        metrics = xr.open_zarr(out / "metrics" / f"{model}.zarr")
        assert metrics.sizes["sample"] == 12
        for var in ("alignment", "linearized_robustness", "robustness", "homogeneity", "bound_rhs", "correct"):
            assert var in metrics and metrics[var].attrs.get("long_name"), var
        # the bound holds for rho~ from g† (one reverse pass); rho~ is from two (g_i* - g_j*): apart by rounding
        images = torch.from_numpy(eval_store["images"].values)
        bound = linearized_robustness_tolerance(metrics, load_model(out / "models" / model), images)
        assert (metrics["bound_rhs"].values >= metrics["linearized_robustness"].values - bound).all()
        assert float(metrics["robustness"].notnull().mean()) >= 0.9
    if not targets:
        summary = xr.open_zarr(out / "summary.zarr")
        # the base model (rule pretrain) is analysed first, as the lambda = 0 / epsilon = 0 start
        assert list(summary["model"].values) == [BASE_MODEL, *models]
        assert summary["method"].values[0] == BASE and float(summary["strength"].values[0]) == 0.0
        assert json.loads((out / "models" / BASE_MODEL / "machine.json").read_text())["threads"] >= 1
        assert (out / "summary.csv").exists()
        assert {png.stem for png in (out / "figures").glob("*.png")} == set(figures_for(["gradnorm"], quality=False))
        assert_fine_tunes_rerun_without_the_base(tmp_path, one_thread, folder_root)


def assert_fine_tunes_rerun_without_the_base(workdir: Path, args: list[str], data_root: Path) -> None:
    """Real dry runs after the whole run: a fine-tune setting (also one of the penalty's own,
    which the base does not read) reruns the fine-tunes (and what follows) but not the
    pretraining; a pretrain setting reruns both."""
    config = yaml.safe_load(TEST_CONFIG.read_text())
    changes = (("train", "learning_rate", 0.002, {"train": 2}), ("train", "penalty_interval", 2, {"train": 2}),
               ("pretrain", "learning_rate", 0.002, {"pretrain": 1, "train": 2}))  # fmt: skip
    for section, key, value, rules in changes:
        changed = {**config, section: {**config[section], key: value}}
        path = workdir / f"changed-{section}-{key}.yaml"
        path.write_text(yaml.safe_dump(changed))
        plan = planned_jobs(snakemake(workdir, path, *args, "--dry-run", data_root=data_root))
        assert {rule: plan.get(rule, 0) for rule in ("pretrain", "train")} == {"pretrain": 0, **rules}, (section, key, plan)
