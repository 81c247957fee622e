"""The data stage and the store helpers: seeded choice, clear errors, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from saliency_robustness import stores
from saliency_robustness.data import MNIST_INPUT_SPACE, build_eval_dataset, eval_dataset
from saliency_robustness.errors import DataError, StoreError
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
    np.testing.assert_allclose(a["images"][5, 0].values, test.data[i].numpy() / 255.0, atol=1e-7)
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
