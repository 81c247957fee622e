"""Nothing lost, nothing silently wrong: damaged stores and checkpoints, bad data roots and
configs each stop with one line naming the problem, never with a number or a traceback."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from conftest import REPO
from saliency_robustness.cli import main as cli_main
from saliency_robustness.config import validate_config
from saliency_robustness.data import DEFAULT_DATA_ROOT, MNIST_FILES, load_mnist, seeded_subset
from saliency_robustness.ensemble import check_ensemble
from saliency_robustness.errors import ConfigError, DataError, PipelineError, StoreError
from saliency_robustness.models import load_model, load_spec
from saliency_robustness.stores import MANIFEST, atomic_directory, open_store, write_manifest, write_store
from saliency_robustness.vocabulary import CHECKPOINT, SPEC


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and text, text
    return text


@pytest.fixture
def store(tmp_path: Path) -> Path:
    robustness = np.linspace(0.5, 2.0, 600)
    robustness[256:512] = np.nan  # a whole chunk of fill values ("no adversarial found")
    ds = xr.Dataset(
        {
            "robustness": ("sample", robustness, {"long_name": "rho", "units": "1"}),
            "alignment": ("sample", np.arange(600.0), {"long_name": "alpha", "units": "1"}),
        },
        coords={"sample": np.arange(600)},
    )
    return write_store(ds, tmp_path / "metrics" / "m.zarr")


def chunk_files(store: Path, variable: str) -> list[Path]:
    return sorted(p for p in (store / variable).rglob("*") if p.is_file() and p.name != "zarr.json")


def test_every_chunk_is_written_also_one_of_fill_values_only(store: Path) -> None:
    assert len(chunk_files(store, "robustness")) == 3  # 600 samples in chunks of 256
    ds = open_store(store).load()
    assert np.isnan(ds["robustness"].values[256:512]).all() and np.isfinite(ds["robustness"].values[:256]).all()


def damage_delete_chunk(store: Path) -> None:
    chunk_files(store, "robustness")[0].unlink()


def damage_truncate_chunk(store: Path) -> None:
    chunk = chunk_files(store, "robustness")[1]
    chunk.write_bytes(chunk.read_bytes()[:10])


def damage_delete_variable(store: Path) -> None:
    shutil.rmtree(store / "robustness")


def damage_flip_bytes(store: Path) -> None:
    chunk = chunk_files(store, "alignment")[0]
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))


def damage_delete_manifest(store: Path) -> None:
    (store / MANIFEST).unlink()


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (damage_delete_chunk, "variable 'robustness'"),
        (damage_truncate_chunk, "variable 'robustness'"),
        (damage_delete_variable, "variable 'robustness'"),
        (damage_flip_bytes, "variable 'alignment'"),
        (damage_delete_manifest, MANIFEST),
    ],
    ids=["deleted chunk", "truncated chunk", "deleted variable", "altered chunk", "no manifest"],
)
def test_a_damaged_store_is_one_line_naming_store_variable_and_fix(store: Path, damage, says: str, capsys) -> None:  # noqa: ANN001
    damage(store)
    with pytest.raises(StoreError) as info:
        open_store(store)
    message = one_line(info.value)
    assert str(store) in message and says in message and f"delete {store}" in message
    # the command line says the same in one line, never prints a number
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["inspect", str(store)])
    assert str(exit_info.value.code).startswith("error: ") and "\n" not in str(exit_info.value.code)
    assert "median" not in capsys.readouterr().out


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_a_flipped_byte_fails_even_a_plain_open_zarr(store: Path, where: float) -> None:
    """The chunks carry Zstd's frame checksum: xarray.open_zarr, which skips the manifest,
    refuses altered bytes too, instead of reading a slightly different number."""
    chunk = chunk_files(store, "alignment")[0]
    data = bytearray(chunk.read_bytes())
    data[int(where * len(data))] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)checksum|zstd|decompress"):
        xr.open_zarr(store).load()


def test_the_package_opens_stores_through_the_checked_opener(store: Path) -> None:
    import saliency_robustness as sr

    chunk_files(store, "robustness")[0].unlink()  # plain xr.open_zarr would read NaN here
    with pytest.raises(StoreError, match="variable 'robustness'"):
        sr.open_store(store)


def test_a_damaged_checkpoint_says_what_to_delete(tiny_experiment: dict[str, Path], tmp_path: Path) -> None:
    model_dir = tmp_path / "gradnorm-lambda0-seed0"
    shutil.copytree(tiny_experiment["model_dir"], model_dir)
    assert isinstance(load_model(model_dir), torch.nn.Module)
    checkpoint = model_dir / CHECKPOINT
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(StoreError) as info:
        load_model(model_dir)
    message = one_line(info.value)
    assert "model.pt" in message and f"delete {model_dir}" in message


def test_a_spec_of_the_former_format_is_refused_in_one_line(tiny_experiment: dict[str, Path], tmp_path: Path) -> None:
    """Specs written before (method, strength) became one pair held ``lam`` and ``epsilon``: such
    a model directory is refused (its stages rerun), never read with a guessed strength."""
    model_dir = tmp_path / "gradnorm-lambda0-seed0"
    shutil.copytree(tiny_experiment["model_dir"], model_dir)
    spec = json.loads((model_dir / SPEC).read_text())
    former = {k: v for k, v in spec.items() if k != "strength"} | {"lam": spec["strength"], "epsilon": None}
    (model_dir / SPEC).write_text(json.dumps(former))
    write_manifest(model_dir)  # a consistent directory: only the spec's format is wrong
    with pytest.raises(StoreError, match=r"cannot read model spec .*spec\.json.*unexpected keyword argument 'lam'") as info:
        load_spec(model_dir)
    assert "\n" not in str(info.value) and f"delete {model_dir}" in str(info.value)


def test_leftovers_of_a_killed_write_are_removed_at_the_next_start(tmp_path: Path) -> None:
    leftover = tmp_path / ".out.zarr.partial-deadbeef"
    leftover.mkdir()
    (leftover / "half-written").write_text("x")
    other = tmp_path / ".other.zarr.partial-deadbeef"  # another output's: not touched
    other.mkdir()
    with atomic_directory(tmp_path / "out.zarr") as tmp:
        (tmp / "done").write_text("y")
    assert not leftover.exists() and other.exists() and (tmp_path / "out.zarr" / "done").exists()


# --- the data root ---


def test_a_missing_data_root_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "root"
    with pytest.raises(DataError) as info:
        load_mnist(missing, train=False)
    assert "does not exist" in one_line(info.value)
    assert not (tmp_path / "no").exists()
    schema = (REPO / "workflow" / "schemas" / "config.schema.yaml").read_text()
    assert f"default: {DEFAULT_DATA_ROOT}\n" in schema  # the one root that may be created (downloads)


def test_truncated_mnist_is_reported_as_corrupt_with_its_size(tmp_path: Path, data_root: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        shutil.copy(data_root / "MNIST" / "raw" / name, raw / name)
    images = raw / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:5000])
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, train=False)
    message = one_line(info.value)
    assert str(images) in message and "5000 bytes" in message and str(MNIST_FILES[images.name]) in message
    assert "download" not in message.split(":")[0]  # not "not found ... download failed"


def test_a_subset_larger_than_the_split_says_it_clamps(caplog) -> None:  # noqa: ANN001
    ds = torch.utils.data.TensorDataset(torch.zeros(5, 1))
    with caplog.at_level(logging.WARNING, logger="saliency_robustness.data"):
        subset, indices = seeded_subset(ds, 9, 0)
    assert len(indices) == 5 and "using all 5" in caplog.text


# --- the whole config, before the first job ---


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"attacks": {"ensemble": {}}}, "attacks.ensemble"),
        ({"dataset": {"n_eval": 10001}}, "dataset.n_eval': 10001 is more than the 10000"),
        ({"train": {"n_train": 60001}}, "train.n_train': 60001 is more than the 60000"),
        ({"experiment": "mnist\n"}, "config key 'experiment'"),
    ],
)
def test_bad_config_found_at_start_up(config: dict, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate_config({"experiment": "x", **config})
    assert says in one_line(info.value)


@pytest.mark.parametrize(
    ("ensemble", "says"),
    [
        ({"DDN": {"attack": "DDNAttak"}}, "attacks.ensemble.DDN': unknown attack class 'DDNAttak'"),
        ({"DDN": {"attack": "DDNAttack", "kwargs": {"stepz": 3}}}, "attacks.ensemble.DDN': bad keyword arguments for DDNAttack"),
        ({"FMN": {"attack": "L2FMNAttack", "refine": True}}, "needs at least one attack with refine: false"),
        (
            {"DDN": {"attack": "DDNAttack"}, "BB": {"attack": "L2BrendelBethgeAttack", "kwargs": {"stepz": 1}, "refine": True}},
            "attacks.ensemble.BB': bad keyword arguments for L2BrendelBethgeAttack",
        ),
    ],
)
def test_every_attack_is_built_at_start_up(ensemble: dict, says: str) -> None:
    validated = validate_config({"experiment": "x", "attacks": {"ensemble": ensemble}})["attacks"]["ensemble"]
    with pytest.raises(ConfigError) as info:
        check_ensemble(validated)
    assert says in one_line(info.value)


def test_the_shipped_ensembles_build() -> None:
    for path in sorted((REPO / "config").glob("*.yaml")):
        import yaml

        if path.name.startswith("with-"):  # an overlay (config/with-quality.yaml): no experiment of its own
            continue
        check_ensemble(validate_config(yaml.safe_load(path.read_text()))["attacks"]["ensemble"])


# --- figures with nothing to plot ---


def test_a_figure_with_no_finite_value_is_one_line_naming_model_and_variable(tmp_path: Path) -> None:
    from saliency_robustness.stages.figures import check_plottable
    from saliency_robustness.stages.summary import SUMMARISED
    from saliency_robustness.vocabulary import SUBSETS

    summary = xr.Dataset(
        {
            "model_n_images": (("model", "subset"), np.zeros((1, len(SUBSETS)), dtype=int)),
            **{q: (("model", "sample"), np.full((1, 4), np.nan if q == "robustness" else 1.0)) for q in SUMMARISED},
        },
        coords={"model": ["gradnorm-lambda100-seed0"], "subset": list(SUBSETS), "quantity": list(SUMMARISED)},
    )
    with pytest.raises(PipelineError) as info:
        check_plottable(summary, "alignment_vs_robustness", "all")
    message = one_line(info.value)
    assert "gradnorm-lambda100-seed0" in message and "robustness" in message
