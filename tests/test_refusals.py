"""Inputs that used to give wrong numbers or a traceback are refused in one line, with real
Snakemake where the case is about the workflow."""

from __future__ import annotations

import importlib
import logging
import pickle
import sys

import numpy as np
import pytest
import torch
import xarray as xr
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from conftest import REPO, assert_within, float_tolerance, mnist_cnn_spec
from saliency_robustness.config import validate_config
from saliency_robustness.data import MNIST_INPUT_SPACE, eval_dataset, open_split
from saliency_robustness.errors import ConfigError, DataError, PipelineError
from saliency_robustness.fingerprints import external_weights_hash
from saliency_robustness.models import build_model, save_model, save_performance
from saliency_robustness.stages.attacks import attack_stage
from saliency_robustness.stages.external import external_stage
from saliency_robustness.stores import write_store
from test_imagefolder import imagefolder_config, write_image_folder
from test_workflow import snakemake

SMOKE = yaml.safe_load((REPO / "config" / "smoke.yaml").read_text())


def one_line_error(result) -> str:  # noqa: ANN001
    """The run failed with exactly one ``error:`` line and no traceback; that line."""
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize(
    ("section", "change", "key", "shown"),
    [
        ("train", {"lambdas": [0.0, float("nan")]}, "train.lambdas[1]", "nan"),
        ("train", {"lambdas": [float("inf")]}, "train.lambdas[0]", "inf"),
        ("train", {"method": "adversarial", "adversarial": {"epsilons": [float("nan")]}}, "train.adversarial.epsilons[0]", "nan"),
    ],
)
@pytest.mark.workflow
def test_a_non_finite_strength_is_a_config_error(tmp_path, section: str, change: dict, key: str, shown: str) -> None:  # noqa: ANN001
    config = {**SMOKE, section: {**SMOKE[section], **change}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))  # writes .nan / .inf, as a user would
    assert ".nan" in path.read_text() or ".inf" in path.read_text()
    result = snakemake(tmp_path, path, "-n", data_root=tmp_path)
    assert one_line_error(result) == f"error: config key '{key}': {shown} is not a finite number"


# --- external models: class count and logits on every image ------------------------------

USER_MODULE = '''
import torch
from torch import nn


class Affine(nn.Module):
    """An affine classifier; NaN logits for an image whose every pixel is 1 (when asked)."""

    def __init__(self, num_classes: int, nan_on_white: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(28 * 28, num_classes)
        self.nan_on_white = nan_on_white

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x.flatten(1))
        white = (x.flatten(1) == 1).all(dim=1, keepdim=True)
        return torch.where(white & self.nan_on_white, torch.nan, logits)


def affine(num_classes: int = 10, nan_on_white: bool = False) -> nn.Module:
    return Affine(num_classes, nan_on_white)
'''


