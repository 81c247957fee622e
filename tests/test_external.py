"""Bring your own models (models.external): config rules, weights read strictly and hashed by
content, input adapters, the external stage, RobustBench checkpoints on disk, and the
summary's attribute coordinates. The whole DAG with external models is in test_workflow.py."""

from __future__ import annotations

import copy
import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import assert_within, decomposition_tolerance, float_tolerance, logit_operands, reduction_terms
from saliency_robustness.architectures import InputAdapter
from saliency_robustness.config import validate_config
from saliency_robustness.data import InputSpace
from saliency_robustness.errors import ConfigError, DataError, PipelineError
from saliency_robustness.fingerprints import content_hash, external_weights_hash, robustbench_files
from saliency_robustness.grid import external_models, model_grid
from saliency_robustness.models import ModelSpec, build_model, load_model, read_state_dict
from saliency_robustness.stacking import attribute_coords
from saliency_robustness.stages.external import external_stage, input_adapter
from saliency_robustness.stages.metrics import compute_metrics
from saliency_robustness.stores import write_store

AFFINE_MODULE = '''
"""A user's module: an affine classifier on flattened images (closed-form robustness)."""
from torch import nn


def affine(in_features: int, num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``affine_zoo:affine`` importable from a folder on ``sys.path`` (the user's environment)."""
    folder = tmp_path / "user_code"
    folder.mkdir()
    (folder / "affine_zoo.py").write_text(textwrap.dedent(AFFINE_MODULE))
    monkeypatch.syspath_prepend(str(folder))
    yield "affine_zoo:affine"
    sys.modules.pop("affine_zoo", None)


def external_config(*entries: dict, method: list | str = ()) -> dict:
    return validate_config(
        {"experiment": "x", "train": {"method": list(method) if not isinstance(method, str) else method}, "models": {"external": list(entries)}}
    )


# --- config -------------------------------------------------------------------------------


def test_external_entries_get_their_defaults_and_need_no_grid() -> None:
    config = external_config({"name": "mine", "architecture": "mnist_cnn", "weights": "mine.pt"})
    (entry,) = external_models(config).values()
    assert entry["options"] == {} and entry["attributes"] == {} and entry["num_classes"] is None
    assert model_grid(config) == {}
    rb = external_config({"name": "rb", "robustbench": {"name": "Standard", "dataset": "cifar10", "threat_model": "L2"}})
    assert external_models(rb)["rb"]["robustbench"]["model_dir"] == "models"


@pytest.mark.parametrize(
    ("entries", "method", "message"),
    [
        ([{"name": "a", "architecture": "mnist_cnn", "weights": "a.pt"}] * 2, [], "models.external[1]' (a): the name appears twice"),
        ([{"name": "gradnorm-lambda0-seed0", "architecture": "mnist_cnn", "weights": "a.pt"}], [], "looks like a trained model's"),
        ([{"name": "a", "architecture": "mnist_cnn"}], [], "missing 'weights'"),
        ([{"name": "a", "weights": "a.pt"}], [], "missing 'architecture'"),
        (
            [{"name": "a", "weights": "a.pt", "robustbench": {"name": "Standard", "dataset": "cifar10", "threat_model": "L2"}}],
            [],
            "a robustbench entry takes no weights",
        ),
        ([{"name": "a/b", "architecture": "mnist_cnn", "weights": "a.pt"}], [], "config key 'models.external.0.name'"),
        ([{"name": "a", "architecture": "m", "weights": "a.pt", "attributes": {"bad key": 1}}], [], "models.external.0.attributes"),
        ([], [], "there is no model to analyse"),
    ],
)
def test_bad_external_entries_are_one_line_config_errors(entries: list, method: list, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        external_config(*entries, method=method)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_weights_are_identified_by_content_not_by_time(tmp_path: Path) -> None:
    entry = {"name": "mine", "weights": "mine.pt"}
    torch.save({"w": torch.ones(3)}, tmp_path / "mine.pt")
    first = external_weights_hash(entry, tmp_path)
    os.utime(tmp_path / "mine.pt", (1e9, 1e9))  # touched: the same content
    assert external_weights_hash(entry, tmp_path) == first
    torch.save({"w": torch.tensor([1.0, 1.0, 2.0])}, tmp_path / "mine.pt")
    assert external_weights_hash(entry, tmp_path) != first
    absolute = {"name": "abs", "weights": str(tmp_path / "mine.pt")}
    assert external_weights_hash(absolute, "/nonexistent") == external_weights_hash(entry, tmp_path)
    with pytest.raises(DataError) as info:
        external_weights_hash({"name": "gone", "weights": "gone.pt"}, tmp_path)
    assert f"external model 'gone': weights file {tmp_path / 'gone.pt'} not found" in str(info.value)


def test_robustbench_files_follow_the_librarys_layout(tmp_path: Path) -> None:
    entry = {"name": "Ding2020MMA", "dataset": "cifar10", "threat_model": "L2", "model_dir": "zoo"}
    folder = tmp_path / "zoo" / "cifar10" / "L2"
    assert robustbench_files(entry, tmp_path) == [folder / "Ding2020MMA.pt"]
    folder.mkdir(parents=True)
    for i in range(2):  # an ensemble is stored member by member
        (folder / f"Ding2020MMA.pt_m{i}.pt").write_bytes(b"member")
    assert robustbench_files(entry, tmp_path) == [folder / "Ding2020MMA.pt_m0.pt", folder / "Ding2020MMA.pt_m1.pt"]
    assert content_hash(robustbench_files(entry, tmp_path))


# --- weights and adapters ---------------------------------------------------------------


def test_state_dicts_are_read_plainly_or_from_a_checkpoint_dict(tmp_path: Path) -> None:
    state = {"weight": torch.randn(2, 3), "bias": torch.zeros(2)}
    torch.save({"epoch": 7, "state_dict": state}, tmp_path / "nested.pt")
    assert torch.equal(read_state_dict(tmp_path / "nested.pt")["weight"], state["weight"])
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(DataError, match="does not hold a state_dict"):
        read_state_dict(tmp_path / "list.pt")


def test_the_input_adapter_feeds_the_network_what_it_was_trained_on() -> None:
    """A network that takes ``(pixel - mean) / std`` gets exactly that from the store's ``x = pixel - offset``."""
    space = InputSpace(pixel_offset=(0.5, 0.4, 0.3))
    entry = {"name": "n", "input_space": {"offset": [0.485, 0.456, 0.406], "scale": [0.229, 0.224, 0.225]}}
    adapter = input_adapter(entry, space, channels=3)
    torch.manual_seed(0)
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.LazyLinear(5))
    pixels = torch.rand(6, 3, 8, 8)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (entry["input_space"]["offset"], entry["input_space"]["scale"]))
    expected = network((pixels - mean) / std)
    model = InputAdapter(network, adapter["shift"], adapter["scale"])
    # the network's input computed two ways (three float32 roundings at the scale of (|pixel| + |mean|) / std, one
    # subtraction and one division), then its rounding: the network with absolute weights on absolute inputs bounds
    # every term of its sums (ReLU of a positive number is the identity)
    absolute = copy.deepcopy(network)
    with torch.no_grad():
        for parameter in absolute.parameters():
            parameter.abs_()
        operands = absolute((pixels.abs() + mean.abs()) / std)
    tolerance = float_tolerance(torch.float32, operands.numpy(), terms=reduction_terms(network) + 3)
    assert_within(model(space.from_pixels(pixels)), expected, tolerance)
    assert input_adapter({"name": "n"}, space, channels=3) is None  # a registered architecture takes the store's space
    with pytest.raises(PipelineError, match="input_space.scale has 2 entries for 3 image channels"):
        input_adapter({"name": "n", "input_space": {"offset": [0.0], "scale": [1.0, 2.0]}}, space, channels=3)


def test_the_decomposition_counts_the_adapters_shift_as_a_bias() -> None:
    """With a shift between the input spaces, ``Ψ = <x, ∇Ψ> + Σ <b, ∂Ψ/∂b>`` still holds with the shift among the biases."""
    torch.manual_seed(1)
    network = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)).double()
    model = InputAdapter(network, [0.1, -0.2, 0.3], [2.0, 3.0, 4.0]).double()
    images = torch.rand(5, 3, 8, 8, dtype=torch.float64)
    ds = compute_metrics(model, images, batch_size=5, class_chunk=5)
    assert "decomposition_unverified_modules" not in ds.attrs
    tolerance = decomposition_tolerance(ds, model, images)  # float64 rounding of the decomposition's operands
    assert_within(ds["bias_sum"].values, ds["bias_part"].values, tolerance)
    scale = np.abs(ds["homogeneous_part"].values) + np.abs(ds["bias_part"].values)  # what the relative error is relative to
    assert ds.attrs["max_relative_decomposition_error"] <= (tolerance / scale).max()


# --- the external stage -----------------------------------------------------------------


@pytest.fixture
def cifar_root(fake_cifar10: tuple[Path, dict]) -> Path:
    return fake_cifar10[0]


def test_external_stage_writes_a_model_directory_like_trainings(cifar_root: Path, user_module: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    affine = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 10))
    torch.save(affine.state_dict(), cifar_root / "affine.pt")
    entry = {"name": "affine", "architecture": user_module, "options": {"in_features": 3072}, "weights": "affine.pt", "num_classes": None}
    output = tmp_path / "models" / "affine"
    import_model(entry, cifar_root, output)
    model = load_model(output)
    images = torch.rand(4, 3, 32, 32)
    weight, bias = affine[1].weight.detach(), affine[1].bias.detach()
    operands = images.flatten(1).abs() @ weight.abs().T + bias.abs()  # each logit a float32 sum of 3072 + 1 terms
    assert_within(model(images), affine(images), float_tolerance(torch.float32, operands.numpy(), terms=3 * 32 * 32 + 1))
    spec = json.loads((output / "spec.json").read_text())
    assert spec["method"] == "external" and spec["num_classes"] == 10 and spec["weights_sha256"] == external_weights_hash(entry, cifar_root)
    assert ModelSpec.from_json((output / "spec.json").read_text()).strength is None  # nothing the pipeline set
    performance = json.loads((output / "test_accuracy.json").read_text())
    assert performance["test_images"] == 8  # the fake test split


def test_unusable_external_weights_give_one_line_naming_the_entry(cifar_root: Path, user_module: str, tmp_path: Path) -> None:
    cnn = build_model(ModelSpec(name="c", architecture="mnist_cnn", method="gradnorm", strength=0.0,
            in_channels=3, image_size=32, sensitivity="loss", p=2.0, seed=0, num_classes=10))
    state = cnn.state_dict()
    cases = {
        "unexpected keys": {**state, "extra.weight": torch.zeros(1)},
        "missing keys classifier.4.bias": {k: v for k, v in state.items() if k != "classifier.4.bias"},
        "shape mismatch at classifier.4.weight": {**state, "classifier.4.weight": torch.zeros(5, 128), "classifier.4.bias": torch.zeros(5)},
    }
    for reason, bad in cases.items():
        torch.save(bad, cifar_root / "bad.pt")
        entry = {"name": "mine", "architecture": "mnist_cnn", "options": {}, "weights": "bad.pt", "num_classes": None}
        with pytest.raises(PipelineError) as info:
            import_model(entry, cifar_root, tmp_path / "out")
        message = str(info.value)
        assert message.startswith("external model 'mine': weights") and reason in message and "\n" not in message, message
        assert not (tmp_path / "out").exists()
    (cifar_root / "bad.pt").write_bytes(b"\x80\x02corrupt")
    with pytest.raises(PipelineError, match="external model 'mine': cannot read weights file .*bad.pt") as info:
        import_model(entry, cifar_root, tmp_path / "out", weights_sha256=content_hash([cifar_root / "bad.pt"]))
    assert "\n" not in str(info.value)
    torch.save(state, cifar_root / "bad.pt")
    with pytest.raises(PipelineError, match="its weights file changed while the workflow ran"):
        import_model(entry, cifar_root, tmp_path / "out", weights_sha256="0" * 64)
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)).state_dict(), cifar_root / "affine.pt")
    wrong_classes = {"name": "mine", "architecture": user_module, "options": {"in_features": 3072}, "weights": "affine.pt", "num_classes": 7}
    with pytest.raises(PipelineError, match="returns 10 logits, but num_classes is 7"):
        import_model(wrong_classes, cifar_root, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the summary ------------------------------------------------------------------------


def test_attributes_become_per_model_coordinates() -> None:
    names = ["gradnorm-lambda0-seed0", "rb", "mine"]
    attributes = {"rb": {"source": "robustbench", "eps": 0.5}, "mine": {"source": "own", "eps": 1}}
    coords = attribute_coords(names, attributes, taken=["alignment"])
    assert list(coords["source"][1]) == ["", "robustbench", "own"]
    np.testing.assert_array_equal(coords["eps"][1], [np.nan, 0.5, 1.0])
    with pytest.raises(ConfigError, match="attribute 'alignment' is also the name of a summary variable"):
        attribute_coords(names, {"rb": {"alignment": 1}}, taken=["alignment"])


# --- helpers ----------------------------------------------------------------------------


def import_model(entry: dict, cifar_root: Path, output: Path, weights_sha256: str | None = None) -> None:
    """The external stage on the fake CIFAR-10 under ``cifar_root`` (its eval store beside ``output``)."""
    dataset = validate_config({"experiment": "x", "dataset": {"kind": "cifar10"}})["dataset"]
    eval_store = output.parent / "eval.zarr"
    if not eval_store.exists():
        write_cifar_eval_store(cifar_root, eval_store)
    sha = external_weights_hash(entry, cifar_root) if weights_sha256 is None else weights_sha256
    external_stage(entry=entry, dataset=dataset, data_root=cifar_root, eval_store=eval_store, output=output, weights_sha256=sha)


def write_cifar_eval_store(cifar_root: Path, path: Path) -> None:
    from saliency_robustness.data import build_eval_dataset

    dataset = validate_config({"experiment": "x", "dataset": {"kind": "cifar10", "n_eval": 4}})["dataset"]
    write_store(build_eval_dataset(dataset, cifar_root), path)


# --- RobustBench ------------------------------------------------------------------------


def test_robustbench_checkpoints_on_disk_load_through_the_library(cifar_root: Path, tmp_path: Path) -> None:
    """A randomly initialised RobustBench architecture saved where ``robustbench.utils.load_model``
    looks for it loads through the library, never downloading, and runs like the original."""
    from saliency_robustness.zoo import robustbench_network

    rb = {"name": "Ding2020MMA", "dataset": "cifar10", "threat_model": "L2", "model_dir": "zoo"}
    entry = {"name": "mma", "robustbench": rb, "attributes": {}, "num_classes": None, "options": {}}
    with pytest.raises(DataError) as info:  # not on disk: an error naming the path, no download
        external_weights_hash(entry, cifar_root)
    assert str(cifar_root / "zoo" / "cifar10" / "L2" / "Ding2020MMA.pt") in str(info.value)
    torch.manual_seed(0)
    original = robustbench_network(**rb).eval()
    (cifar_root / "zoo" / "cifar10" / "L2").mkdir(parents=True)
    torch.save(original.state_dict(), cifar_root / "zoo" / "cifar10" / "L2" / "Ding2020MMA.pt")
    output = tmp_path / "models" / "mma"
    import_model(entry, cifar_root, output)
    spec = json.loads((output / "spec.json").read_text())
    assert spec["architecture"] == "robustbench" and spec["architecture_options"] == {k: rb[k] for k in ("name", "dataset", "threat_model")}
    assert spec["input_adapter"] == {"shift": [0.0, 0.0, 0.0], "scale": [1.0, 1.0, 1.0]}  # the [0, 1] image, as the library's models take
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        loaded, expected = load_model(output)(images), original(images)
    # the same network behind an exact identity adapter (x * 1); compared to the rounding of its logits' terms
    assert_within(loaded, expected, float_tolerance(torch.float32, logit_operands(original, images), terms=reduction_terms(original)))
    missing = {**entry, "robustbench": {**rb, "name": "Rice2020Overfitting"}}
    with pytest.raises(DataError, match="external model 'mma': RobustBench checkpoint .*Rice2020Overfitting.pt not found"):
        import_model(missing, cifar_root, tmp_path / "o", weights_sha256="")


