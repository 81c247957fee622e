"""The data stage and the store helpers: seeded choice, clear errors, atomic writes."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
import xarray as xr

from conftest import assert_within, float_tolerance, write_fake_cifar10
from saliency_robustness import stores
from saliency_robustness.config import validate_config
from saliency_robustness.data import CIFAR10_INPUT_SPACE, MNIST_INPUT_SPACE, build_eval_dataset, eval_dataset, open_split
from saliency_robustness.errors import ConfigError, DataError, StoreError
from saliency_robustness.stores import open_store, write_store


def test_eval_set_is_a_seeded_choice_of_test_images(data_root) -> None:  # noqa: ANN001
    dataset = {"kind": "mnist", "n_eval": 20, "eval_seed": 3}
    a = build_eval_dataset(dataset, data_root)
    b = build_eval_dataset(dataset, data_root)
    c = build_eval_dataset({**dataset, "eval_seed": 4}, data_root)
    assert a["images"].dims == ("sample", "channel", "y", "x")
    assert a["images"].shape == (20, 1, 28, 28)
    np.testing.assert_array_equal(a["dataset_index"], b["dataset_index"])
    assert not np.array_equal(a["dataset_index"], c["dataset_index"])
    assert float(a["images"].min()) >= 0.0 and float(a["images"].max()) <= 1.0
    # the stored image is the test image with that index
    from torchvision.datasets import MNIST

    test = MNIST(str(data_root), train=False)
    i = int(a["dataset_index"][5])
    expected = test.data[i].numpy() / 255.0
    assert_within(a["images"][5, 0].values, expected, float_tolerance(np.float32, expected))  # one float32 division
    assert int(a["label"][5]) == int(test.targets[i])


def test_missing_mnist_offline_names_data_root(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from torchvision.datasets import MNIST

    def offline(self):  # noqa: ANN001, ANN202
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(MNIST, "download", offline)
    with pytest.raises(DataError) as info:
        build_eval_dataset({"kind": "mnist", "n_eval": 5, "eval_seed": 0}, tmp_path / "nowhere")
    assert "data_root=" in str(info.value) and "nowhere" in str(info.value)
    assert "\n" not in str(info.value)


CIFAR10 = {"kind": "cifar10", "n_eval": 5, "eval_seed": 3}
CIFAR10_DATA_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


def test_cifar10_eval_store_holds_the_files_pixels_labels_and_class_names(fake_cifar10) -> None:  # noqa: ANN001
    root, expected = fake_cifar10
    a = build_eval_dataset(CIFAR10, root)
    assert a["images"].shape == (5, 3, 32, 32) and a["images"].dtype == np.float32
    index = a["dataset_index"].values
    assert len(set(index)) == 5 and index.max() < 8
    np.testing.assert_array_equal(a["images"].values, expected["test_pixels"][index] / np.float32(255.0))
    np.testing.assert_array_equal(a["label"].values, expected["test_labels"][index])
    assert a.attrs["class_names"] == expected["class_names"] == [f"class-{i}" for i in range(10)]
    assert a.attrs["pixel_offset"] == [0.0, 0.0, 0.0] and a.attrs["pixel_bounds"] == [0.0, 1.0]
    digest = hashlib.md5(b"".join((root / "cifar-10-batches-py" / name).read_bytes() for name in CIFAR10_DATA_FILES))
    assert a.attrs["data_fingerprint"] == f"md5:{digest.hexdigest()}"
    # the seeded choice is reproducible, and the whole test split comes back with n_eval >= 8
    np.testing.assert_array_equal(build_eval_dataset(CIFAR10, root)["dataset_index"], index)
    everything = build_eval_dataset({**CIFAR10, "n_eval": 8}, root)
    np.testing.assert_array_equal(everything["images"].values * 255.0, expected["test_pixels"].astype(np.float32))


def test_cifar10_train_split_is_all_five_batches_in_order(fake_cifar10) -> None:  # noqa: ANN001
    root, expected = fake_cifar10
    train, space = open_split(CIFAR10, root, "train")
    images, labels = train.tensors  # type: ignore[attr-defined]
    assert space == CIFAR10_INPUT_SPACE and space.pixel_offset == (0.0, 0.0, 0.0)
    assert images.shape == (30, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    np.testing.assert_array_equal(images.numpy(), expected["train_pixels"] / np.float32(255.0))
    np.testing.assert_array_equal(labels.numpy(), expected["train_labels"])
    assert train.classes == expected["class_names"]  # type: ignore[attr-defined]
    assert len(open_split(CIFAR10, root, "test")[0]) == 8  # type: ignore[arg-type]


def test_cifar10_repickled_by_python3_reads_the_same(fake_cifar10) -> None:  # noqa: ANN001
    """Real files are Python 2 pickles (str keys once read as latin1); a Python 3 copy has bytes keys."""
    root, expected = fake_cifar10
    entry = {b"data": expected["test_pixels"].reshape(8, 3072), b"labels": expected["test_labels"].tolist()}
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(entry, protocol=4))
    test, _ = open_split(CIFAR10, root, "test")
    np.testing.assert_array_equal(test.tensors[0].numpy() * 255.0, expected["test_pixels"].astype(np.float32))  # type: ignore[attr-defined]
    np.testing.assert_array_equal(test.tensors[1].numpy(), expected["test_labels"])  # type: ignore[attr-defined]


def _batch(n: int = 6, **changes: object) -> bytes:
    entry: dict[str, object] = {"data": np.zeros((n, 3072), dtype=np.uint8), "labels": [0] * n}
    entry.update(changes)
    return pickle.dumps({k: v for k, v in entry.items() if v is not None}, protocol=4)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("data_batch_3", None, "not a readable pickle"),  # truncated: see below
        ("test_batch", b"not a pickle at all", "not a readable pickle"),
        ("data_batch_2", b"", "not a readable pickle"),
        ("data_batch_1", b"cos\nsystem\n(S'touch {marker}'\ntR.", "os.system"),
        ("data_batch_1", b"cposix\nsystem\n(S'touch {marker}'\ntR.", "posix.system"),
        ("data_batch_1", b"cbuiltins\neval\n(S'1'\ntR.", "builtins.eval"),
        ("data_batch_4", _batch(data=np.zeros((6, 3000), dtype=np.uint8)), "shape (6, 3000)"),
        ("data_batch_4", _batch(data=np.zeros((6, 3, 32, 32), dtype=np.uint8)), "shape (6, 3, 32, 32)"),
        ("data_batch_4", _batch(data=np.full((6, 3072), 256, dtype=np.int64)), "not uint8-valued"),
        ("data_batch_4", _batch(data=np.zeros((6, 3072), dtype=np.float32)), "not uint8-valued"),
        ("data_batch_5", _batch(labels=[0] * 5), "expected 6 integers"),
        ("data_batch_5", _batch(labels=[0, 1, 2, 3, 4, 10]), "expected 0..9"),
        ("data_batch_5", _batch(labels=None), "lacks the key(s) ['labels']"),
        ("data_batch_5", pickle.dumps([1, 2, 3], protocol=4), "holds a list"),
        ("batches.meta", pickle.dumps({"label_names": ["a", "b"]}, protocol=4), "'label_names' is not a list of 10"),
        ("batches.meta", pickle.dumps({"names": []}, protocol=4), "lacks the key(s) ['label_names']"),
    ],
)
def test_damaged_cifar10_file_gives_one_line_error_naming_it(fake_cifar10, tmp_path, name, content, problem) -> None:  # noqa: ANN001
    root, _ = fake_cifar10
    path = root / "cifar-10-batches-py" / name
    marker = tmp_path / "code-ran"
    if content is None:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content.replace(b"{marker}", str(marker).encode()))
    split = "test" if name == "test_batch" else "train"
    with pytest.raises(DataError) as info:
        open_split(CIFAR10, root, split)
    message = str(info.value)
    assert str(path) in message and problem in message, message
    assert "\n" not in message
    assert not marker.exists()  # the pickle ran nothing


def test_missing_cifar10_file_is_named(fake_cifar10) -> None:  # noqa: ANN001
    root, _ = fake_cifar10
    (root / "cifar-10-batches-py" / "data_batch_2").unlink()
    open_split(CIFAR10, root, "test")  # the test split does not need it
    with pytest.raises(DataError, match="data_batch_2 is missing") as info:
        open_split(CIFAR10, root, "train")
    assert "\n" not in str(info.value)


@pytest.fixture
def no_download(monkeypatch):  # noqa: ANN001, ANN201
    """torchvision's CIFAR10, replaced by one that records its calls (and downloads nothing)."""
    import torchvision.datasets

    calls = []

    def record(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        calls.append((args, kwargs))
        raise RuntimeError("no download in tests")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", record)
    return calls


def test_absent_cifar10_folder_under_other_data_root_is_an_error_that_creates_nothing(tmp_path, no_download) -> None:  # noqa: ANN001
    (tmp_path / "MNIST").mkdir()  # a data root holding something else
    with pytest.raises(DataError) as info:
        build_eval_dataset(CIFAR10, tmp_path)
    message = str(info.value)
    assert f"{tmp_path}/cifar-10-batches-py" in message and "data_root=" in message and "\n" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["MNIST"] and no_download == []
    mistyped = tmp_path / "shraed" / "data"
    with pytest.raises(DataError, match="does not exist.*cifar-10-batches-py") as info:
        build_eval_dataset(CIFAR10, mistyped)
    assert "\n" not in str(info.value) and not mistyped.parent.exists() and no_download == []


def test_cifar10_offline_under_default_data_root_names_the_folder(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from torchvision.datasets import CIFAR10 as TorchCIFAR10

    def offline(self):  # noqa: ANN001, ANN202
        raise RuntimeError("Error downloading cifar-10-python.tar.gz:\n<urlopen error [Errno -3]>")

    monkeypatch.setattr(TorchCIFAR10, "download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as info:
        build_eval_dataset(CIFAR10, "data")
    message = str(info.value)
    assert "data/cifar-10-batches-py" in message and "download failed" in message and "urlopen error" in message
    assert "\n" not in message


def test_cifar10_is_downloaded_once_under_the_default_data_root(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    import torchvision.datasets

    calls = []

    def fake_download(root, train, download):  # noqa: ANN001, ANN202
        calls.append((root, train, download))
        write_fake_cifar10(tmp_path / root)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_download)
    monkeypatch.chdir(tmp_path)
    ds = build_eval_dataset(CIFAR10, "data")
    assert calls == [("data", False, True)]
    assert ds.attrs["class_names"][0] == "class-0" and ds["images"].shape == (5, 3, 32, 32)
    build_eval_dataset(CIFAR10, "data")  # an existing folder is read, never downloaded into
    open_split(CIFAR10, "data", "train")
    assert len(calls) == 1


@pytest.mark.parametrize(
    ("section", "key", "largest"),
    [("dataset", "n_eval", 10000), ("train", "n_train", 50000)],
)
def test_cifar10_subsets_larger_than_the_split_are_config_errors(section, key, largest) -> None:  # noqa: ANN001
    def config(n: int) -> dict[str, dict[str, object] | str]:
        raw: dict[str, dict[str, object] | str] = {"experiment": "x", "dataset": {"kind": "cifar10"}, "train": {}}
        raw[section][key] = n  # type: ignore[index]
        return raw

    assert validate_config(config(largest))[section][key] == largest
    with pytest.raises(ConfigError, match=f"'{section}.{key}': {largest + 1} is more than the {largest} images of CIFAR-10's"):
        validate_config(config(largest + 1))
    if key == "n_train":  # MNIST's train split is larger
        assert validate_config({"experiment": "x", section: {key: largest + 1}})[section][key] == largest + 1


def small_store() -> xr.Dataset:
    images = torch.rand(6, 1, 4, 4)
    return eval_dataset(images, torch.arange(6) % 3, np.arange(6) * 2, MNIST_INPUT_SPACE)


def test_store_round_trip_opens_with_plain_open_zarr(tmp_path) -> None:  # noqa: ANN001
    ds = small_store()
    write_store(ds, tmp_path / "eval.zarr")
    back = xr.open_zarr(tmp_path / "eval.zarr")
    xr.testing.assert_identical(back.load().drop_attrs(), ds.drop_attrs())
    assert back["images"].attrs["long_name"]
    assert back.attrs["pixel_bounds"] == [0.0, 1.0]


def test_interrupted_write_leaves_nothing_that_opens(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    ds = small_store()
    target = tmp_path / "eval.zarr"
    write_store(ds, target)  # an older complete store is replaced only on success

    def crash(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(xr.Dataset, "to_zarr", crash)
    with pytest.raises(KeyboardInterrupt):
        write_store(ds.isel(sample=slice(0, 2)), target)
    assert xr.open_zarr(target).sizes["sample"] == 6
    assert [p.name for p in tmp_path.iterdir()] == ["eval.zarr"]


def test_corrupt_or_missing_store_gives_one_line_error(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "absent.zarr")
    write_store(small_store(), tmp_path / "eval.zarr")
    (tmp_path / "eval.zarr" / "zarr.json").write_text("{ not json")
    with pytest.raises(StoreError, match="corrupt") as info:
        open_store(tmp_path / "eval.zarr")
    assert "\n" not in str(info.value)
    write_store(small_store(), tmp_path / "ok.zarr")
    with pytest.raises(StoreError, match="lacks variable"):
        open_store(tmp_path / "ok.zarr", variables=["saliency"])


def test_provenance_records_version_and_config() -> None:
    attrs = stores.provenance({"n_eval": 3})
    assert attrs["package_version"] and attrs["config"] == '{"n_eval": 3}'


def test_inspect_describes_a_store_and_fails_in_one_line(tmp_path, capsys) -> None:  # noqa: ANN001
    from saliency_robustness.cli import main

    write_store(small_store(), tmp_path / "eval.zarr")
    main(["inspect", str(tmp_path / "eval.zarr")])
    out = capsys.readouterr().out
    assert "dims: sample=6" in out and "evaluation image" in out and "median" in out
    with pytest.raises(SystemExit, match="does not exist"):
        main(["inspect", str(tmp_path / "nope.zarr")])