@pytest.fixture
def mnist_eval_store(tmp_path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    """An MNIST-like evaluation store (no class names, as MNIST's has none) with a white image
    at sample 20, and ``refusal_zoo:affine`` importable."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "refusal_zoo.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    images = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    images[20] = 1.0
    store = write_store(eval_dataset(images, torch.arange(40) % 10, np.arange(40), MNIST_INPUT_SPACE), tmp_path / "eval.zarr")
    assert "class_names" not in xr.open_zarr(store).attrs
    yield store
    sys.modules.pop("refusal_zoo", None)


def import_affine(tmp_path, eval_store, **options) -> None:  # noqa: ANN001, ANN003
    model = importlib.import_module("refusal_zoo").affine(**options)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    entry = {"name": "mine", "architecture": "refusal_zoo:affine", "options": options, "weights": str(tmp_path / "w.pt")}
    entry["num_classes"] = options.get("num_classes")
    dataset = validate_config({"experiment": "x"})["dataset"]
    sha = external_weights_hash(entry, tmp_path)
    external_stage(entry=entry, dataset=dataset, data_root=tmp_path, eval_store=eval_store, output=tmp_path / "models" / "mine", weights_sha256=sha)


def test_an_external_model_with_another_class_count_than_mnists_is_refused(tmp_path, mnist_eval_store) -> None:  # noqa: ANN001
    """It used to be accepted on MNIST (whose evaluation store has no class names), and to
    count in the trends although half the labels were classes it cannot predict."""
    with pytest.raises(PipelineError, match=r"^external model 'mine': returns 5 logits, but the dataset has 10 classes$"):
        import_affine(tmp_path, mnist_eval_store, num_classes=5)
    assert not (tmp_path / "models" / "mine").exists()


def test_non_finite_logits_on_any_evaluation_image_are_refused(tmp_path, mnist_eval_store) -> None:  # noqa: ANN001
    """Only the first 8 images used to be checked: NaN logits on image 20 went through."""
    with pytest.raises(PipelineError, match=r"non-finite logits on 1 of 40 evaluation images \(first: sample 20\)$"):
        import_affine(tmp_path, mnist_eval_store, nan_on_white=True)
    assert not (tmp_path / "models" / "mine").exists()


# --- attack settings, by value, before any job --------------------------------------------


@pytest.mark.workflow
@pytest.mark.parametrize(
    ("attack", "kwargs", "says"),
    [
        ("DDN", {"steps": "ten"}, "keyword steps: 'ten' is not an integer"),  # was a TypeError traceback at job time
        ("DDN", {"steps": -5}, "keyword steps: -5 must be at least 1"),  # ran, verified nothing, dropped DDN from rho
        ("DDN", {"gamma": 0.0}, "keyword gamma: 0.0 must be more than 0"),
        ("DeepFool", {"candidates": 1}, "keyword candidates: 1 must be at least 2"),  # failed at job time
        ("DeepFool", {"candidates": 11}, "keyword candidates: 11 is more than the dataset's 10 classes"),
    ],
)
def test_attack_settings_are_checked_by_value_before_any_job(tmp_path, attack: str, kwargs: dict, says: str) -> None:  # noqa: ANN001
    ensemble = {name: dict(settings) for name, settings in SMOKE["attacks"]["ensemble"].items()}
    assert attack in ensemble
    ensemble[attack]["kwargs"] = {**ensemble[attack].get("kwargs", {}), **kwargs}
    config = {**SMOKE, "attacks": {**SMOKE["attacks"], "ensemble": ensemble}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = snakemake(tmp_path, path, "-n", data_root=tmp_path)
    assert one_line_error(result) == f"error: config key 'attacks.ensemble.{attack}': {says}"


def test_an_attack_that_verifies_no_image_is_an_error_not_a_silent_drop(tmp_path, caplog) -> None:  # noqa: ANN001
    """A model whose logits do not depend on the input: no attack can move any image. That is
    an error for a model that tested healthy (the attack's settings are at fault), and a
    warning for one that the train stage recorded as degenerate (the summary flags it)."""
    spec = mnist_cnn_spec("gradnorm-lambda0-seed0", image_size=8)
    model = build_model(spec)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        model.classifier[-1].bias[3] = 1.0
    model_dir = tmp_path / "models" / spec.name
    model_dir.mkdir(parents=True)
    save_model(model, spec, model_dir)
    save_performance(model_dir, 0.9, 0.1, 100)  # as a healthy model records it
    images = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    eval_store = write_store(eval_dataset(images, torch.arange(6), np.arange(6), MNIST_INPUT_SPACE), tmp_path / "eval.zarr")
    settings = {"name": "DDN", "attack": "DDNAttack", "kwargs": {"steps": 5}, "refine": False, "batch_size": 6, "store_adversarials": False}
    output = tmp_path / "attacks" / spec.name / "DDN.zarr"
    with pytest.raises(PipelineError, match=r"attack DDN \(DDNAttack\) verified no adversarial on any of the 6 evaluation images"):
        attack_stage(model_dir=model_dir, eval_store=eval_store, output=output, settings=settings)
    assert not output.exists()
    # candidates against the model's class count, for datasets the start-up check cannot count (folders)
    deepfool = {**settings, "name": "DeepFool", "attack": "L2DeepFoolAttack", "kwargs": {"steps": 5, "candidates": 11}}
    with pytest.raises(ConfigError, match=r"^config key 'attacks.ensemble.DeepFool': keyword candidates: 11 is more than the dataset's 10 classes$"):
        attack_stage(model_dir=model_dir, eval_store=eval_store, output=output, settings=deepfool)
    save_performance(model_dir, 0.1, 1.0, 100)  # what it is: one class for every image
    with caplog.at_level(logging.WARNING):
        attack_stage(model_dir=model_dir, eval_store=eval_store, output=output, settings=settings)
    assert "verified no adversarial on the degenerate model gradnorm-lambda0-seed0 (100% of images predicted as one class)" in caplog.text
    assert not bool(xr.open_zarr(output)["success"].any())


# --- image files that do not decode ------------------------------------------------------


def truncated_jpeg(path) -> None:  # noqa: ANN001
    Image.fromarray(np.full((40, 48, 3), 128, dtype=np.uint8)).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


DECODES = ["per_epoch", "once"]


@pytest.mark.parametrize("decode", DECODES)
@pytest.mark.parametrize("damage", ["truncated", "empty", "not an image"])
def test_an_image_that_does_not_decode_is_one_line_naming_the_file(tmp_path, damage: str, decode: str) -> None:  # noqa: ANN001
    """Through a DataLoader worker too: the worker's traceback used to come back as the message."""
    root = write_image_folder(tmp_path / "folder", train_per_class=2, val_per_class=2)
    bad = root / "val" / "class_b" / "broken.jpg"
    {"truncated": truncated_jpeg, "empty": lambda p: p.write_bytes(b""), "not an image": lambda p: p.write_text("hello")}[damage](bad)
    dataset = {**imagefolder_config()["dataset"], "path": str(root), "decode": decode}
    split, _ = open_split(dataset, tmp_path, "test")
    for workers in (0, 1):
        with pytest.raises(DataError) as info:
            list(DataLoader(split, batch_size=2, num_workers=workers))
        message = str(info.value)
        assert message.startswith(f"image file {bad} cannot be decoded (") and message.endswith("; remove or replace it"), message
        assert "\n" not in message


@pytest.mark.parametrize("decode", DECODES)
def test_grayscale_and_cmyk_files_are_converted_as_torchvision_converts_them(tmp_path, decode: str) -> None:  # noqa: ANN001
    from torchvision.datasets.folder import default_loader

    root = write_image_folder(tmp_path / "folder", train_per_class=2, val_per_class=2)
    gray, cmyk = root / "val" / "class_a" / "gray.jpg", root / "val" / "class_a" / "cmyk.jpg"
    Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (40, 1)), mode="L").save(gray)
    Image.new("CMYK", (48, 40), (0, 128, 0, 0)).save(cmyk)
    dataset = {**imagefolder_config()["dataset"], "path": str(root), "decode": decode}
    split, _ = open_split(dataset, tmp_path, "test")
    mean = torch.tensor(dataset["mean"]).view(3, 1, 1)
    for path in (gray, cmyk):
        index = [p for p, _ in split.samples].index(str(path))
        image, _ = split[index]
        # known answer: torchvision's own loader (PIL's conversion to RGB), the 40x48 image's 32x32 center crop at (4, 8)
        expected = torch.from_numpy(np.asarray(default_loader(str(path)), dtype=np.float32)[4:36, 8:40].transpose(2, 0, 1) / 255.0)
        assert image.shape == (3, 32, 32)
        assert_within(image + mean, expected, float_tolerance(torch.float32, 1.0, mean.max().item(), terms=3))  # pixel / 255 - mean + mean
    assert not torch.equal(split[[p for p, _ in split.samples].index(str(gray))][0][0], split[0][0][0])


@pytest.mark.parametrize("decode", DECODES)
def test_stray_files_without_an_image_extension_are_skipped_as_torchvision_skips_them(tmp_path, decode: str) -> None:  # noqa: ANN001
    root = write_image_folder(tmp_path / "folder", train_per_class=2, val_per_class=2)
    dataset = {**imagefolder_config()["dataset"], "path": str(root), "decode": decode}
    before = [p for p, _ in open_split(dataset, tmp_path, "test")[0].samples]
    (root / "val" / "class_a" / "README.txt").write_text("not an image")
    (root / "val" / "class_b" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "val" / "notes.csv").write_text("a loose file beside the class folders")
    split, _ = open_split(dataset, tmp_path, "test")
    assert [p for p, _ in split.samples] == before and split.classes == ["class_a", "class_b", "class_c"]
    list(DataLoader(split, batch_size=2))  # and every remaining file decodes


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_class_folder_without_images_is_one_line_naming_it(tmp_path, split: str) -> None:  # noqa: ANN001
    root = write_image_folder(tmp_path / "folder", train_per_class=2, val_per_class=2)
    folder = root / ("train" if split == "train" else "val") / "class_b"
    for path in folder.iterdir():
        path.unlink()
    (folder / "README.txt").write_text("only a stray file")
    dataset = {**imagefolder_config()["dataset"], "path": str(root)}
    with pytest.raises(DataError) as info:
        open_split(dataset, tmp_path, split)
    message = str(info.value)
    assert message.startswith(f"class folder {folder} holds no image file (") and message.endswith(": remove it or fill it"), message
    assert "\n" not in message


def test_a_split_without_class_folders_is_one_line(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "folder" / "val").mkdir(parents=True)
    (tmp_path / "folder" / "val" / "image.jpg").write_bytes(b"")
    dataset = {**imagefolder_config()["dataset"], "path": str(tmp_path / "folder")}
    with pytest.raises(DataError, match=r"^ImageNet-layout folder .*/val holds no class folders \(expected .*/val/<class>/<image>\)$"):
        open_split(dataset, tmp_path, "test")


@pytest.mark.workflow
def test_a_truncated_image_stops_the_data_rule_in_one_line(tmp_path) -> None:  # noqa: ANN001
    data_root = tmp_path / "data"
    write_image_folder(data_root / "imagefolder-test", train_per_class=2, val_per_class=4)
    bad = data_root / "imagefolder-test" / "val" / "class_a" / "class_a_001.png"
    bad.write_bytes(bad.read_bytes()[:40])
    result = snakemake(tmp_path, REPO / "config" / "imagefolder-test.yaml", "results/imagefolder-test/data/eval.zarr", data_root=data_root)
    assert one_line_error(result).startswith(f"error: image file {bad} cannot be decoded (")
    assert not (tmp_path / "results" / "imagefolder-test" / "data" / "eval.zarr").exists()


# --- smaller ones ---------------------------------------------------------------------------


def test_a_directory_as_weights_path_is_named_as_such(tmp_path) -> None:  # noqa: ANN001
    (tmp_path / "checkpoints").mkdir()
    entry = {"name": "mine", "architecture": "mnist_cnn", "weights": "checkpoints"}
    with pytest.raises(DataError, match=r"weights file .*checkpoints is a directory; name the file in it$"):
        external_weights_hash(entry, tmp_path)


def test_a_cifar10_batch_pickled_by_python3_with_protocol_2_reads_the_same(fake_cifar10) -> None:  # noqa: ANN001
    """Protocol 2 in Python 3 builds bytes through _codecs.encode, which used to be refused."""
    root, expected = fake_cifar10
    entry = {b"data": expected["test_pixels"].reshape(8, 3072), b"labels": expected["test_labels"].tolist(), b"name": b"x"}
    content = pickle.dumps(entry, protocol=2)
    assert b"_codecs" in content
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(content)
    test, _ = open_split({"kind": "cifar10"}, root, "test")
    np.testing.assert_array_equal(test.tensors[1].numpy(), expected["test_labels"])  # type: ignore[attr-defined]
